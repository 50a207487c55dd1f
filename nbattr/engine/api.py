"""``attribute``: the one entry point of the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from . import registry
from .baselines import BaselineSpec
from .batching import BatchSize
from .errors import InputError
from .guard import model_guard
from .paths import RULES
from .problem import Problem, TargetSpec
from .result import Attribution


def attribute(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    method: str = "integrated_gradients",
    target: TargetSpec = None,
    baseline: BaselineSpec = "zeros",
    steps: int = 50,
    rule: str = "gauss_legendre",
    batch_size: BatchSize = "auto",
    layer: nn.Module | None = None,
    **method_options: Any,
) -> Attribution:
    """Attribute the model's target score to the features of ``x``.

    Parameters
    ----------
    model : ``nn.Module`` or callable mapping a batch ``(N, ...)`` to scores ``(N, C)`` or ``(N,)``.
        Attribution runs on the model's device; the model is left exactly as found (training flags,
        ``requires_grad``, ``.grad``, buffers, hooks), also when the call raises.
    x : float tensor ``(N, ...)``. A 1-D tensor is one example; an input the model rejects as a
        batch (or maps to a different number of rows) is taken as one example ``x[None]``. The
        result of an unbatched example has N = 1 and ``params["unbatched"] = True``.
    method : a name from :func:`nbattr.methods`.
    target : None (the argmax of each example), an int, or N ints. Ignored for ``(N,)`` outputs.
    baseline : ``"zeros"``, a number, ``"blur"``, ``"uniform"``, ``"mean"``, a tensor broadcastable
        to x, or a callable ``x -> tensor``. With ``layer``, it applies to the layer's output.
    steps, rule : path points and quadrature rule for path methods (see ``nbattr.engine.paths``);
        ``rule`` also names a method's own rule where it has one (``deeplift``: ``"rescale"``).
    batch_size : rows per model call, or ``"auto"`` (sized from memory; see ``engine.batching``).
    layer : attribute with respect to this module's output instead of the input (embedding-layer
        attribution for models taking token ids).
    **method_options : the method's own options, listed by :func:`nbattr.methods`.

    Returns
    -------
    Attribution
    """
    info = registry.get(method)
    opts = dict(method_options)
    unknown = set(opts) - set(info.options)
    if unknown:
        valid = ", ".join(sorted(info.options)) or "none"
        raise InputError(f"{method} has no option(s) {sorted(unknown)}; its options are: {valid}")
    if info.path:  # steps and rule are the path's; other methods may have a rule of their own
        opts.setdefault("steps", steps)
        opts.setdefault("rule", rule)
    elif "rule" in info.options and rule not in RULES:
        opts.setdefault("rule", rule)  # e.g. deeplift's rule="rescale"; the quadrature default is not one
    with model_guard(model):
        problem = Problem(model, x, target=target, baseline=baseline, layer=layer, batch_size=batch_size)
        return info.fn(problem, **opts)
