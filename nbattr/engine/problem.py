"""A validated attribution problem: model, input, target, baseline and how to evaluate them.

Every method receives a :class:`Problem`. It owns the one way to run the model on points of the
attributed space (the input, or a layer's output), to pick the target score, to take gradients
in memory-sized chunks, and to turn the pieces into an :class:`Attribution`.
"""

from __future__ import annotations

import contextlib
import copy
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import baselines as _baselines
from .batching import PROBE_ROWS, BatchSize, StorageBytes, is_oom, run_chunked, warn
from .errors import InputError, NoGradientPathError, NonFiniteWarning, TargetError, TrainingModeWarning
from .guard import model_guard, model_storages, modules_of, thread_hook
from .result import Attribution

TargetSpec = int | str | Sequence[int] | Sequence[Sequence[int]] | Tensor | None

_TOPK = re.compile(r"top(\d+)")

#: device types on which the K backward passes of several targets run as ONE batched backward
#: (``torch.autograd.grad(..., is_grads_batched=True)``). Elsewhere they are a loop of K backward
#: passes over the one retained graph, which measured faster on CPU (IG, small CNN 4x3x64x64,
#: 32 steps, K = 5, 2 threads: 0.64 s looped vs 0.89 s batched vs 1.11 s for 5 separate runs;
#: the same FLOPs, and vmapped convolution backward is slower there). Either way there is one
#: forward per point.
BATCHED_BACKWARD_DEVICES = {"cuda"}

#: device types on which image batches ``(N, C, H, W)`` attributed at the input are handed to the
#: model as channels-last tensors (``torch.channels_last``; the model's weights are untouched):
#: oneDNN's convolutions then run without layout conversions. Measured on 2 CPU cores, forward +
#: backward: 0.87x the time on a small CNN, 0.73x on EfficientNet-Lite0; IG (32 steps) 0.74-0.81x,
#: SmoothGrad 0.69-0.77x. A model that cannot take such an input (``x.view(n, -1)`` on it, or on a
#: convolution's output) is detected by the first forward, which is then run again with the usual
#: layout, as is every later call on that model (:data:`_USUAL_LAYOUT`). Not yet on CUDA:
#: unmeasured there (``benchmarks/bench_layout.py --device cuda`` measures it).
CHANNELS_LAST_DEVICES = {"cpu"}

#: models that failed on a channels-last input and ran with the usual layout: not tried again
#: (the widget calls the engine on the same model many times)
_USUAL_LAYOUT: weakref.WeakSet[Any] = weakref.WeakSet()


def _known_usual_layout(model: Any) -> bool:
    try:
        return model in _USUAL_LAYOUT
    except TypeError:  # not weakly referenceable
        return False


def model_device(model: Any, fallback: torch.device) -> torch.device:
    """Where the model's (or, for a callable, its modules') first parameter or buffer lives."""
    for m in modules_of(model):
        for t in m.parameters():
            return t.device
        for t in m.buffers():
            return t.device
    return fallback


def _mode_dependent(model: Any) -> bool:
    """Whether the model is in training mode and has modules that behave differently then."""
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return any(m.training and isinstance(m, kinds) for top in modules_of(model) for m in top.modules())


class _ReplaceOutput:
    """Forward hook that replaces a layer's output by given values (removed on exit)."""

    def __init__(self, layer: nn.Module, values: Tensor) -> None:
        self.layer, self.values, self.handle = layer, values, None

    def __enter__(self) -> _ReplaceOutput:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> Tensor:
            if not isinstance(out, Tensor):
                raise InputError(f"layer {type(self.layer).__name__} returns "
                                 f"{type(out).__name__}; attribution needs a layer returning a tensor")
            if out.shape != self.values.shape:
                raise InputError(f"layer output shape {tuple(out.shape)} differs from the attributed "
                                 f"values {tuple(self.values.shape)}")
            return self.values

        self.handle = thread_hook(self.layer, hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class _Capture:
    """Forward hook that records a layer's output (removed on exit): a copy, as it left the layer
    (the model may change the tensor in place afterwards: ``nn.ReLU(inplace=True)`` after a
    convolution, ``e += pos`` after an embedding). With ``leaf`` the model goes on with a detached
    copy that requires grad (what the gradient passes differentiate by; a differentiable copy of
    the leaf, which the model may change in place)."""

    def __init__(self, layer: nn.Module, leaf: bool = False) -> None:
        self.layer, self.value, self.handle, self.calls, self.leaf = layer, None, None, 0, leaf

    def __enter__(self) -> _Capture:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
            self.calls += 1
            self.value = out.detach().clone() if isinstance(out, Tensor) else out
            if self.leaf and isinstance(out, Tensor) and out.is_floating_point():
                return out.detach().requires_grad_(True).clone()
            return None

        self.handle = thread_hook(self.layer, hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums over many path points, samples or perturbations are kept: float32 for the half
    precisions (bfloat16 has 8 significant bits; 50 additions in it cost ~3% of a sum), else
    ``dtype``. The attributions are returned in the attributed tensor's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dtype_hint(model: Any, x: Tensor, layer: nn.Module | None) -> str:
    """A hint when the model's floating-point parameters have another dtype than a float ``x``."""
    if layer is not None or not x.is_floating_point():
        return ""
    kinds = {t.dtype for top in modules_of(model) for t in top.parameters() if t.is_floating_point()}
    if len(kinds) != 1 or x.dtype in kinds:
        return ""
    (kind,) = kinds
    return f" (the model's parameters are {kind} and x is {x.dtype}: pass x.to({kind}))"


def _sharing(model: Any, layer: nn.Module) -> str:
    """A hint naming the model's other modules that share ``layer``'s weight (Hugging Face
    encoder-decoders: ``get_input_embeddings()`` is ``shared``, the encoder calls
    ``encoder.embed_tokens``), or ""."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, Tensor):
        return ""
    names = [name for top in modules_of(model) for name, m in top.named_modules()
             if m is not layer and getattr(m, "weight", None) is w]
    if not names:
        return ""
    return (f" (it shares its weight with {', '.join(names[:6])}, which the model may call instead: "
            "pass the one whose output is to be attributed)")


def _require_float(x: Tensor, layer: nn.Module | None) -> None:
    if layer is None and not x.is_floating_point():
        raise InputError(
            f"x has dtype {x.dtype}; attribution needs a floating-point input (an image as uint8: "
            "x.float() / 255, normalised as the model expects). For token ids, pass layer=<the "
            "embedding module> to attribute over its output."
        )


def model_scores(model: Any, x: Tensor, forward_kwargs: dict[str, Any] | None = None,
                 layer: nn.Module | None = None) -> Tensor:
    """The model's output at ``x`` for a caller outside :func:`nbattr.attribute` (the widget's
    list of top classes): inside :func:`model_guard` (a model in training mode keeps its batch-norm
    statistics), without gradients, with the engine's checks of the input's dtype and its hints."""
    _require_float(x, layer)
    with model_guard(model), torch.no_grad():
        try:
            out = model(x, **(forward_kwargs or {}))
        except Exception as err:
            hint = _dtype_hint(model, x, layer)
            if not hint:
                raise
            raise InputError(f"the model failed on x of shape {tuple(x.shape)}: {type(err).__name__}: "
                             f"{err}{hint}") from err
    return require_tensor(out)


def require_tensor(out: Any) -> Tensor:
    """``out`` if the model returned a tensor; else an error naming what it returned and how to
    get the scores out of it (a Hugging Face ``ModelOutput``, a tuple, a dict)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "logits", None), Tensor):
        how = "model(x).logits"
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        how = "model(x)[0]"
    elif isinstance(out, dict) and out:
        how = f"model(x)[{next(iter(out))!r}]"
    else:
        how = None
    hint = f": pass `lambda x: {how}` as the model" if how else ""
    raise InputError(f"the model must return a tensor of scores, (N, C) or (N,), but returned "
                     f"{type(out).__name__}{hint}")


def nonfinite_message(method: str, attributions: Tensor) -> str | None:
    """The :class:`NonFiniteWarning`'s message when ``attributions`` hold NaN or inf, else None.
    One reduction decides; only a non-finite (or overflowing) sum is looked at element by element.
    (The widget applies it to each target of a several-target call on its own.)"""
    if attributions.numel() == 0 or torch.isfinite(attributions.sum()).item():
        return None
    bad = int((~torch.isfinite(attributions)).sum())
    if not bad:
        return None
    return (f"{method}: {bad} of {attributions.numel()} attributions are not finite (NaN or "
            "inf), so the map and delta cannot be trusted: the model's gradient (or a rule) "
            "produced them, e.g. sqrt or log at 0 on the path")


def _warn_nonfinite(method: str, attributions: Tensor) -> None:
    """Warn when attributions hold NaN or inf (the inputs were checked finite, so the model's
    gradient or a rule made them): never hand over such a map silently."""
    message = nonfinite_message(method, attributions)
    if message is not None:
        warn(message, NonFiniteWarning)


def _warn_nonfinite_scores(method: str, outputs: Tensor, base_out: Tensor | None) -> None:
    """Warn when the target score at x or at the baseline is NaN or inf (the attributions may still
    be finite: a baseline outside the model's domain, log(0) there, makes F(x') = -inf and
    ``delta`` infinite, which no relative check of delta catches). One reduction decides."""
    scores = [("x", outputs)] + ([("the baseline", base_out)] if base_out is not None else [])
    if bool(torch.stack([torch.isfinite(v).all() for _, v in scores]).all()):
        return
    for where, v in scores:
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            warn(f"{method}: the target score at {where} is not finite for {bad} of {v.numel()} "
                 "(example, target) pairs (NaN or inf), so F(x) - F(x') and delta are meaningless there: "
                 + ("choose a baseline inside the model's domain" if where != "x" else
                    "the model's output at the input itself is not finite"), NonFiniteWarning)


@contextlib.contextmanager
def _named_autograd_errors() -> Any:
    """Autograd's errors that come from how the model is built, as named InputErrors."""
    try:
        yield
    except RuntimeError as e:
        if "use_reentrant=True" in str(e):
            raise InputError(
                "the model uses torch.utils.checkpoint with use_reentrant=True, which gives no "
                "gradient with respect to an input through torch.autograd.grad; turn activation "
                "checkpointing off for attribution (e.g. model.gradient_checkpointing_disable()) or "
                "use use_reentrant=False") from e
        raise


def score_gradient(scores: Tensor, z: Tensor) -> Tensor:
    """Gradient of the scores with respect to ``z``; a named error when there is no path.

    ``scores`` is ``(M,)`` (one target per row of ``z``): the result is ``(M, ...)``, the gradient of
    ``scores.sum()``. ``scores`` may also be ``(M, K)`` (K targets per row): the result is
    ``(M, K, ...)``, the gradient of each column, from one forward and K backward passes: batched
    by ``torch.autograd.grad(..., is_grads_batched=True)`` on :data:`BATCHED_BACKWARD_DEVICES`,
    else (and where an operation has no batching rule) a loop of K backward passes over the same
    retained graph.
    """
    if not scores.requires_grad:
        raise NoGradientPathError(
            "the model's output does not depend on the attributed tensor (no gradient path): check "
            "that the forward uses x (or the given layer's output) through differentiable operations")
    with _named_autograd_errors():
        return _score_gradient(scores, z)


def _score_gradient(scores: Tensor, z: Tensor) -> Tensor:
    if scores.dim() == 1:
        (g,) = torch.autograd.grad(scores.sum(), z, allow_unused=True)
        if g is None:
            raise NoGradientPathError("the target score has no gradient path to the input")
        return g
    k = scores.shape[1]
    if scores.device.type in BATCHED_BACKWARD_DEVICES:
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        seeds = eye[:, None, :].expand(k, scores.shape[0], k)  # seed j selects column j of every row
        try:
            # No warnings.catch_warnings here: it swaps the process's filters, and the widget
            # runs this on a worker thread (the user's cells would lose their warnings meanwhile).
            # vmap's fallback performance notes are off unless the user turned them on.
            (g,) = torch.autograd.grad(scores, z, grad_outputs=seeds, is_grads_batched=True,
                                       retain_graph=True, allow_unused=True)
        except RuntimeError:  # an operation (e.g. a custom autograd.Function) without a vmap rule
            g = False
        if g is None:
            raise NoGradientPathError("the target score has no gradient path to the input")
        if g is not False:
            return g.movedim(0, 1)  # (K, M, ...) -> (M, K, ...)
    parts = []
    for j in range(k):
        (gj,) = torch.autograd.grad(scores[:, j].sum(), z, retain_graph=j < k - 1, allow_unused=True)
        if gj is None:
            raise NoGradientPathError("the target score has no gradient path to the input")
        parts.append(gj)
    return torch.stack(parts, 1)


class Problem:
    """Validated inputs of one :func:`nbattr.attribute` call.

    Attributes
    ----------
    model : the user's callable.
    x : ``(N, ...)`` the model's input on the model's device.
    layer : module whose output is attributed, or None (attribute the input).
    inputs : ``(N, ...)`` detached values of the attributed tensor at x.
    target : ``(N,)`` long; ``(N, K)`` when several targets per example were asked for (``multi``).
    outputs : ``(N,)`` target scores at x; ``(N, K)`` with several targets.
    multi : whether ``target`` holds K targets per example. Methods that compute them natively
        (one forward and K backward passes; the perturbation methods read the K scores off each
        forward) accept such a problem; the others get one :meth:`for_target` view per target
        from :func:`nbattr.attribute`.
    scalar_output : whether the model returns ``(N,)`` scores.
    unbatched : whether x was given without a batch dimension (the result then has N = 1).
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        x: Tensor,
        *,
        target: TargetSpec = None,
        baseline: _baselines.BaselineSpec = "zeros",
        layer: nn.Module | None = None,
        batch_size: BatchSize = "auto",
        record: Callable[[], Any] | None = None,
        keep_graph: bool = False,
        measure: bool = False,
        forward_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(model):
            raise InputError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        if forward_kwargs is not None and not (isinstance(forward_kwargs, dict)
                                               and all(isinstance(k, str) for k in forward_kwargs)):
            raise InputError("forward_kwargs must be a dict of keyword arguments for the model, e.g. "
                             f"{{'attention_mask': mask}}; got {type(forward_kwargs).__name__}")
        if not isinstance(x, Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if layer is not None and not isinstance(layer, nn.Module):
            raise InputError(f"layer must be an nn.Module of the model, got {type(layer).__name__}")
        _require_float(x, layer)
        if x.dim() == 0:
            raise InputError("x is a 0-d tensor; give at least one feature dimension")
        if x.numel() == 0:
            raise InputError(f"x of shape {tuple(x.shape)} is empty: nothing to attribute")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise InputError("x contains NaN or Inf")
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        self.model = model
        self.layer = layer
        self._record = record
        #: the mode (``record()``) the first forward at ``x`` ran in, when it was taped: with
        #: ``batch_size="auto"`` only for at most ``PROBE_ROWS`` examples (one chunk, whose
        #: recording a method may then reuse; more rows would keep all their activations)
        self.first_tape: Any = None
        self._keep_graph = keep_graph
        #: ``(leaf, output)`` of the first forward at ``x`` run with grad (``keep_graph``, at most
        #: ``PROBE_ROWS`` examples with ``batch_size="auto"``, input attribution): the gradient at
        #: ``x`` then needs no second forward (see :meth:`take_first_graph`)
        self.first_graph: tuple[Tensor, Tensor] | None = None
        self._measure = measure
        #: bytes autograd saves per example in a forward at ``x`` (``measure``, at most
        #: ``PROBE_ROWS`` examples, ``batch_size="auto"``, input attribution: the first forward
        #: runs with grad and counts them), so the gradient passes need no probe chunk
        self.saved_row_bytes: int | None = None
        #: bytes per example of the widest activation that forward saved (CPU chunks keep it in cache)
        self.saved_row_largest: int | None = None
        self.device = model_device(model, x.device)
        #: keyword arguments of every model call; :meth:`_call` indexes those with a row per example
        self._kwargs: dict[str, Any] = {k: v.to(self.device) if isinstance(v, Tensor) else v
                                        for k, v in (forward_kwargs or {}).items()}
        self._per_row: frozenset[str] = frozenset()
        self.batch_size = batch_size
        self.stats: dict[str, Any] = {}
        self._baseline_spec = baseline
        # baselines and the model's full output at them, shared with every for_target() view
        # (and whether the model takes its points channels-last: decided by the first forward)
        self._shared: dict[str, Any] = {"baselines": None, "baseline_full": None, "channels_last": False}
        if _mode_dependent(model):
            warn("the model is in training mode: dropout and batch-norm make attributions random "
                 "and batch-dependent; call model.eval() first", TrainingModeWarning)

        x = x.detach().to(self.device)
        # A 1-D x is one example (a row of features). Otherwise x is a batch, unless the model
        # fails on it or returns a different number of rows, in which case x[None] is tried.
        self.unbatched = x.dim() == 1
        if self.unbatched:
            self._batch_kwargs_like(x)
            x = x.unsqueeze(0)
            full, inputs = self._first_forward(x)
        else:
            try:
                full, inputs = self._first_forward(x)
                ok = full.dim() >= 1 and full.shape[0] == x.shape[0]
                err: Exception | None = None
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - the model's own error; retried unbatched
                ok, err = False, e
            if not ok:
                unbatched_kwargs = self._kwargs
                self._batch_kwargs_like(x)
                try:
                    full, inputs = self._first_forward(x.unsqueeze(0))
                except Exception:  # noqa: BLE001
                    self._kwargs = unbatched_kwargs
                    if err is not None:
                        raise InputError(
                            f"the model failed on x of shape {tuple(x.shape)} (taken as a batch) and "
                            f"on x[None]: {type(err).__name__}: {err}{_dtype_hint(model, x, layer)}") from err
                    raise InputError(
                        f"the model maps x of shape {tuple(x.shape)} to an output of shape "
                        f"{tuple(full.shape)}; expected (N, C) or (N,) with N = {x.shape[0]}"
                    ) from None
                if full.dim() not in (1, 2) or full.shape[0] != 1:
                    if err is not None:  # x[None] is no better: the model's own error stands
                        raise err
                    raise InputError(f"the model's output has shape {tuple(full.shape)}; "
                                     "expected (N, C) or (N,)")
                x = x.unsqueeze(0)
                self.unbatched = True
        self._check_output(full, x.shape[0])
        self.x = x
        self.n = x.shape[0]
        self._per_row = frozenset(k for k, v in self._kwargs.items()
                                  if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == self.n)
        self.inputs = inputs
        self.scalar_output = full.dim() == 1
        self.num_classes = 1 if self.scalar_output else full.shape[1]
        self.logits = full
        self.target = self._resolve_target(target, full)
        self.multi = self.target.dim() == 2
        self.outputs = self.select(full, self.target)

    # -- the model -------------------------------------------------------------------------
    def _first_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The model's output at ``x`` and the values of the attributed tensor there. Decides
        whether the points go to the model channels-last (:data:`CHANNELS_LAST_DEVICES`): tried
        first for an image batch, and if the model fails on it, the usual layout decides."""
        self._shared["channels_last"] = False
        if (self.layer is None and x.dim() == 4 and x.is_floating_point()
                and self.device.type in CHANNELS_LAST_DEVICES and not _known_usual_layout(self.model)):
            try:
                result = self._first_forward_as(x, torch.channels_last)
            except Exception:  # noqa: BLE001 - the model needs the usual layout (or fails anyway)
                result = self._first_forward_as(x, torch.preserve_format)
                with contextlib.suppress(TypeError):  # a callable that takes no weak reference
                    _USUAL_LAYOUT.add(self.model)
                return result
            self._shared["channels_last"] = True
            return result
        return self._first_forward_as(x, torch.preserve_format)

    def _first_forward_as(self, x: Tensor, layout: torch.memory_format) -> tuple[Tensor, Tensor]:
        # one chunk's worth of rows: the first forward may keep what a method will reuse
        few = x.shape[0] <= (PROBE_ROWS if self.batch_size == "auto" else self.batch_size)
        try:
            return self._first_forward_once(x, layout, few)
        except Exception as err:  # noqa: BLE001 - re-raised unless an OOM of a forward with grad
            if not (few and (self._measure or self._keep_graph) and is_oom(err)):
                raise
        # The forward with grad (measuring, or keeping its graph) did not fit: the plain one
        # without grad; the gradient passes then find their size by a probe chunk and halving.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._first_forward_once(x, layout, few, plain=True)

    def _first_forward_once(self, x: Tensor, layout: torch.memory_format, few: bool,
                            plain: bool = False) -> tuple[Tensor, Tensor]:
        mode = self._record() if self._record is not None and few else None
        self.first_tape = self.first_graph = self.saved_row_bytes = self.saved_row_largest = None
        # ``measure``: run with grad and count what autograd saves (the weights are not per row)
        measure = self._measure and mode is None and few and self.batch_size == "auto" and not plain
        counter = StorageBytes(model_storages(self.model)) if measure else None
        counting = (torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack)
                    if counter is not None else contextlib.nullcontext())
        with torch.no_grad():
            if self.layer is None:
                keep = self._keep_graph and mode is None and few and not plain
                if keep or counter is not None:  # with grad, on a leaf: measuring or keeping the graph
                    # a copy: a model may work in place on its input, and x (the caller's data) stays
                    leaf = x.detach().clone().requires_grad_(True)
                    with torch.enable_grad(), counting:
                        out = require_tensor(self._call(leaf.clone(memory_format=layout)))
                    if counter is not None:
                        self.saved_row_bytes = max(1, counter.bytes // x.shape[0])
                        self.saved_row_largest = max(1, counter.largest // x.shape[0])
                    if keep:
                        self.first_graph = (leaf, out)
                    return out.detach(), x
                z = x.clone(memory_format=layout)
                if mode is None:
                    return require_tensor(self._call(z)), x
                with mode:
                    out = require_tensor(self._call(z))
                self.first_tape = mode
                return out, x
            with (_Capture(self.layer, leaf=counter is not None) as cap,
                  (mode if mode is not None else contextlib.nullcontext()),
                  torch.set_grad_enabled(counter is not None), counting):
                out = require_tensor(self._call(x.clone()))
            if counter is not None:
                out = out.detach()
                if cap.calls == 1:
                    self.saved_row_bytes = max(1, counter.bytes // x.shape[0])
                    self.saved_row_largest = max(1, counter.largest // x.shape[0])
            self.first_tape = mode
            if cap.calls == 0:
                raise InputError(f"layer {type(self.layer).__name__} was not called by the model's "
                                 f"forward; pass a module that the model uses{_sharing(self.model, self.layer)}")
            if cap.calls > 1:
                raise InputError(f"layer {type(self.layer).__name__} is called {cap.calls} times in "
                                 "one forward; attribute a layer that is called once")
            if not isinstance(cap.value, Tensor):
                raise InputError(f"layer {type(self.layer).__name__} returns "
                                 f"{type(cap.value).__name__}; choose a layer returning a tensor")
            if not cap.value.is_floating_point():
                raise InputError(f"layer output has dtype {cap.value.dtype}; need floating point")
            return out, cap.value.detach()

    def _batch_kwargs_like(self, x: Tensor) -> None:
        """For one example given without its batch dimension: the ``forward_kwargs`` tensors of
        exactly its shape (an attention mask beside token ids) get theirs too, as x does."""
        self._kwargs = {k: v.unsqueeze(0) if isinstance(v, Tensor) and v.shape == x.shape else v
                        for k, v in self._kwargs.items()}

    @staticmethod
    def _check_output(out: Any, n: int) -> None:
        require_tensor(out)
        if out.dim() not in (1, 2) or out.shape[0] != n:
            raise InputError(f"the model's output has shape {tuple(out.shape)}; expected (N, C) or "
                             f"(N,) with N = {n}")
        if out.dim() == 2 and out.shape[1] == 0:
            raise InputError(f"the model's output has shape {tuple(out.shape)}: no scores to attribute")
        if not out.is_floating_point():
            raise InputError(f"the model's output has dtype {out.dtype}; expected floating point")

    def _resolve_target(self, target: TargetSpec, full: Tensor) -> Tensor:
        """``(N,)`` targets, or ``(N, K)`` for a 2-D target (tensor, array, N lists of K ints) or ``"topK"``."""
        n = full.shape[0]
        t: Tensor | None = None
        if isinstance(target, bool):
            raise TargetError(f"target must be an int, N ints or N lists of K ints, got {target!r}")
        if target is not None and not isinstance(target, (int, str)):
            try:
                t = torch.as_tensor(target, device=self.device)
            except (ValueError, TypeError, RuntimeError) as e:
                raise TargetError(f"target must be an int, N ints or N lists of K ints (the same K for "
                                  f"every example); could not read it: {e}") from None
            if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
                raise TargetError(f"target must hold integers, got dtype {t.dtype}")
            if t.dim() > 2:
                raise TargetError(f"target has shape {tuple(t.shape)}; give N ints or an (N, K) array of "
                                  "K targets per example")
        multi = isinstance(target, str) or (t is not None and t.dim() == 2)
        if self.scalar_output:
            if multi:
                raise TargetError(f"several targets per example need a model with (N, C) outputs; this "
                                  f"model returns (N,) scores of shape {tuple(full.shape)}")
            return torch.zeros(n, dtype=torch.long, device=self.device)
        c = full.shape[1]
        if target is None:
            return full.argmax(1)
        if isinstance(target, str):
            m = _TOPK.fullmatch(target)
            if m is None:
                raise TargetError(f"target string {target!r} is not understood; use 'topK' (e.g. 'top5') "
                                  "for the K highest-scoring classes of each example")
            k = int(m.group(1))
            if not 1 <= k <= c:
                raise TargetError(f"target {target!r} asks for {k} classes of a model with {c} output "
                                  f"classes; K must lie in 1..{c}")
            return full.topk(k, dim=1).indices
        if isinstance(target, int):
            t = torch.full((n,), target, dtype=torch.long, device=self.device)
        elif multi:
            if t.shape[0] != n:
                raise TargetError(f"target has {t.shape[0]} rows of targets for {n} examples; several "
                                  "targets per example must be (N, K)")
            if t.shape[1] == 0:
                raise TargetError("target has K = 0 targets per example; give at least one")
            t = t.long()
        else:
            t = t.long().reshape(-1)
            if t.numel() == 1:
                t = t.expand(n).clone()
            if t.numel() != n:
                raise TargetError(f"target has {t.numel()} entries for {n} examples")
        bad = (t < 0) | (t >= c)
        if bad.any():
            v = int(t[bad][0])
            raise TargetError(f"target {v} is out of range for a model with {c} output classes "
                              f"(valid: 0..{c - 1})")
        return t

    def select(self, full: Tensor, target: Tensor) -> Tensor:
        """The target score of each row: ``full[i, target[i]]`` (or ``full`` for (N,) outputs).

        With ``(M, K)`` targets the result is ``(M, K)``: ``full[i, target[i, j]]``.
        """
        if full.dim() == 1:
            return full
        if target.dim() == 2:
            return full.gather(1, target)
        return full.gather(1, target.view(-1, 1)).squeeze(1)

    @property
    def k(self) -> int:
        """Targets per example: K for a multi-target problem, else 1."""
        return int(self.target.shape[1]) if self.multi else 1

    def for_target(self, j: int) -> Problem:
        """A single-target view of a multi-target problem: target ``self.target[:, j]``.

        It shares the input, the model, the baselines and the model's output at them (nothing is
        recomputed) and has its own ``stats``.
        """
        if not self.multi:
            raise ValueError("for_target needs a problem with several targets per example")
        view = copy.copy(self)
        view.target = self.target[:, j].contiguous()
        view.multi = False
        view.outputs = self.outputs[:, j].contiguous()
        view.stats = {}
        return view

    def forward_full(self, z: Tensor, rows: Tensor) -> Tensor:
        """Raw model output for points ``z`` of the attributed space; ``rows`` are example indices.

        The model gets a copy of ``z`` (a differentiable one, when ``z`` requires grad): a model
        that works in place on its input (``x.relu_()``) then changes neither the caller's
        tensors (inputs, baselines) nor a leaf whose gradient is wanted. The copy is channels-last
        when the first forward chose it (:data:`CHANNELS_LAST_DEVICES`).
        """
        cl = self._shared["channels_last"] and z.dim() == 4
        z = z.clone(memory_format=torch.channels_last if cl else torch.preserve_format)
        if self.layer is None:
            out = self._call(z, rows)
        else:
            with torch._C.DisableTorchFunction():  # our own indexing: not the model's (DeepLIFT's tape)
                x = self.x[rows]
            with _ReplaceOutput(self.layer, z):
                out = self._call(x, rows)
        self._check_output(out, z.shape[0])
        return out

    def _call(self, z: Tensor, rows: Tensor | None = None) -> Any:
        """The model on ``z`` with :attr:`_kwargs`; those with one row per example are indexed by
        ``rows`` (None: all examples, in order). A model that fails on more rows than examples
        gets a note on its error: a per-example tensor it closes over is the usual cause."""
        kwargs = self._kwargs
        if rows is not None and self._per_row:
            with torch._C.DisableTorchFunction():  # our own indexing: not the model's
                kwargs = {k: v[rows] if k in self._per_row else v for k, v in kwargs.items()}
        try:
            return self.model(z, **kwargs)
        except Exception as err:
            n = getattr(self, "n", None)
            if (n is not None and z.shape[0] != n and hasattr(err, "add_note") and not is_oom(err)
                    and not type(err).__module__.startswith("nbattr")):
                err.add_note(
                    f"nbattr: the model ran on the {n} example(s) but failed on a batch of "
                    f"{z.shape[0]} rows (path points, samples or perturbations of them). If it uses "
                    "a per-example tensor besides its input (an attention mask), pass it as "
                    "attribute(..., forward_kwargs={'attention_mask': mask}): tensors with one row "
                    "per example are indexed along with the rows.")
            raise

    def take_first_graph(self) -> tuple[Tensor, Tensor] | None:
        """The first forward's ``(leaf, scores)`` when it kept its graph (see :attr:`first_graph`),
        once: the target scores at ``x`` ready for one backward pass."""
        graph, self.first_graph = self.first_graph, None
        if graph is None:
            return None
        leaf, out = graph
        self.stats["chunks"] = [self.n]
        return leaf, self.select(out, self.target)

    def forward(self, z: Tensor, rows: Tensor) -> Tensor:
        """``(M,)`` target scores at points ``z`` (M rows) belonging to examples ``rows``."""
        return self.select(self.forward_full(z, rows), self.target[rows])

    # -- baselines -------------------------------------------------------------------------
    @property
    def baselines(self) -> Tensor:
        if self._shared["baselines"] is None:
            self._shared["baselines"] = _baselines.resolve(self._baseline_spec, self.inputs)
        return self._shared["baselines"]

    @property
    def baseline_outputs(self) -> Tensor:
        """Target scores F(x') at the baselines: ``(N,)``, or ``(N, K)`` with several targets."""
        if self._shared["baseline_full"] is None:
            rows = torch.arange(self.n, device=self.device)
            with torch.no_grad():
                self._shared["baseline_full"] = self.forward_full(self.baselines, rows)
        return self.select(self._shared["baseline_full"], self.target)

    def baseline_name(self) -> str:
        spec = self._baseline_spec
        if isinstance(spec, (str, int, float)):
            return str(spec)
        if isinstance(spec, Tensor):
            return "tensor"
        return getattr(spec, "__name__", "callable")

    # -- gradients in chunks -----------------------------------------------------------------
    def expand(self, t: Tensor, k: int) -> Tensor:
        """Reshape a ``(k,)`` vector to broadcast against ``(k, *inputs.shape[1:])``."""
        return t.view(k, *([1] * (self.inputs.dim() - 1)))

    def gradient_pass(
        self,
        total: int,
        points: Callable[[Tensor], tuple[Tensor, Tensor]],
        consume: Callable[[Tensor, Tensor, Tensor, Tensor], None],
        *,
        reuse_probe: bool = False,
    ) -> None:
        """Evaluate ``total`` points in chunks and hand each chunk's scores and gradients on.

        ``points(idx) -> (z, rows)`` builds the points with flat indices ``idx`` and their example
        indices; ``consume(idx, rows, scores, grads)`` accumulates them. With several targets
        (``multi``) scores are ``(M, K)`` and gradients ``(M, K, ...)``. ``reuse_probe``: size
        ``"auto"`` chunks from the bytes per row measured by an earlier pass of this problem.
        """
        row_bytes = (1 + self.k) * self.inputs[0].numel() * self.inputs.element_size()

        def work(sl: slice) -> None:
            idx = torch.arange(sl.start, sl.stop, device=self.device)
            z, rows = points(idx)
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                s = self.forward(z, rows)
                g = score_gradient(s, z)
            consume(idx, rows, s.detach(), g)

        per_row = self.stats.get("row_bytes") if reuse_probe else None
        if per_row is None and self.saved_row_bytes is not None:
            per_row = self.saved_row_bytes + row_bytes  # measured by the first forward
        run_chunked(total, work, batch_size=self.batch_size, device=self.device, row_bytes=row_bytes,
                    stats=self.stats, per_row=per_row,
                    largest_row=self.saved_row_largest or (self.stats.get("largest_row") if reuse_probe else None),
                    exclude=model_storages(self.model) if per_row is None and self.batch_size == "auto" else ())

    def eval_pass(
        self,
        total: int,
        points: Callable[[Tensor], tuple[Tensor, Tensor]],
        consume: Callable[[Tensor, Tensor, Tensor], None],
    ) -> None:
        """Like :meth:`gradient_pass` without gradients (perturbation methods)."""
        row_bytes = 4 * self.inputs[0].numel() * self.inputs.element_size()

        def work(sl: slice) -> None:
            idx = torch.arange(sl.start, sl.stop, device=self.device)
            z, rows = points(idx)
            with torch.no_grad():
                consume(idx, rows, self.forward(z, rows))

        # No autograd graph is saved without gradients: size chunks from the inputs alone.
        run_chunked(total, work, batch_size=self.batch_size, device=self.device,
                    row_bytes=row_bytes, stats=self.stats, saves=False, largest_row=self.saved_row_largest)

    # -- the result --------------------------------------------------------------------------
    def result(
        self,
        method: str,
        attributions: Tensor,
        *,
        completeness: bool = False,
        uses_baseline: bool = False,
        params: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Attribution:
        """Assemble an :class:`Attribution`; ``delta`` is computed when ``completeness``."""
        base_out = fields.pop("baseline_outputs", None)
        baselines = fields.pop("baselines", None)
        if uses_baseline:
            base_out = self.baseline_outputs if base_out is None else base_out
            baselines = self.baselines if baselines is None else baselines
        attributions = attributions.to(self.inputs.dtype)  # half precisions were accumulated wider
        if fields.get("stderr") is not None:
            fields["stderr"] = fields["stderr"].detach().to(self.inputs.dtype)
        _warn_nonfinite(method, attributions)
        _warn_nonfinite_scores(method, self.outputs, base_out)
        delta = None
        if completeness:
            # summed and subtracted wide: in bfloat16, sum(attributions) - (F(x) - F(x')) would round
            # to a multiple of the scores' last bit (often exactly 0)
            wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
            out = torch.promote_types(attributions.dtype, self.outputs.dtype)
            delta = (attributions.to(wide).flatten(2 if self.multi else 1).sum(-1)
                     - (self.outputs.to(wide) - base_out.to(wide))).to(out)
        p = {"batch_size": self.batch_size, "layer": type(self.layer).__name__ if self.layer else None}
        if uses_baseline:
            p["baseline"] = self.baseline_name()
        if self.unbatched:
            p["unbatched"] = True
        if self._shared["channels_last"]:
            p["channels_last"] = True
        p.update(params or {})
        if "chunks" in self.stats:
            p["chunks"] = list(self.stats["chunks"])
        return Attribution(
            attributions=attributions.detach(),
            method=method,
            target=self.target,
            outputs=self.outputs,
            baseline_outputs=base_out,
            delta=delta,
            params=p,
            inputs=self.inputs,
            baselines=baselines,
            **fields,
        )
