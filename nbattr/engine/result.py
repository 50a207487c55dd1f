"""The result of an attribution: the maps and their completeness receipt."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

#: the ``params`` that may hold one value per example (``steps="auto"``: the gradients each example
#: used, whether it met the tolerance, the |delta| it reached); every other param is one setting
#: for the whole call, even a tuple (occlusion's ``window``) or a tensor (Shapley's ``feature_mask``)
PER_EXAMPLE_PARAMS = ("steps", "converged", "delta_reached")


@dataclass
class Attribution:
    """Attributions for a batch of N examples, with what is needed to check and display them.

    Attributes
    ----------
    attributions : ``(N, ...)`` same shape as the attributed tensor (the input, or the layer's output).
    method : the registry name of the method.
    target : ``(N,)`` long, the class whose score is explained (0 for models with ``(N,)`` outputs).
    outputs : ``(N,)`` the target score F(x).
    baseline_outputs : ``(N,)`` the target score F(x') at the baseline, or None for baseline-free methods.
    delta : ``(N,)`` sum of attributions over non-batch dims minus (outputs - baseline_outputs), for
        methods that promise completeness (integrated_gradients, deeplift, shapley_sampling); else None.
    params : the effective options (steps and rule actually used, etc.); those named in
        :data:`PER_EXAMPLE_PARAMS` may be lists of one value per example.
    inputs : ``(N, ...)`` the attributed values at x (the input, or the layer's output at x).
    baselines : ``(N, ...)`` the baseline in the same space, or None.
    alphas : ``(S,)`` path points, for path methods.
    path_outputs : ``(S, N)`` the target score at x' + alpha (x - x').
    path_gradients : ``(S, N, ...)`` the gradient of the target score at each path point
        (interior gradients); kept for interior_gradients and for IG with ``keep_path=True``.
    unsupported : operation name -> number of calls that had no rule and were differentiated
        plainly (rule-based methods only; empty means every operation had a rule).
    stderr : ``(N, ...)`` like ``attributions``: the Monte-Carlo standard error of each attribution,
        for the sampling estimators (``shapley_sampling``: over its orderings; ``smoothgrad``'s
        mean variant: over its noise samples); None for exact methods and where it is not
        estimable (a single ordering or sample). ``delta`` cannot show this error: every
        ordering of Shapley sampling sums exactly to F(x) - F(x'), however few there are.

    Several targets per example
    ---------------------------
    When :func:`nbattr.attribute` is given K targets per example (an ``(N, K)`` target or
    ``"topK"``), every per-example tensor carries a K axis right after N: ``attributions``
    ``(N, K, ...)``, ``target``, ``outputs``, ``baseline_outputs`` and ``delta`` ``(N, K)``,
    ``path_outputs`` ``(S, N, K)``, ``path_gradients`` ``(S, N, K, ...)``, ``stderr``
    ``(N, K, ...)``; ``inputs``,
    ``baselines`` and ``alphas`` have no K axis (they do not depend on the target). ``multi`` is
    then True. :meth:`for_target` and :meth:`split` return ordinary single-target results.
    """

    attributions: Tensor
    method: str
    target: Tensor
    outputs: Tensor
    baseline_outputs: Tensor | None = None
    delta: Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)
    inputs: Tensor | None = None
    baselines: Tensor | None = None
    alphas: Tensor | None = None
    path_outputs: Tensor | None = None
    path_gradients: Tensor | None = None
    unsupported: dict[str, int] = field(default_factory=dict)
    stderr: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.attributions.shape

    @property
    def multi(self) -> bool:
        """Whether this result holds K targets per example (a K axis after N)."""
        return self.target.dim() == 2

    def require_single_target(self, what: str) -> None:
        """Raise :class:`~nbattr.InputError` naming ``what`` when this result holds several
        targets per example (for the checks in :mod:`nbattr.evaluate`, which take one)."""
        if self.multi:
            raise InputError(
                f"{what} takes one target per example; this result holds {self.target.shape[1]} "
                f"(attributions {tuple(self.attributions.shape)}, a K axis after N): pass r.for_target(j) "
                "for target j, or each result of r.split()")

    def total(self) -> Tensor:
        """``(N,)`` sum of the attributions of each example (``(N, K)`` with several targets)."""
        return self.attributions.flatten(2 if self.multi else 1).sum(-1)

    def for_target(self, j: int) -> Attribution:
        """The single-target result of the j-th target of each example (``target[:, j]``).

        Equal to what :func:`nbattr.attribute` returns for that one target, without the K axis.
        """
        if not self.multi:
            raise ValueError("for_target needs a result with several targets per example (target (N, K))")
        k = self.target.shape[1]
        if not -k <= j < k:
            raise IndexError(f"target index {j} is out of range for K = {k} targets per example")

        def pick(t: Tensor | None, dim: int) -> Tensor | None:
            return None if t is None else t.select(dim, j)

        return replace(
            self,
            attributions=self.attributions[:, j],
            target=self.target[:, j],
            outputs=self.outputs[:, j],
            baseline_outputs=pick(self.baseline_outputs, 1),
            delta=pick(self.delta, 1),
            path_outputs=pick(self.path_outputs, 2),
            path_gradients=pick(self.path_gradients, 2),
            stderr=pick(self.stderr, 1),
            params={k_: v for k_, v in self.params.items() if k_ != "targets"},
            unsupported=dict(self.unsupported),
        )

    def split(self) -> list[Attribution]:
        """``[for_target(0), ..., for_target(K - 1)]``."""
        if not self.multi:
            raise ValueError("split needs a result with several targets per example (target (N, K))")
        return [self.for_target(j) for j in range(self.target.shape[1])]

    @staticmethod
    def stack(parts: list[Attribution], params: dict[str, Any] | None = None) -> Attribution:
        """Join K single-target results of the same examples into one with a K axis after N.

        ``unsupported`` counts are summed; ``params`` are the first part's, updated by ``params``.
        """
        if not parts or any(r.multi for r in parts):
            raise ValueError("stack needs one or more single-target results")
        first = parts[0]

        def join(name: str, dim: int) -> Tensor | None:
            vals = [getattr(r, name) for r in parts]
            if any(v is None for v in vals):
                return None
            return torch.stack(vals, dim)

        unsupported: dict[str, int] = {}
        for r in parts:
            for op, n in r.unsupported.items():
                unsupported[op] = unsupported.get(op, 0) + n
        return replace(
            first,
            attributions=join("attributions", 1),
            target=join("target", 1),
            outputs=join("outputs", 1),
            baseline_outputs=join("baseline_outputs", 1),
            delta=join("delta", 1),
            path_outputs=join("path_outputs", 2),
            path_gradients=join("path_gradients", 2),
            stderr=join("stderr", 1),
            params={**first.params, **(params or {})},
            unsupported=unsupported,
        )

    def to(self, device: str | torch.device) -> Attribution:
        """A copy with every tensor moved to ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return Attribution(**kw)

    def cpu(self) -> Attribution:
        return self.to("cpu")

    def __repr__(self) -> str:
        n = self.attributions.shape[0]
        lines = [
            f"Attribution(method={self.method!r}, shape={tuple(self.attributions.shape)}, "
            f"dtype={self.attributions.dtype}, device={self.attributions.device})"
        ]
        if self.multi:
            lines[0] = lines[0][:-1] + f", {self.target.shape[1]} targets per example)"
            tot = self.total()
            for i in range(min(n, 8)):
                lines.append(f"  [{i}] target={self.target[i].tolist()} "
                             f"F(x)={[float(f'{v:.6g}') for v in self.outputs[i].tolist()]} "
                             f"sum={[float(f'{v:.6g}') for v in tot[i].tolist()]}")
                if self.delta is not None:
                    lines[-1] += f" delta={[float(f'{v:.3g}') for v in self.delta[i].tolist()]}"
            if n > 8:
                lines.append(f"  ... {n - 8} more")
            return "\n".join(lines)
        for i in range(min(n, 8)):
            row = f"  [{i}] target={int(self.target[i])} F(x)={float(self.outputs[i]):.6g}"
            if self.baseline_outputs is not None:
                row += f" F(x')={float(self.baseline_outputs[i]):.6g}"
            row += f" sum={float(self.total()[i]):.6g}"
            if self.delta is not None:
                row += f" delta={float(self.delta[i]):.3g}"
            if self.stderr is not None:
                row += f" stderr<={float(self.stderr[i].abs().max()):.3g}"
            lines.append(row)
        if n > 8:
            lines.append(f"  ... {n - 8} more")
        if self.unsupported:
            ops = ", ".join(f"{k} x{v}" for k, v in self.unsupported.items())
            lines.append(f"  operations without a rule (plain gradient used): {ops}")
        return "\n".join(lines)
