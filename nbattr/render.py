"""Static pictures of an explanation with matplotlib: the PNG fallback in the widget's mime
bundle, ``Explain.plot()`` and ``Explain.save()``. Works without Jupyter (Agg canvas)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _receipt_text(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    parts = [f"{r.get('method')}  target {r.get('target')}"
             + (f" ({r['label']})" if r.get("label") else "")]
    parts.append(f"F(x)={r['fx']:.4g}")
    if r.get("fbase") is not None:
        parts.append(f"F(x')={r['fbase']:.4g}")
    parts.append(f"sum={r['total']:.4g}")
    if r.get("delta") is not None:
        parts.append(f"delta={r['delta']:.2g}")
    if r.get("unsupported"):
        parts.append("unsupported ops: " + ", ".join(r["unsupported"]))
    return "  ".join(parts)


def draw(
    fig: Any,
    kind: str,
    maps: np.ndarray | None,
    image: np.ndarray | None = None,
    receipt: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    sign: str = "absolute",
    cmap: str = "inferno",
    opacity: float = 0.6,
    clip: float = 99.0,
) -> Any:
    """Draw one explanation into ``fig``. ``maps`` is ``(2, ...)`` [abs-sum, signed-sum]."""
    if maps is None:
        ax = fig.add_subplot(1, 1, 1)
        if image is not None:
            ax.imshow(image)
        ax.set_title("computing…")
        ax.axis("off")
        return fig
    signed = sign == "signed" or kind != "image"
    m = maps[1] if signed else maps[0]
    if sign == "positive":
        m = np.maximum(maps[1], 0)
    elif sign == "negative":
        m = np.maximum(-maps[1], 0)
    if kind == "image":
        ax1, ax2 = fig.subplots(1, 2)
        if image is not None:
            ax1.imshow(image)
            ax2.imshow(image)
        lim = float(np.percentile(np.abs(m), clip)) or 1e-12
        if signed:
            im = ax2.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=opacity if image is not None else 1)
        else:
            im = ax2.imshow(np.clip(m, 0, lim), cmap=cmap, vmin=0, vmax=lim,
                            alpha=opacity if image is not None else 1)
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
        ax1.set_title("input")
        ax2.set_title("attribution")
        ax1.axis("off")
        ax2.axis("off")
    else:
        ax = fig.add_subplot(1, 1, 1)
        vals = np.asarray(m, dtype=float)
        labels = list(names) if names is not None else [str(i) for i in range(len(vals))]
        if kind == "tabular":
            order = np.argsort(-np.abs(vals))[::-1]
        else:
            order = np.arange(len(vals))[::-1]  # reading order, top to bottom
        colors = ["#d62728" if v > 0 else "#1f77b4" for v in vals[order]]
        ax.barh(range(len(order)), vals[order], color=colors)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([labels[i] for i in order])  # matplotlib draws text, never HTML
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("attribution")
    fig.suptitle(_receipt_text(receipt), fontsize=8)
    return fig


def png_bytes(kind: str, maps: np.ndarray | None, **kw: Any) -> bytes:
    n = 1 if maps is None else (len(maps[0]) if kind != "image" else 0)
    size = (8.0, 3.6) if kind == "image" else (6.0, max(2.0, 0.28 * n + 1.0))
    fig = draw(_figure(size), kind, maps, **kw)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def save(path: str, kind: str, maps: np.ndarray | None, **kw: Any) -> None:
    with open(path, "wb") as f:
        f.write(png_bytes(kind, maps, **kw))
