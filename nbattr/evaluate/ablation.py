"""Ablation curves and AOPC: does removing the features an attribution ranks highest change the score?

Deletion (Samek et al. 2017, "most relevant first"): starting from x, the top-ranked features are
replaced by baseline values in steps; a faithful attribution makes the target score fall fast.
Insertion: starting from the baseline x', the top-ranked features are put back first; a faithful
attribution makes the score rise fast. The area over the perturbation curve (AOPC) sums this up:

    AOPC (deletion)  = 1/(L+1) sum_{k=0..L} [f(x) - f(x_k)]
    AOPC (insertion) = 1/(L+1) sum_{k=0..L} [f(x_k) - f(x')]

where x_k is the input after step k (step 0 removes or inserts nothing) and L+1 is the number of
points of the curve. For both modes a larger AOPC means a more faithful ranking. Gradients of
Counterfactuals (Sundararajan et al. 2016, sec. 2.5) compares integrated gradients and plain
gradients this way by ablating the top pixels of an image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine.baselines import BaselineSpec
from ..engine.batching import BatchSize, run_chunked
from ..engine.errors import InputError, TargetError
from ..engine.guard import model_guard
from ..engine.problem import Problem, TargetSpec
from ..engine.result import Attribution

MODES = ("deletion", "insertion")
IMPORTANCE = ("abs", "signed")


@dataclass
class AblationResult:
    """An ablation (perturbation) curve for N examples at S points.

    Attributes
    ----------
    mode : ``"deletion"`` or ``"insertion"``.
    fractions : ``(S,)`` the requested share of features removed (deletion) or inserted (insertion).
    counts : ``(S, N)`` long, the number of features (groups) actually removed or inserted:
        ``round(fraction * n_features)``.
    n_features : ``(N,)`` long, how many features (groups) each example has.
    scores : ``(S, N)`` the target score after each step (the model's output, or its softmax
        probability with ``probability=True``).
    original : ``(N,)`` the score at x.
    baseline_score : ``(N,)`` the score at the baseline x' (every feature removed).
    target : ``(N,)`` long, the explained class.
    aopc : ``(N,)`` the area over the perturbation curve (see the module docstring): the mean of
        ``drop`` over the S points for deletion, of ``scores - baseline_score`` for insertion.
    """

    mode: str
    fractions: Tensor
    counts: Tensor
    n_features: Tensor
    scores: Tensor
    original: Tensor
    baseline_score: Tensor
    target: Tensor
    aopc: Tensor

    @property
    def drop(self) -> Tensor:
        """``(S, N)`` f(x) - score after each step (the score's fall relative to the original)."""
        return self.original[None] - self.scores

    def __repr__(self) -> str:
        aopc = ", ".join(f"{float(a):.4g}" for a in self.aopc[:8])
        more = " ..." if self.aopc.numel() > 8 else ""
        return (f"AblationResult(mode={self.mode!r}, points={self.fractions.numel()}, "
                f"examples={self.aopc.numel()}, aopc=[{aopc}{more}])")


def _fractions(steps: int | Sequence[float] | Tensor) -> Tensor:
    if isinstance(steps, bool):
        raise InputError(f"steps must be a positive int or a sequence of fractions, got {steps!r}")
    if isinstance(steps, (int, np.integer)):  # a count, numpy's too (np.int64(4) is no fraction)
        steps = int(steps)
        if steps < 1:
            raise InputError(f"steps must be a positive int, got {steps}")
        return torch.arange(steps + 1, dtype=torch.float64) / steps
    try:
        f = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"steps must be a positive int or a sequence of fractions, got {steps!r}") from None
    if f.numel() == 0:
        raise InputError("steps holds no fractions")
    if not torch.isfinite(f).all() or (f < 0).any() or (f > 1).any():
        raise InputError(f"fractions must lie in [0, 1], got {f.tolist()}")
    if (f[1:] <= f[:-1]).any():
        raise InputError(f"fractions must be strictly increasing, got {f.tolist()}")
    return f


def _group_ids(feature_mask: Tensor | None, attr: Tensor) -> Tensor:
    """``(N, ...)`` long group id of every element (ids need not be contiguous)."""
    n = attr.shape[0]
    if feature_mask is None:
        if attr.dim() == 4:  # (N, C, H, W): one group per pixel, all channels together
            h, w = attr.shape[2:]
            ids = torch.arange(h * w, device=attr.device).view(1, 1, h, w)
            return ids.expand(attr.shape)
        return torch.arange(attr[0].numel(), device=attr.device).view(1, *attr.shape[1:]).expand(attr.shape)
    if not isinstance(feature_mask, Tensor):
        raise InputError(f"feature_mask must be an integer tensor, got {type(feature_mask).__name__}")
    if feature_mask.is_floating_point() or feature_mask.is_complex() or feature_mask.dtype == torch.bool:
        raise InputError(f"feature_mask must hold integer group ids, got dtype {feature_mask.dtype}")
    m = feature_mask.to(attr.device).long()
    try:
        if m.dim() == attr.dim() and m.shape[0] in (1, n):
            m = torch.broadcast_to(m, attr.shape)
        else:  # a mask for one example, broadcast over the batch
            m = torch.broadcast_to(m, attr.shape[1:]).unsqueeze(0).expand(attr.shape)
    except RuntimeError:
        raise InputError(f"feature_mask of shape {tuple(feature_mask.shape)} does not broadcast to the "
                         f"attributions {tuple(attr.shape)} (or to one example {tuple(attr.shape[1:])})") from None
    return m


def _ranks(attr: Tensor, ids: Tensor, importance: str) -> tuple[Tensor, Tensor]:
    """Rank of every element's group (0 = most important) and the number of groups per example."""
    vals = attr.abs() if importance == "abs" else attr
    n = attr.shape[0]
    ranks = torch.empty(ids.shape, dtype=torch.long, device=attr.device)
    counts = torch.empty(n, dtype=torch.long)
    for i in range(n):
        uniq, inv = torch.unique(ids[i].reshape(-1), return_inverse=True)
        score = torch.zeros(uniq.numel(), dtype=torch.float64, device=attr.device)
        score.index_add_(0, inv, vals[i].reshape(-1).double())
        order = torch.argsort(score, descending=True, stable=True)  # ties: lower group id first
        rank_of_group = torch.empty_like(order)
        rank_of_group[order] = torch.arange(order.numel(), device=attr.device)
        ranks[i] = rank_of_group[inv].view(ids.shape[1:])
        counts[i] = uniq.numel()
    return ranks, counts


def ablation_curve(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    attributions: Tensor | Attribution,
    *,
    target: TargetSpec = None,
    baseline: BaselineSpec = "zeros",
    steps: int | Sequence[float] | Tensor = 10,
    mode: str = "deletion",
    feature_mask: Tensor | None = None,
    importance: str = "abs",
    probability: bool = False,
    batch_size: BatchSize = "auto",
    forward_kwargs: dict[str, Any] | None = None,
) -> AblationResult:
    """Remove (or insert) the top features by importance in steps and record the target score.

    Parameters
    ----------
    model : ``nn.Module`` or callable mapping ``(N, ...)`` to scores ``(N, C)`` or ``(N,)``. It runs
        under ``torch.no_grad()`` and is left exactly as found.
    x : ``(N, ...)`` float inputs (a single example without a batch dimension is accepted as for
        :func:`nbattr.attribute`).
    attributions : ``(N, ...)`` tensor shaped like x, or an :class:`~nbattr.Attribution` of x (its
        ``attributions`` are used, and its ``target`` when ``target`` is None).
    target : None (the argmax at x, or the Attribution's target), an int or N ints.
    baseline : the values that replace removed features (any baseline spec of
        :func:`nbattr.attribute`: ``"zeros"``, a number, ``"blur"``, ``"uniform"``, ``"mean"``, a
        tensor, a callable).
    steps : an int L (the curve has L + 1 points at fractions 0, 1/L, ..., 1) or an increasing
        sequence of fractions in [0, 1]. At fraction f the top ``round(f * n_features)`` features
        are removed (deletion) or inserted (insertion).
    mode : ``"deletion"`` (start at x, most important removed first) or ``"insertion"`` (start at
        the baseline, most important inserted first).
    feature_mask : integer group ids shaped like x (or like one example, broadcast over the batch):
        elements with the same id are one feature, removed together, and the group's importance is
        the sum over its elements. Default: for ``(N, C, H, W)`` inputs one group per pixel (all
        channels of a pixel together, importance = sum over channels of ``|attribution|`` with
        ``importance="abs"``); otherwise every element is its own feature.
    importance : ``"abs"`` ranks by the sum of ``|attribution|`` (the usual heatmap), ``"signed"``
        by the signed sum (most positive evidence first, as in Samek et al.'s MoRF ordering).
    probability : score with the softmax probability of the target instead of the raw output.
    batch_size : rows per model call, or ``"auto"``.
    forward_kwargs : keyword arguments of every model call, per-example tensors indexed with the
        rows (as for :func:`nbattr.attribute`).

    Returns
    -------
    AblationResult
        ``scores`` at every fraction, ``original`` f(x), ``baseline_score`` f(x'), ``drop`` and
        the ``aopc`` of each example. For deletion ``scores[0] == original`` when fractions start
        at 0 and ``scores[-1] == baseline_score`` when they end at 1; insertion the other way round.

    Raises
    ------
    InputError
        Shapes that do not match, an unknown mode or importance, bad fractions or feature mask.
    TargetError
        A target out of range, or not one per example.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if importance not in IMPORTANCE:
        raise InputError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    fractions = _fractions(steps)
    if isinstance(attributions, Attribution):
        attributions.require_single_target("ablation_curve")
        if target is None:
            target = attributions.target
        attr = attributions.attributions
    elif isinstance(attributions, Tensor):
        attr = attributions
    else:
        raise InputError(f"attributions must be a tensor or an Attribution, got {type(attributions).__name__}")
    with model_guard(model):
        p = Problem(model, x, target=target, baseline=baseline, batch_size=batch_size,
                    forward_kwargs=forward_kwargs)
        if p.target.dim() != 1:
            raise TargetError(f"give one target per example (an int or N ints); got {p.target.shape[1]} "
                              "per example: call once per target")
        if p.scalar_output and probability:
            raise InputError("probability=True needs a model with (N, C) class scores; this one returns (N,)")
        attr = attr.detach().to(p.device)
        if attr.shape != p.x.shape:
            if p.unbatched and attr.shape == p.x.shape[1:]:
                attr = attr.unsqueeze(0)
            else:
                raise InputError(f"attributions have shape {tuple(attr.shape)}; expected the input's "
                                 f"shape {tuple(p.x.shape)} (input-space attributions)")
        if not attr.is_floating_point() or not torch.isfinite(attr).all():
            raise InputError("attributions must be finite floating-point values")
        ranks, n_feat = _ranks(attr, _group_ids(feature_mask, attr), importance)
        counts = torch.round(fractions[:, None] * n_feat[None].double()).long()  # (S, N)
        xb = p.x
        base = p.baselines
        s, n = fractions.numel(), p.n
        scores = torch.empty(s, n, dtype=p.outputs.dtype, device=p.device)
        counts_dev = counts.to(p.device)

        def score(full: Tensor, rows: Tensor) -> Tensor:
            if probability:
                full = full.softmax(1)
            return p.select(full, p.target[rows])

        def work(sl: slice) -> None:
            idx = torch.arange(sl.start, sl.stop, device=p.device)
            k, rows = idx // n, idx % n
            shape = (len(idx),) + (1,) * (xb.dim() - 1)
            chosen = ranks[rows] < counts_dev[k, rows].view(shape)  # the top counts[k] groups
            if mode == "deletion":
                z = torch.where(chosen, base[rows], xb[rows])
            else:
                z = torch.where(chosen, xb[rows], base[rows])
            with torch.no_grad():
                scores[k, rows] = score(p.forward_full(z, rows), rows)

        row_bytes = 4 * xb[0].numel() * xb.element_size()
        run_chunked(s * n, work, batch_size=batch_size, device=p.device, row_bytes=row_bytes, saves=False)
        all_rows = torch.arange(n, device=p.device)
        with torch.no_grad():
            original = score(p.logits, all_rows)
            base_score = score(p.forward_full(base, all_rows), all_rows)
    if mode == "deletion":
        aopc = (original[None] - scores).mean(0)
    else:
        aopc = (scores - base_score[None]).mean(0)
    return AblationResult(
        mode=mode, fractions=fractions, counts=counts, n_features=n_feat, scores=scores.cpu(),
        original=original.cpu(), baseline_score=base_score.cpu(), target=p.target.cpu(), aopc=aopc.cpu(),
    )
