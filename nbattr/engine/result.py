"""The result of an attribution: the maps and their completeness receipt."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


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
    params : the effective options (steps and rule actually used, etc.).
    inputs : ``(N, ...)`` the attributed values at x (the input, or the layer's output at x).
    baselines : ``(N, ...)`` the baseline in the same space, or None.
    alphas : ``(S,)`` path points, for path methods.
    path_outputs : ``(S, N)`` the target score at x' + alpha (x - x').
    path_gradients : ``(S, N, ...)`` the gradient of the target score at each path point
        (interior gradients); kept for interior_gradients and for IG with ``keep_path=True``.
    unsupported : operation name -> number of calls that had no rule and were differentiated
        plainly (rule-based methods only; empty means every operation had a rule).
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

    @property
    def shape(self) -> torch.Size:
        return self.attributions.shape

    def total(self) -> Tensor:
        """``(N,)`` sum of the attributions of each example."""
        return self.attributions.flatten(1).sum(1)

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
        for i in range(min(n, 8)):
            row = f"  [{i}] target={int(self.target[i])} F(x)={float(self.outputs[i]):.6g}"
            if self.baseline_outputs is not None:
                row += f" F(x')={float(self.baseline_outputs[i]):.6g}"
            row += f" sum={float(self.total()[i]):.6g}"
            if self.delta is not None:
                row += f" delta={float(self.delta[i]):.3g}"
            lines.append(row)
        if n > 8:
            lines.append(f"  ... {n - 8} more")
        if self.unsupported:
            ops = ", ".join(f"{k} x{v}" for k, v in self.unsupported.items())
            lines.append(f"  operations without a rule (plain gradient used): {ops}")
        return "\n".join(lines)
