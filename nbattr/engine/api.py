"""``attribute``: the one entry point of the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from . import registry
from .baselines import BaselineSpec
from .batching import BatchSize, check_cancelled
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
    steps: int | str = 50,
    rule: str = "gauss_legendre",
    batch_size: BatchSize = "auto",
    layer: nn.Module | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    **method_options: Any,
) -> Attribution:
    """Attribute the model's target score to the features of ``x``.

    Parameters
    ----------
    model : ``nn.Module`` or callable mapping a batch ``(N, ...)`` to scores ``(N, C)`` or ``(N,)``.
        Attribution runs on the model's device; the model is left exactly as found (training flags,
        ``requires_grad``, ``.grad``, buffers, hooks), also when the call raises. For a callable
        (``lambda x: net(x).logits``) that holds for the modules it reaches by name (closure,
        globals it names, a bound method's or a ``__call__`` object's attributes).
    x : float tensor ``(N, ...)``. A 1-D tensor is one example; an input the model rejects as a
        batch (or maps to a different number of rows) is taken as one example ``x[None]``. The
        result of an unbatched example has N = 1 and ``params["unbatched"] = True``.
    method : a name from :func:`nbattr.methods`.
    target : None (the argmax of each example), an int, or N ints (ignored for ``(N,)`` outputs);
        or SEVERAL targets per example: an ``(N, K)`` int tensor / array / N lists of K ints, or
        ``"topK"`` (e.g. ``"top5"``: each example's K highest-scoring classes, best first). The
        result then carries a K axis after N (``attributions (N, K, ...)``, ``target``,
        ``outputs``, ``baseline_outputs``, ``delta (N, K)``, ``path_outputs (S, N, K)``);
        ``r.for_target(j)`` / ``r.split()`` give ordinary single-target results. saliency,
        gradient_x_input, integrated_gradients, interior_gradients, smoothgrad, deeplift and
        epsilon_lrp run ONE forward per point and K backward passes (batched with
        ``is_grads_batched`` on CUDA, see ``engine.problem.BATCHED_BACKWARD_DEVICES``); occlusion
        and shapley_sampling read all K scores off the forwards of one target (``params["targets"]``
        says which). A method registered without a native path runs once per target.
    baseline : ``"zeros"``, a number, ``"blur"``, ``"uniform"``, ``"mean"``, a tensor broadcastable
        to x, or a callable ``x -> tensor``. With ``layer``, it applies to the layer's output.
    steps, rule : path points and quadrature rule for path methods (see ``nbattr.engine.paths``);
        ``rule`` also names a method's own rule where it has one (``deeplift``: ``"rescale"``).
        ``integrated_gradients`` also takes ``steps="auto"`` with the options ``tol`` (default
        1e-3) and ``max_steps`` (default 257): a nested quadrature is refined per example
        (``rule="clenshaw_curtis"``, the default, on 5, 9, 17, 33, ... points, or
        ``rule="adaptive_simpson"``), reusing every gradient already computed, until
        ``|delta| <= tol * max(|F(x) - F(x')|, 0.01 * max(|F(x)|, |F(x')|))`` (the second term is
        the floor for F(x) ~ F(x')) or ``max_steps`` gradients are used (a warning names those
        examples). ``params["steps"]`` lists each example's gradient
        count, ``params["delta_reached"]`` its |delta|, ``params["converged"]`` whether it met
        the tolerance; ``alphas`` is the sorted union of the points used and ``path_outputs``
        is NaN where an example has no point. See ``nbattr.engine.gradient.AdaptivePath``.
    batch_size : rows per model call, or ``"auto"`` (sized from memory; see ``engine.batching``).
    layer : attribute with respect to this module's output instead of the input (embedding-layer
        attribution for models taking token ids).
    forward_kwargs : keyword arguments for every model call, ``model(points, **forward_kwargs)``
        (Captum's ``additional_forward_args``). A tensor whose first dimension is N (one row per
        example: an attention mask, token type ids) is indexed along with the rows, so each path
        point, sample or perturbation gets its example's row; anything else is passed as is.
        These are not attributed.
    **method_options : the method's own options, listed by :func:`nbattr.methods`.

    Inside a :func:`nbattr.watch` block the call reports its progress and can be cancelled.

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
    # a method may tape the first forward at x and reuse it (DeepLIFT: the recording of its passes)
    record = getattr(info.fn, "record_first_forward", None)
    record = record(model, opts) if record is not None else None
    check_cancelled()  # besides before every chunk: also before a method without chunks starts
    with model_guard(model):
        problem = Problem(model, x, target=target, baseline=baseline, layer=layer, batch_size=batch_size,
                          record=record, keep_graph=getattr(info.fn, "keep_first_graph", False),
                          measure=getattr(info.fn, "measure_first_forward", False),
                          forward_kwargs=forward_kwargs)
        if not problem.multi:
            return info.fn(problem, **opts)
        if getattr(info.fn, "multi_target", False):
            r = info.fn(problem, **opts)
            r.params.setdefault("targets", f"{problem.k} per example, one forward and {problem.k} backward passes")
            return r
        # no native multi-target path: one run per target on a view sharing input and baselines
        parts = []
        for j in range(problem.k):
            check_cancelled()
            parts.append(info.fn(problem.for_target(j), **opts))
        return Attribution.stack(parts, params={"targets": f"{problem.k} per example, one run per target"})
