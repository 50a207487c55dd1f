"""Matplotlib pictures of the evaluation results (matplotlib is imported only when drawing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .ablation import AblationResult
from .saturation import SaturationResult


def _axes(ax: Any, n: int, width: float = 4.0) -> tuple[Any, list[Any]]:
    if ax is None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, n, figsize=(width * n, 3.2), squeeze=False)
        return fig, list(axes[0])
    if hasattr(ax, "flat"):  # a numpy array of axes
        axes = list(ax.flat)
    else:
        axes = list(ax) if isinstance(ax, (list, tuple)) else [ax]
    return axes[0].figure, axes


def plot_saturation(result: SaturationResult, ax: Any = None, example: int = 0,
                    relative: bool = True) -> Any:
    """Draw a :class:`SaturationResult` for one example (Gradients of Counterfactuals, Figs. 2, 12).

    Panels, left to right: the softmax probability of the target along a, the pre-softmax score
    (logit) along a, and, when the result has layers, each layer's distance to its activation at x
    (L2, divided by the activation's norm when ``relative``, solid; cosine distance, dashed).

    Parameters
    ----------
    result : from :func:`nbattr.evaluate.saturation`.
    ax : None (a new figure), or a sequence of as many axes as panels. A single Axes gets the
        probability and the logit together (logit on a twin y axis).
    example : which example of the batch to draw.
    relative : normalise the L2 distance by ``||activation at x||``.

    Returns
    -------
    matplotlib Figure
    """
    n_ex = result.logits.shape[1]
    if not 0 <= example < n_ex:
        raise IndexError(f"example {example} out of range for {n_ex} examples")
    a = result.alphas.numpy()
    has_p = result.probs is not None
    panels = int(has_p) + 1 + int(bool(result.layers))
    single = ax is not None and not (isinstance(ax, (list, tuple)) or hasattr(ax, "flat"))
    fig, axes = _axes(ax, 1 if single else panels)
    t = int(result.target[example])
    if single:
        ax0 = axes[0]
        ax0.plot(a, result.logits[:, example].numpy(), color="C0", label="pre-softmax score")
        ax0.set_xlabel("scaling α")
        ax0.set_ylabel("pre-softmax score", color="C0")
        if has_p:
            tw = ax0.twinx()
            tw.plot(a, result.probs[:, example].numpy(), color="C1", label="softmax probability")
            tw.set_ylabel("softmax probability", color="C1")
        ax0.set_title(f"class {t} along α")
        return fig
    if len(axes) < panels:
        raise ValueError(f"this result needs {panels} axes, got {len(axes)}")
    i = 0
    if has_p:
        axes[i].plot(a, result.probs[:, example].numpy(), color="C1")
        axes[i].set_title(f"softmax score of class {t}")
        axes[i].set_xlabel("scaling α")
        axes[i].set_ylim(-0.02, 1.02)
        i += 1
    axes[i].plot(a, result.logits[:, example].numpy(), color="C0")
    axes[i].set_title(f"pre-softmax score of class {t}")
    axes[i].set_xlabel("scaling α")
    i += 1
    if result.layers:
        for j, name in enumerate(result.layers):
            d = result.relative_l2(name) if relative else result.l2[name]
            axes[i].plot(a, d[:, example].numpy(), color=f"C{j}", label=f"{name} L2")
            axes[i].plot(a, result.cosine[name][:, example].numpy(), color=f"C{j}", ls="--",
                         label=f"{name} cosine")
        axes[i].set_title("distance to the activation at x")
        axes[i].set_xlabel("scaling α")
        axes[i].set_ylabel("relative L2 (solid), 1 − cos (dashed)" if relative else "L2 (solid), 1 − cos (dashed)")
        axes[i].legend(fontsize=7)
    return fig


def plot_ablation(results: AblationResult | Mapping[str, AblationResult] | Sequence[AblationResult],
                  ax: Any = None, example: int | None = None, drop: bool = False) -> Any:
    """Draw ablation curves: the score against the fraction of features removed or inserted.

    Parameters
    ----------
    results : one :class:`AblationResult`, or a dict label -> result (e.g. one per method).
    ax : an Axes, or None for a new figure.
    example : one example's curve; None draws the mean over the batch.
    drop : plot ``f(x) - score`` instead of the score.

    Returns
    -------
    matplotlib Figure
    """
    if isinstance(results, AblationResult):
        results = {results.mode: results}
    elif not isinstance(results, Mapping):
        results = {f"{r.mode} {i}": r for i, r in enumerate(results)}
    fig, axes = _axes(ax, 1, width=5.0)
    a = axes[0]
    for label, r in results.items():
        y = r.drop if drop else r.scores
        y = y.mean(1) if example is None else y[:, example]
        aopc = r.aopc.mean() if example is None else r.aopc[example]
        a.plot(r.fractions.numpy(), y.numpy(), marker="o", ms=3, label=f"{label} (AOPC {float(aopc):.3g})")
    modes = sorted({r.mode for r in results.values()})  # deletion and insertion curves may share the axes
    done = {"deletion": "removed", "insertion": "inserted"}
    a.set_xlabel("fraction of features " + " / ".join(done.get(m, m) for m in modes))
    a.set_ylabel("score drop f(x) − f(x_k)" if drop else "target score")
    a.set_title(f"{' and '.join(modes)} curve{'s' if len(modes) > 1 else ''}"
                + (" (mean over examples)" if example is None else ""))
    a.legend(fontsize=8)
    return fig
