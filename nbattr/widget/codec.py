"""The one place that turns tensors into bytes for the browser (and back, for tests).

Wire formats (all C-contiguous, little-endian):

- array: ``{"view": memoryview, "dtype": "float32" | "uint8", "shape": [...]}``.
- frames: one uint8 buffer ``(F, *shape)`` plus ``"scales"`` (F floats). Frame ``k`` decodes as
  ``(q - 128) / 127 * scales[k]``, so signed and non-negative maps share one format and each
  frame keeps its own magnitude (saturation shows as shrinking scales).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = {"float32": np.float32, "uint8": np.uint8}


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def encode(a: Any, dtype: str = "float32") -> dict[str, Any]:
    """Array or tensor -> ``{"view", "dtype", "shape"}`` (a copy, C-contiguous)."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported wire dtype {dtype!r}; use one of {sorted(DTYPES)}")
    arr = np.ascontiguousarray(_numpy(a), dtype=DTYPES[dtype])
    if dtype == "float32" and not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return {"view": memoryview(arr.tobytes()), "dtype": dtype, "shape": list(arr.shape)}


def decode(wire: dict[str, Any], byte_offset: int = 0) -> np.ndarray:
    """Inverse of :func:`encode`. ``wire["view"]`` may be bytes, memoryview or a buffer with an offset."""
    dt = np.dtype(DTYPES[wire["dtype"]])
    shape = tuple(int(s) for s in wire["shape"])
    count = int(np.prod(shape)) if shape else 1
    buf = wire["view"]
    arr = np.frombuffer(buf, dtype=dt, count=count, offset=byte_offset)
    return arr.reshape(shape).copy()


def encode_frames(frames: Any) -> dict[str, Any]:
    """``(F, ...)`` float frames -> one uint8 buffer with a per-frame scale (max |value|)."""
    f = _numpy(frames).astype(np.float64)
    if f.ndim < 2:
        raise ValueError(f"frames need shape (F, ...), got {f.shape}")
    f = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
    scales = np.abs(f.reshape(f.shape[0], -1)).max(axis=1)
    safe = np.where(scales > 0, scales, 1.0).reshape(-1, *([1] * (f.ndim - 1)))
    q = np.clip(np.rint(f / safe * 127.0) + 128.0, 1, 255).astype(np.uint8)
    wire = encode(q, "uint8")
    wire["scales"] = [float(s) for s in scales]
    return wire


def decode_frames(wire: dict[str, Any]) -> np.ndarray:
    q = decode(wire).astype(np.float64)
    scales = np.asarray(wire["scales"], dtype=np.float64).reshape(-1, *([1] * (q.ndim - 1)))
    return (q - 128.0) / 127.0 * scales


def encode_image(img: Any) -> dict[str, Any]:
    """Display image: ``(C, H, W)`` or ``(H, W, C)`` float/uint8 -> uint8 ``(H, W, 4)`` RGBA.

    Floats are min-max scaled to 0..255 (a normalised input still shows its structure)."""
    a = _numpy(img)
    if a.ndim == 4:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # ambiguous tiny case: assume channels-first like torch
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)).round().astype(np.uint8)
    c = a.shape[-1]
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    rgba = np.concatenate([a, np.full((*a.shape[:2], 1), 255, np.uint8)], axis=-1)
    return encode(rgba, "uint8")
