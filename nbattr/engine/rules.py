"""Modified-backward methods: DeepLIFT (Rescale) and epsilon-LRP.

Both methods replace, at every elementwise nonlinearity ``y = f(t)`` of the model, the local
derivative ``f'(t)`` by a *multiplier* ``m``, give products of two input-dependent tensors a
product rule, compute composite operations (softmax, norms, max-pooling, attention) through a
decomposition into those pieces, keep the gradient of linear operations, and multiply the
resulting modified gradient by the input (ε-LRP) or by ``x - x'`` (DeepLIFT):

* DeepLIFT Rescale (Shrikumar et al. 2017): ``m = (f(t) - f(t')) / (t - t')`` where ``t'`` is
  the value of the same tensor when the model runs on the reference ``x'``. Because every
  multiplier is an exact secant, every product split is exact and linear maps pass differences
  through unchanged, ``sum(attributions) = F(x) - F(x')`` (up to rounding) as long as every
  operation on the path has a rule.
* ε-LRP (Bach et al. 2015) as DeepExplain computes it (Ancona et al. 2018):
  ``m = f(t) / (t + ε sign(t))`` with ``sign(0) = +1``.

The operation table
-------------------
* Linear, plain gradient (:data:`LINEAR_OPS`): shapes and indexing (view, reshape, permute,
  getitem, cat, pad, unfold, index_select, gather, repeat_interleave, tril, ...), add, sub,
  sum, mean, cumsum, average pooling, interpolate; :data:`BILINEAR_OPS` (linear, conv, matmul,
  mul, div, einsum, ...) when at most one operand depends on the input; :data:`EVAL_ONLY_OPS`
  (batch norm, dropout) when not training; :data:`SELECT_OPS` (``where``, ``masked_fill``)
  while the condition is the same at the input and the reference (DeepLIFT compares the taped
  condition; a condition that changes, as in ``where(t > 0, t, 0)``, is reported), and likewise
  indexing by a tensor (:data:`INDEX_OPS`: ``gather``, ``h[idx]``, ``scatter``, ...) while the
  index is the same (``h.gather(1, h.argmax(1, keepdim=True))`` is reported); the selections by
  value (:data:`SELECTION_OPS`: ``topk``, ``sort``, ``kthvalue``) while their picks are. A value of the
  input made a constant (``detach()``, or computed under ``no_grad`` inside the forward) is
  reported: it differs between the passes, which the rules cannot see.
* Elementwise nonlinearities, Rescale / ε multiplier (:data:`NONLINEAR_OPS`): relu and its
  variants, sigmoid, tanh, softplus, GELU (both forms), SiLU, mish, hardswish, hardsigmoid,
  ELU/SELU/CELU, exp, log, sqrt, rsqrt, pow, abs, sin, cos, erf, clamp, reciprocal, ``c / t``,
  ``maximum(t, c)``, ... (one input-dependent argument).
* Products of two input-dependent operands (:data:`PRODUCT_OPS`): ``*``/``mul``, matmul, mm,
  bmm, einsum of two varying operands, dot, inner, outer, tensordot, mv; in place too
  (``a *= b``).
* Composites (:data:`COMPOSITES`, :data:`BINARY_COMPOSITES`), computed by a decomposition whose
  pieces have the rules above (below).
* Anything else that produces an input-dependent tensor keeps its plain gradient and is counted
  by name into :attr:`Attribution.unsupported` (calls per forward pass, the largest over
  chunks; also ``params["unsupported"]``) with one warning; with ``strict=True``
  :class:`UnsupportedOperationError` is raised instead. Examples: ``cumprod``, ``prod``,
  ``special_erfcx``, an einsum of three varying operands, ``pow(a, b)`` with both varying,
  batch norm in training mode, attention with ``dropout_p > 0``, a fused kernel called directly
  (``torch._transformer_encoder_layer_fwd``).

The product rule
----------------
DeepLIFT: for ``y = f(a, b)`` bilinear with both operands varying, ``a`` gets the multiplier
``f(·, ½(b + b'))`` and ``b`` gets ``f(½(a + a'), ·)`` — the two-player Shapley split, exact:
``Δ(ab) = ½(b + b')Δa + ½(a + a')Δb`` (also for matmul: ``ΔA ½(B + B') + ½(A + A') ΔB``). It is
implemented as ``f(a, b).detach() + f(a - a.detach(), b̄) + f(ā, b - b.detach())``. Division
``a / b`` with both varying is ``a * reciprocal(b)`` (reciprocal is an elementwise
nonlinearity); ``maximum(a, b)`` = ``b + relu(a - b)``, ``minimum(a, b)`` = ``a - relu(a - b)``.
The split is exact but ill-conditioned when one factor changes scale by orders of magnitude
between the passes: the two halves are then large and cancel. That happens in norms: with a
nearly constant input at the reference (a zero baseline), ``x = rsqrt(var + eps)`` is
``1/sqrt(eps)`` there. So the product of a norm's normaliser ``x`` with its signal ``z``
(:meth:`_Replay.mark_scale`) takes the exact *ordered* split instead, per row: ``Δz`` is weighted
by the smaller of ``x``, ``x'`` and ``Δx`` by the other pass's ``z`` (``x Δz + z' Δx`` or
``x' Δz + z Δx``; Shapley is their average). On a transformer block with a zero baseline this
brings the attributions' L1 norm from ~1000 |F(x) - F(x')| (Shapley) to ~10 (IG: ~50).

ε-LRP, the gating convention (Arras et al. 2017): in ``gate * signal`` the gate passes no
relevance and the signal gets it all (the gate is held constant: gradient ``gate`` to the signal,
none to the gate). A *gate* is the output of sigmoid, hardsigmoid, softmax or softmin
(:data:`GATE_OPS`), the normaliser ``rsqrt(var + eps)`` inside layer/group/RMS norm (so norms
follow Ali et al. 2022: the scale is held constant), or anything computed from gates by linear
operations only (``1 - z``, a reshape, a chunk). So LSTM/GRU gates, swish ``x * sigmoid(x)``
(which then equals the SiLU rule) and attention ``softmax(q k^T) @ v`` (relevance to ``v``)
conserve relevance. A product with no gate or with two gates is split in halves, ``½b`` to
``a`` and ``½a`` to ``b`` (the Shapley split with a zero reference), which also conserves.

The decompositions
------------------
* ``softmax(t) = exp(t - L)``, ``log_softmax(t) = t - L``, ``logsumexp(t) = L`` with
  ``L = c + log(sum(exp(t - c)))``; ``softmin(t) = softmax(-t)``. The shift ``c`` is a constant
  shared by both passes (the larger of the maxima at the input and at the reference, so
  ``t - c <= 0``); when those maxima are so far apart that the sum could underflow, ``c`` is
  each pass's own maximum computed by the max tree below. (Not ``e * (1 / sum)``: with a
  product the split would be ill-conditioned, ``1/sum`` changing by ``exp(max t - max t')``.)
* ``layer_norm``: ``d = t - mean(t)``, ``y = d * rsqrt(mean(d²) + eps) * w + b`` (``d²`` by
  ``square``, a nonlinearity); ``rms_norm``: ``t * rsqrt(mean(t²) + eps) * w``;
  ``group_norm``: the same over ``(N, G, -1)``, then the per-channel affine map;
  ``instance_norm``: the same per (example, channel) over the spatial dims; ``var``/``std``:
  ``sum(square(t - mean)) / (n - correction)`` (and its ``sqrt``); ``norm`` /
  ``linalg.vector_norm``: ``sqrt(sum(square(t)))`` (p = 2), ``sum(abs(t))`` (p = 1),
  ``amax(abs(t))`` (p = inf), ``pow(sum(pow(abs(t), p)), 1/p)``; ``F.normalize`` is run
  transparently (below) and is then a division by a clamped norm.
* ``max``/``amax``/``min``/``amin`` reductions (with or without ``dim``) and max pooling: a
  pairwise tree of ``max(a, b) = b + relu(a - b)`` over the flattened window, halves against
  halves (the attribution depends on the pairing, the sum does not). Pooling (``max_pool1d/2d/
  3d``, ``adaptive_max_pool1d/2d/3d``, their ``_with_indices`` forms) gathers each window with
  ``index_select`` (stride, dilation, ceil mode; padding by a constant below every value at both
  passes; adaptive windows padded by repeating their last element); indices come from the
  original call.
* ``scaled_dot_product_attention``: ``softmax(q k^T * scale + mask) @ v`` (causal and boolean
  masks as ``-inf`` biases, grouped-query heads repeated), with ``dropout_p = 0`` only.
* ``glu``: ``a * sigmoid(b)``; ``addcmul``/``addcdiv``/``addmm``/``baddbmm``/``addbmm``: their
  product (or quotient) plus the scaled input.
* :data:`TRANSPARENT_OPS`: ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) and
  ``F.normalize`` are Python functions that hand themselves to the mode as one call; a copy of
  each with its ``has_torch_function`` check switched off is run inside the mode instead, so the
  operations of its body get their rules.
* Fused fast paths: ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` in eval mode run
  fused kernels only when no argument "has a torch function"; an active mode counts, so during
  the passes they run their plain operations (a test checks the fused kernel is not called).

A composite's output has the fused operation's exact value and the decomposition's gradient.
With DeepLIFT, a composite call is taped as one entry (its arguments at the reference); at the
input the decomposition runs first on those reference arguments inside a nested
:class:`_Recorder`, then on the input's arguments inside a nested :class:`_Replay`, so the
pieces pair up and shared constants (the softmax shift, the pooling pad value) are computed
from both passes.

How it works
------------
Operations are intercepted, not modules: a :class:`torch.overrides.TorchFunctionMode` is
active while the model runs, so functional calls (``torch.relu``, ``F.sigmoid``, ``x.tanh()``),
activation modules reused several times, in-place variants and operators (``1 / t``,
``t ** 2``) are all seen, which Captum's module hooks miss. Each chunk of examples is handled by
two forward passes and one backward:

1. *Reference pass* (DeepLIFT only): the model runs on the references under ``no_grad`` inside
   a :class:`_Recorder`, which tapes, in call order, every call of a function in
   :data:`TAPED_OPS` (the decision depends on the call's arguments, never on values or
   ``requires_grad``, so both passes agree): its tensor arguments and (nonlinearities) its
   output. They are taped as aliases, not copies; before any in-place write (``relu_``,
   ``inplace=True``, ``+=``, ``setitem``, ``out=``) the taped aliases sharing the written
   storage are replaced by copies, and the version counters are checked when the tape is read:
   a write the mode could not see makes the chunk run again with every taped tensor copied.
2. *Input pass*: the model runs on the detached input (``requires_grad``) inside a
   :class:`_Replay`. The k-th taped call is paired with the k-th taped reference call (same
   operation, same argument shapes; otherwise the control flow differs between input and
   reference and :class:`InputError` is raised). A nonlinearity whose single varying tensor
   argument is ``t`` (it requires grad, i.e. depends on the attributed tensor: parameters have
   ``requires_grad=False`` inside :func:`nbattr.attribute`) returns ``f(t)`` computed without
   grad, wrapped in an autograd function whose gradient is ``m``. No assumption about the batch
   dimension is made, and a constant argument that broadcasts (a clamp bound, a PReLU weight)
   is reduced over. Where the multiplier is ill-conditioned (``|t - t'|`` at most
   ``sqrt(machine eps) * (1 + |t|)``, or not finite) the plain derivative is used instead
   (computed on those elements only). In-place calls keep their semantics: the value is
   computed on a copy and written back with ``t.copy_(...)``, and ``t`` itself is returned.
3. ``autograd.grad`` of the summed target scores gives the modified gradient.

Calls whose outputs do not require grad are ignored.

Known limitations: tensors produced by code the mode cannot see (a custom
``autograd.Function``) are differentiated plainly without being counted; nonlinearities written
as input-dependent masking (``t[t < 0] = 0``) look linear; the product rule covers two varying
operands (three or more are reported); the tape (the reference pass's taped tensors, kept alive
for the chunk) is not part of the memory measured by ``batch_size="auto"``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batching import StorageBytes, run_chunked, warn
from .errors import InputError, MissingRuleWarning, UnsupportedOperationError
from .guard import model_storages, modules_of
from .problem import Problem, score_gradient
from .registry import multi_target, register
from .rnn import unrolled_rnns

# -- operation tables ---------------------------------------------------------------------------
# Names are normalised by :func:`_op_name`: ``torch.X``, ``torch.nn.functional.X``,
# ``torch.Tensor.X`` and ``torch._C._nn.X`` all give ``X``; the in-place ``X_`` gives ``X`` (with
# the in-place flag set); operators are mapped by :data:`DUNDER_NAMES`; aliases by
# :data:`ALIASES`.

#: Elementwise nonlinearities with one varying tensor argument (the others are constants): a
#: call gets the method's multiplier (Rescale secant, or ε-LRP ratio) as its backward.
NONLINEAR_OPS: frozenset[str] = frozenset({
    "relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "softplus", "sigmoid", "tanh", "hardtanh", "hardsigmoid", "hardswish", "logsigmoid",
    "softsign", "tanhshrink", "softshrink", "hardshrink", "threshold",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "square",
    "pow", "rpow", "float_power", "abs", "sin", "cos", "tan", "erf", "erfc", "atan", "asinh",
    "sinh", "cosh", "asin", "acos", "atanh", "acosh", "logit", "rrelu",
    "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "fmax", "fmin",
    "reciprocal", "div", "rdiv",
})

#: Nonlinearities whose varying argument may be any one operand (``2 ** t`` or ``t ** 2``).
NONLINEAR_ANY_OPERAND: frozenset[str] = frozenset({
    "pow", "rpow", "float_power", "maximum", "minimum", "fmax", "fmin",
})

#: Divisions: the rule applies only when the denominator (positional index given) varies;
#: ``t / c`` is linear (see :data:`BILINEAR_OPS`).
DENOMINATOR_INDEX: dict[str, int] = {"div": 1, "rdiv": 0}

#: Linear (affine) operations in all their tensor operands: shapes, indexing, sums, averages.
LINEAR_OPS: frozenset[str] = frozenset({
    # shape and indexing
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT",
    "contiguous", "expand", "expand_as", "broadcast_to", "broadcast_tensors", "ravel", "atleast_1d",
    "atleast_2d", "atleast_3d", "repeat", "tile", "getitem", "setitem", "narrow",
    "select", "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "cat", "concat",
    "concatenate", "stack", "hstack", "vstack", "pad", "clone", "copy", "flip", "roll",
    "diagonal", "unfold", "index_select", "gather", "take_along_dim", "repeat_interleave", "tril",
    "triu", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "_pack_padded_sequence", "_pad_packed_sequence", "pad_sequence",  # packed RNN input and output
    "index_fill", "index_copy", "index_add", "index_put", "scatter", "scatter_add", "masked_select",
    "masked_scatter", "take", "select_scatter", "slice_scatter", "diagonal_scatter", "diag",
    "diag_embed", "trace",
    "to", "float", "double", "half", "bfloat16", "type", "type_as", "identity", "zero", "fill",
    # sums, averages and resampling
    "add", "sub", "rsub", "neg", "positive", "sum", "mean", "cumsum",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "interpolate",
})

#: Operations linear in each operand separately: plain gradient when at most ONE operand
#: depends on the input (a product of two input-dependent tensors has no rule yet).
BILINEAR_OPS: frozenset[str] = frozenset({
    "mul", "div", "matmul", "rmatmul", "mm", "bmm", "einsum", "linear", "bilinear",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "addmm", "baddbmm", "dot", "inner", "outer", "tensordot",
})

#: Operations that are the identity / an affine map only when not training: name ->
#: (positional index, keyword name) of the training flag. The input must be the only varying
#: argument.
EVAL_ONLY_OPS: dict[str, tuple[int, str]] = {
    "batch_norm": (5, "training"),
    "dropout": (2, "training"),
    "dropout1d": (2, "training"),
    "dropout2d": (2, "training"),
    "dropout3d": (2, "training"),
    "alpha_dropout": (2, "training"),
    "feature_alpha_dropout": (2, "training"),
}

#: Python operators -> (normalised name, in-place).
DUNDER_NAMES: dict[str, tuple[str, bool]] = {
    "__add__": ("add", False), "__radd__": ("add", False), "__iadd__": ("add", True),
    "__sub__": ("sub", False), "__rsub__": ("rsub", False), "__isub__": ("sub", True),
    "__mul__": ("mul", False), "__rmul__": ("mul", False), "__imul__": ("mul", True),
    "__truediv__": ("div", False), "__div__": ("div", False), "__itruediv__": ("div", True),
    "__idiv__": ("div", True), "__rtruediv__": ("rdiv", False), "__rdiv__": ("rdiv", False),
    "__pow__": ("pow", False), "__rpow__": ("rpow", False), "__ipow__": ("pow", True),
    "__matmul__": ("matmul", False), "__rmatmul__": ("rmatmul", False),
    "__neg__": ("neg", False), "__pos__": ("positive", False), "__abs__": ("abs", False),
    "__getitem__": ("getitem", False), "__setitem__": ("setitem", True),
}

#: Other spellings of the same operation.
ALIASES: dict[str, str] = {
    "log_sigmoid": "logsigmoid", "special_expit": "sigmoid", "expit": "sigmoid",
    "special_exp2": "exp2", "special_expm1": "expm1", "special_log1p": "log1p",
    "special_erf": "erf", "clip": "clamp", "absolute": "abs", "divide": "div",
    "true_divide": "div", "multiply": "mul", "subtract": "sub", "negative": "neg",
    "arctan": "atan", "arcsinh": "asinh", "_threshold": "threshold",
}

#: Products: bilinear operations of two operands. When BOTH depend on the input, DeepLIFT gives
#: each operand the average of the other's values at the input and at the reference (the
#: two-player Shapley split, exact: ``Δ(ab) = ½(b + b')Δa + ½(a + a')Δb``); ε-LRP follows the
#: gating convention (see the module docstring). With one varying operand they are linear.
PRODUCT_OPS: frozenset[str] = frozenset({
    "mul", "matmul", "rmatmul", "mm", "bmm", "einsum", "dot", "inner", "outer", "tensordot", "mv",
})

#: Selections ``where(cond, a, b)`` / ``masked_fill(t, mask, v)``: linear in the selected values
#: while the condition is the same at the input and at the reference (DeepLIFT tapes it and
#: compares); a condition that changes (``where(t > 0, t, 0)`` is a ReLU) has no rule.
SELECT_OPS: frozenset[str] = frozenset({"where", "masked_fill"})

#: Operations that pick entries by their values and return the indices too (``topk``, ``sort``):
#: where the picks agree at the input and the reference they are a linear selection (a gather),
#: whose multiplier is the gradient; where they differ DeepLIFT reports the call. (ε-LRP passes
#: relevance to the picked entries, winner-take-all, as for a max-pool.)
SELECTION_OPS: frozenset[str] = frozenset({"topk", "sort", "kthvalue"})

#: Linear operations that pick entries by an index tensor. Linear for one index only: DeepLIFT
#: tapes the index (integer or boolean tensors) and reports the call where the input's index
#: differs from the reference's (``h.gather(1, h.argmax(1, keepdim=True))``, ``h[mask(h)]``).
INDEX_OPS: frozenset[str] = frozenset({
    "getitem", "setitem", "index_select", "gather", "take_along_dim", "repeat_interleave",
    "index_fill", "index_copy", "index_add", "index_put", "scatter", "scatter_add", "masked_select",
    "masked_scatter", "take",
})

#: Outputs that are *scales* (:meth:`_Replay.mark_scale`): ``rsqrt(var + eps)`` in a norm written
#: out by hand (Hugging Face's Llama RMSNorm, T5's LayerNorm), whose product with the signal then
#: takes the ordered split, as in the built-in norms (with a zero baseline the normaliser is
#: ``1/sqrt(eps)`` there and the Shapley halves cancel: Llama's |delta| was 4567 |F(x) - F(x')|).
#: Also ``pow(t, c)`` with ``c < 0``. (A division ``x / sqrt(var + eps)`` keeps the Shapley split
#: of a product with a reciprocal.)
SCALE_OPS: frozenset[str] = frozenset({"rsqrt"})

#: Outputs that are *gates* for ε-LRP's product rule (see :func:`_Replay._product`).
GATE_OPS: frozenset[str] = frozenset({"sigmoid", "hardsigmoid", "softmax", "softmin"})

#: Python functions of ``torch.nn.functional`` that are run *inside* the mode (their body's
#: operations get the rules) instead of being one opaque call.
TRANSPARENT_OPS: frozenset[str] = frozenset({"multi_head_attention_forward", "normalize"})

@dataclass(frozen=True)
class _Op:
    """A normalised operation: its table name and whether the call writes into its input."""

    name: str
    inplace: bool


_OP_CACHE: dict[Any, _Op] = {}


def _op_name(func: Any) -> _Op:
    """Normalised name of an intercepted function (see the tables above)."""
    try:
        return _OP_CACHE[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", None) or type(func).__name__
    inplace = False
    if name == "__get__":  # a property getter such as Tensor.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name in DUNDER_NAMES:
        name, inplace = DUNDER_NAMES[name]
    elif name.endswith("_") and not name.endswith("__"):
        name, inplace = name[:-1], True
    name = ALIASES.get(name, name)
    op = _Op(name, inplace)
    try:
        _OP_CACHE[func] = op
    except TypeError:
        pass
    return op


def _bound_argument(func: Any, args: tuple, kwargs: dict, index: int | None, name: str,
                    default: Any) -> Any:
    """The argument ``name`` of a call, by keyword, by signature, or at positional ``index``."""
    if name in kwargs:
        return kwargs[name]
    slot = _slot(func, name)
    if slot is not None:
        position, fallback = slot
        if position is not None and len(args) > position:
            return args[position]
        return default if fallback is inspect.Parameter.empty else fallback
    if index is not None and len(args) > index:
        return args[index]
    return default


_SLOTS: dict[tuple[Any, str], tuple[int | None, Any] | None] = {}


def _slot(func: Any, name: str) -> tuple[int | None, Any] | None:
    """Where the parameter ``name`` of ``func`` sits: (its position, None if keyword-only; its
    default), from the signature, once per function; None without a signature naming it."""
    key = (func, name)
    try:
        return _SLOTS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable callable
        return None
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        params = []
    slot = None
    for i, q in enumerate(params):
        if q.kind == q.VAR_POSITIONAL and all(r.name != name for r in params[i:]):
            break
        if q.name == name:
            positional = q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD) and all(
                r.kind != r.VAR_POSITIONAL for r in params[:i])
            slot = (i if positional else None, q.default)
            break
    _SLOTS[key] = slot
    return slot


def _writes_input(func: Any, op: _Op, args: tuple, kwargs: dict) -> bool:
    """Whether the call mutates its first argument (``relu_``, ``inplace=True``, ``**=``)."""
    if op.inplace:
        return True
    return bool(_bound_argument(func, args, kwargs, None, "inplace", False))


_CONTAINERS = (tuple, list, dict)


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """``tree_flatten((args, kwargs))``, fast for the usual call (no containers among the
    arguments: a conv, an activation, an addition), where pytree's generic walk is most of the
    mode's cost per call. Its spec goes back to :func:`unflatten_call`."""
    if all(map(_opaque, args)) and all(map(_opaque, kwargs.values())):
        return [*args, *kwargs.values()], (len(args), tuple(kwargs))
    return tree_flatten((args, kwargs))


def _opaque(v: Any) -> bool:
    """Whether ``v`` can be a leaf of :func:`flatten_call` as it is: not a container, or a plain
    tuple or list of numbers (a conv's stride, a reduction's dims), which no rule looks into."""
    if not isinstance(v, _CONTAINERS):
        return True
    return type(v) in (tuple, list) and all(type(e) in _NUMBERS for e in v)


_NUMBERS = (int, float, bool, type(None))


def unflatten_call(leaves: list[Any], spec: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from leaves and a :func:`flatten_call` spec."""
    if isinstance(spec, tuple):
        n, keys = spec
        return tuple(leaves[:n]), dict(zip(keys, leaves[n:], strict=True))
    return tree_unflatten(leaves, spec)


def _leaves(out: Any) -> list[Any]:
    return [out] if isinstance(out, Tensor) else tree_flatten(out)[0]


def _requires_grad(out: Any) -> bool:
    leaves = _leaves(out)
    return any(isinstance(v, Tensor) and v.requires_grad for v in leaves)


def _is_first_argument(t: Tensor, args: tuple, kwargs: dict) -> bool:
    if args:
        return args[0] is t
    return kwargs.get("input") is t or kwargs.get("self") is t


def _rule_applies(op: _Op, t: Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a nonlinearity call with the single varying tensor ``t`` gets the multiplier."""
    if op.name in DENOMINATOR_INDEX:
        i = DENOMINATOR_INDEX[op.name]
        return kwargs.get("rounding_mode") is None and len(args) > i and args[i] is t
    if op.name == "rrelu" and kwargs.get("training", args[3] if len(args) > 3 else False):
        return False  # random slopes: no rule (a leaky relu when not training)
    if op.name in NONLINEAR_ANY_OPERAND:
        return True
    return _is_first_argument(t, args, kwargs)


def _is_linear(func: Any, op: _Op, args: tuple, kwargs: dict, varying: list[Tensor]) -> bool:
    """Whether a call keeps its plain gradient without being reported."""
    if op.name in LINEAR_OPS:
        return True
    if op.name in BILINEAR_OPS:
        if op.name == "div" and kwargs.get("rounding_mode") is not None:
            return False
        return len(varying) <= 1
    if op.name in EVAL_ONLY_OPS:
        index, name = EVAL_ONLY_OPS[op.name]
        training = _bound_argument(func, args, kwargs, index, name, True)
        return not training and len(varying) == 1 and _is_first_argument(varying[0], args, kwargs)
    return False


# -- multipliers ---------------------------------------------------------------------------------
#: Nonlinearities whose value is, piece by piece, the input itself or a constant (``relu(t)`` is
#: ``t`` or ``0``): where ``t`` and ``t'`` lie on the same piece, ``f(t) - f(t')`` and ``t - t'``
#: are the same floating-point subtraction (or ``0``), and across a kink ``|Δy| <= |Δt|`` with no
#: cancellation, so the secant needs no tolerance: it is exact wherever ``t != t'``.
EXACT_SECANT_OPS: frozenset[str] = frozenset({
    "relu", "relu6", "hardtanh", "threshold", "hardshrink", "clamp", "clamp_min", "clamp_max",
    "abs", "maximum", "minimum", "fmax", "fmin",
})


#: The clamps among :data:`EXACT_SECANT_OPS`: monotone with slope 0 or 1, so every secant lies in
#: ``[0, 1]`` and is 1 wherever ``t`` and ``t'`` both lie inside the bounds.
CLAMP_OPS: frozenset[str] = frozenset({"relu", "relu6", "hardtanh", "clamp", "clamp_min", "clamp_max"})

#: The derivative of an elementwise op times ``g`` (``g`` None: times 1), in PyTorch's convention.
Derivative = Callable[[Tensor, "Tensor | None"], Tensor]


def _clamp_derivative(lo: Any, hi: Any, strict: bool) -> Derivative:
    """The derivative of a clamp to ``[lo, hi]`` (None: unbounded) as PyTorch's autograd defines
    it: 1 inside, 0 outside, and at a bound 0 when ``strict`` (hardtanh, relu) else 1 (clamp);
    times ``g`` if given. Relu and hardtanh use their own fused backward kernels (one float pass;
    ops that make or read booleans cost 2-3 times a float op on a CPU)."""

    def derivative(t: Tensor, g: Tensor | None = None) -> Tensor:
        if strict and lo is not None:
            if g is None:
                g = torch.ones((), dtype=t.dtype, device=t.device).expand_as(t)
            if hi is None:
                return torch.ops.aten.threshold_backward(g, t, lo)
            return torch.ops.aten.hardtanh_backward(g, t, lo, hi)
        inside = None
        for bound, cmp in ((lo, torch.gt if strict else torch.ge), (hi, torch.lt if strict else torch.le)):
            if bound is not None:
                c = cmp(t, bound)
                inside = c if inside is None else inside.logical_and_(c)
        d = torch.ones_like(t) if inside is None else inside.to(t.dtype)
        return d if g is None else d.mul_(g)

    return derivative


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _known_derivative(func: Any, op: _Op, args: tuple, kwargs: dict) -> Derivative | None:
    """For the clamp-like :data:`EXACT_SECANT_OPS` with number arguments: a function computing
    the op's derivative (with PyTorch's convention at the kinks) in one or two elementwise passes,
    without running the op and its backward; None for any other call."""
    name = op.name
    if name == "relu":
        return _clamp_derivative(0, None, True)
    if name == "relu6":
        return _clamp_derivative(0, 6, True)
    if name == "hardtanh":
        lo = _bound_argument(func, args, kwargs, 1, "min_val", -1.0)
        hi = _bound_argument(func, args, kwargs, 2, "max_val", 1.0)
        return _clamp_derivative(lo, hi, True) if _number(lo) and _number(hi) else None
    if name == "threshold":
        th = _bound_argument(func, args, kwargs, 1, "threshold", None)
        return _clamp_derivative(th, None, True) if _number(th) else None
    if name in ("clamp", "clamp_min", "clamp_max"):
        lo = hi = None
        if name in ("clamp", "clamp_min"):
            lo = _bound_argument(func, args, kwargs, 1, "min", None)
        if name == "clamp":
            hi = _bound_argument(func, args, kwargs, 2, "max", None)
        elif name == "clamp_max":
            hi = _bound_argument(func, args, kwargs, 1, "max", None)
        if all(v is None or _number(v) for v in (lo, hi)) and (lo, hi) != (None, None):
            return _clamp_derivative(lo, hi, False)
    return None


#: ``multiplier(t, y, t_ref, y_ref, exact) -> (m, bad)``: the multiplier of ``y = f(t)`` and where
#: (None: nowhere) the plain derivative must replace it; ``m`` may hold anything at ``bad``, a
#: boolean mask or :data:`AT_NAN`. ``exact`` says ``f`` is one of :data:`EXACT_SECANT_OPS`.
Multiplier = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None", bool], "tuple[Tensor, Any]"]

#: ``bad`` meaning: wherever ``m`` is NaN (and nowhere else). The mask (``m.isnan()``) is built
#: only by a caller that needs one; a clamp needs none (:meth:`_Replay._apply_rule`).
AT_NAN = object()


#: Device types on which reading a value on the host costs nothing (no queue to drain): there a
#: reduction decides whether a mask is needed at all, and flagged elements are found by index.
#: Elsewhere masks are built unconditionally and the plain derivative is taken over the whole
#: tensor: a few cheap kernels, and the host never waits for the device.
SYNC_FREE_DEVICES = {"cpu"}

#: Device types on which an elementwise op that makes or reads booleans (``==``, ``isnan``,
#: ``torch.where``) costs 2-3 times a float op (measured on a CPU): there a clamp's ties are fixed
#: with float passes only, one more pass over memory than a mask takes (see
#: :meth:`_Replay._apply_rule`); elsewhere the mask is cheaper.
FLOAT_FIX_DEVICES = {"cpu"}


def _all_finite(m: Tensor) -> bool:
    """Whether every element of ``m`` is finite, known without waiting for the device: one
    reduction on :data:`SYNC_FREE_DEVICES`, else False (the caller then builds its mask)."""
    return m.device.type in SYNC_FREE_DEVICES and math.isfinite(m.sum().item())


def _nonfinite(m: Tensor) -> Tensor | None:
    """Where ``m`` is not finite, or None when :func:`_all_finite` says it is finite everywhere."""
    return None if _all_finite(m) else torch.isfinite(m).logical_not_()


def _rescale_multiplier(t: Tensor, y: Tensor, t_ref: Tensor | None, y_ref: Tensor | None,
                        exact: bool = False) -> tuple[Tensor, Tensor | None]:
    """DeepLIFT Rescale: ``(f(t) - f(t')) / (t - t')``; ``bad`` marks where the plain derivative
    is used instead: ``t = t'`` (and non-finite ratios) for :data:`EXACT_SECANT_OPS`, otherwise
    also ``t`` close to ``t'``. Every step works in place on fresh tensors (on a CPU each pass over
    a large activation costs about as much as the nonlinearity itself)."""
    assert t_ref is not None and y_ref is not None
    dt = t - t_ref
    m = (y - y_ref).div_(dt)
    if exact:  # |f(t) - f(t')| <= |t - t'|: only 0/0 (t = t'), or inf/inf, gives a non-finite
        return m, (None if _all_finite(m) else AT_NAN)  # ratio, a NaN; one reduction finds out
    # |t - t'| <= sqrt(machine eps) (1 + |t|): the secant is mostly rounding error there, while
    # the plain derivative differs from it by O(|t - t'|) only. (|t| ~ |t'| wherever dt is that
    # small, so |t| alone sets the scale.)
    r = math.sqrt(torch.finfo(t.dtype).eps)
    bad = torch.le(dt.abs_(), t.abs().mul_(r).add_(r))
    nonfinite = _nonfinite(m)  # includes the t = t' elements, which are in ``bad`` already
    if nonfinite is not None:
        bad.logical_or_(nonfinite)
    return m, bad


def _epsilon_multiplier(epsilon: float) -> Multiplier:
    """ε-LRP (DeepExplain): ``f(t) / (t + ε sign(t))`` with ``sign(0) = +1``."""

    def multiplier(t: Tensor, y: Tensor, _t_ref: Tensor | None, _y_ref: Tensor | None,
                   _exact: bool = False) -> tuple[Tensor, Tensor | None]:
        eps = torch.tensor(epsilon, dtype=t.dtype, device=t.device)  # not the default dtype
        m = y / torch.where(t >= 0, eps, -eps).add_(t)
        bad = _nonfinite(m)
        infinite = _nonfinite(t)  # t = -inf (a masked logit): plain derivative
        if infinite is not None:
            bad = infinite if bad is None else bad.logical_or_(infinite)
        return m, bad

    return multiplier


# -- composite operations -----------------------------------------------------------------------
# A composite operation is replaced, at the input, by a decomposition into operations that have
# rules (see the module docstring). ``parse(func, args, kwargs)`` normalises the call's arguments
# (outside any mode), ``prepare(parsed, parsed_ref)`` computes constants that must be identical at
# the input and at the reference (``parsed_ref`` is None for ε-LRP), ``run(parsed, shared, mode)``
# is the decomposition, run inside ``mode``.


@dataclass(frozen=True)
class _Composite:
    parse: Callable[[Any, tuple, dict], Any]
    run: Callable[[Any, Any, Any], Tensor]
    prepare: Callable[[Any, Any], Any] | None = None
    applies: Callable[[Any], bool] | None = None
    gate: bool = False


def _first(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return kwargs.get("input", kwargs.get("self"))


@dataclass(frozen=True)
class _Orders:
    """For :func:`_max_tree`: per level of the tree, where the pair's first half ``a`` is the
    larger (see :func:`_tree_orders`). A constant shared by both passes."""

    levels: tuple[Tensor, ...]


def _halves(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """A tree level's pairs ``a``, ``b`` over the last dimension and the odd entry left over."""
    k = x.shape[-1]
    h = k // 2
    return x[..., :h], x[..., h:2 * h], (x[..., 2 * h:] if k % 2 else None)


#: A max tree takes the plain pairs ``b + relu(a - b)`` while its values spread over at most this
#: many times their largest magnitude (see :func:`_tame`).
TAME_SPREAD = 256.0


def _ranges(*ts: Tensor | None) -> list[tuple[float, float]]:
    """``(min, max)`` of each non-empty tensor given (one per pass), read on the host."""
    out = []
    with torch.no_grad():
        for t in ts:
            if t is not None and t.numel():
                lo, hi = t.detach().aminmax()
                out.append((float(lo), float(hi)))
    return out


def _tame(*ts: Tensor | None, ranges: list[tuple[float, float]] | None = None) -> bool:
    """Whether a max tree over these values (one tensor per pass, or their ``ranges``) may take
    the plain pairs ``b + relu(a - b)``: all finite, and ``max - min <= TAME_SPREAD (|max| + 1)``.
    A masked score (-inf; -1e4 or ``finfo.min`` filled in or added) fails this: ``a - b`` would
    round ``a`` away (or be NaN), losing its change between the passes."""
    return all(math.isfinite(lo) and math.isfinite(hi) and hi - lo <= TAME_SPREAD * (abs(hi) + 1.0)
               for lo, hi in (_ranges(*ts) if ranges is None else ranges))


def _tree_orders(x: Tensor, x_ref: Tensor | None) -> _Orders | None:
    """Which of each pair sits outside the relu in :func:`_max_tree`: ``a`` where it is the larger
    (summed over both passes when ``x_ref`` is given, the same choice for both), else ``b``;
    None (the plain pairs, fewer passes) when the values are :func:`_tame`."""
    if _tame(x, x_ref):
        return None
    levels = []
    with torch.no_grad():
        x = x.detach()
        x_ref = None if x_ref is None else x_ref.detach()
        while x.shape[-1] > 1:
            a, b, rest = _halves(x)
            m = torch.maximum(a, b)
            if x_ref is None:
                levels.append(a >= b)
            else:
                ar, br, rest_ref = _halves(x_ref)
                levels.append(a + ar >= b + br)
                m_ref = torch.maximum(ar, br)
                x_ref = m_ref if rest_ref is None else torch.cat([m_ref, rest_ref], -1)
            x = m if rest is None else torch.cat([m, rest], -1)
    return _Orders(tuple(levels))


def _pair_max(a: Tensor, b: Tensor, first: Tensor | None) -> Tensor:
    """``max(a, b)``: ``b + relu(a - b)`` without ``first`` (tame values, see :func:`_tame`), else
    ``o + relu(i - o)`` with ``o`` the larger of the two where ``first`` says (``a`` where True).
    That is exact wherever ``o >= i``: a masked entry (-inf, or ``finfo.min`` added to a score)
    never meets a difference that rounds the other operand away, which would lose its change
    between the passes; where ``i`` is -inf the result is ``o`` (``relu(-inf - -inf)`` would be
    NaN). The conditions are the same at both passes (constants, and masks that are: a ``where``
    whose condition differs is reported)."""
    if first is None:
        return b + torch.relu(a - b)
    o, i = torch.where(first, a, b), torch.where(first, b, a)
    return torch.where(torch.isneginf(i), o, o + torch.relu(i - o))


def _max_tree(x: Tensor, orders: _Orders | None = None) -> Tensor:
    """Maximum over the last dimension as a pairwise tree of :func:`_pair_max`, with the larger
    operand of each pair outside the relu as ``orders`` (from :func:`_tree_orders`; None: plain
    pairs) says."""
    level = 0
    while x.shape[-1] > 1:
        a, b, rest = _halves(x)
        m = _pair_max(a, b, None if orders is None else orders.levels[level])
        x = m if rest is None else torch.cat([m, rest], -1)
        level += 1
    return x[..., 0]


def _tree_input(t: Tensor, dims: tuple[int, ...] | None, sign: int) -> tuple[Tensor, tuple[int, ...]]:
    """``t`` (negated for a minimum) with ``dims`` (None: all) flattened into the last dimension."""
    nd = t.dim()
    dims = tuple(range(nd)) if not dims else tuple(sorted(d % nd for d in dims))
    x = t if sign > 0 else -t
    return x.movedim(dims, tuple(range(nd - len(dims), nd))).flatten(nd - len(dims)), dims


def _reduce_orders(t: Tensor, t_ref: Tensor | None, dims: tuple[int, ...] | None, sign: int) -> _Orders | None:
    """:func:`_tree_orders` for :func:`_reduce_max` of ``t`` (and of ``t_ref``, the other pass)."""
    if t.dim() == 0:
        return None
    x, _ = _tree_input(t, dims, sign)
    return _tree_orders(x, None if t_ref is None else _tree_input(t_ref, dims, sign)[0])


def _reduce_max(t: Tensor, dims: tuple[int, ...] | None, keepdim: bool, sign: int,
                orders: _Orders | None = None) -> Tensor:
    """``amax`` (sign +1) or ``amin`` (sign -1) of ``t`` over ``dims`` (None: all) by a max tree."""
    if t.dim() == 0:
        return t
    x, dims = _tree_input(t, dims, sign)
    m = _max_tree(x, orders)
    if keepdim:
        for d in dims:
            m = m.unsqueeze(d)
    return m if sign > 0 else -m


# softmax, log_softmax, softmin, logsumexp -------------------------------------------------------
def _parse_softmax(func: Any, args: tuple, kwargs: dict, sign: int = 1) -> tuple:
    t = _first(args, kwargs)
    dim = _bound_argument(func, args, kwargs, 1, "dim", None)
    dtype = _bound_argument(func, args, kwargs, 2, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = None
    if dtype is not None:
        t = t.to(dtype)
    if dim is None:  # F.softmax's legacy implicit dimension
        dim = 0 if t.dim() in (0, 1, 3) else 1
    return (-t if sign < 0 else t), dim


def _parse_logsumexp(func: Any, args: tuple, kwargs: dict) -> tuple:
    t = _first(args, kwargs)
    dim = _bound_argument(func, args, kwargs, 1, "dim", None)
    keepdim = bool(_bound_argument(func, args, kwargs, 2, "keepdim", False))
    return t, (dim if isinstance(dim, (tuple, list)) else (dim,)), keepdim


def _shift(p: tuple, p_ref: tuple | None) -> Tensor | _Orders | None:
    """The softmax shift ``c``: the larger of the maxima at the input and at the reference, so that
    ``t - c <= 0`` (no overflow) and ``c`` is the same constant in both passes. When the two
    maxima are so far apart that ``sum(exp(t - c))`` could underflow at one of them, the shift is
    each pass's own maximum, computed by the max tree (so it gets attributions too): then the
    tree's :class:`_Orders`, or None for its plain pairs (tame values, or a 0-d input)."""
    t, dim = p[0], p[1]
    with torch.no_grad():
        c = t.detach().amax(dim, keepdim=True)
        if p_ref is not None:
            c_ref = p_ref[0].detach().amax(dim, keepdim=True)
            if bool(((c - c_ref).abs() > -0.5 * math.log(torch.finfo(t.dtype).tiny)).any()):
                dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
                return _reduce_orders(t, p_ref[0], dims, 1)
            c = torch.maximum(c, c_ref)
        return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def _logsumexp(t: Tensor, dim: Any, c: Tensor | _Orders | None) -> Tensor:
    """``L = c + log(sum(exp(t - c)))`` (keepdim) with the shift of :func:`_shift` (each pass's
    own maximum by the max tree when it is None). Softmax is ``exp(t - L)``: no product and no
    reciprocal, so every multiplier stays bounded. (Written as ``e * (1 / S)``, the product
    rule's split would be ill-conditioned: ``1/S`` changes by ``exp(max t - max t')`` between
    the passes, and the two halves of the split grow like it and cancel.)"""
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not isinstance(c, Tensor):
        c = _reduce_max(t, dims, True, 1, c)
    return c + torch.log(torch.exp(t - c).sum(dims, keepdim=True))


def _run_softmax(p: tuple, c: Tensor | None, mode: Any) -> Tensor:
    t, dim = p
    return torch.exp(t - _logsumexp(t, dim, c))


def _run_log_softmax(p: tuple, c: Tensor | None, mode: Any) -> Tensor:
    t, dim = p
    return t - _logsumexp(t, dim, c)


def _run_logsumexp(p: tuple, c: Tensor | None, mode: Any) -> Tensor:
    t, dim, keepdim = p
    out = _logsumexp(t, dim, c)
    return out if keepdim else out.squeeze(dim)


# normalisations ---------------------------------------------------------------------------------
def _parse_layer_norm(func: Any, args: tuple, kwargs: dict) -> tuple:
    shape = _bound_argument(func, args, kwargs, 1, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return (_first(args, kwargs), shape, _bound_argument(func, args, kwargs, 2, "weight", None),
            _bound_argument(func, args, kwargs, 3, "bias", None),
            float(_bound_argument(func, args, kwargs, 4, "eps", 1e-5)))


def _parse_rms_norm(func: Any, args: tuple, kwargs: dict) -> tuple:
    t = _first(args, kwargs)
    shape = _bound_argument(func, args, kwargs, 1, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    eps = _bound_argument(func, args, kwargs, 3, "eps", None)
    eps = torch.finfo(t.dtype).eps if eps is None else float(eps)
    return t, shape, _bound_argument(func, args, kwargs, 2, "weight", None), None, eps


def _parse_group_norm(func: Any, args: tuple, kwargs: dict) -> tuple:
    return (_first(args, kwargs), int(_bound_argument(func, args, kwargs, 1, "num_groups", 1)),
            _bound_argument(func, args, kwargs, 2, "weight", None),
            _bound_argument(func, args, kwargs, 3, "bias", None),
            float(_bound_argument(func, args, kwargs, 4, "eps", 1e-5)))


def _normalise(d: Tensor, dims: tuple[int, ...], eps: float, mode: Any, center: bool) -> Tensor:
    """``(d - mean) * rsqrt(mean((d - mean)^2) + eps)`` over ``dims`` (no centring for RMSNorm)."""
    if center:
        d = d - d.mean(dims, keepdim=True)
    r = torch.rsqrt(torch.square(d).mean(dims, keepdim=True) + eps)
    mode.mark_scale(r)
    return d * r


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None, shape: tuple[int, ...] | None = None) -> Tensor:
    """``y * w + b`` of a normalisation (either may be None), ``w`` and ``b`` reshaped to ``shape``
    when it is given."""
    if w is not None:
        y = y * (w if shape is None else w.reshape(shape))
    if b is not None:
        y = y + (b if shape is None else b.reshape(shape))
    return y


def _run_layer_norm(p: tuple, _shared: Any, mode: Any, center: bool = True) -> Tensor:
    t, shape, w, b, eps = p
    return _affine(_normalise(t, tuple(range(-len(shape), 0)), eps, mode, center), w, b)


def _run_group_norm(p: tuple, _shared: Any, mode: Any) -> Tensor:
    t, groups, w, b, eps = p
    n, c = t.shape[0], t.shape[1]
    y = _normalise(t.reshape(n, groups, -1), (-1,), eps, mode, True).reshape(t.shape)
    return _affine(y, w, b, (1, c) + (1,) * (t.dim() - 2))


def _parse_instance_norm(func: Any, args: tuple, kwargs: dict) -> tuple:
    """``F.instance_norm`` (named arguments only: ``torch.instance_norm`` orders them otherwise)."""
    if func is not F.instance_norm:
        raise TypeError("instance_norm: only torch.nn.functional.instance_norm is decomposed")
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments[n] for n in names)


def _run_instance_norm(p: tuple, _shared: Any, mode: Any) -> Tensor:
    """Per (example, channel) over the spatial dims; with ``use_input_stats=False`` the running
    statistics make it an affine map."""
    t, mean, var, w, b, use_input_stats, _momentum, eps = p
    shape = (1, t.shape[1]) + (1,) * (t.dim() - 2)
    if use_input_stats or mean is None:
        y = _normalise(t, tuple(range(2, t.dim())), eps, mode, True)
    else:
        y = (t - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    return _affine(y, w, b, shape)


def _parse_var(func: Any, args: tuple, kwargs: dict) -> tuple:
    t = _first(args, kwargs)
    dim, correction = kwargs.get("dim"), kwargs.get("correction")
    keepdim = bool(kwargs.get("keepdim", False))
    unbiased = kwargs.get("unbiased")
    rest = list(args[1:])
    if rest and isinstance(rest[0], bool):  # var(input, unbiased)
        unbiased = rest.pop(0)
    elif rest:
        dim = rest.pop(0)
        if rest and isinstance(rest[0], bool) and unbiased is None and correction is None:
            unbiased = rest.pop(0)
        if rest:
            keepdim = bool(rest.pop(0))
    if correction is None:
        correction = 0 if unbiased is False else 1
    if dim is not None and not isinstance(dim, (tuple, list)):
        dim = (dim,)
    dims = tuple(range(t.dim())) if not dim else tuple(dim)
    return t, dims, float(correction), keepdim


def _run_var(p: tuple, _shared: Any, mode: Any, root: bool = False) -> Tensor:
    t, dims, correction, keepdim = p
    count = math.prod(t.shape[d] for d in dims)
    d = t - t.mean(dims, keepdim=True)
    v = torch.square(d).sum(dims, keepdim=keepdim) / max(count - correction, 0)
    return torch.sqrt(v) if root else v


def _parse_norm(func: Any, args: tuple, kwargs: dict) -> tuple:
    t = _first(args, kwargs)
    name = _op_name(func).name
    order = _bound_argument(func, args, kwargs, 1, "ord" if name == "linalg_vector_norm" else "p",
                            2 if name == "linalg_vector_norm" else "fro")
    dim = _bound_argument(func, args, kwargs, 2, "dim", None)
    keepdim = bool(_bound_argument(func, args, kwargs, 3, "keepdim", False))
    if isinstance(dim, int):
        dim = (dim,)
    return t, order, (tuple(dim) if dim else None), keepdim


def _norm_applies(p: tuple) -> bool:
    order = p[1]
    if order == "fro":
        return True
    return isinstance(order, (int, float)) and not isinstance(order, bool) and order > 0


def _norm_orders(p: tuple, p_ref: tuple | None) -> _Orders | None:
    """The max tree's orders of the infinity norm (None for other orders)."""
    t, order, dims, _keepdim = p
    if order != math.inf:
        return None
    dims = tuple(range(t.dim())) if dims is None else dims
    return _reduce_orders(t.detach().abs(), None if p_ref is None else p_ref[0].detach().abs(), dims, 1)


def _run_norm(p: tuple, shared: Any, mode: Any) -> Tensor:
    t, order, dims, keepdim = p
    dims = tuple(range(t.dim())) if dims is None else dims
    if order == "fro" or order == 2:
        return torch.sqrt(torch.square(t).sum(dims, keepdim=keepdim))
    a = torch.abs(t)
    if order == 1:
        return a.sum(dims, keepdim=keepdim)
    if order == math.inf:
        return _reduce_max(a, dims, keepdim, 1, shared)
    return torch.pow(torch.pow(a, order).sum(dims, keepdim=keepdim), 1.0 / order)


# max and min ------------------------------------------------------------------------------------
def _parse_max(func: Any, args: tuple, kwargs: dict, sign: int = 1) -> tuple:
    t = _first(args, kwargs)
    other = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else kwargs.get("other")
    if isinstance(other, Tensor):
        return "binary", t, other, sign
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    if isinstance(dim, int):
        dim = (dim,)
    return "reduce", t, (tuple(dim) if dim else None), keepdim, sign


def _max_orders(p: tuple, p_ref: tuple | None) -> _Orders | None:
    """The max tree's orders of a ``max``/``min`` reduction (None for the binary form, whose
    constant operand needs none)."""
    if p[0] == "binary":
        return None
    _, t, dims, _keepdim, sign = p
    return _reduce_orders(t, None if p_ref is None else p_ref[1], dims, sign)


def _run_max(p: tuple, shared: Any, mode: Any) -> Tensor:
    if p[0] == "binary":
        _, a, b, sign = p
        return b + torch.relu(a - b) if sign > 0 else a - torch.relu(a - b)
    _, t, dims, keepdim, sign = p
    return _reduce_max(t, dims, keepdim, sign, shared)


def _parse_binary(func: Any, args: tuple, kwargs: dict, kind: str) -> tuple:
    a = _first(args, kwargs)
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if kind == "rdiv":  # __rtruediv__(self, other) = other / self
        return "div", b, a
    return kind, a, b


def _binary_orders(p: tuple, p_ref: tuple | None) -> _Orders | None:
    """For ``maximum``/``minimum`` of two varying operands: which is the larger (one tree level)."""
    kind, a, b = p
    if kind not in ("max", "min"):
        return None
    sign = 1 if kind == "max" else -1
    x = torch.stack(torch.broadcast_tensors(sign * a.detach(), sign * b.detach()), -1)
    x_ref = None
    if p_ref is not None:
        x_ref = torch.stack(torch.broadcast_tensors(sign * p_ref[1].detach(), sign * p_ref[2].detach()), -1)
    return _tree_orders(x, x_ref)


def _run_binary(p: tuple, shared: Any, mode: Any) -> Tensor:
    kind, a, b = p
    first = None if shared is None else shared.levels[0][..., 0]
    if kind == "max":
        return _pair_max(a, b, first)
    if kind == "min":
        return -_pair_max(-a, -b, first)
    return a * torch.reciprocal(b)  # div


# max pooling ------------------------------------------------------------------------------------
def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(u) for u in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return (int(v),) * n


def _parse_max_pool(func: Any, args: tuple, kwargs: dict, n: int) -> tuple:
    """Input, paddings per spatial dim and the window index matrices ``(out, K)`` per dim."""
    t = _first(args, kwargs)
    k = _ntuple(_bound_argument(func, args, kwargs, 1, "kernel_size", 1), n)
    s = _ntuple(_bound_argument(func, args, kwargs, 2, "stride", None), n) or k
    p = _ntuple(_bound_argument(func, args, kwargs, 3, "padding", 0), n)
    d = _ntuple(_bound_argument(func, args, kwargs, 4, "dilation", 1), n)
    ceil = bool(_bound_argument(func, args, kwargs, 5, "ceil_mode", False))
    pads, idxs = [], []
    for i in range(n):
        size = t.shape[t.dim() - n + i]
        span = d[i] * (k[i] - 1) + 1
        num = size + 2 * p[i] - span
        out = (num + (s[i] - 1 if ceil else 0)) // s[i] + 1
        if ceil and (out - 1) * s[i] >= size + p[i]:
            out -= 1
        need = (out - 1) * s[i] + span
        pads.append((p[i], max(0, need - size - p[i])))
        starts = torch.arange(out, device=t.device) * s[i]
        idxs.append(starts[:, None] + torch.arange(k[i], device=t.device)[None, :] * d[i])
    return t, n, pads, idxs


def _parse_adaptive_max_pool(func: Any, args: tuple, kwargs: dict, n: int) -> tuple:
    t = _first(args, kwargs)
    size = _bound_argument(func, args, kwargs, 1, "output_size", None)
    size = list(size) if isinstance(size, (list, tuple)) else [size] * n
    idxs = []
    for i in range(n):
        length = t.shape[t.dim() - n + i]
        out = length if size[i] is None else int(size[i])
        o = torch.arange(out, device=t.device)
        start = (o * length) // out
        end = -((-(o + 1) * length) // out)
        width = int((end - start).max())
        j = torch.arange(width, device=t.device)
        idxs.append(torch.minimum(start[:, None] + j[None, :], end[:, None] - 1))
    return t, n, [(0, 0)] * n, idxs


def _pool_windows(p: tuple, lo: float) -> Tensor:
    """The pooling windows of ``p``'s input, ``(..., out_1, ..., out_n, K)``, padded with ``lo``."""
    t, n, pads, idxs = p
    x = t
    if any(a or b for a, b in pads):
        x = F.pad(x, [v for a, b in reversed(pads) for v in (a, b)], value=lo)
    base = x.dim() - n
    for i, idx in enumerate(idxs):
        dim = base + i
        x = x.index_select(dim, idx.flatten()).unflatten(dim, tuple(idx.shape)).movedim(dim + 1, -1)
    return x.flatten(-n)


def _pool_prepare(p: tuple, p_ref: tuple | None) -> tuple[float, _Orders | None]:
    """The padding value and the max tree's orders over the windows (both passes; None for tame
    values, the usual case, told from the input without building the windows)."""
    ranges = _ranges(p[0], None if p_ref is None else p_ref[0])
    # the padding: below every entry at the input and the reference (the same in both)
    lo = min(r[0] for r in ranges) - 1.0 if ranges and any(a or b for a, b in p[2]) else 0.0
    if _tame(ranges=ranges):
        return lo, None
    with torch.no_grad():
        x = _pool_windows((p[0].detach(), *p[1:]), lo)
        x_ref = None if p_ref is None else _pool_windows((p_ref[0].detach(), *p_ref[1:]), lo)
    return lo, _tree_orders(x, x_ref)


def _run_max_pool(p: tuple, shared: tuple[float, _Orders | None], mode: Any) -> Tensor:
    lo, orders = shared
    return _max_tree(_pool_windows(p, lo), orders)


# attention, GLU, fused multiply-adds -----------------------------------------------------------
def _parse_sdpa(func: Any, args: tuple, kwargs: dict) -> tuple:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    return tuple(args[i] if i < len(args) else kwargs.get(n, dv)
                 for i, (n, dv) in enumerate(zip(names, defaults, strict=True)))


def _run_sdpa(p: tuple, _shared: Any, mode: Any) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` (the reference implementation in PyTorch's docs)."""
    q, k, v, mask, _dropout, causal, scale, gqa = p
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    logits = (q @ k.transpose(-2, -1)) * scale
    bias = None
    if causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(n_q, n_k, dtype=q.dtype, device=q.device).masked_fill(~keep, -math.inf)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
        bias = mask if bias is None else bias + mask
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, -1) @ v


def _run_glu(p: tuple, _shared: Any, mode: Any) -> Tensor:
    t, dim = p
    a, b = t.chunk(2, dim)
    return a * torch.sigmoid(b)


def _parse_cosine(func: Any, args: tuple, kwargs: dict) -> tuple:
    a = _first(args, kwargs)
    b = args[1] if len(args) > 1 else kwargs.get("x2")
    return (a, b, int(_bound_argument(func, args, kwargs, 2, "dim", 1)),
            float(_bound_argument(func, args, kwargs, 3, "eps", 1e-8)))


def _run_cosine(p: tuple, _shared: Any, mode: Any) -> Tensor:
    """``cosine_similarity`` as ATen computes it: each operand over its norm (clamped to ``eps``),
    then the sum of their product."""
    a, b, dim, eps = p

    def unit(t: Tensor) -> Tensor:
        return t / torch.clamp_min(torch.sqrt(torch.square(t).sum(dim, keepdim=True)), eps)

    a, b = torch.broadcast_tensors(a, b)
    return (unit(a) * unit(b)).sum(dim)


def _parse_addmul(func: Any, args: tuple, kwargs: dict, kind: str) -> tuple:
    """``input + value * t1 * t2`` (addcmul), ``... / t2`` (addcdiv), ``beta * input + alpha *
    (m1 @ m2)`` (addmm, baddbmm, addbmm)."""
    leaves = [args[i] if i < len(args) else None for i in range(3)]
    for i, name in enumerate(("input", "tensor1" if kind.startswith("addc") else "mat1",
                              "tensor2" if kind.startswith("addc") else "mat2")):
        if leaves[i] is None:
            leaves[i] = kwargs.get(name, kwargs.get({"mat1": "batch1", "mat2": "batch2"}.get(name, name)))
    if kind.startswith("addc"):
        return kind, *leaves, kwargs.get("value", 1), 1
    return kind, *leaves, kwargs.get("alpha", 1), kwargs.get("beta", 1)


def _run_addmul(p: tuple, _shared: Any, mode: Any) -> Tensor:
    kind, x, a, b, alpha, beta = p
    if kind == "addcmul":
        prod = a * b
    elif kind == "addcdiv":
        prod = a * torch.reciprocal(b)
    elif kind == "addbmm":
        prod = (a @ b).sum(0)
    else:
        prod = a @ b
    out = prod if alpha == 1 else alpha * prod
    if beta != 0:
        out = out + (x if beta == 1 else beta * x)
    return out


def _pool(n: int, adaptive: bool = False) -> _Composite:
    parse = _parse_adaptive_max_pool if adaptive else _parse_max_pool
    return _Composite(lambda f, a, k: parse(f, a, k, n), _run_max_pool, _pool_prepare)


#: Operations computed by a decomposition into operations with rules (see the module docstring).
COMPOSITES: dict[str, _Composite] = {
    "softmax": _Composite(_parse_softmax, _run_softmax, _shift, gate=True),
    "softmin": _Composite(lambda f, a, k: _parse_softmax(f, a, k, -1), _run_softmax, _shift, gate=True),
    "log_softmax": _Composite(_parse_softmax, _run_log_softmax, _shift),
    "logsumexp": _Composite(_parse_logsumexp, _run_logsumexp, _shift),
    "layer_norm": _Composite(_parse_layer_norm, _run_layer_norm),
    "rms_norm": _Composite(_parse_rms_norm, lambda p, s, m: _run_layer_norm(p, s, m, center=False)),
    "group_norm": _Composite(_parse_group_norm, _run_group_norm),
    "instance_norm": _Composite(_parse_instance_norm, _run_instance_norm),
    "var": _Composite(_parse_var, _run_var),
    "std": _Composite(_parse_var, lambda p, s, m: _run_var(p, s, m, root=True)),
    "norm": _Composite(_parse_norm, _run_norm, _norm_orders, applies=_norm_applies),
    "linalg_vector_norm": _Composite(_parse_norm, _run_norm, _norm_orders, applies=_norm_applies),
    "max": _Composite(_parse_max, _run_max, _max_orders),
    "amax": _Composite(_parse_max, _run_max, _max_orders),
    "min": _Composite(lambda f, a, k: _parse_max(f, a, k, -1), _run_max, _max_orders),
    "amin": _Composite(lambda f, a, k: _parse_max(f, a, k, -1), _run_max, _max_orders),
    "scaled_dot_product_attention": _Composite(_parse_sdpa, _run_sdpa,
                                               applies=lambda p: not p[4]),
    "glu": _Composite(lambda f, a, k: (_first(a, k), _bound_argument(f, a, k, 1, "dim", -1)), _run_glu),
    "cosine_similarity": _Composite(_parse_cosine, _run_cosine),
    **{name: _Composite(lambda f, a, k, kind=name: _parse_addmul(f, a, k, kind), _run_addmul)
       for name in ("addcmul", "addcdiv", "addmm", "baddbmm", "addbmm")},
    **{f"max_pool{n}d": _pool(n) for n in (1, 2, 3)},
    **{f"max_pool{n}d_with_indices": _pool(n) for n in (1, 2, 3)},
    **{f"adaptive_max_pool{n}d": _pool(n, True) for n in (1, 2, 3)},
    **{f"adaptive_max_pool{n}d_with_indices": _pool(n, True) for n in (1, 2, 3)},
}

#: Nonlinearities of two operands, decomposed when BOTH depend on the input.
BINARY_COMPOSITES: dict[str, _Composite] = {
    "maximum": _Composite(lambda f, a, k: _parse_binary(f, a, k, "max"), _run_binary, _binary_orders),
    "fmax": _Composite(lambda f, a, k: _parse_binary(f, a, k, "max"), _run_binary, _binary_orders),
    "minimum": _Composite(lambda f, a, k: _parse_binary(f, a, k, "min"), _run_binary, _binary_orders),
    "fmin": _Composite(lambda f, a, k: _parse_binary(f, a, k, "min"), _run_binary, _binary_orders),
    "div": _Composite(lambda f, a, k: _parse_binary(f, a, k, "div"), _run_binary),
    "rdiv": _Composite(lambda f, a, k: _parse_binary(f, a, k, "rdiv"), _run_binary),
}

#: Every operation the reference pass tapes.
TAPED_OPS: frozenset[str] = (NONLINEAR_OPS | PRODUCT_OPS | SELECT_OPS | INDEX_OPS | SELECTION_OPS
                              | frozenset(COMPOSITES))

_TRANSPARENT: dict[Any, Any] = {}


def _transparent(func: Any) -> Any:
    """A copy of a ``torch.nn.functional`` Python function whose own ``has_torch_function`` check
    is off, so that running it inside a mode dispatches its body's operations to the mode (the
    original would hand itself to the mode again as one call)."""
    try:
        return _TRANSPARENT[func]
    except KeyError:
        pass
    import types

    g = dict(func.__globals__)
    for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        g[name] = lambda *_a: False
    copy = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    _TRANSPARENT[func] = copy
    return copy


def _taped_kind(op: _Op, func: Any, args: tuple, kwargs: dict, leaves: list[Any]) -> str | None:
    """How the reference pass tapes a call (the same decision at the input: it depends neither on
    values nor on ``requires_grad``): ``"composite"``, ``"nonlinear"``, ``"product"``,
    ``"select"`` or None (not taped)."""
    name = op.name
    if name in COMPOSITES:
        comp = COMPOSITES[name]
        try:
            parsed = comp.parse(func, args, kwargs)
        except Exception:  # noqa: BLE001 - a call form the decomposition does not know: no rule
            return None
        return "composite" if comp.applies is None or comp.applies(parsed) else None
    if name in NONLINEAR_OPS:
        return "nonlinear"
    if name in PRODUCT_OPS:
        return "product" if sum(isinstance(v, Tensor) for v in leaves) >= 2 else None
    if name in SELECT_OPS:
        return "select"
    if name in SELECTION_OPS:
        return "selection"
    if name in INDEX_OPS:  # taped only with an index tensor (not for slices and ints)
        return "index" if any(_is_index(v) for v in leaves) else None
    return None


def _in_checkpoint() -> bool:
    """Whether a non-reentrant ``torch.utils.checkpoint`` block is running (its saved-tensor hooks
    are on top): backward recomputes that block with plain operations, without the rules."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError, TypeError):  # a private API: best effort
        return False
    return bool(hooks) and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


def _varies(v: Any) -> bool:
    """Whether ``v`` depends on the input in a pass with the rules: computed from it with grad (the
    model gets a copy of the leaf, so a leaf that requires grad is a parameter or the user's own
    tensor, a constant here)."""
    return isinstance(v, Tensor) and v.requires_grad and not v.is_leaf


def _is_index(v: Any) -> bool:
    return isinstance(v, Tensor) and not (v.is_floating_point() or v.is_complex())


def _same_index(leaves: list[Any], entry: _TapeEntry) -> bool:
    """Whether every index tensor among ``leaves`` equals the taped one."""
    return all(not _is_index(v) or r is None or (v.shape == r.shape and torch.equal(v, r))
               for v, r in zip(leaves, entry.leaves, strict=True))


def _exact(fused: Tensor, dec: Tensor) -> Tensor:
    """``dec``'s gradient with the fused operation's value, bit for bit (``fused + 0``): the taped
    pass computes the fused value too, so a tie (``max(a, a)``, ``t = t'``) seen there is seen here
    (``dec + (fused - dec)`` would differ from ``fused`` by rounding). Where ``dec`` is infinite
    (a masked logit) the term is 0 and passes no gradient."""
    if dec.dtype != fused.dtype:
        dec = dec.to(fused.dtype)
    return fused + torch.nan_to_num(dec - dec.detach(), 0.0, 0.0, 0.0)


def _attach(fused: Any, dec: Tensor) -> Any:
    """The composite's output: the fused output (a tensor, or a tuple whose first item is the
    values, e.g. ``(values, indices)``) carrying the decomposition's gradient."""
    if isinstance(fused, Tensor):
        return _exact(fused, dec)
    items = list(fused)
    items[0] = _exact(items[0], dec)
    return type(fused)(items)


class _Multiplied(torch.autograd.Function):
    """``y`` (computed without grad) as a function of ``t`` whose gradient is ``m``. ``y`` comes
    in a list, not as an input: an input returned as-is would be a view that the model could not
    modify in place (``h = relu(x); h += 1``)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, m: Tensor, y: list[Tensor]) -> Tensor:  # noqa: D102
        ctx.save_for_backward(m)
        ctx.shape, ctx.dtype = t.shape, t.dtype
        return y[0]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (m,) = ctx.saved_tensors
        g = g * m
        if g.shape != ctx.shape:  # t was broadcast against a constant argument
            g = g.sum_to_size(ctx.shape)
        return g.to(ctx.dtype), None, None


# -- the modes ----------------------------------------------------------------------------------
@dataclass
class _TapeEntry:
    name: str
    leaves: list[Tensor | None]
    output: Tensor | None
    versions: list[int] | None = None  # of leaves (then output) when taped as aliases


class _StaleTape(RuntimeError):
    """A taped alias was written in place after it was taped (rerun with copies)."""


class ControlFlowDiffers(InputError):
    """The replay's calls with a rule do not match the recording's."""


def _storage_key(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _written_tensor(func: Any, op: _Op, args: tuple, kwargs: dict) -> Tensor | None:
    """The tensor a call writes into (in-place ops, ``setitem``, ``inplace=True``, ``out=``)."""
    out = kwargs.get("out")
    if isinstance(out, Tensor):
        return out
    if op.inplace or kwargs.get("inplace") is True or (op.name in NONLINEAR_OPS and _writes_input(
            func, op, args, kwargs)):
        first = _first(args, kwargs)
        return first if isinstance(first, Tensor) else None
    return None


class _Recorder(TorchFunctionMode):
    """Reference pass: tapes every call of a :data:`TAPED_OPS` function, in call order.

    Arguments and outputs are taped as aliases (no copy) with their version counters; a tensor
    about to be written in place has the taped aliases of its storage replaced by copies first,
    and :meth:`_Replay._next_entry` checks the versions (:class:`_StaleTape` when a write went
    unseen, after which the chunk is redone with ``copy=True``: every taped tensor copied).
    """

    def __init__(self, copy: bool = False) -> None:
        super().__init__()
        self.tape: list[_TapeEntry] = []
        self.copy = copy
        self._aliases: dict[int, list[tuple[_TapeEntry, int]]] = {}

    def mark_gate(self, t: Tensor) -> None:
        """No gates in the reference pass (see :meth:`_Replay.mark_gate`)."""

    def mark_scale(self, t: Tensor) -> None:
        """No marks in the reference pass (see :meth:`_Replay.mark_scale`)."""

    def _protect(self, w: Tensor) -> None:
        """``w`` is about to be written: copy the taped aliases that share its storage."""
        for entry, slot in self._aliases.pop(_storage_key(w), ()):
            v = entry.output if slot == len(entry.leaves) else entry.leaves[slot]
            if v is None or entry.versions is None or v._version != entry.versions[slot]:
                continue
            c = v.clone()
            if slot == len(entry.leaves):
                entry.output = c
            else:
                entry.leaves[slot] = c
            entry.versions[slot] = c._version

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = _op_name(func)
        if op.name in TRANSPARENT_OPS:
            with self:
                return _transparent(func)(*args, **kwargs)
        written = _written_tensor(func, op, args, kwargs) if self._aliases or op.name in TAPED_OPS else None
        if written is not None and self._aliases:
            self._protect(written)
        if op.name not in TAPED_OPS:
            return func(*args, **kwargs)
        leaves, _ = flatten_call(args, kwargs)
        kind = _taped_kind(op, func, args, kwargs, leaves)
        if kind is None:
            return func(*args, **kwargs)
        saved = [None if not isinstance(v, Tensor) else
                 v.detach().clone() if self.copy or v is written else v.detach() for v in leaves]
        out = func(*args, **kwargs)
        keep_out = kind == "nonlinear" and isinstance(out, Tensor)
        entry = _TapeEntry(op.name, saved, (out.detach().clone() if self.copy else out.detach())
                           if keep_out else None)
        if kind == "selection" and isinstance(out, tuple) and len(out) == 2:
            entry.output = out[1].detach().clone()  # the picks (indices), compared at the input
        if not self.copy:
            entry.versions = [-1 if v is None else v._version for v in saved]
            entry.versions.append(entry.output._version if entry.output is not None else -1)
            for slot, v in enumerate([*saved, entry.output]):
                if v is not None:
                    self._aliases.setdefault(_storage_key(v), []).append((entry, slot))
        self.tape.append(entry)
        return out


class _Replay(TorchFunctionMode):
    """Input pass: operations get their rules; see the module docstring.

    ``tape`` (from :class:`_Recorder`) pairs each taped call with its reference call; None for
    methods without a reference (ε-LRP, which then tracks gates for its product rule).
    ``unsupported`` counts calls without a rule (shared with nested replays of composites).
    """

    def __init__(self, method: str, multiplier: Multiplier, tape: list[_TapeEntry] | None = None,
                 unsupported: dict[str, int] | None = None) -> None:
        super().__init__()
        self.method, self.multiplier, self.tape = method, multiplier, tape
        self.unsupported: dict[str, int] = {} if unsupported is None else unsupported
        self.gates: dict[int, Tensor] | None = {} if tape is None else None
        self.scales: dict[int, Tensor] = {}
        self.position = 0
        #: what this pass and the taped pass run at (for messages): (this, taped)
        self.sides = ("input", "reference")

    def _report(self, name: str) -> None:
        self.unsupported[name] = self.unsupported.get(name, 0) + 1

    def mark_gate(self, t: Any) -> None:
        """Mark ``t`` as a gate for ε-LRP's product rule (no-op for DeepLIFT)."""
        if self.gates is not None and isinstance(t, Tensor):
            self.gates[id(t)] = t

    def _is_gate(self, t: Tensor) -> bool:
        return self.gates is not None and self.gates.get(id(t)) is t

    def mark_scale(self, t: Tensor) -> None:
        """Mark a norm's normaliser ``rsqrt(var + eps)``: a gate for ε-LRP; for DeepLIFT its
        products take the ordered split of :meth:`_product`."""
        if self.gates is not None:
            self.mark_gate(t)
        else:
            self.scales[id(t)] = t

    def _is_scale(self, t: Tensor) -> bool:
        return self.scales.get(id(t)) is t

    def _next_entry(self, op: _Op, leaves: list[Any]) -> _TapeEntry:
        assert self.tape is not None
        k = self.position
        self.position += 1
        entry = self.tape[k] if k < len(self.tape) else None
        same = (entry is not None and entry.name == op.name and len(entry.leaves) == len(leaves)
                and all((r is None) == (not isinstance(v, Tensor))
                        and (r is None or r.shape == v.shape) for r, v in zip(entry.leaves, leaves, strict=True)))
        if not same:
            at_ref = "no call" if entry is None else f"{entry.name}"
            here, there = self.sides
            raise ControlFlowDiffers(
                f"{self.method}: the model's control flow differs between the input and the "
                f"reference: call {k + 1} with a rule is {op.name} with input shapes "
                f"{[tuple(v.shape) for v in leaves if isinstance(v, Tensor)]} at the {here} but "
                f"{at_ref} at the {there}; choose a reference on which the model runs the same "
                "operations")
        if entry.versions is not None:
            for v, ver in zip([*entry.leaves, entry.output], entry.versions, strict=True):
                if v is not None and v._version != ver:
                    raise _StaleTape(op.name)
        return entry

    def finish(self) -> None:
        """Check that every taped reference call had its input counterpart."""
        if self.tape is not None and self.position != len(self.tape):
            here, there = self.sides
            raise ControlFlowDiffers(
                f"{self.method}: the model's control flow differs between the input and the "
                f"reference: {len(self.tape)} calls with a rule at the {there}, "
                f"{self.position} at the {here}")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = _op_name(func)
        if op.name in TRANSPARENT_OPS:
            with self:
                return _transparent(func)(*args, **kwargs)
        leaves, spec = flatten_call(args, kwargs)
        kind = _taped_kind(op, func, args, kwargs, leaves) if op.name in TAPED_OPS else None
        entry = self._next_entry(op, leaves) if kind is not None and self.tape is not None else None
        if not torch.is_grad_enabled():
            out = func(*args, **kwargs)
            if op.name == "view_as" and len(args) == 2 and args[0] is args[1]:
                # x.view_as(x): what a module's full backward hook (BackwardHookFunction, an identity
                # in the graph) does to the tensors it watches; no value becomes a constant
                return out
            if any(_varies(v) for v in leaves) and any(  # a value of the input made into a constant
                    isinstance(o, Tensor) and o.is_floating_point() for o in _leaves(out)):
                self._report(f"{op.name} (under no_grad)")
            return out
        varying = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.requires_grad]
        if not varying:
            return func(*args, **kwargs)
        if op.name in ("detach", "data") and _varies(leaves[0]):  # h.detach(), h.data
            self._report(f"{op.name} (a value of the input used as a constant)")
        if kind == "composite":
            return self._composite(COMPOSITES[op.name], func, op, args, kwargs, leaves, spec, entry)
        if kind == "nonlinear":
            if len(varying) == 1 and _rule_applies(op, leaves[varying[0]], args, kwargs):
                return self._apply_rule(func, op, args, kwargs, leaves, spec, varying[0], entry)
            if (len(varying) == 2 and op.name in BINARY_COMPOSITES
                    and kwargs.get("rounding_mode") is None):
                return self._composite(BINARY_COMPOSITES[op.name], func, op, args, kwargs, leaves, spec, entry)
        if kind == "product" and len(varying) == 2:
            return self._product(func, op, args, kwargs, leaves, spec, *varying, entry)
        if kind == "selection" and len(varying) == 1:
            out = func(*args, **kwargs)
            if entry is not None and not (isinstance(out, tuple) and len(out) == 2 and entry.output is not None
                                          and out[1].shape == entry.output.shape
                                          and torch.equal(out[1], entry.output)):
                self._report(f"{op.name} (selection differs from the reference)")
            return out
        out = func(*args, **kwargs)
        if not _requires_grad(out):
            return out
        if kind == "index" and entry is not None and not _same_index(leaves, entry):
            self._report(f"{op.name} (index differs from the reference)")
        if kind == "select":
            if entry is not None and not all(
                    r is None or v.dtype != torch.bool or torch.equal(v, r)
                    for v, r in zip(leaves, entry.leaves, strict=True) if isinstance(v, Tensor)):
                self._report(f"{op.name} (condition differs from the reference)")
        elif not _is_linear(func, op, args, kwargs, [leaves[i] for i in varying]):
            self._report(op.name)
        elif self.gates is not None and all(self._is_gate(leaves[i]) for i in varying):
            for v in _leaves(out):
                self.mark_gate(v)
        return out

    def _composite(self, comp: _Composite, func: Any, op: _Op, args: tuple, kwargs: dict,
                   leaves: list[Any], spec: Any, entry: _TapeEntry | None) -> Any:
        """Run a decomposition (:data:`COMPOSITES`): with DeepLIFT, first at the reference (taped
        by a nested :class:`_Recorder`), then at the input (a nested :class:`_Replay`). An in-place
        call on its first argument (``w /= w.sum(-1, keepdim=True)``) is decomposed out of place
        and its result copied into that argument, as for a product."""
        written = _written_tensor(func, op, args, kwargs)
        inplace = written is not None and op.inplace and bool(args) and args[0] is written
        if written is not None and not inplace:
            self._report(op.name)
            return func(*args, **kwargs)
        with torch.no_grad():
            fused = func(args[0].clone(), *args[1:], **kwargs) if inplace else func(*args, **kwargs)
        parsed = comp.parse(func, args, kwargs)
        if self.tape is not None:
            assert entry is not None
            ref_leaves = [r if isinstance(v, Tensor) else v for r, v in zip(entry.leaves, leaves, strict=True)]
            ref_args, ref_kwargs = unflatten_call(ref_leaves, spec)
            ref_parsed = comp.parse(func, ref_args, ref_kwargs)
            shared = comp.prepare(parsed, ref_parsed) if comp.prepare else None
            rec = _Recorder()
            with torch.no_grad(), rec:
                comp.run(ref_parsed, shared, rec)
            child = _Replay(self.method, self.multiplier, rec.tape, self.unsupported)
            child.sides = self.sides
            with child:
                dec = comp.run(parsed, shared, child)
            child.finish()
        else:
            shared = comp.prepare(parsed, None) if comp.prepare else None
            with self:
                dec = comp.run(parsed, shared, self)
        out = _attach(fused, dec)
        if comp.gate:
            self.mark_gate(out)
        if inplace:
            written.copy_(out)
            return written
        return out

    def _product(self, func: Any, op: _Op, args: tuple, kwargs: dict, leaves: list[Any], spec: Any,
                 i: int, j: int, entry: _TapeEntry | None) -> Any:
        """A product of two varying operands ``a``, ``b`` (see the module docstring)."""
        a, b = leaves[i], leaves[j]
        written = _written_tensor(func, op, args, kwargs)
        if written is not None and written is not a:
            self._report(op.name)
            return func(*args, **kwargs)
        inplace = written is not None

        def call(va: Tensor, vb: Tensor) -> Tensor:
            new = list(leaves)
            new[i], new[j] = va, vb
            x, k = unflatten_call(new, spec)
            return func(*x, **k)

        a0, b0 = a.detach(), b.detach()
        if self.tape is None and self._is_gate(a) != self._is_gate(b):
            # ε-LRP: the gate passes no relevance; the signal gets it all.
            if self._is_gate(a):
                out = call(a0.clone() if inplace else a0, b)
            else:
                out = call(a.clone() if inplace else a, b0)
        else:
            if self.tape is not None and self._is_scale(a) != self._is_scale(b):
                # A norm's normaliser x times its signal z: the exact ordered split in which Δz
                # is weighted by the smaller of x, x' and Δx by the other pass's z
                # (x Δz + z' Δx, or x' Δz + z Δx; both equal Δ(xz)). Shapley averages the two;
                # with a nearly constant input at one pass (a zero baseline), x = 1/sqrt(eps)
                # there and the Shapley halves grow like it and cancel.
                assert entry is not None
                a_ref, b_ref = entry.leaves[i], entry.leaves[j]
                if self._is_scale(a):
                    keep = a0.abs() <= a_ref.abs()
                    abar, bbar = torch.where(keep, a0, a_ref), torch.where(keep, b_ref, b0)
                else:
                    keep = b0.abs() <= b_ref.abs()
                    abar, bbar = torch.where(keep, a_ref, a0), torch.where(keep, b0, b_ref)
            elif self.tape is not None:
                assert entry is not None
                abar, bbar = (a0 + entry.leaves[i]) * 0.5, (b0 + entry.leaves[j]) * 0.5
            else:  # ε-LRP, no gate or two gates: equal split (the Shapley split with a zero reference)
                abar, bbar = a0 * 0.5, b0 * 0.5
            with torch.no_grad():
                y = call(a0.clone() if inplace else a0, b0)
            out = y + call(a - a0, bbar) + call(abar, b - b0)
            if self._is_gate(a) and self._is_gate(b):
                self.mark_gate(out)
        if inplace:
            a.copy_(out)
            return a
        return out

    def _value_without_graph(self, func: Any, op: _Op, leaves: list[Any], spec: Any, i: int,
                             inplace: bool) -> tuple[Callable[[Tensor], Any], Tensor, Any]:
        """For a rule on the ``i``-th leaf ``t``: the call as a function of that leaf (``call_with``),
        ``t0 = t.detach()`` and the call's value at ``t0`` without a graph (on a copy if ``inplace``).
        Raises if the call wrote into ``t`` although it was not recognised as in-place."""
        t: Tensor = leaves[i]

        def call_with(v: Tensor) -> Any:
            new = list(leaves)
            new[i] = v
            a, k = unflatten_call(new, spec)
            return func(*a, **k)

        t0 = t.detach()
        version = t._version
        with torch.no_grad():
            y = call_with(t0.clone() if inplace else t0)
        if t._version != version:
            raise RuntimeError(f"{self.method}: {op.name} wrote into its input although it was not "
                               "recognised as in-place; please report this model")
        return call_with, t0, y

    def _apply_rule(self, func: Any, op: _Op, args: tuple, kwargs: dict, leaves: list[Any], spec: Any,
                    i: int, entry: _TapeEntry | None) -> Any:
        t: Tensor = leaves[i]
        if _in_checkpoint():
            self._report("checkpoint (its block is recomputed in backward without the rules)")
        inplace = _writes_input(func, op, args, kwargs)
        if inplace and not _is_first_argument(t, args, kwargs):
            # ``c /= t``: the call writes into a constant; no rule (plain gradient, reported).
            out = func(*args, **kwargs)
            self.unsupported[op.name] = self.unsupported.get(op.name, 0) + 1
            return out
        call_with, t0, y = self._value_without_graph(func, op, leaves, spec, i, inplace)
        if not isinstance(y, Tensor) or not y.is_floating_point():
            out = func(*args, **kwargs)
            self.unsupported[op.name] = self.unsupported.get(op.name, 0) + 1
            return out
        t_ref = y_ref = None
        if entry is not None:
            t_ref, y_ref = entry.leaves[i], entry.output
            if y_ref is None or y_ref.shape != y.shape:
                raise InputError(f"{self.method}: {op.name} returns different shapes at the input "
                                 "and at the reference")
        m, bad = self.multiplier(t0, y, t_ref, y_ref, op.name in EXACT_SECANT_OPS)
        plain = False
        if bad is not None:
            elementwise = m.shape == t0.shape and sum(isinstance(v, Tensor) for v in leaves) == 1
            known = _known_derivative(func, op, args, kwargs) if elementwise else None
            if (bad is AT_NAN and known is not None and op.name in CLAMP_OPS and t_ref is not None
                    and m.device.type in FLOAT_FIX_DEVICES):
                # A clamp, with t = t' common (both sides clamped upstream): its secants lie in
                # [0, 1] and are 1 where f'(t) f'(t') is, so max(secant, f'(t) f'(t')) leaves each
                # secant as it is and puts f'(t) at the 0/0s (set to 0 first): float passes only.
                both = known(t_ref, known(t0)).to(m.dtype)
                m = torch.maximum(m.nan_to_num_(0.0, 0.0, 0.0), both, out=m)
                bad = None
            elif bad is AT_NAN:
                bad = m.isnan()
        if bad is not None:
            if elementwise:  # elementwise with scalar arguments: the plain derivative where flagged
                if known is not None:  # clamp-like: where t = t' is common: dense
                    m = torch.where(bad, known(t0).to(m.dtype), m, out=m)
                else:
                    m = _derivative_at(bad, m, t0, call_with, inplace,
                                       None if t_ref is None else (t_ref, y, y_ref))
            else:  # a broadcast argument: the plain call's own graph where flagged (below)
                m.masked_fill_(bad, 0.0)
                plain = bool(bad.any())
        out = _Multiplied.apply(t, m.detach(), [y])  # value y, gradient m
        if plain:
            y_plain = call_with(t.clone() if inplace else t)
            out = torch.where(bad, y_plain, out)
        if inplace:
            t.copy_(out)
            out = t
        if op.name in GATE_OPS:
            self.mark_gate(out)
        elif op.name in SCALE_OPS or (op.name == "pow" and i == 0 and len(args) > 1 and _number(args[1])
                                        and args[1] < 0):
            self.mark_scale(out)  # a hand-written norm's 1 / sqrt(var + eps), as in our own
        return out


def _derivative_at(bad: Tensor, m: Tensor, t0: Tensor, call_with: Callable[[Tensor], Any],
                   inplace: bool, secant: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``m`` with the elementwise derivative of ``call_with`` at ``t0`` where ``bad``. On
    :data:`SYNC_FREE_DEVICES` from a small graph of the flagged elements only (one index
    computation; usually few are flagged); elsewhere over the whole tensor, which costs a few
    cheap kernels and no host sync.

    With ``secant = (t_ref, y, y_ref)`` (DeepLIFT; ``m`` holds the secants), a flagged element
    keeps its finite secant where the derivative misses ``Δy`` by more than the secant's own
    rounding: there the function bends within ``Δt`` (``rsqrt`` of a small variance) and the
    derivative would cost completeness, while a secant that is only rounding noise (``Δt`` tiny)
    still gives way to the smooth derivative."""
    sparse = m.device.type in SYNC_FREE_DEVICES and m.dim() > 0
    with torch.enable_grad():
        if sparse:
            idx = bad.nonzero(as_tuple=True)
            if idx[0].numel() == 0:
                return m
            tb = t0[idx].requires_grad_(True)
        else:
            tb = t0.clone().requires_grad_(True)
        yb = call_with(tb.clone() if inplace else tb)
        (d,) = torch.autograd.grad(yb.sum(), tb, allow_unused=True)
    if d is None:
        d = torch.zeros_like(tb)
    d = d.to(m.dtype)
    if secant is not None:
        t_ref, y, y_ref = secant
        pick = (lambda v: v[idx]) if sparse else (lambda v: v)
        s, dt, dy = pick(m), pick(t0) - pick(t_ref), pick(y) - pick(y_ref)
        eps = torch.finfo(m.dtype).eps
        rounding = (pick(y).abs() + pick(y_ref).abs()).mul_(4 * eps).add_(dy.abs(), alpha=math.sqrt(eps))
        d = torch.where(((d * dt - dy).abs() <= rounding) | ~torch.isfinite(s), d, s)
    if sparse:
        return m.index_put_(idx, d)
    return torch.where(bad, d, m)


# -- the passes ---------------------------------------------------------------------------------
def _tape_bytes(tape: list[_TapeEntry] | None, exclude: set[int]) -> int:
    """Bytes of the tensors a tape holds (each storage once), without those in ``exclude`` (the
    model's parameters and buffers, which are not per row)."""
    counter = StorageBytes(exclude)
    for entry in tape or ():
        for v in (*entry.leaves, entry.output):
            if isinstance(v, Tensor):
                counter.pack(v)
    return counter.bytes


def _ops_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{v})" for k, v in counts.items())


def _modified_gradient(p: Problem, method: str, multiplier: Multiplier, *, reference: bool,
                       strict: bool, recorder_cls: Callable[[], _Recorder] = _Recorder,
                       replay_cls: Callable[..., _Replay] = _Replay, at_reference: bool = False,
                       ) -> tuple[Tensor, Tensor | None, dict[str, int]]:
    """Chunked passes: the modified gradient, the reference scores (if ``reference``) and the
    operations without a rule (calls per forward, max over chunks).

    The multipliers do not depend on the target: with several targets per example (``p.multi``)
    one recording and one forward serve all K, followed by K backward passes, and the gradient is
    ``(N, K, ...)``.

    The gradient is taken at ``p.inputs`` after a recording at the references; with
    ``at_reference`` the roles swap: the recording is at the inputs and the gradient at the
    references. Rescale's multipliers, the product splits and the composites' shared constants are
    symmetric in the two passes, so both give the same multipliers (to rounding); the swap lets
    the problem's own first forward at the inputs, taped (:attr:`Problem.first_tape`), serve as
    the recording of a chunk that covers every row, which saves one forward pass.
    """
    shape = (p.n, p.k, *p.inputs.shape[1:]) if p.multi else tuple(p.inputs.shape)
    grads = torch.empty(shape, dtype=p.inputs.dtype, device=p.device)
    base_out = torch.empty_like(p.outputs) if reference else None
    unsupported: dict[str, int] = {}
    row_bytes = (2 + p.k) * p.inputs[0].numel() * p.inputs.element_size()
    recorded, replayed = (p.inputs, p.baselines) if at_reference else (p.baselines, p.inputs)
    weights = model_storages(p.model)  # not per row: neither the tape nor the probe counts them

    def work(sl: slice) -> int:
        rows = torch.arange(sl.start, sl.stop, device=p.device)
        # the problem's first forward as the recording where it covers these rows; then fresh
        # recordings, the second with copies
        first = p.first_tape if reference and at_reference and sl == slice(0, p.n) else None
        attempts = [(True, False)] if first is not None else []
        attempts += [(False, False), (False, True)]
        k = 0
        while True:
            from_first, copy = attempts[k]
            tape = None
            if reference:
                if from_first:
                    tape = first.tape
                else:
                    rec = recorder_cls()
                    rec.copy = copy  # aliases first; copies if a write to a taped tensor went unseen
                    with torch.no_grad():
                        with rec:
                            full_rec = p.forward_full(recorded[sl].detach(), rows)
                        if not at_reference:
                            base_out[sl] = p.select(full_rec, p.target[rows])
                    tape = rec.tape
            z = replayed[sl].detach().clone().requires_grad_(True)
            replay = replay_cls(method, multiplier, tape)
            if at_reference:
                replay.sides = ("reference", "input")
            try:
                with torch.enable_grad():
                    with replay:
                        full = p.forward_full(z, rows)  # runs the model on a copy of the leaf
                    replay.finish()
                break
            except _StaleTape:
                if copy or not reference:
                    raise
                k = len(attempts) - 1
            except ControlFlowDiffers:
                if not from_first:
                    raise
                # a model whose first call differs from the later ones (it fills a cache, as the
                # attention biases of Hugging Face's BEiT and LeViT in eval mode): record again
                k += 1
        with torch.enable_grad():
            for name, count in replay.unsupported.items():
                unsupported[name] = max(unsupported.get(name, 0), count)
            if strict and replay.unsupported:
                raise UnsupportedOperationError(
                    f"{method}: no rule for {_ops_text(replay.unsupported)}; strict=True forbids the "
                    "plain-gradient fallback (pass strict=False to compute anyway)")
            scores = p.select(full, p.target[rows])
            if at_reference:
                base_out[sl] = scores.detach()
            g = score_gradient(scores, z)
        grads[sl] = g
        return _tape_bytes(tape, weights)  # held beside autograd's saved tensors: batch_size="auto" counts it

    with unrolled_rnns(p.model) as unrolled:  # LSTM/GRU/RNN run as plain ops: the gates get rules
        run_chunked(p.n, work, batch_size=p.batch_size, device=p.device, row_bytes=row_bytes, stats=p.stats,
                    exclude=weights)
    p.stats["unrolled"] = unrolled
    return grads, base_out, unsupported


def record_first_forward(model: Any, options: dict[str, Any]) -> Callable[[], _Recorder] | None:
    """For :func:`nbattr.attribute`: a recorder for the problem's first forward when the method
    will use it (DeepLIFT Rescale on a model without recurrent modules, which run fused there and
    unrolled in the passes), else None."""
    if options.get("rule", "rescale") != "rescale":
        return None
    if any(isinstance(m, (torch.nn.RNNBase, torch.nn.RNNCellBase))
           for top in modules_of(model) for m in top.modules()):
        return None
    return _Recorder


def _warn_unsupported(method: str, unsupported: dict[str, int], consequence: str) -> None:
    if unsupported:
        warn(f"{method}: no rule for {_ops_text(unsupported)}; plain gradient used, {consequence}", MissingRuleWarning)


@register(
    "deeplift",
    "DeepLIFT (Shrikumar et al. 2017): (x - x') times multipliers from operation-level rules; "
    "rule='rescale' (default) or 'reveal_cancel' (positive and negative terms apart).",
    completeness=True, needs_baseline=True, multiplies_by_inputs=True,
)
@multi_target  # the multipliers do not depend on the target: one pair of passes, K backward
def deeplift(p: Problem, *, strict: bool = False, rule: str = "rescale") -> object:
    """DeepLIFT with the Rescale or the RevealCancel rule, the reference being the baseline.

    Parameters
    ----------
    p : the problem.
    strict : raise :class:`UnsupportedOperationError` when an operation on the path has no rule,
        instead of differentiating it plainly with a warning.
    rule : ``"rescale"`` (one secant multiplier per nonlinearity) or ``"reveal_cancel"``
        (§3.5.3: the positive and negative terms of a linear call's output get separate
        multipliers; see :mod:`nbattr.engine.reveal_cancel`, which reports its Rescale
        fallbacks in ``params["reveal_cancel_fallback"]``).

    Returns
    -------
    Attribution
        ``(x - x') * multipliers``, with ``delta`` (the completeness error) and ``unsupported``.
    """
    if rule not in ("rescale", "reveal_cancel"):
        raise InputError(f"deeplift rule {rule!r} is not available: choose 'rescale' or 'reveal_cancel'")
    rule_params: dict[str, Any] = {}
    if rule == "reveal_cancel":
        from .reveal_cancel import reveal_cancel_passes
        grads, base_out, unsupported, rule_params = reveal_cancel_passes(p, strict=strict)
    else:
        grads, base_out, unsupported = _modified_gradient(p, "deeplift", _rescale_multiplier,
                                                          reference=True, strict=strict, at_reference=True)
    _warn_unsupported("deeplift", unsupported, "completeness may not hold")
    diff = p.inputs - p.baselines
    return p.result(
        "deeplift", (diff.unsqueeze(1) if p.multi else diff) * grads, completeness=True, uses_baseline=True,
        baseline_outputs=base_out,
        params={"rule": rule, "strict": strict, "unsupported": list(unsupported),
                "unrolled": p.stats.get("unrolled", []), **rule_params},
        unsupported=unsupported,
    )


deeplift.record_first_forward = record_first_forward  # type: ignore[attr-defined]


@register(
    "epsilon_lrp",
    "Epsilon-LRP (Bach et al. 2015) as in DeepExplain: x times the gradient with f(z)/(z + eps sign z) "
    "at every nonlinearity.",
    multiplies_by_inputs=True,
)
@multi_target
def epsilon_lrp(p: Problem, *, epsilon: float = 1e-9, strict: bool = False) -> object:
    """ε-LRP: ``x * g`` where ``g`` is the gradient with every nonlinearity's derivative replaced
    by ``f(z) / (z + ε sign(z))``.

    Parameters
    ----------
    p : the problem.
    epsilon : the stabiliser, > 0. As ε -> 0 on a ReLU network this is gradient x input.
    strict : raise :class:`UnsupportedOperationError` when an operation on the path has no rule.

    Returns
    -------
    Attribution
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0 \
            or not math.isfinite(epsilon):
        raise InputError(f"epsilon must be a positive number (use a tiny value such as 1e-12 for "
                         f"LRP-0), got {epsilon!r}")
    grads, _, unsupported = _modified_gradient(p, "epsilon_lrp", _epsilon_multiplier(float(epsilon)),
                                               reference=False, strict=strict)
    _warn_unsupported("epsilon_lrp", unsupported, "relevance may not be conserved")
    return p.result(
        "epsilon_lrp", (p.inputs.unsqueeze(1) if p.multi else p.inputs) * grads,
        params={"epsilon": float(epsilon), "strict": strict, "unsupported": list(unsupported),
                "unrolled": p.stats.get("unrolled", [])},
        unsupported=unsupported,
    )
