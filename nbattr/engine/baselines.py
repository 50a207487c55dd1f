"""Named baselines (references) x' for path and reference methods."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

BaselineSpec = str | float | int | Tensor | Callable[[Tensor], Tensor]

NAMES = ("zeros", "blur", "uniform", "mean")


def blur(x: Tensor, sigma: float | None = None) -> Tensor:
    """Gaussian blur over the spatial dims of a channels-first batch ``(N, C, *spatial)``.

    ``sigma`` defaults to 1/16 of the smallest spatial size (14 pixels at 224x224).
    """
    if x.dim() < 3:
        raise InputError(
            f"the 'blur' baseline needs a channels-first input (N, C, H, W) or (N, C, L); "
            f"got shape {tuple(x.shape)}"
        )
    spatial = x.shape[2:]
    if sigma is None:
        sigma = max(1.0, min(spatial) / 16.0)
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = x
    for d in range(len(spatial)):
        # move dim d of the spatial dims last, blur along it with a 1-D conv, move it back
        moved = out.movedim(2 + d, -1)
        shp = moved.shape
        flat = moved.reshape(-1, 1, shp[-1])
        flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), k.view(1, 1, -1))
        out = flat.reshape(shp).movedim(-1, 2 + d)
    return out


def uniform(x: Tensor, seed: int = 0, rows: Sequence[int] | None = None) -> Tensor:
    """Uniform noise in each example's own range [min(x), max(x)], deterministic per example:
    row i's noise comes from a generator seeded with ``seed * 1_000_003 + rows[i]`` (``rows``
    defaults to 0..N-1), so it does not depend on the other rows of the call
    (:func:`nbattr.attribute_dataset` passes each chunk's row numbers in the data set)."""
    rows = range(x.shape[0]) if rows is None else rows
    if len(rows) != x.shape[0]:
        raise InputError(f"uniform: {len(rows)} row numbers for {x.shape[0]} rows")
    u = torch.empty_like(x)
    for i, r in enumerate(rows):
        g = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + int(r))
        u[i] = torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (x.dim() - 1)))
    return lo + u * (hi - lo)


def mean(x: Tensor) -> Tensor:
    """Each example's per-channel mean (channels-first), or its mean for 1-D features."""
    if x.dim() >= 3:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x).clone()
    return x.mean(dim=tuple(range(1, x.dim())), keepdim=True).expand_as(x).clone()


def resolve(spec: BaselineSpec, inputs: Tensor) -> Tensor:
    """Turn a baseline spec into an ``(N, ...)`` tensor shaped, typed and placed like ``inputs``."""
    if isinstance(spec, str):
        if spec == "zeros":
            b = torch.zeros_like(inputs)
        elif spec == "blur":
            b = blur(inputs)
        elif spec == "uniform":
            b = uniform(inputs)
        elif spec == "mean":
            b = mean(inputs)
        else:
            raise InputError(f"unknown baseline {spec!r}; use one of {NAMES}, a number, a tensor "
                             "or a callable x -> tensor")
    elif isinstance(spec, numbers.Number) and not isinstance(spec, bool):
        b = torch.full_like(inputs, float(spec))
    elif isinstance(spec, Tensor):
        b = spec
    elif callable(spec):
        b = spec(inputs)
        if not isinstance(b, Tensor):
            raise InputError(f"a baseline callable must return a tensor, got {type(b).__name__}")
    else:
        raise InputError(f"unsupported baseline {spec!r}")
    b = b.detach().to(device=inputs.device, dtype=inputs.dtype)
    try:
        b = torch.broadcast_to(b, inputs.shape).clone()
    except RuntimeError:
        raise InputError(
            f"baseline shape {tuple(b.shape)} does not broadcast to the input shape "
            f"{tuple(inputs.shape)}"
        ) from None
    if not torch.isfinite(b).all():
        raise InputError("baseline contains NaN or Inf")
    return b
