"""Perturbation methods: occlusion and Shapley value sampling.

Both methods only evaluate the model (no gradients). Every perturbed point of every example goes
through :meth:`Problem.eval_pass`, so the model is called once per memory-sized chunk of points,
never once per window or per permutation step.

Windows and groups
------------------
Both methods perturb *blocks* of elements of the attributed tensor (the input, or a layer's
output), described over its non-batch shape:

* 1-D features ``(F,)``: one element (window ``(1,)``);
* 2-D ``(L, E)``, e.g. token embeddings: one whole token (window ``(1, E)``);
* 3-D and more, channels-first ``(C, H, W, ...)``: a ``(C, s, s, ...)`` patch across all channels,
  with ``s = max(1, round_half_up(min(H, W, ...) / 8))``, i.e. an 8 x 8 grid of patches.

Occlusion slides that window; Shapley sampling uses the non-overlapping tiling by it as its
default grouping (``feature_mask``).

Several targets per example (``target="top5"``, an ``(N, K)`` tensor) cost nothing extra: every
model evaluation gives all K target scores, so both methods take the same forward passes for K
targets as for one (where a gradient method needs K backward passes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import InputError
from .problem import Problem, accumulation_dtype
from .registry import measures_first_forward, multi_target, register, targets_share_forwards

WindowSpec = int | Sequence[int] | None

#: random draw j (a permutation) comes from a CPU generator seeded with seed * _SEED_MUL + j
_SEED_MUL = 1_000_003


# -- windows ---------------------------------------------------------------------------------
def default_window(shape: Sequence[int]) -> tuple[int, ...]:
    """The default occlusion window (and Shapley patch) for a non-batch ``shape``.

    Parameters
    ----------
    shape : the non-batch shape of the attributed tensor.

    Returns
    -------
    tuple of int
        ``(1,)`` for 1-D, ``(1, E)`` for 2-D ``(L, E)``, ``(C, s, s, ...)`` for channels-first
        ``(C, *spatial)`` with ``s = max(1, round_half_up(min(spatial) / 8))``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 1:
        return (1,)
    if len(shape) == 2:
        return (1, shape[1])
    s = max(1, int(math.floor(min(shape[1:]) / 8 + 0.5)))
    return (shape[0],) + (s,) * (len(shape) - 1)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int_tuple(value: object, name: str) -> tuple[int, ...]:
    try:
        out = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be an int or a tuple of ints, got {value!r}") from None
    if not all(_is_int(v) for v in out):
        raise InputError(f"{name} must be an int or a tuple of ints, got {value!r}")
    return tuple(int(v) for v in out)


def resolve_window(window: WindowSpec, shape: Sequence[int]) -> tuple[int, ...]:
    """Turn the ``window`` option into a full tuple over the non-batch ``shape``.

    An int ``w`` means ``(w,)`` for 1-D, ``(w, E)`` for 2-D ``(L, E)`` and ``(C, w, w, ...)``
    for channels-first inputs; a tuple must have one entry per non-batch dimension.
    """
    shape = tuple(int(d) for d in shape)
    nd = len(shape)
    if window is None:
        return default_window(shape)
    if _is_int(window):
        w = int(window)
        if nd == 1:
            win = (w,)
        elif nd == 2:
            win = (w, shape[1])
        else:
            win = (shape[0],) + (w,) * (nd - 1)
    else:
        win = _int_tuple(window, "window")
        if len(win) != nd:
            raise InputError(
                f"window {win} has {len(win)} entries but the attributed tensor has {nd} non-batch "
                f"dimensions {shape}; give one entry per dimension (or an int)")
    if any(v < 1 for v in win):
        raise InputError(f"window entries must be >= 1, got {win}")
    if any(w > d for w, d in zip(win, shape, strict=True)):
        raise InputError(f"window {win} is larger than the input's non-batch shape {shape}")
    return win


def resolve_stride(stride: WindowSpec, window: tuple[int, ...], shape: Sequence[int]) -> tuple[int, ...]:
    """Turn the ``stride`` option into a tuple (default: the window, i.e. non-overlapping).

    An int applies to every dimension. A stride may exceed the window only along a dimension the
    window spans completely (otherwise some elements would never be occluded).
    """
    shape = tuple(int(d) for d in shape)
    if stride is None:
        st = window
    elif _is_int(stride):
        st = (int(stride),) * len(window)
    else:
        st = _int_tuple(stride, "stride")
        if len(st) != len(window):
            raise InputError(f"stride {st} has {len(st)} entries; the window {window} has {len(window)}")
    if any(v < 1 for v in st):
        raise InputError(f"stride entries must be >= 1, got {st}")
    for s, w, d in zip(st, window, shape, strict=True):
        if s > w and w < d:
            raise InputError(f"stride {st} is larger than the window {window} along a dimension the "
                             f"window does not cover ({shape}): some elements would never be occluded")
    return st


def window_positions(shape: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Number of window positions along each dimension: ``ceil((D - w) / s) + 1``.

    As in Captum's ``Occlusion``, the window starts at ``0, s, 2s, ...`` and the last position
    may run past the edge; such a window is cut at the edge (it is not shifted back).
    """
    return [-(-(d - w) // s) + 1 for d, w, s in zip(shape, window, stride, strict=True)]


def tile_labels(shape: Sequence[int], window: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Group labels ``0..G-1`` of the non-overlapping tiling of ``shape`` by ``window``.

    Tiles are numbered in C order over the tile grid; edge tiles may be smaller.
    """
    lab = torch.zeros((), dtype=torch.long, device=device)
    nd = len(shape)
    for d, (size, w) in enumerate(zip(shape, window, strict=True)):
        k = -(-size // w)
        coord = (torch.arange(size, device=device) // w).view(*([1] * d), size, *([1] * (nd - d - 1)))
        lab = lab * k + coord
    return lab.expand(*shape).contiguous()


def _outer_and(masks: list[Tensor]) -> Tensor:
    """``(M, D_0, D_1, ...)`` from per-dimension ``(M, D_d)`` boolean masks (logical and)."""
    nd = len(masks)
    out = None
    for d, m in enumerate(masks):
        v = m.view(m.shape[0], *([1] * d), m.shape[1], *([1] * (nd - d - 1)))
        out = v if out is None else out & v
    return out


# -- occlusion -------------------------------------------------------------------------------
@register(
    "occlusion",
    "Mean drop F(x) - F(x with a sliding window replaced by the baseline) over the windows "
    "covering each element (Zeiler & Fergus 2014).",
    needs_baseline=True,
)
@multi_target  # every forward gives all K target scores
@targets_share_forwards
@measures_first_forward  # the widest activation per row bounds a CPU chunk (batching.cpu_row_cap)
def occlusion(p: Problem, *, window: WindowSpec = None, stride: WindowSpec = None,
              fill: float | None = None) -> object:
    """Occlusion (Zeiler & Fergus 2014), as computed by Captum's ``Occlusion``.

    Parameters
    ----------
    p : the problem.
    window : int or tuple over the non-batch dims, or None (see :func:`default_window`). An int
        ``w`` means ``(w,)`` for 1-D features, ``(w, E)`` (w whole tokens) for 2-D ``(L, E)``, and
        ``(C, w, w, ...)`` for channels-first inputs.
    stride : int or tuple; None means the window (non-overlapping windows).
    fill : None to replace the window by the baseline (the ``baseline=`` argument), or a number.

    Returns
    -------
    Attribution
        Each element's attribution is the mean, over the window positions covering it, of
        ``F(x) - F(x_occluded)``. Windows start at ``0, s, 2s, ...`` along each dimension,
        ``ceil((D - w) / s) + 1`` of them; a last window running past the edge is cut there
        (as in Captum). No completeness is promised (``delta`` is None).
    """
    shape = tuple(p.inputs.shape[1:])
    win = resolve_window(window, shape)
    st = resolve_stride(stride, win, shape)
    if fill is None:
        fill_t = p.baselines
    elif isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        if not math.isfinite(float(fill)):
            raise InputError(f"fill must be a finite number, got {fill!r}")
        fill_t = torch.full_like(p.inputs, float(fill))
    else:
        raise InputError(f"fill must be None (use the baseline) or a number, got {fill!r}")

    n, x, dev = p.n, p.inputs, p.device
    counts = window_positions(shape, win, st)
    n_windows = math.prod(counts)
    ar = [torch.arange(d, device=dev) for d in shape]

    def dim_masks(k: Tensor) -> list[Tensor]:
        """Per-dimension ``(M, D_d)`` masks of the windows with flat numbers ``k`` (C order)."""
        coords = []
        rem = k
        for c in reversed(counts):
            coords.append(rem % c)
            rem = rem // c
        coords.reverse()
        out = []
        for cd, a, w, s in zip(coords, ar, win, st, strict=True):
            start = (cd * s).unsqueeze(1)
            out.append((a.unsqueeze(0) >= start) & (a.unsqueeze(0) < start + w))
        return out

    # How many windows cover each element: a product of per-dimension coverage counts.
    cover = torch.ones(shape, dtype=x.dtype, device=dev)
    for d, (c, a, w, s) in enumerate(zip(counts, ar, win, st, strict=True)):
        starts = torch.arange(c, device=dev).unsqueeze(1) * s
        per = ((a.unsqueeze(0) >= starts) & (a.unsqueeze(0) < starts + w)).sum(0).to(x.dtype)
        cover = cover * per.view(*([1] * d), -1, *([1] * (len(shape) - d - 1)))

    # (N, K, ...) with K targets per example: the K scores of each forward, accumulated per target
    total = torch.zeros((n, p.k, *shape), dtype=accumulation_dtype(x.dtype), device=dev)

    # Flat point index i is window i // N of example i % N.
    def points(idx: Tensor) -> tuple[Tensor, Tensor]:
        rows = idx % n
        mask = _outer_and(dim_masks(idx // n))
        return torch.where(mask, fill_t[rows], x[rows]), rows

    def consume(idx: Tensor, rows: Tensor, s: Tensor) -> None:
        drop = (p.outputs[rows] - s).to(total.dtype).view(len(rows), p.k)
        mask = _outer_and(dim_masks(idx // n)).to(total.dtype)
        for j in range(p.k):  # one target at a time: no (M, K, ...) temporary
            total[:, j].index_add_(0, rows, mask * p.expand(drop[:, j].contiguous(), len(rows)))

    p.eval_pass(n_windows * n, points, consume)
    attributions = total / cover
    if not p.multi:
        attributions = attributions.squeeze(1)
    params = {"window": win, "stride": st, "fill": None if fill is None else float(fill),
              "windows": n_windows}
    if p.multi:
        params["targets"] = f"{p.k} per example, from the same {n_windows * n} forward rows as one"
    extra = {}
    if fill is None:
        params["baseline"] = p.baseline_name()
        extra["baselines"] = p.baselines
    return p.result("occlusion", attributions, params=params, **extra)


# -- Shapley value sampling --------------------------------------------------------------------
def resolve_feature_mask(feature_mask: object, inputs: Tensor) -> tuple[Tensor, int, bool]:
    """Validate ``feature_mask`` against ``inputs`` ``(N, ...)``.

    Returns
    -------
    labels : ``(N, ...)`` long tensor of group labels ``0..G-1``.
    groups : G.
    shared : whether every example has the same grouping (the mask had no batch dimension, or
        a batch dimension of 1).
    """
    n, shape = inputs.shape[0], tuple(inputs.shape[1:])
    if feature_mask is None:
        lab = tile_labels(shape, default_window(shape), device=inputs.device)
        return lab.unsqueeze(0).expand(n, *shape), int(lab.max()) + 1, True
    try:
        m = torch.as_tensor(feature_mask, device=inputs.device)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"feature_mask must be an integer tensor, got {type(feature_mask).__name__}") from None
    if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool:
        raise InputError(f"feature_mask must hold integer group labels, got dtype {m.dtype}")
    try:
        lab = torch.broadcast_to(m.long(), inputs.shape)
    except RuntimeError:
        raise InputError(
            f"feature_mask of shape {tuple(m.shape)} broadcasts neither to the non-batch shape "
            f"{shape} nor to the attributed tensor's shape {tuple(inputs.shape)}") from None
    shared = m.dim() < inputs.dim() or m.shape[0] == 1
    if lab.numel() == 0:
        raise InputError("feature_mask is empty")
    if int(lab.min()) < 0:
        raise InputError(f"feature_mask labels must be >= 0, got {int(lab.min())}")
    groups = int(lab.max()) + 1
    present = torch.zeros(groups, dtype=torch.bool, device=inputs.device)
    present[lab.reshape(-1)] = True
    if not present.all():
        missing = (~present).nonzero().flatten()[:10].tolist()
        raise InputError(f"feature_mask labels must be 0..G-1 with every label used; labels "
                         f"{missing} (of 0..{groups - 1}) label no element")
    return lab, groups, shared


def permutation_ranks(permutations: int, groups: int, seed: int, antithetic: bool = False) -> Tensor:
    """``(P, G)``: ``ranks[k, g]`` is the position of group g in permutation k.

    Draw j is ``torch.randperm(G)`` from a CPU generator seeded with ``seed * 1_000_003 + j``:
    the same whatever the device, chunking or number of permutations (P orderings are the first
    P of any larger count). Independent orderings: permutation k is draw k. ``antithetic``:
    permutation 2j is draw j and permutation 2j + 1 its reverse (``ranks = G - 1 - ranks[2j]``);
    an odd P leaves the last one unpaired.
    """
    ranks = torch.empty(permutations, groups, dtype=torch.long)
    pos = torch.arange(groups)
    draws = (permutations + 1) // 2 if antithetic else permutations
    for j in range(draws):
        g = torch.Generator().manual_seed(seed * _SEED_MUL + j)
        k = 2 * j if antithetic else j
        ranks[k, torch.randperm(groups, generator=g)] = pos
        if antithetic and k + 1 < permutations:
            ranks[k + 1] = groups - 1 - ranks[k]
    return ranks


def _sampling_stderr(c: Tensor, antithetic: bool) -> Tensor | None:
    """The standard error of ``c.mean(0)`` for the contributions ``c`` ``(P, N, G)`` of P orderings.

    Independent orderings: ``std / sqrt(P)``. Antithetic pairs are independent of each other but
    not inside a pair, so the pair means are the units: for P = 2m (+ 1), the mean is
    ``(2 sum(pair means) [+ last]) / P`` with variance ``(4 m var(pair mean) [+ var(one)]) / P^2``.
    None where the spread cannot be estimated (one ordering; fewer than two pairs)."""
    p = c.shape[0]
    if not antithetic:
        return (c.var(0, correction=1) / p).sqrt() if p > 1 else None
    m = p // 2
    if m < 2:
        return None
    pairs = (c[0:2 * m:2] + c[1:2 * m:2]) / 2
    var = 4 * m * pairs.var(0, correction=1)
    if p % 2:
        var = var + c.var(0, correction=1)  # the unpaired last ordering
    return var.sqrt() / p


@register(
    "shapley_sampling",
    "Shapley values estimated from random feature orderings (Castro et al. 2009; Strumbelj & "
    "Kononenko 2010); sums exactly to F(x) - F(x').",
    completeness=True, needs_baseline=True,
)
@multi_target  # every forward gives all K target scores
@targets_share_forwards
@measures_first_forward
def shapley_sampling(p: Problem, *, permutations: int = 24, feature_mask: object = None,
                     seed: int = 0, antithetic: bool = True) -> object:
    """Shapley value sampling over groups of elements, starting from the baseline.

    Parameters
    ----------
    p : the problem.
    permutations : number of orderings of the groups (with ``antithetic``, an even number: an
        odd one leaves its last ordering unpaired, which carries a pair's weight with a single
        ordering's error and can leave the estimate worse than one ordering fewer; 3 orderings
        of a model with pairwise interactions are off where 2 are exact).
    feature_mask : integer labels ``0..G-1`` broadcastable to the non-batch shape (one grouping
        for all examples) or to ``(N, ...)``; elements with the same label form one feature.
        None groups like occlusion's default window tiling (per element for 1-D, per token for
        2-D ``(L, E)``, per ``(C, s, s)`` patch for images; see :func:`default_window`).
    seed : seeds the orderings (see :func:`permutation_ranks`); every example uses the same ones.
    antithetic : draw the orderings in pairs, each random ordering followed by its reverse
        (antithetic or paired sampling; Mitchell et al. 2022, "Sampling permutations for Shapley
        value estimation", JMLR). A group that comes late in one comes early in the other, so
        each pair gives every pairwise interaction exactly its Shapley half: a model whose
        features interact at most in pairs gets exact values from one pair. At the same cost as
        independent orderings, measured (spread of the estimate over seeds): 0.69-0.91x the
        error on a trained tabular MLP (30 features), 0.29x on a random CNN's image patches,
        1.0x on EfficientNet-Lite0's 49 patches of a photo (interactions of higher order).
        False: independent orderings (as Captum's ``ShapleyValueSampling``).

    Returns
    -------
    Attribution
        For each ordering, groups are switched from the baseline x' to x one at a time; a
        group's marginal contribution is the change of the target score. The end points
        F(x') and F(x) are the same for every ordering and evaluated once, so each ordering
        needs G - 1 model evaluations per example and its contributions telescope to exactly
        F(x) - F(x'). A group's mean contribution is spread evenly over its elements, so
        ``sum(attributions) = F(x) - F(x')`` and ``delta`` is rounding error only. (Captum's
        ``ShapleyValueSampling`` instead gives every element of a group the full group value;
        group sums here equal Captum's per-element values.)
        ``params`` holds ``feature_mask`` (the resolved labels: non-batch shape if shared, else
        ``(N, ...)``), ``groups`` (G), ``permutations``, ``seed`` and ``antithetic``. ``stderr``
        is the standard error of each estimate, spread over a group's elements like its value
        (see :func:`_sampling_stderr`: over the orderings, or over the pairs when antithetic;
        None with one ordering, or fewer than 4 antithetic ones). ``delta`` is ~0 however few
        orderings there are, so ``stderr`` is the estimate's error to read (it shrinks as
        1/sqrt(permutations)).
    """
    if not _is_int(permutations) or permutations < 1:
        raise InputError(f"permutations must be an int >= 1, got {permutations!r}")
    if not _is_int(seed):
        raise InputError(f"seed must be an int, got {seed!r}")
    if not isinstance(antithetic, bool):
        raise InputError(f"antithetic must be True or False, got {antithetic!r}")
    permutations, seed = int(permutations), int(seed)
    n, x, dev = p.n, p.inputs, p.device
    lab, groups, shared = resolve_feature_mask(feature_mask, x)
    base = p.baselines
    ranks = permutation_ranks(permutations, groups, seed, antithetic).to(dev)
    flat_lab = lab.reshape(n, -1)

    # values[k, i, t, j]: target j's score with the first t groups of ordering k switched to x
    # (K = 1 for a single target).
    kk = p.k
    values = torch.empty(permutations, n, groups + 1, kk, dtype=x.dtype, device=dev)
    values[:, :, 0] = p.baseline_outputs.to(x.dtype).view(n, kk)
    values[:, :, groups] = p.outputs.to(x.dtype).view(n, kk)
    inner = groups - 1

    def points(idx: Tensor) -> tuple[Tensor, Tensor]:
        t = idx % inner + 1
        kr = idx // inner
        k, rows = kr // n, kr % n
        on = ranks[k] < t.unsqueeze(1)  # (M, G): groups switched on at this step
        if shared:
            mask = on[:, flat_lab[0]]
        else:
            mask = torch.empty(len(idx), flat_lab.shape[1], dtype=torch.bool, device=dev)
            for r in rows.unique().tolist():
                sel = rows == r
                mask[sel] = on[sel][:, flat_lab[r]]
        mask = mask.view(len(idx), *x.shape[1:])
        return torch.where(mask, x[rows], base[rows]), rows

    def consume(idx: Tensor, _rows: Tensor, s: Tensor) -> None:
        t = idx % inner + 1
        kr = idx // inner
        values[kr // n, kr % n, t] = s.to(x.dtype).view(len(idx), kk)

    p.eval_pass(permutations * n * inner, points, consume)

    marginal = values[:, :, 1:] - values[:, :, :-1]  # (P, N, G, K): step t adds group order[k, t]
    order = torch.argsort(ranks, dim=1)  # (P, G): the group added at each step
    # contrib[k, i, g, j]: group g's contribution to target j in ordering k (a permutation of the steps)
    contrib = torch.empty(permutations, n, groups, kk, dtype=accumulation_dtype(x.dtype), device=dev)
    contrib.scatter_(2, order[:, None, :, None].expand(permutations, n, groups, kk), marginal.to(contrib.dtype))
    phi = contrib.mean(0)  # (N, G, K)
    stderr = _sampling_stderr(contrib, antithetic)
    sizes = torch.zeros(n, groups, dtype=x.dtype, device=dev)
    sizes.scatter_add_(1, flat_lab, torch.ones_like(flat_lab, dtype=x.dtype))
    sizes = sizes.clamp_min(1).unsqueeze(2)
    per_element = flat_lab.unsqueeze(2).expand(n, flat_lab.shape[1], kk)
    out_shape = (n, kk, *x.shape[1:]) if p.multi else tuple(x.shape)

    def spread(v: Tensor) -> Tensor:
        """``(N, G, K)`` group values -> each element its group's share, ``(N, [K,] ...)``.
        A label an example does not use (per-example masks) has size 0 there and is never gathered."""
        return (v / sizes).gather(1, per_element).movedim(2, 1).reshape(out_shape)

    attributions = spread(phi)
    stderr = None if stderr is None else spread(stderr)
    mask_param = lab[0].clone() if shared else lab.clone()
    params = {"permutations": permutations, "groups": groups, "seed": seed, "antithetic": antithetic,
              "feature_mask": mask_param}
    if p.multi:
        params["targets"] = f"{kk} per example, from the same {permutations * n * inner} forward rows as one"
    return p.result("shapley_sampling", attributions, completeness=True, uses_baseline=True,
                    params=params, stderr=stderr)
