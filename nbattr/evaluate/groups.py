"""Feature groups: attributions summed over named groups of features, and each group's share.

Sundararajan, Taly and Yan ("Gradients of Counterfactuals", 2016, §3.1) sum integrated gradients
over groups of features of a molecule model (atom features, bonded atom pairs, ...) and report
each group's part of the prediction, e.g. "bonded pairs carry 46% of the prediction". With a
complete method (integrated gradients, DeepLIFT, Shapley sampling) the attributions add up to
F(x) - F(x'), so a group's total divided by F(x) - F(x') is its share of the change of the score
from the baseline to the input.

:func:`group_shares` does this for any grouping: a mapping ``name -> feature indices / bool
mask``, or an integer group-id mask like Captum's ``feature_mask``. Features in no group form the
*remainder*. The completeness error ``delta = sum(attributions) - (F(x) - F(x'))`` is reported on
its own row and never spread over the groups: the rows "groups + remainder - delta" add up to
F(x) - F(x') exactly, so their shares add up to 1 whatever delta is, and a large delta is seen
instead of hidden in rescaled shares.

Groups must not overlap (an element in two groups would be counted twice and the shares would
not add up); overlapping groups raise :class:`~nbattr.engine.errors.InputError`. Call
:func:`group_shares` once per grouping to compare two partitions of the same features (say by
measurement and by statistic).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.errors import InputError
from ..engine.result import Attribution

GroupSpec = Mapping[str, Any] | Tensor | Sequence[int]

#: row labels of the rows that are not groups
REMAINDER = "(in no group)"
DELTA = "(-delta: not attributed)"
TOTAL = "F(x) - F(x')"
SUM = "sum of attributions"


@dataclass
class GroupShares:
    """Attributions summed per feature group for N examples.

    Attributes
    ----------
    names : the G group names, in the order given.
    totals : ``(N, G)`` sum of the attributions over each group's elements.
    abs_totals : ``(N, G)`` sum of ``|attribution|`` over each group's elements.
    sizes : ``(N, G)`` number of elements in each group (the same row for every example unless
        the grouping was given per example).
    remainder : ``(N,)`` sum of the attributions of the elements in no group.
    abs_remainder : ``(N,)`` the same for ``|attribution|``.
    remainder_size : ``(N,)`` number of elements in no group.
    change : ``(N,)`` F(x) - F(x'), or None when unknown (a raw tensor without ``change``, or a
        method without a baseline such as saliency).
    delta : ``(N,)`` ``sum(attributions) - change``, or None when ``change`` is None.
    method : the attribution method's name, when known.
    pooled_from : for the result of :meth:`pooled`, the number of examples pooled; else None.
    """

    names: tuple[str, ...]
    totals: Tensor
    abs_totals: Tensor
    sizes: Tensor
    remainder: Tensor
    abs_remainder: Tensor
    remainder_size: Tensor
    change: Tensor | None = None
    delta: Tensor | None = None
    method: str | None = None
    pooled_from: int | None = None

    # -- shares --------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.totals.shape[0])

    @property
    def reference(self) -> str:
        """What the shares are fractions of: ``"F(x) - F(x')"`` or ``"sum of attributions"``."""
        return TOTAL if self.change is not None else SUM

    @property
    def denominator(self) -> Tensor:
        """``(N,)`` F(x) - F(x') when known, else the sum of the attributions."""
        if self.change is not None:
            return self.change
        return self.totals.sum(1) + self.remainder

    def _share(self, v: Tensor) -> Tensor:
        d = self.denominator
        d = d.view(-1, *([1] * (v.dim() - 1)))
        nan = torch.full_like(v, math.nan)
        return torch.where(d != 0, v / torch.where(d != 0, d, torch.ones_like(d)), nan)

    @property
    def shares(self) -> Tensor:
        """``(N, G)`` each group's total divided by :attr:`denominator` (NaN where it is 0)."""
        return self._share(self.totals)

    @property
    def remainder_share(self) -> Tensor:
        """``(N,)`` the remainder divided by :attr:`denominator`."""
        return self._share(self.remainder)

    @property
    def delta_share(self) -> Tensor | None:
        """``(N,)`` delta / (F(x) - F(x')), or None. ``shares.sum(1) + remainder_share - delta_share``
        is 1 (up to rounding) for any delta."""
        return None if self.delta is None else self._share(self.delta)

    @property
    def abs_shares(self) -> Tensor:
        """``(N, G)`` each group's part of the total ``|attribution|`` (with the remainder these add
        up to 1; NaN where every attribution is 0)."""
        tot = self.abs_totals.sum(1, keepdim=True) + self.abs_remainder.unsqueeze(1)
        nan = torch.full_like(self.abs_totals, math.nan)
        return torch.where(tot > 0, self.abs_totals / torch.where(tot > 0, tot, torch.ones_like(tot)), nan)

    @property
    def abs_remainder_share(self) -> Tensor:
        """``(N,)`` the remainder's part of the total ``|attribution|``."""
        tot = self.abs_totals.sum(1) + self.abs_remainder
        nan = torch.full_like(tot, math.nan)
        return torch.where(tot > 0, self.abs_remainder / torch.where(tot > 0, tot, torch.ones_like(tot)), nan)

    def pooled(self) -> GroupShares:
        """One row pooling the N examples: the mean of each total (and of F(x) - F(x'), delta), so
        its shares are ratios of means, ``sum_i total_i / sum_i (F(x_i) - F(x'_i))``. Unlike the
        mean of per-example shares (``table("mean")``), examples with a small F(x) - F(x') do not
        dominate it. Meaningful when the changes have one sign (e.g. every target is the class
        the model predicts and the baseline scores it lower)."""

        def m(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.to(self.totals.dtype).mean(0, keepdim=True)

        return GroupShares(
            names=self.names, totals=m(self.totals), abs_totals=m(self.abs_totals), sizes=m(self.sizes),
            remainder=m(self.remainder), abs_remainder=m(self.abs_remainder),
            remainder_size=m(self.remainder_size), change=m(self.change), delta=m(self.delta),
            method=self.method, pooled_from=self.n)

    # -- tables ----------------------------------------------------------------------------------
    def table(self, example: int | str = 0, sort: bool = False) -> list[dict[str, Any]]:
        """The groups of one example (or their mean over the examples) as a list of rows.

        Parameters
        ----------
        example : an example index, or ``"mean"``: the mean over the N examples of each
            example's totals and of each example's shares (the mean of ratios, so every example
            counts the same whatever the size of its F(x) - F(x')).
        sort : order the groups by decreasing ``|share|`` (the extra rows stay last).

        Returns
        -------
        list of dict
            One row per group with keys ``group``, ``size``, ``total``, ``share`` and
            ``abs_share``; then a row ``"(in no group)"`` when some element is in no group; then,
            when F(x) - F(x') is known, a row ``"(-delta: not attributed)"`` holding ``-delta``
            and a last row ``"F(x) - F(x')"`` whose total is F(x) - F(x') and whose share is 1
            (the rows above it add up to it). Without F(x) - F(x') the last row is the
            ``"sum of attributions"``. ``abs_share`` is None on the delta and last rows. Sizes are
            means over the examples for ``"mean"``.
        """
        sel = self._select(example)
        shares, abs_shares = sel(self.shares), sel(self.abs_shares)
        rows = [
            {"group": name, "size": float(sel(self.sizes.to(self.totals.dtype))[g]),
             "total": float(sel(self.totals)[g]), "share": float(shares[g]),
             "abs_share": float(abs_shares[g])}
            for g, name in enumerate(self.names)
        ]
        if sort:
            rows.sort(key=lambda r: -abs(r["share"]) if not math.isnan(r["share"]) else 0.0)
        if bool((self.remainder_size > 0).any()):
            rows.append({"group": REMAINDER, "size": float(sel(self.remainder_size.to(self.totals.dtype))),
                         "total": float(sel(self.remainder)), "share": float(sel(self.remainder_share)),
                         "abs_share": float(sel(self.abs_remainder_share))})
        size = float(sel((self.sizes.sum(1) + self.remainder_size).to(self.totals.dtype)))
        if self.change is not None and self.delta is not None:
            rows.append({"group": DELTA, "size": None, "total": -float(sel(self.delta)),
                         "share": -float(sel(self.delta_share)), "abs_share": None})
            rows.append({"group": TOTAL, "size": size, "total": float(sel(self.change)),
                         "share": float(sel(self._share(self.change))), "abs_share": None})
        else:
            rows.append({"group": SUM, "size": size, "total": float(sel(self.denominator)),
                         "share": float(sel(self._share(self.denominator))), "abs_share": None})
        return rows

    def text(self, example: int | str = 0, sort: bool = False, digits: int = 4) -> str:
        """:meth:`table` as a plain-text table (no pandas needed)."""
        rows = self.table(example, sort=sort)
        head = ["group", "size", "total", "share", "|attr| share"]

        def fmt_size(v: Any) -> str:
            if v is None:
                return ""
            return str(int(v)) if float(v).is_integer() else f"{v:.1f}"

        def pct(v: Any) -> str:
            return "" if v is None else ("nan" if math.isnan(v) else f"{100 * v:.1f}%")

        body = [[r["group"], fmt_size(r["size"]), f"{r['total']:.{digits}g}", pct(r["share"]),
                 pct(r["abs_share"])] for r in rows]
        widths = [max(len(head[j]), *(len(b[j]) for b in body)) for j in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

        which = self._which(example)
        title = f"{self.method or 'attributions'} by group ({which}); shares of {self.reference}"
        rule = "-" * len(line(head))
        out = [title, line(head), rule]
        out += [line(b) for b in body[:-1]] + [rule, line(body[-1])]
        return "\n".join(out)

    def _which(self, example: int | str) -> str:
        if self.pooled_from is not None:
            return f"pooled over {self.pooled_from} examples: mean totals / mean {self.reference}"
        return f"mean of {self.n} examples" if example == "mean" else f"example {example}"

    def __str__(self) -> str:
        return self.text(0 if self.n == 1 else "mean")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython: show the table
        p.text(str(self))

    def _select(self, example: int | str) -> Callable[[Tensor], Tensor]:
        if isinstance(example, str):
            if example != "mean":
                raise InputError(f"example must be an int or 'mean', got {example!r}")

            def mean(v: Tensor) -> Tensor:
                return v.nanmean(0) if v.is_floating_point() else v.double().mean(0)

            return mean
        if isinstance(example, bool) or not isinstance(example, int):
            raise InputError(f"example must be an int or 'mean', got {example!r}")
        if not -self.n <= example < self.n:
            raise InputError(f"example {example} is out of range for {self.n} example(s)")
        return lambda v: v[example]

    # -- picture ---------------------------------------------------------------------------------
    def plot(self, example: int | str = 0, ax: Any = None, sort: bool = True, kind: str = "share") -> Any:
        """Horizontal bars of each group's share (matplotlib, imported here).

        Parameters
        ----------
        example : an example index or ``"mean"`` (see :meth:`table`).
        ax : matplotlib axes to draw on; a new figure when None.
        sort : order the groups by decreasing ``|share|``.
        kind : ``"share"`` (signed share of F(x) - F(x')), ``"abs_share"`` (part of ``|attr|``)
            or ``"total"`` (the sums themselves).

        Returns
        -------
        the matplotlib axes. The remainder and ``-delta`` rows are drawn in grey when present (the
        ``-delta`` row only when it is at least 0.5% of the reference).
        """
        if kind not in ("share", "abs_share", "total"):
            raise InputError(f"kind must be 'share', 'abs_share' or 'total', got {kind!r}")
        import matplotlib.pyplot as plt

        rows = self.table(example, sort=sort)[:-1]  # the last row is the reference itself
        rows = [r for r in rows if r["group"] != DELTA or abs(r["share"]) >= 0.005]
        if kind == "abs_share":
            rows = [r for r in rows if r["abs_share"] is not None]
        values = [r[kind] for r in rows]
        labels = [r["group"] for r in rows]
        extra = {REMAINDER, DELTA}
        colors = ["0.6" if lab in extra else ("tab:red" if v >= 0 else "tab:blue")
                  for lab, v in zip(labels, values)]
        if ax is None:
            _, ax = plt.subplots(figsize=(5.5, 0.32 * len(rows) + 1.0))
        pos = list(range(len(rows)))[::-1]
        scale = 100.0 if kind != "total" else 1.0
        ax.barh(pos, [scale * v for v in values], color=colors)
        ax.set_yticks(pos)
        ax.set_yticklabels(labels)
        ax.axvline(0, color="k", lw=0.6)
        xlabel = {"share": f"% of {self.reference}", "abs_share": "% of sum |attribution|",
                  "total": "sum of attributions"}[kind]
        ax.set_xlabel(xlabel)
        if self.pooled_from is not None:
            which = f"pooled over {self.pooled_from} examples"
        else:
            which = f"mean of {self.n} examples" if example == "mean" else f"example {example}"
        ax.set_title(f"{self.method or 'attributions'} by group\n({which})", fontsize=9)
        return ax


# -- building the groups ---------------------------------------------------------------------------
def group_by(feature_names: Sequence[str], key: Callable[[str], Hashable]) -> dict[str, list[int]]:
    """Group feature indices by ``key(name)``, in order of first appearance.

    ``group_by(["mean radius", "radius error", "worst radius"], lambda s: "radius")`` gives
    ``{"radius": [0, 1, 2]}``. A key of None leaves the feature in no group.
    """
    out: dict[str, list[int]] = {}
    for i, name in enumerate(feature_names):
        k = key(name)
        if k is not None:
            out.setdefault(str(k), []).append(i)
    return out


def _labels_from_mapping(groups: Mapping[str, Any], shape: tuple[int, ...], full: tuple[int, ...],
                         feature_names: Sequence[str] | None, device: torch.device) -> tuple[Tensor, list[str]]:
    """``(labels, names)``: labels ``-1`` (no group) or ``0..G-1``, broadcastable to ``full``."""
    numel = math.prod(shape)
    index = {str(s): i for i, s in enumerate(feature_names)} if feature_names is not None else None
    if feature_names is not None and len(index) != len(feature_names):
        raise InputError("feature_names has duplicates; names must identify features uniquely")
    names = [str(k) for k in groups]
    if len(set(names)) != len(names):
        raise InputError(f"group names must be unique as strings, got {list(groups)}")
    masks = []
    for name, spec in zip(names, groups.values()):
        masks.append(_group_mask(name, spec, shape, full, numel, index, device))
    # Masks are (..., *shape) bool; combine them into one label tensor and reject overlaps.
    lead = full[:1] if any(m.dim() > len(shape) for m in masks) else ()
    count = torch.zeros(*lead, *shape, dtype=torch.long, device=device)
    labels = torch.full((*lead, *shape), -1, dtype=torch.long, device=device)
    for g, m in enumerate(masks):
        m = torch.broadcast_to(m, count.shape)
        both = m & (count > 0)
        if bool(both.any()):
            other = int(labels[both].flatten()[0])
            raise InputError(
                f"groups {names[other]!r} and {names[g]!r} overlap ({int(both.sum())} shared element(s)); "
                "groups must be disjoint so that their shares add up; call group_shares once per grouping")
        count += m.long()
        labels[m] = g
    return labels, names


def _group_mask(name: str, spec: Any, shape: tuple[int, ...], full: tuple[int, ...], numel: int,
                index: dict[str, int] | None, device: torch.device) -> Tensor:
    """One group's bool mask over ``shape`` (or over ``full`` for a per-example bool mask)."""
    if isinstance(spec, (str, int)) or (isinstance(spec, Tensor) and spec.dim() == 0):
        spec = [spec]
    if isinstance(spec, Tensor) and spec.dtype == torch.bool or _is_bool_array(spec):
        return _bool_mask(name, torch.as_tensor(spec, device=device), shape, full)
    if isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.is_complex():
            raise InputError(f"group {name!r}: indices must be integers, got dtype {spec.dtype}")
        spec = spec.reshape(-1).tolist()
    try:
        items = list(spec)
    except TypeError:
        raise InputError(f"group {name!r} must be feature indices, feature names or a bool mask, "
                         f"got {type(spec).__name__}") from None
    if not items:
        raise InputError(f"group {name!r} is empty")
    if all(isinstance(it, bool) for it in items):  # a plain list of bools is a mask
        return _bool_mask(name, torch.tensor(items, dtype=torch.bool, device=device), shape, full)
    flat = []
    for it in items:
        if isinstance(it, str):
            if index is None:
                raise InputError(f"group {name!r} names feature {it!r}; pass feature_names= to use names")
            if it not in index:
                raise InputError(f"group {name!r}: unknown feature name {it!r}")
            i = index[it]
        else:
            try:
                if isinstance(it, bool) or isinstance(it, Tensor) and it.is_floating_point():
                    raise TypeError
                i = operator.index(it)
            except TypeError:
                raise InputError(f"group {name!r}: indices must be ints (flat indices into the feature "
                                 f"shape {shape}) or feature names, got {it!r}") from None
        if not 0 <= i < numel:
            raise InputError(f"group {name!r}: index {i} is out of range for {numel} features "
                             f"(feature shape {shape}; valid 0..{numel - 1})")
        flat.append(i)
    if len(set(flat)) != len(flat):
        dup = next(i for i in flat if flat.count(i) > 1)
        raise InputError(f"group {name!r} lists feature {dup} more than once")
    m = torch.zeros(numel, dtype=torch.bool, device=device)
    m[torch.tensor(flat, dtype=torch.long, device=device)] = True
    return m.view(shape)


def _bool_mask(name: str, m: Tensor, shape: tuple[int, ...], full: tuple[int, ...]) -> Tensor:
    for target in (shape, full):
        try:
            out = torch.broadcast_to(m, target)
        except RuntimeError:
            continue
        if not bool(out.any()):
            raise InputError(f"group {name!r} is empty (its mask selects no element)")
        return out
    raise InputError(f"group {name!r}: bool mask of shape {tuple(m.shape)} broadcasts neither to the "
                     f"feature shape {shape} nor to the attributions' shape {full}")


def _is_bool_array(spec: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return False
    return isinstance(spec, np.ndarray) and spec.dtype == np.bool_


def _labels_from_ids(mask: Any, shape: tuple[int, ...], full: tuple[int, ...], names: Any,
                     device: torch.device) -> tuple[Tensor, list[str]]:
    """An integer group-id mask (Captum's ``feature_mask``): labels >= 0 are groups, -1 is none."""
    try:
        m = torch.as_tensor(mask, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"groups must be a mapping or an integer mask, got {type(mask).__name__}") from None
    if m.dtype == torch.bool:
        raise InputError("a bool tensor is one group's mask; pass {'name': mask} (or an integer group-id mask)")
    if m.is_floating_point() or m.is_complex():
        raise InputError(f"the group-id mask must hold integers, got dtype {m.dtype}")
    if m.numel() == 0:
        raise InputError("the group-id mask is empty")
    ok = False
    for target in (shape, full):
        try:
            torch.broadcast_to(m, target)
            ok = True
            break
        except RuntimeError:
            continue
    if not ok:
        raise InputError(f"the group-id mask of shape {tuple(m.shape)} broadcasts neither to the feature "
                         f"shape {shape} nor to the attributions' shape {full}")
    m = m.long()
    if int(m.min()) < -1:
        raise InputError(f"group ids must be >= 0 (or -1 for 'in no group'), got {int(m.min())}")
    ids = sorted(int(v) for v in m.unique().tolist() if v >= 0)
    if not ids:
        raise InputError("the group-id mask puts every element in no group (-1)")
    if names is None:
        label_names = [f"group {i}" for i in ids]
    elif isinstance(names, Mapping):
        missing = [i for i in ids if i not in names]
        if missing:
            raise InputError(f"names has no entry for group id(s) {missing[:10]}")
        label_names = [str(names[i]) for i in ids]
    else:
        names = list(names)
        if len(names) <= ids[-1]:
            raise InputError(f"names has {len(names)} entries; the mask uses group id {ids[-1]}")
        label_names = [str(names[i]) for i in ids]
    if len(set(label_names)) != len(label_names):
        raise InputError(f"group names must be unique, got {label_names}")
    remap = torch.full((ids[-1] + 2,), -1, dtype=torch.long, device=device)
    remap[torch.tensor(ids, device=device) + 1] = torch.arange(len(ids), device=device)
    return remap[m + 1], label_names


# -- the entry point -------------------------------------------------------------------------------
def group_shares(
    attribution: Attribution | Tensor,
    groups: GroupSpec,
    *,
    names: Sequence[str] | Mapping[int, str] | None = None,
    feature_names: Sequence[str] | None = None,
    change: Tensor | float | Sequence[float] | None = None,
) -> GroupShares:
    """Sum attributions over feature groups and report each group's share of F(x) - F(x').

    Parameters
    ----------
    attribution : an :class:`~nbattr.Attribution` (its ``outputs - baseline_outputs`` is the
        change F(x) - F(x') when it has a baseline), or a raw tensor of attributions ``(N, ...)``;
        a 1-D tensor is one example (as in :func:`nbattr.attribute`).
    groups : either
        * a mapping ``name -> group``, where a group is a list of flat indices into the feature
          (non-batch) shape (for ``(N, F)`` rows: feature indices), a list of names from
          ``feature_names``, or a bool mask broadcastable to the feature shape (e.g. an ``(H, W)``
          region of ``(C, H, W)`` images) or to the attributions' shape (a per-example mask);
        * an integer group-id mask broadcastable to the feature shape or to the attributions'
          shape, like Captum's ``feature_mask``: elements with id g >= 0 form group g, ``-1``
          marks elements in no group. Group names come from ``names``.
        Groups must be disjoint; elements in no group form the remainder.
    names : for an integer mask, the name of each group id (a sequence indexed by id, or a
        ``{id: name}`` mapping); default ``"group <id>"``.
    feature_names : names of the features (for ``(N, F)`` rows), so groups may list names.
    change : F(x) - F(x') per example (or one number for all), for a raw tensor; overrides the
        Attribution's. Without it, a raw tensor's shares are fractions of the sum of its
        attributions.

    Returns
    -------
    GroupShares
        Totals per group, the remainder, and ``delta = sum(attributions) - change`` reported on
        its own (shares are never rescaled to hide it): ``shares.sum(1) + remainder_share -
        delta_share == 1``. For a method without completeness (saliency, occlusion, ...) the
        shares of F(x) - F(x') are computed all the same but need not add up; ``delta`` says by
        how much.

    Raises
    ------
    InputError
        Overlapping or empty groups, indices out of range, unknown feature names, masks of the
        wrong shape or dtype, NaN/Inf attributions.
    """
    method = None
    if isinstance(attribution, Attribution):
        attribution.require_single_target("group_shares")
        attr = attribution.attributions
        method = attribution.method
        if change is None and attribution.baseline_outputs is not None:
            change = attribution.outputs - attribution.baseline_outputs
    elif isinstance(attribution, Tensor):
        attr = attribution
        if attr.dim() == 1:
            attr = attr.unsqueeze(0)
    else:
        raise InputError(f"attribution must be an nbattr Attribution or a tensor, got {type(attribution).__name__}")
    if attr.dim() < 2:
        raise InputError(f"attributions of shape {tuple(attr.shape)}: need (N, ...) or one (F,) example")
    if not attr.is_floating_point():
        raise InputError(f"attributions must be floating point, got dtype {attr.dtype}")
    if not bool(torch.isfinite(attr).all()):
        raise InputError("the attributions contain NaN or Inf")
    attr = attr.detach()
    n, shape, full, dev = attr.shape[0], tuple(attr.shape[1:]), tuple(attr.shape), attr.device

    if isinstance(groups, Mapping):
        if names is not None:
            raise InputError("names= is for an integer group-id mask; a mapping already names its groups")
        if not groups:
            raise InputError("groups is an empty mapping")
        labels, gnames = _labels_from_mapping(groups, shape, full, feature_names, dev)
    else:
        labels, gnames = _labels_from_ids(groups, shape, full, names, dev)

    lab = torch.broadcast_to(labels, full).reshape(n, -1) + 1  # 0: no group
    # Sums are accumulated in float64 (a float32 scatter-add over 10^5 elements drifts by ~1e-4
    # relative) and returned in the attributions' dtype.
    acc = torch.float64 if attr.dtype != torch.float64 and dev.type != "mps" else attr.dtype
    flat = attr.reshape(n, -1).to(acc)
    g = len(gnames)
    sums = torch.zeros(n, g + 1, dtype=acc, device=dev).scatter_add_(1, lab, flat)
    abs_sums = torch.zeros(n, g + 1, dtype=acc, device=dev).scatter_add_(1, lab, flat.abs())
    counts = torch.zeros(n, g + 1, dtype=torch.long, device=dev).scatter_add_(1, lab, torch.ones_like(lab))

    delta = None
    if change is not None:
        try:
            change = (change.detach().to(device=dev, dtype=acc) if isinstance(change, Tensor)
                      else torch.as_tensor(change, dtype=acc, device=dev))
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"change must be a number, N numbers or a tensor, got {change!r}") from None
        if change.dim() == 0:
            change = change.expand(n).clone()
        change = change.reshape(-1)
        if change.numel() != n:
            raise InputError(f"change has {change.numel()} entries for {n} examples")
        if not bool(torch.isfinite(change).all()):
            raise InputError("change (F(x) - F(x')) contains NaN or Inf")
        delta = (sums.sum(1) - change).to(attr.dtype)
        change = change.to(attr.dtype)
    out = attr.dtype
    return GroupShares(
        names=tuple(gnames), totals=sums[:, 1:].to(out), abs_totals=abs_sums[:, 1:].to(out),
        sizes=counts[:, 1:], remainder=sums[:, 0].to(out), abs_remainder=abs_sums[:, 0].to(out),
        remainder_size=counts[:, 0], change=change, delta=delta, method=method,
    )
