"""Attribution -> what the views draw (numpy arrays and a receipt). No bytes here (see codec).

Reductions (done in Python, sent as float32):

- image ``(1, C, H, W)``: ``maps[0]`` = sum over channels of |a| (the pixel importance of the IG
  paper, the default), ``maps[1]`` = signed sum over channels. The page's sign modes use them:
  absolute -> maps[0]; signed -> maps[1] (diverging); positive / negative -> max(+/-maps[1], 0).
- text ``(1, L, D)`` over an embedding layer, or tabular ``(1, F)``: per token / feature sum over
  the remaining dims, again as ``[abs-sum, signed-sum]``.

α frames (path methods run with ``keep_path=True``): frame k is the channel sum of
|g_k * (x - x')|, the interior gradient at α_k scaled by the input difference (paper Fig. 3);
``curve`` holds α_k, F(x' + α_k (x - x')) and F(x') + the cumulative trapezoid integral of
sum(g * (x - x')) up to α_k (which ends at F(x') + sum of attributions with evenly spaced
trapezoid nodes; under ``steps="auto"`` the nodes are Clenshaw-Curtis's, whose weights are not
a running sum, so the curve's trapezoid end is within the two rules' difference of it). Frames are
float32 (the widget quantises them to uint8 once, for its cache and the wire); maps and curve
float64.

:func:`build` takes a single-target result; for a multi-target one (the widget's prefetch of the
other top classes) build each ``attr.for_target(j)``: the payload is identical to a separate run
(with a fixed step count; under ``steps="auto"`` the K targets share their nodes, refined until
every target meets the tolerance, so a target may get more nodes than its own run would take).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engine.errors import CoarseDeltaWarning, MissingRuleWarning


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def reduce(a: np.ndarray, kind: str) -> np.ndarray:
    """``(N, ...)`` attributions of example 0 -> ``(2, *view_shape)`` [abs-sum, signed-sum]."""
    a0 = a[0]
    if kind == "image":
        if a0.ndim == 2:
            a0 = a0[None]
        return np.stack([np.abs(a0).sum(0), a0.sum(0)])
    if a0.ndim == 1:
        return np.stack([np.abs(a0), a0])
    flat = a0.reshape(a0.shape[0], -1)
    return np.stack([np.abs(flat).sum(1), flat.sum(1)])


def _steps_used(attr: Any) -> int | None:
    """The gradients a path method used for the (one) example: ``params["steps"]`` is an int for a
    fixed count and a per-example list under ``steps="auto"``; None for other methods."""
    s = attr.params.get("steps") if attr.alphas is not None else None
    if isinstance(s, (list, tuple)):
        s = s[0] if s else None
    return None if s is None else int(s)


def _stderr(attr: Any, a: np.ndarray) -> dict[str, Any] | None:
    """A sampling estimator's error for the receipt: its largest standard error, also as a fraction
    of the largest |attribution| (what decides whether the map's brightest parts are settled), and
    the draws it came from. None for exact methods."""
    if attr.stderr is None:
        return None
    s = float(np.abs(_np(attr.stderr)[0]).max())
    top = float(np.abs(a[0]).max())
    draws = attr.params.get("permutations", attr.params.get("samples"))
    return {"max": s, "relative": s / top if top > 0 else None,
            "draws": None if draws is None else int(draws),
            "of": "permutations" if "permutations" in attr.params else "samples"}


def build(attr: Any, kind: str, label: str | None = None, notes: list[Warning] | None = None) -> dict[str, Any]:
    """The payload of one single-target result; ``notes``: the engine's warnings for it, as
    :func:`nbattr.watch` hands them over (the receipt lists them, each once, except those the
    receipt shows its own way)."""
    a = _np(attr.attributions)
    out: dict[str, Any] = {"maps": reduce(a, kind)}
    fx = float(attr.outputs[0])
    fb = None if attr.baseline_outputs is None else float(attr.baseline_outputs[0])
    total = float(a[0].sum())
    # a delta off by more than 5% is the receipt's own red mark, with its advice on hover; a jump at
    # the baseline is not (more steps do not help there: a BaselineJumpWarning), so that note stays
    kept = [n for n in notes or () if not isinstance(n, CoarseDeltaWarning)]
    unsupported = {str(k): int(v) for k, v in (attr.unsupported or {}).items()}
    # the warning about operations without a rule becomes the badge's hover text (the badge lists them)
    rule_notes = [str(n) for n in kept if unsupported and isinstance(n, MissingRuleWarning)]
    notes = list(dict.fromkeys(str(n) for n in kept if str(n) not in rule_notes))
    out["receipt"] = {
        "method": attr.method,
        "target": int(attr.target[0]),
        "label": label,
        "fx": fx,
        "fbase": fb,
        "total": total,
        "delta": None if attr.delta is None else float(attr.delta[0]),
        "gap": None if fb is None else fx - fb,
        "unsupported": unsupported,
        "unsupported_note": rule_notes[0] if rule_notes else None,
        "steps": _steps_used(attr),
        "auto": "tol" in attr.params,  # the engine chose the steps (steps="auto")
        "notes": notes,
        "params": {k: v for k, v in attr.params.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "stderr": _stderr(attr, a),
    }
    if attr.path_gradients is not None and attr.path_outputs is not None and attr.baselines is not None:
        g = _np(attr.path_gradients)[:, 0]  # (S, ...)
        diff = _np(attr.inputs)[0] - _np(attr.baselines)[0]
        contrib = g * diff[None]  # (S, ...)
        alphas = _np(attr.alphas)
        frames = np.stack([reduce(np.abs(c)[None], kind)[0] for c in contrib])
        per_step = contrib.reshape(contrib.shape[0], -1).sum(1)
        cum = np.zeros_like(per_step)
        if len(alphas) > 1:
            da = np.diff(alphas)
            cum[1:] = np.cumsum(da * (per_step[1:] + per_step[:-1]) / 2.0)
        base = fb if fb is not None else 0.0
        out["frames"] = frames.astype(np.float32)  # the widget quantises them to uint8 (codec) for its cache
        out["curve"] = np.stack([alphas, _np(attr.path_outputs)[:, 0], base + cum])
    return out
