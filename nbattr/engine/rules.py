"""Modified-backward methods: DeepLIFT (Rescale) and epsilon-LRP.

Both methods replace, at every elementwise nonlinearity ``y = f(t)`` of the model, the local
derivative ``f'(t)`` by a *multiplier* ``m``, keep the gradient of linear operations, and
multiply the resulting modified gradient by the input (ε-LRP) or by ``x - x'`` (DeepLIFT):

* DeepLIFT Rescale (Shrikumar et al. 2017): ``m = (f(t) - f(t')) / (t - t')`` where ``t'`` is
  the value of the same tensor when the model runs on the reference ``x'``. Because every
  multiplier is an exact secant, ``sum(attributions) = F(x) - F(x')`` (up to rounding) as long
  as every operation on the path has a rule.
* ε-LRP (Bach et al. 2015) as DeepExplain computes it (Ancona et al. 2018):
  ``m = f(t) / (t + ε sign(t))`` with ``sign(0) = +1``.

How it works
------------
Operations are intercepted, not modules: a :class:`torch.overrides.TorchFunctionMode` is
active while the model runs, so functional calls (``torch.relu``, ``F.sigmoid``, ``x.tanh()``),
activation modules reused several times, in-place variants and operators (``1 / t``,
``t ** 2``) are all seen, which Captum's module hooks miss. Each chunk of examples is handled by
two forward passes and one backward:

1. *Reference pass* (DeepLIFT only): the model runs on the references under ``no_grad`` inside
   a :class:`_Recorder`, which tapes, in call order, every call of a function whose name is in
   :data:`NONLINEAR_OPS`: copies of its tensor arguments (taken before the call, so in-place
   calls are taped correctly) and of its output.
2. *Input pass*: the model runs on the detached input (``requires_grad``) inside a
   :class:`_Replay`. The k-th nonlinearity call is paired with the k-th taped call (same
   operation, same argument shapes; otherwise the control flow differs between input and
   reference and :class:`InputError` is raised). A call whose single varying tensor argument
   ``t`` (the one that requires grad, i.e. depends on the attributed tensor: parameters have
   ``requires_grad=False`` inside :func:`nbattr.attribute`) returns
   ``f(t).detach() + m.detach() * (t - t.detach())``: its value is the true ``f(t)``, its
   gradient with respect to ``t`` is ``m``. No assumption about the batch dimension is made,
   and a constant argument that broadcasts (a clamp bound, a PReLU weight) is handled by
   autograd's broadcasting rules. Where the multiplier is ill-conditioned (``|t - t'|`` below
   ``sqrt(machine eps) * (1 + |t|)``, or not finite) the plain derivative is used instead
   through ``torch.where``. In-place calls keep their semantics: the value is computed on a
   copy and written back with ``t.copy_(...)``, and ``t`` itself is returned.
3. ``autograd.grad`` of the summed target scores gives the modified gradient.

Operations in :data:`LINEAR_OPS` (any number of input-dependent operands) and
:data:`BILINEAR_OPS` (at most one input-dependent operand) keep their plain gradient, as do
:data:`EVAL_ONLY_OPS` when not training. Calls whose outputs do not require grad are ignored.
Any other call that produces an input-dependent tensor (a product of two input-dependent
tensors, ``max_pool2d``, ``softmax``, ``layer_norm``, ...) keeps its plain gradient and is
counted by name into :attr:`Attribution.unsupported` (calls per forward pass, the largest over
chunks) with one warning; with ``strict=True`` :class:`UnsupportedOperationError` is raised
instead. A later rule (products, softmax) is added by giving such an operation a rule here.

Known limitations: tensors produced by code the mode cannot see (a custom
``autograd.Function``) are differentiated plainly without being counted; nonlinearities written
as input-dependent masking (``t[t < 0] = 0``) look linear; the tape (copies of the arguments and
outputs of every nonlinearity of a chunk) is not part of the memory measured by
``batch_size="auto"``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batching import run_chunked
from .errors import InputError, UnsupportedOperationError
from .problem import Problem, score_gradient
from .registry import register

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
    "pow", "rpow", "float_power", "abs", "sin", "cos", "erf", "atan", "asinh",
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
    "contiguous", "expand", "expand_as", "repeat", "tile", "getitem", "setitem", "narrow",
    "select", "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "cat", "concat",
    "concatenate", "stack", "hstack", "vstack", "pad", "clone", "copy", "flip", "roll",
    "diagonal", "unfold", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
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
    "arctan": "atan", "arcsinh": "asinh",
}

@dataclass(frozen=True)
class _Op:
    """A normalised operation: its table name and whether the call writes into its input."""

    name: str
    inplace: bool


_OP_CACHE: dict[Any, _Op] = {}
_SIGNATURES: dict[Any, inspect.Signature | None] = {}


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
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    sig = _SIGNATURES[func]
    if sig is not None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            bound = None
        if bound is not None:
            bound.apply_defaults()
            return bound.arguments.get(name, default)
    if index is not None and len(args) > index:
        return args[index]
    return default


def _writes_input(func: Any, op: _Op, args: tuple, kwargs: dict) -> bool:
    """Whether the call mutates its first argument (``relu_``, ``inplace=True``, ``**=``)."""
    if op.inplace:
        return True
    return bool(_bound_argument(func, args, kwargs, None, "inplace", False))


def _requires_grad(out: Any) -> bool:
    leaves, _ = tree_flatten(out)
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


# -- multipliers --------------------------------------------------------------------------------
Multiplier = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None"], "tuple[Tensor, Tensor | None]"]


def _rescale_multiplier(t: Tensor, y: Tensor, t_ref: Tensor | None, y_ref: Tensor | None
                        ) -> tuple[Tensor, Tensor | None]:
    """DeepLIFT Rescale: ``(f(t) - f(t')) / (t - t')``; ``bad`` marks where the plain derivative
    is used instead (``t`` close to ``t'``, or a non-finite ratio)."""
    assert t_ref is not None and y_ref is not None
    dt = t - t_ref
    dy = y - y_ref
    # |t - t'| below sqrt(machine eps) (1 + |t|): the secant is mostly rounding error there,
    # while the plain derivative differs from it by O(|t - t'|) only.
    tol = math.sqrt(torch.finfo(t.dtype).eps) * (1 + torch.maximum(t.abs(), t_ref.abs()))
    small = dt.abs() <= tol
    m = dy / torch.where(small, torch.ones_like(dt), dt)
    bad = small | ~torch.isfinite(m)
    return torch.where(bad, torch.zeros_like(m), m), bad


def _epsilon_multiplier(epsilon: float) -> Multiplier:
    """ε-LRP (DeepExplain): ``f(t) / (t + ε sign(t))`` with ``sign(0) = +1``."""

    def multiplier(t: Tensor, y: Tensor, _t_ref: Tensor | None, _y_ref: Tensor | None
                   ) -> tuple[Tensor, Tensor | None]:
        m = y / (t + torch.where(t >= 0, epsilon, -epsilon))
        bad = ~torch.isfinite(m)
        return torch.where(bad, torch.zeros_like(m), m), bad

    return multiplier


# -- the modes ----------------------------------------------------------------------------------
@dataclass
class _TapeEntry:
    name: str
    leaves: list[Tensor | None]
    output: Tensor | None


class _Recorder(TorchFunctionMode):
    """Reference pass: tapes every call of a :data:`NONLINEAR_OPS` function, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.tape: list[_TapeEntry] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = _op_name(func)
        if op.name not in NONLINEAR_OPS:
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        saved = [v.detach().clone() if isinstance(v, Tensor) else None for v in leaves]
        out = func(*args, **kwargs)
        self.tape.append(_TapeEntry(op.name, saved, out.detach().clone() if isinstance(out, Tensor) else None))
        return out


class _Replay(TorchFunctionMode):
    """Input pass: nonlinearities get ``multiplier`` as their backward; see the module docstring.

    ``tape`` (from :class:`_Recorder`) pairs each nonlinearity call with its reference call;
    None for methods without a reference (ε-LRP). ``unsupported`` counts calls without a rule.
    """

    def __init__(self, method: str, multiplier: Multiplier, tape: list[_TapeEntry] | None = None) -> None:
        super().__init__()
        self.method, self.multiplier, self.tape = method, multiplier, tape
        self.unsupported: dict[str, int] = {}
        self.position = 0

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
            raise InputError(
                f"{self.method}: the model's control flow differs between the input and the "
                f"reference: nonlinearity call {k + 1} is {op.name} with input shapes "
                f"{[tuple(v.shape) for v in leaves if isinstance(v, Tensor)]} at the input but "
                f"{at_ref} at the reference; choose a reference on which the model runs the same "
                "operations")
        return entry

    def finish(self) -> None:
        """Check that every taped reference call had its input counterpart."""
        if self.tape is not None and self.position != len(self.tape):
            raise InputError(
                f"{self.method}: the model's control flow differs between the input and the "
                f"reference: {len(self.tape)} nonlinearity calls at the reference, "
                f"{self.position} at the input")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = _op_name(func)
        nonlinear = op.name in NONLINEAR_OPS
        leaves, spec = tree_flatten((args, kwargs))
        entry = self._next_entry(op, leaves) if nonlinear and self.tape is not None else None
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        varying = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.requires_grad]
        if not varying:
            return func(*args, **kwargs)
        if nonlinear and len(varying) == 1 and _rule_applies(op, leaves[varying[0]], args, kwargs):
            return self._apply_rule(func, op, args, kwargs, leaves, spec, varying[0], entry)
        out = func(*args, **kwargs)
        if _requires_grad(out) and not _is_linear(func, op, args, kwargs, [leaves[i] for i in varying]):
            self.unsupported[op.name] = self.unsupported.get(op.name, 0) + 1
        return out

    def _apply_rule(self, func: Any, op: _Op, args: tuple, kwargs: dict, leaves: list[Any], spec: Any,
                    i: int, entry: _TapeEntry | None) -> Any:
        t: Tensor = leaves[i]
        inplace = _writes_input(func, op, args, kwargs)
        if inplace and not _is_first_argument(t, args, kwargs):
            # ``c /= t``: the call writes into a constant; no rule (plain gradient, reported).
            out = func(*args, **kwargs)
            self.unsupported[op.name] = self.unsupported.get(op.name, 0) + 1
            return out

        def call_with(v: Tensor) -> Any:
            new = list(leaves)
            new[i] = v
            a, k = tree_unflatten(new, spec)
            return func(*a, **k)

        t0 = t.detach()
        version = t._version
        with torch.no_grad():
            y = call_with(t0.clone() if inplace else t0)
        if t._version != version:
            raise RuntimeError(f"{self.method}: {op.name} wrote into its input although it was not "
                               "recognised as in-place; please report this model")
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
        m, bad = self.multiplier(t0, y, t_ref, y_ref)
        mod = m.detach() * (t - t0)  # value 0, gradient m
        if bad is not None and bool(bad.any()):
            y_plain = call_with(t.clone() if inplace else t)
            mod = torch.where(bad, y_plain - y_plain.detach(), mod)
        out = y + mod
        if inplace:
            t.copy_(out)
            return t
        return out


# -- the passes ---------------------------------------------------------------------------------
def _ops_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{v})" for k, v in counts.items())


def _modified_gradient(p: Problem, method: str, multiplier: Multiplier, *, reference: bool,
                       strict: bool) -> tuple[Tensor, Tensor | None, dict[str, int]]:
    """Chunked passes: the modified gradient at ``p.inputs``, the reference scores (if
    ``reference``) and the operations without a rule (calls per forward, max over chunks)."""
    grads = torch.empty_like(p.inputs)
    base_out = torch.empty_like(p.outputs) if reference else None
    unsupported: dict[str, int] = {}
    row_bytes = 3 * p.inputs[0].numel() * p.inputs.element_size()

    def work(sl: slice) -> None:
        rows = torch.arange(sl.start, sl.stop, device=p.device)
        tape = None
        if reference:
            rec = _Recorder()
            ref = p.baselines[sl].detach().clone()
            with torch.no_grad():
                with rec:
                    full_ref = p.forward_full(ref, rows)
                base_out[sl] = p.select(full_ref, p.target[rows])
            tape = rec.tape
        z = p.inputs[sl].detach().clone().requires_grad_(True)
        replay = _Replay(method, multiplier, tape)
        with torch.enable_grad():
            zin = z.clone()  # not a leaf: the model may work in place on its input
            with replay:
                full = p.forward_full(zin, rows)
            replay.finish()
            for name, count in replay.unsupported.items():
                unsupported[name] = max(unsupported.get(name, 0), count)
            if strict and replay.unsupported:
                raise UnsupportedOperationError(
                    f"{method}: no rule for {_ops_text(replay.unsupported)}; strict=True forbids the "
                    "plain-gradient fallback (pass strict=False to compute anyway)")
            g = score_gradient(p.select(full, p.target[rows]), z)
        grads[sl] = g

    run_chunked(p.n, work, batch_size=p.batch_size, device=p.device, row_bytes=row_bytes, stats=p.stats)
    return grads, base_out, unsupported


def _warn_unsupported(method: str, unsupported: dict[str, int], consequence: str) -> None:
    if unsupported:
        warnings.warn(f"{method}: no rule for {_ops_text(unsupported)}; plain gradient used, "
                      f"{consequence}", stacklevel=4)


@register(
    "deeplift",
    "DeepLIFT Rescale (Shrikumar et al. 2017): (x - x') times multipliers from operation-level rules.",
    completeness=True, needs_baseline=True, multiplies_by_inputs=True,
)
def deeplift(p: Problem, *, strict: bool = False, rule: str = "rescale") -> object:
    """DeepLIFT with the Rescale rule, the reference being the baseline.

    Parameters
    ----------
    p : the problem.
    strict : raise :class:`UnsupportedOperationError` when an operation on the path has no rule,
        instead of differentiating it plainly with a warning.
    rule : ``"rescale"`` (the only rule implemented; RevealCancel is not implemented yet).

    Returns
    -------
    Attribution
        ``(x - x') * multipliers``, with ``delta`` (the completeness error) and ``unsupported``.
    """
    if rule != "rescale":
        raise InputError(f"deeplift rule {rule!r} is not available: only 'rescale' is implemented "
                         "(RevealCancel is not implemented yet)")
    grads, base_out, unsupported = _modified_gradient(p, "deeplift", _rescale_multiplier,
                                                      reference=True, strict=strict)
    _warn_unsupported("deeplift", unsupported, "completeness may not hold")
    return p.result(
        "deeplift", (p.inputs - p.baselines) * grads, completeness=True, uses_baseline=True,
        baseline_outputs=base_out,
        params={"rule": rule, "strict": strict, "unsupported": list(unsupported)},
        unsupported=unsupported,
    )


@register(
    "epsilon_lrp",
    "Epsilon-LRP (Bach et al. 2015) as in DeepExplain: x times the gradient with f(z)/(z + eps sign z) "
    "at every nonlinearity.",
    multiplies_by_inputs=True,
)
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
        "epsilon_lrp", p.inputs * grads,
        params={"epsilon": float(epsilon), "strict": strict, "unsupported": list(unsupported)},
        unsupported=unsupported,
    )
