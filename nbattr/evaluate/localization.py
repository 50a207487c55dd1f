"""Localization: how much of an attribution falls inside a region known to hold the object."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.errors import InputError
from ..engine.result import Attribution

Box = tuple[int, int, int, int]


def _box_mask(box: Sequence[int], shape: torch.Size, device: torch.device) -> Tensor:
    """Bool mask ``(H, W)`` of the half-open box rows ``y0:y1``, columns ``x0:x1``."""
    if len(box) != 4 or not all(isinstance(v, int) or (isinstance(v, Tensor) and v.numel() == 1)
                                for v in box):
        raise InputError(f"a box is four ints (y0, x0, y1, x1), got {box!r}")
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = shape
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise InputError(f"box (y0, x0, y1, x1) = {(y0, x0, y1, x1)} must satisfy 0 <= y0 < y1 <= {h} "
                         f"and 0 <= x0 < x1 <= {w} (the image's height and width)")
    m = torch.zeros(h, w, dtype=torch.bool, device=device)
    m[y0:y1, x0:x1] = True
    return m


def localization(attributions: Tensor | Attribution, box_mask: Tensor | Box | Sequence[Box]) -> Tensor:
    """Share of the absolute attribution of each example that lies inside a region.

    ``sum(|a| inside) / sum(|a|)`` per example: 1 when all the attribution is inside, and the
    region's share of the elements for a uniform map (the chance level to compare against).

    Parameters
    ----------
    attributions : ``(N, ...)`` tensor or an :class:`~nbattr.Attribution` (its ``attributions``).
    box_mask : the region, one of
        - a bool tensor broadcastable to ``(N, ...)`` (e.g. ``(H, W)`` for every example and channel
          of ``(N, C, H, W)`` attributions, or ``(N, 1, H, W)`` per example);
        - a box ``(y0, x0, y1, x1)`` in pixel indices of the last two dims (rows ``y0:y1``,
          columns ``x0:x1``, end excluded, as in slicing), the same for every example;
        - a list of N such boxes, one per example.

    Returns
    -------
    Tensor
        ``(N,)`` float64 shares in [0, 1]; NaN for an example whose attribution is all zero.

    Raises
    ------
    InputError
        A mask that is not boolean or does not broadcast, a malformed or out-of-range box.
    """
    if isinstance(attributions, Attribution):
        attributions.require_single_target("localization")
        a = attributions.attributions
    else:
        a = attributions
    if not isinstance(a, Tensor) or not a.is_floating_point():
        raise InputError("attributions must be a floating-point tensor or an Attribution")
    if a.dim() < 2:
        raise InputError(f"attributions must have a batch dimension (N, ...), got shape {tuple(a.shape)}")
    n = a.shape[0]
    if isinstance(box_mask, Tensor):
        if box_mask.dtype != torch.bool:
            raise InputError(f"box_mask must be a bool tensor (True inside the region), got {box_mask.dtype}")
        try:
            mask = torch.broadcast_to(box_mask.to(a.device), a.shape)
        except RuntimeError:
            raise InputError(f"box_mask of shape {tuple(box_mask.shape)} does not broadcast to the "
                             f"attributions {tuple(a.shape)}") from None
    else:
        if a.dim() < 3:
            raise InputError(f"a box needs image attributions (N, H, W) or (N, C, H, W), got shape "
                             f"{tuple(a.shape)}; pass a bool mask instead")
        boxes = list(box_mask) if isinstance(box_mask, (list, tuple)) else None
        if boxes is None or len(boxes) == 0:
            raise InputError(f"box_mask must be a bool tensor, a box (y0, x0, y1, x1) or N boxes, got {box_mask!r}")
        hw = a.shape[-2:]
        if all(isinstance(b, (list, tuple)) for b in boxes):
            if len(boxes) != n:
                raise InputError(f"{len(boxes)} boxes for {n} examples")
            m = torch.stack([_box_mask(b, hw, a.device) for b in boxes])  # (N, H, W)
            m = m.view(n, *([1] * (a.dim() - 3)), *hw)
        else:
            m = _box_mask(boxes, hw, a.device)
        mask = torch.broadcast_to(m, a.shape)
    mag = a.detach().abs().double()
    inside = (mag * mask).flatten(1).sum(1)
    total = mag.flatten(1).sum(1)
    out = inside / total
    return torch.where(total > 0, out, torch.full_like(out, float("nan"))).cpu()
