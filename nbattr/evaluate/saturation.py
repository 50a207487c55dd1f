"""Saturation along the straight path x' + a (x - x') (Gradients of Counterfactuals, Figs. 2 and 12).

Sundararajan, Taly and Yan (2016) observe that a network's score for the top class rises steeply
for small scalings a of the input and is flat for most of [0, 1]: the gradient at x is then small
although the features matter. :func:`saturation` records that curve, pre-softmax (the logit) and
post-softmax (the probability), and for chosen layers how far the activation at the scaled input
is from the one at x (L2 and cosine distance), which flattens in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.baselines import BaselineSpec
from ..engine.batching import BatchSize, run_chunked
from ..engine.errors import InputError, TargetError
from ..engine.guard import model_guard, modules_of, thread_hook
from ..engine.problem import Problem, TargetSpec

LayerSpec = Mapping[str, nn.Module] | Sequence[str | nn.Module] | str | nn.Module | None


@dataclass
class SaturationResult:
    """Scores and layer distances at the points x' + a (x - x') of the straight path.

    Attributes
    ----------
    alphas : ``(S,)`` the scalings a, from 0 (the baseline) to 1 (the input).
    target : ``(N,)`` long, the class whose score is followed (the argmax at x by default).
    logits : ``(S, N)`` the model's raw (pre-softmax) target score at each point.
    probs : ``(S, N)`` the softmax probability of the target at each point; None for models with
        ``(N,)`` outputs.
    l2 : layer name -> ``(S, N)`` L2 distance between the layer's activation at the point and at x.
    cosine : layer name -> ``(S, N)`` cosine distance ``1 - cos`` between the same two activations
        (1 where the activation at the point is all zero).
    norms : layer name -> ``(N,)`` the L2 norm of the layer's activation at x (to normalise ``l2``).
    """

    alphas: Tensor
    target: Tensor
    logits: Tensor
    probs: Tensor | None
    l2: dict[str, Tensor] = field(default_factory=dict)
    cosine: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The layer names, in the order given."""
        return list(self.l2)

    def relative_l2(self, name: str) -> Tensor:
        """``(S, N)`` the L2 distance of layer ``name`` divided by the norm of its activation at x."""
        return self.l2[name] / self.norms[name].clamp_min(torch.finfo(self.l2[name].dtype).tiny)[None]

    def __repr__(self) -> str:
        s, n = self.logits.shape
        return (f"SaturationResult(points={s}, examples={n}, probs={self.probs is not None}, "
                f"layers={self.layers})")


def resolve_layers(model: Any, layers: LayerSpec) -> dict[str, nn.Module]:
    """Turn a layer spec into ``{name: module}``.

    ``layers`` is a dict name -> module, a module name of ``model.named_modules()`` (e.g.
    ``"model._blocks.3"``), a module of the model, or a sequence of names and modules. A module
    given without a name is named after its path in the model.
    """
    if layers is None:
        return {}
    if isinstance(layers, Mapping):
        out = dict(layers)
        for k, v in out.items():
            if not isinstance(v, nn.Module):
                raise InputError(f"layers[{k!r}] must be an nn.Module, got {type(v).__name__}")
        return out
    if isinstance(layers, (str, nn.Module)):
        items = [layers]
    elif isinstance(layers, (list, tuple)):
        items = list(layers)
    else:
        raise InputError(f"layers must be a module name, a module, a dict name -> module or a list of those; "
                         f"got {type(layers).__name__}")
    tops = modules_of(model)  # a callable (lambda x: net(x)[0]): the one module it uses
    named = dict(tops[0].named_modules()) if len(tops) == 1 else {}
    by_id = {id(m): name for name, m in named.items()}
    out: dict[str, nn.Module] = {}
    for item in items:
        if isinstance(item, str):
            if item not in named:
                if not named:
                    raise InputError(f"layer names need an nn.Module model (or a callable using one); got "
                                     f"{type(model).__name__} using {len(tops)} modules: pass the modules")
                hint = ", ".join(list(n for n in named if n)[:8])
                raise InputError(f"the model has no module named {item!r}; some of its modules: {hint}, ...")
            out[item] = named[item]
        elif isinstance(item, nn.Module):
            out[by_id.get(id(item), f"{type(item).__name__}_{len(out)}")] = item
        else:
            raise InputError(f"a layer is a module name or an nn.Module, got {type(item).__name__}")
    return out


class _Recorder:
    """Forward hooks recording each layer's output once per model call (removed on exit)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers, self.values, self.handles = layers, {}, []

    def __enter__(self) -> _Recorder:
        for name, mod in self.layers.items():
            def hook(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
                if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
                    out = out[0]
                if not isinstance(out, Tensor):
                    raise InputError(f"layer {name!r} returns {type(out).__name__}; need a tensor")
                if name in self.values:
                    raise InputError(f"layer {name!r} is called more than once in one forward; "
                                     "choose a module that is called once")
                self.values[name] = out.detach()

            self.handles.append(thread_hook(mod, hook))
        return self

    def take(self) -> dict[str, Tensor]:
        v, self.values = self.values, {}
        missing = [k for k in self.layers if k not in v]
        if missing:
            raise InputError(f"layer(s) {missing} were not called by the model's forward")
        return v

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def saturation(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    baseline: BaselineSpec = "zeros",
    steps: int = 50,
    target: TargetSpec = None,
    layers: LayerSpec = None,
    batch_size: BatchSize = "auto",
    forward_kwargs: dict[str, Any] | None = None,
) -> SaturationResult:
    """The target score and layer activations along x' + a (x - x') for a = 0, 1/steps, ..., 1.

    Parameters
    ----------
    model : ``nn.Module`` or callable mapping ``(N, ...)`` to ``(N, C)`` or ``(N,)``; run under
        ``torch.no_grad()`` and left exactly as found.
    x : ``(N, ...)`` float inputs (one example without a batch dimension is accepted).
    baseline : the path's start x' (any baseline spec of :func:`nbattr.attribute`); the paper
        scales the input, i.e. ``"zeros"``.
    steps : the path has ``steps + 1`` points a = k / steps.
    target : None (the argmax at x), an int or N ints.
    layers : layers whose activations are compared with the ones at x: a dict name -> module, a
        module name from ``model.named_modules()``, a module, or a sequence of names/modules.
    batch_size : rows per model call, or ``"auto"``.
    forward_kwargs : keyword arguments of every model call, per-example tensors indexed with the
        rows (as for :func:`nbattr.attribute`).

    Returns
    -------
    SaturationResult
        ``logits`` and ``probs`` are ``(steps + 1, N)``; ``l2``/``cosine`` hold one ``(steps + 1, N)``
        array per layer, 0 at a = 1.

    Raises
    ------
    InputError
        Bad steps, unknown layer names, layers not called (or called twice) by the forward.
    TargetError
        A target out of range.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive int, got {steps!r}")
    mods = resolve_layers(model, layers)
    with model_guard(model):
        p = Problem(model, x, target=target, baseline=baseline, batch_size=batch_size,
                    forward_kwargs=forward_kwargs)
        if p.target.dim() != 1:
            raise TargetError(f"give one target per example (an int or N ints); got {p.target.shape[1]} "
                              "per example: call once per target")
        dtype = p.inputs.dtype
        alphas = torch.arange(steps + 1, dtype=torch.float64).div(steps).to(dtype=dtype, device=p.device)
        n, s = p.n, steps + 1
        logits = torch.empty(s, n, dtype=p.outputs.dtype, device=p.device)
        probs = None if p.scalar_output else torch.empty_like(logits)
        l2 = {k: torch.empty(s, n, dtype=torch.float64, device=p.device) for k in mods}
        cos = {k: torch.empty(s, n, dtype=torch.float64, device=p.device) for k in mods}
        diff = p.inputs - p.baselines
        with _Recorder(mods) as rec:
            ref: dict[str, Tensor] = {}
            if mods:
                with torch.no_grad():
                    p.forward_full(p.x, torch.arange(n, device=p.device))
                ref = {k: v.flatten(1).double() for k, v in rec.take().items()}

            def work(sl: slice) -> None:
                idx = torch.arange(sl.start, sl.stop, device=p.device)
                k, rows = idx // n, idx % n
                z = p.baselines[rows] + p.expand(alphas[k], len(idx)) * diff[rows]
                with torch.no_grad():
                    full = p.forward_full(z, rows)
                    logits[k, rows] = p.select(full, p.target[rows])
                    if probs is not None:
                        probs[k, rows] = p.select(full.softmax(1), p.target[rows])
                    if mods:
                        for name, act in rec.take().items():
                            a, r = act.flatten(1).double(), ref[name][rows]
                            if a.shape != r.shape:
                                raise InputError(f"layer {name!r} has shape {tuple(act.shape[1:])} at a "
                                                 "scaled input but another at x")
                            l2[name][k, rows] = (a - r).norm(dim=1)
                            c = F.cosine_similarity(a, r, dim=1, eps=1e-12)
                            cos[name][k, rows] = 1.0 - c

            row_bytes = 4 * p.inputs[0].numel() * p.inputs.element_size()
            run_chunked(s * n, work, batch_size=batch_size, device=p.device, row_bytes=row_bytes,
                        saves=False)
    return SaturationResult(
        alphas=alphas.cpu(), target=p.target.cpu(), logits=logits.cpu(),
        probs=None if probs is None else probs.cpu(),
        l2={k: v.cpu() for k, v in l2.items()}, cosine={k: v.cpu() for k, v in cos.items()},
        norms={k: v.norm(dim=1).cpu() for k, v in ref.items()},
    )
