"""DeepLIFT RevealCancel (Shrikumar, Greenside & Kundaje 2017, §3.5.3): ``rule="reveal_cancel"``.

The rule
--------
Rescale gives a nonlinearity ``y = f(t)`` one multiplier ``Δy / Δt``. When ``Δt`` is the sum of
contributions that cancel (``+3`` from one input, ``-1`` from another) the nonlinearity only
sees the net ``+2`` and can hide a dependency: for ``o = min(i1, i2) = i1 - relu(i1 - i2)`` at
reference ``(0, 0)`` Rescale gives all of ``o`` to the smaller input and nothing to the other.
RevealCancel splits ``Δt = Δt⁺ + Δt⁻`` into the sums of the positive and of the negative
contribution terms reaching ``t`` and gives each part its own change of output, the average
over the two orders in which the parts can be added (a two-player Shapley value)::

    Δy⁺ = ½ (f(t' + Δt⁺) - f(t')) + ½ (f(t' + Δt⁻ + Δt⁺) - f(t' + Δt⁻))
    Δy⁻ = ½ (f(t' + Δt⁻) - f(t')) + ½ (f(t' + Δt⁺ + Δt⁻) - f(t' + Δt⁺))
    m⁺ = Δy⁺ / Δt⁺,   m⁻ = Δy⁻ / Δt⁻.

``Δy⁺ + Δy⁻ = f(t) - f(t') = Δy`` term by term, so conservation holds exactly. (Here
``f(t' + Δt⁺ + Δt⁻)`` is taken as the value ``f(t)`` of the input pass and ``Δt⁻`` as
``Δt - Δt⁺``, so the identity holds to rounding, whatever the rounding of ``Δt⁺``.) Where
``|Δt±|`` is below ``sqrt(machine eps)`` times the size of the arguments the ratio is replaced by
its limit, ``m⁺ -> ½ (f'(t') + f'(t' + Δt⁻))`` and ``m⁻ -> ½ (f'(t') + f'(t' + Δt⁺))``
(the reference implementation, kundajelab/deeplift, adds a tiny pseudocount instead, which
approximates the same limit); where that is not finite the plain derivative is used, as Rescale
does.

Where the terms come from (the linear rule, §3.5.1)
---------------------------------------------------
For ``t = Σ_j w_j z_j + b`` the terms are ``w_j Δz_j``: positive when ``w_j`` and ``Δz_j`` have
the same sign. For a linear operation ``B(z, W)`` (``F.linear``, ``conv1d/2d/3d``, ``matmul``,
``mm``, ``addmm``; ``W`` constant, ``z`` the attributed-dependent operand) with ``W⁺ = max(W,
0)``, ``W⁻ = min(W, 0)``, ``Δz⁺ = max(Δz, 0)``, ``Δz⁻ = min(Δz, 0)``::

    Δt⁺ = B(Δz⁺, W⁺) + B(Δz⁻, W⁻),    Δt⁻ = B(Δz⁺, W⁻) + B(Δz⁻, W⁺).

Backward: the term ``w_j Δz_j`` carries ``m⁺`` if positive, ``m⁻`` if negative, so with ``G⁺ =
g·m⁺`` and ``G⁻ = g·m⁻`` (``g`` the multiplier of ``y``) the multiplier of ``z_j`` is, per the
chain rule of §3.5.1 (``m_{Δz_j Δt⁺} = 1{w_j Δz_j > 0} w_j``)::

    m_z = [Δz > 0] (W⁺ᵀ G⁺ + W⁻ᵀ G⁻) + [Δz < 0] (W⁺ᵀ G⁻ + W⁻ᵀ G⁺) + [Δz = 0] ½ Wᵀ (G⁺ + G⁻)

(the tie ``Δz = 0`` takes the mean of both sides, as the reference implementation does; the
term is zero, so this only matters for what flows further back). With the transposes read as
the adjoints of ``B`` this is exactly the gradient, with respect to ``z``, of
``<G⁺, T⁺> + <G⁻, T⁻>`` where, with ``s = [Δz > 0] + ½ [Δz = 0]`` (a constant mask) and ``Δz =
z - z'`` differentiable in ``z``::

    T⁺ = B(s Δz, W⁺) + B((1 - s) Δz, W⁻),    T⁻ = B(Δz, W) - T⁺.

The values of ``T⁺`` and ``T⁻`` are ``Δt⁺`` and ``Δt⁻``. So the linear call is given these two
side tensors (its own output and gradient are unchanged), and the nonlinearity returns
``f(t).detach() + m⁺ (T⁺ - T⁺.detach()) + m⁻ (T⁻ - T⁻.detach())``: value ``f(t)``, and one
``autograd.grad`` routes ``g·m⁺`` through the positive terms and ``g·m⁻`` through the negative
ones. For a convolution ``B`` is the convolution itself (same stride, padding, groups), so the
adjoints are transposed convolutions with ``W⁺`` and ``W⁻``, computed by autograd.

Between the linear call and the nonlinearity the pair ``(T⁺, T⁻)`` follows affine maps:
adding a constant (a bias) leaves it unchanged; scaling by a constant ``c`` (``mul``, ``div``,
``neg``, ``sub``, eval-mode ``batch_norm``) gives ``(c⁺T⁺ + c⁻T⁻, c⁺T⁻ + c⁻T⁺)`` (a negative
scale turns positive terms into negative ones); the sum of two such tensors (``W x + U h + b``
in a gate) adds the pairs. (The rule is symmetric in its two parts, so on a single chain the
swap changes nothing; in a sum it keeps positive terms with positive terms.) reshaping, indexing, chunking, concatenation, padding and averaging
(operations with non-negative coefficients) apply to both parts. In-place writes are tracked by
the tensor's version counter.

A nonlinearity whose input does not come from such a chain (``tanh(relu(...))``, the output of
an unsupported operation, a layer's output attributed directly) gets the Rescale multiplier;
the number of such calls per forward pass is reported as
``Attribution.params["reveal_cancel_fallback"]`` (operation -> calls) beside
``params["reveal_cancel_applied"]``. On a network in which every nonlinearity input is a
single term (a diagonal scaling) ``Δt⁻`` or ``Δt⁺`` is zero and RevealCancel equals Rescale.

Cost: the reference pass also tapes the operands of every linear call, and each linear call on
the path runs three more times (forward and backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .errors import InputError
from .rules import (
    EXACT_SECANT_OPS,
    _bound_argument,
    _is_first_argument,
    _op_name,
    _Recorder,
    _Replay,
    _writes_input,
    flatten_call,
    unflatten_call,
)

#: Linear operations whose output starts a RevealCancel split (one varying operand, a constant
#: weight).
START_OPS: frozenset[str] = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "matmul", "rmatmul", "mm", "addmm",
})

#: Affine operations ``out = sum_k c_k * operand_k + constant`` whose coefficients are read from
#: the call (see :meth:`_RevealCancelReplay._affine_terms`).
AFFINE_OPS: frozenset[str] = frozenset({"add", "sub", "rsub", "neg", "positive", "mul", "div", "batch_norm"})

#: Linear, homogeneous operations with non-negative coefficients: applied as they are to both
#: parts of the split.
STRUCTURAL_OPS: frozenset[str] = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT",
    "contiguous", "expand", "expand_as", "repeat", "tile", "getitem", "narrow", "select",
    "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "cat", "concat",
    "concatenate", "stack", "hstack", "vstack", "pad", "clone", "flip", "roll", "diagonal",
    "unfold", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "to", "float", "double",
    "half", "bfloat16", "type_as", "sum", "mean", "cumsum",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
})

#: Structural operations that may take a constant floating-point tensor (a shape template).
_TEMPLATE_OPS: frozenset[str] = frozenset({"view_as", "reshape_as", "expand_as", "type_as"})


# -- the multipliers ----------------------------------------------------------------------------
def _derivative(f: Callable[[Tensor], Tensor], v: Tensor, shape: torch.Size) -> Tensor:
    """Elementwise derivative of ``f`` at ``v`` (broadcast to ``shape``, the output's shape)."""
    v = v.detach().expand(shape).clone().requires_grad_(True)
    with torch.enable_grad():
        out = f(v.clone())  # a clone: f may work in place
    (g,) = torch.autograd.grad(out.sum(), v, allow_unused=True)
    return torch.zeros_like(v) if g is None else g.detach()


def reveal_cancel_multipliers(f: Callable[[Tensor], Tensor], t: Tensor, y: Tensor, t_ref: Tensor,
                              y_ref: Tensor, dt_pos: Tensor, exact: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """RevealCancel multipliers ``m⁺ = Δy⁺ / Δt⁺`` and ``m⁻ = Δy⁻ / Δt⁻`` of ``y = f(t)``.

    Parameters
    ----------
    f : the nonlinearity as a function of its varying argument (other arguments fixed).
    t, y : input and output at the input pass.
    t_ref, y_ref : the same at the reference.
    dt_pos : ``Δt⁺``, the sum of the positive contribution terms of ``t - t'``;
        ``Δt⁻ = (t - t') - Δt⁺``.
    exact : ``f`` is piecewise linear with pieces ``t`` or constants
        (:data:`~nbattr.engine.rules.EXACT_SECANT_OPS`): the tolerance is relative to the
        arguments alone, without the absolute floor a smooth ``f`` needs.

    Returns
    -------
    m_pos, m_neg : multipliers, shaped like ``y``; 0 where ``bad``.
    bad : where a multiplier is not finite (the caller uses the plain derivative there).
    """
    dt = t - t_ref
    dt_neg = dt - dt_pos
    with torch.no_grad():
        f_pos = f(t_ref + dt_pos)
        f_neg = f(t_ref + dt_neg)
    dy_pos = 0.5 * ((f_pos - y_ref) + (y - f_neg))
    dy_neg = 0.5 * ((f_neg - y_ref) + (y - f_pos))
    # The secants are differences of f at points of size up to `scale`: their rounding error is
    # about eps * scale; below sqrt(eps) * scale the limit (error O(|Δt±|)) is the better value.
    # A smooth f's values carry rounding of their own size, not of the argument's (sigmoid(t) ~ 0.5
    # at t ~ 0): hence the 1. A piecewise-linear f (exact) returns its argument or a constant, so
    # the argument's own size is the scale: with the 1, a ReLU network whose activations are small
    # (1e-9: randomly initialised MobileNetV2, MnasNet) took the limit everywhere, where a kink lies
    # inside nearly every Δt±, and missed completeness by 70-280%.
    scale = t_ref.abs() + dt_pos.abs() + dt_neg.abs()
    if not exact:
        scale = scale + 1
    tol = math.sqrt(torch.finfo(t.dtype).eps) * scale
    small_pos, small_neg = dt_pos.abs() <= tol, dt_neg.abs() <= tol
    m_pos = dy_pos / torch.where(small_pos, torch.ones_like(dt_pos), dt_pos)
    m_neg = dy_neg / torch.where(small_neg, torch.ones_like(dt_neg), dt_neg)
    if bool(small_pos.any()) or bool(small_neg.any()):
        # lim_{Δt⁺ -> 0} Δy⁺ / Δt⁺ = ½ (f'(t') + f'(t' + Δt⁻)), and symmetrically for m⁻.
        d_ref = _derivative(f, t_ref, y.shape)
        lim_pos = 0.5 * (d_ref + _derivative(f, t_ref + dt_neg, y.shape))
        lim_neg = 0.5 * (d_ref + _derivative(f, t_ref + dt_pos, y.shape))
        m_pos = torch.where(small_pos, lim_pos, m_pos)
        m_neg = torch.where(small_neg, lim_neg, m_neg)
    bad = ~(torch.isfinite(m_pos) & torch.isfinite(m_neg))
    zero = torch.zeros_like(m_pos)
    return torch.where(bad, zero, m_pos), torch.where(bad, zero, m_neg), bad


# -- tapes --------------------------------------------------------------------------------------
@dataclass
class _LinearEntry:
    name: str
    leaves: list[Tensor | None]


class _Tape(list):
    """The nonlinearity tape of :class:`_Recorder` plus the operands of every linear call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear: list[_LinearEntry] = []


def _keep(v: Any) -> Tensor | None:
    if not isinstance(v, Tensor):
        return None
    return v.detach() if isinstance(v, nn.Parameter) else v.detach().clone()


class _RevealCancelRecorder(_Recorder):
    """Reference pass: the nonlinearity tape, and the operands of every :data:`START_OPS` call."""

    def __init__(self) -> None:
        super().__init__()
        self.tape = _Tape()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _op_name(func).name in START_OPS:
            leaves, _ = flatten_call(args, kwargs)
            self.tape.linear.append(_LinearEntry(_op_name(func).name, [_keep(v) for v in leaves]))
        return super().__torch_function__(func, types, args, kwargs)


# -- the input pass -----------------------------------------------------------------------------
@dataclass
class _Split:
    """``T⁺`` and ``T⁻`` of a tensor (values ``Δt⁺``, ``Δt⁻``), valid while its version holds."""

    tensor: Tensor
    version: int
    pos: Tensor
    neg: Tensor


@dataclass
class RevealCancelStats:
    """Calls per forward pass (the largest over chunks) that got RevealCancel / fell back."""

    applied: dict[str, int]
    fallback: dict[str, int]


def _scaled(c: Any, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """The split of ``c * t`` from the split of ``t`` (a negative ``c`` swaps the parts)."""
    if isinstance(c, Tensor):
        cp, cn = c.clamp(min=0), c.clamp(max=0)
        return cp * pos + cn * neg, cp * neg + cn * pos
    if c >= 0:
        return c * pos, c * neg
    return c * neg, c * pos


class _RevealCancelReplay(_Replay):
    """Input pass with RevealCancel at nonlinearities fed by linear calls (module docstring)."""

    def __init__(self, method: str, multiplier: Any, tape: _Tape, stats: RevealCancelStats) -> None:
        super().__init__(method, multiplier, tape)
        self.stats = stats
        self.splits: dict[int, _Split] = {}
        self.linear_position = 0
        self.applied: dict[str, int] = {}
        self.fallback: dict[str, int] = {}

    # bookkeeping
    def _next_linear(self, name: str, leaves: list[Any]) -> _LinearEntry:
        tape: _Tape = self.tape  # type: ignore[assignment]
        k = self.linear_position
        self.linear_position += 1
        entry = tape.linear[k] if k < len(tape.linear) else None
        same = (entry is not None and entry.name == name and len(entry.leaves) == len(leaves)
                and all((r is None) == (not isinstance(v, Tensor)) and (r is None or r.shape == v.shape)
                        for r, v in zip(entry.leaves, leaves, strict=True)))
        if not same:
            raise InputError(
                f"{self.method}: the model's control flow differs between the input and the "
                f"reference: linear call {k + 1} is {name} at the input but "
                f"{'no call' if entry is None else entry.name} at the reference; choose a "
                "reference on which the model runs the same operations")
        return entry

    def finish(self) -> None:
        """Check that every taped call was replayed; fold this pass's counts into the stats."""
        super().finish()
        tape: _Tape = self.tape  # type: ignore[assignment]
        if self.linear_position != len(tape.linear):
            raise InputError(
                f"{self.method}: the model's control flow differs between the input and the "
                f"reference: {len(tape.linear)} linear calls at the reference, "
                f"{self.linear_position} at the input")
        for mine, total in ((self.applied, self.stats.applied), (self.fallback, self.stats.fallback)):
            for name, count in mine.items():
                total[name] = max(total.get(name, 0), count)

    def _lookup(self, v: Any) -> _Split | None:
        if not isinstance(v, Tensor):
            return None
        s = self.splits.get(id(v))
        if s is None or s.tensor is not v or s.version != v._version:
            return None
        return s

    def _store(self, out: Tensor, pos: Tensor, neg: Tensor) -> None:
        if pos.shape != out.shape or neg.shape != out.shape:
            try:
                pos, neg = pos.broadcast_to(out.shape), neg.broadcast_to(out.shape)
            except RuntimeError:
                return
        self.splits[id(out)] = _Split(out, out._version, pos, neg)

    # dispatch
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = _op_name(func)
        if op.name in START_OPS:
            leaves, spec = flatten_call(args, kwargs)
            entry = self._next_linear(op.name, leaves)
            out = super().__torch_function__(func, types, args, kwargs)
            if torch.is_grad_enabled() and not op.inplace and isinstance(out, Tensor) and out.requires_grad:
                self._start(func, op.name, args, kwargs, leaves, spec, entry, out)
            return out
        if self.splits and (op.name in AFFINE_OPS or op.name in STRUCTURAL_OPS):
            leaves, spec = flatten_call(args, kwargs)
            varying = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.requires_grad]
            splits = [self._lookup(leaves[i]) for i in varying]
            out = super().__torch_function__(func, types, args, kwargs)
            if varying and all(s is not None for s in splits) and torch.is_grad_enabled():
                if op.name in AFFINE_OPS:
                    self._propagate_affine(func, op.name, args, kwargs, leaves, varying, splits, out)
                elif not op.inplace:
                    self._propagate_structural(func, op.name, args, kwargs, leaves, spec, varying, splits, out)
            return out
        return super().__torch_function__(func, types, args, kwargs)

    # the split at a linear call
    def _start(self, func: Any, name: str, args: tuple, kwargs: dict, leaves: list[Any], spec: Any,
               entry: _LinearEntry, out: Tensor) -> None:
        tensors = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
        varying = [i for i in tensors if leaves[i].requires_grad]
        if len(varying) != 1:
            return
        (i,) = varying
        zeroed: list[int] = []
        if name in ("linear", "conv1d", "conv2d", "conv3d"):
            first = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if first is not leaves[i] or not isinstance(weight, Tensor) or len(tensors) > 3:
                return
            w = next(k for k in tensors if leaves[k] is weight)
            zeroed = [k for k in tensors if k not in (i, w)]
        elif name == "addmm":
            alpha = kwargs.get("alpha", 1)
            if (len(tensors) != 3 or len(args) > 3 or i == tensors[0] or isinstance(alpha, Tensor)
                    or not alpha > 0):
                return
            zeroed = [tensors[0]]
            w = next(k for k in tensors[1:] if k != i)
        else:  # matmul, rmatmul, mm: the other tensor operand is the weight
            if len(tensors) != 2:
                return
            w = next(k for k in tensors if k != i)
        z, z_ref, weight = leaves[i], entry.leaves[i], leaves[w].detach()
        if z_ref is None or z_ref.shape != z.shape or not z.is_floating_point():
            return

        def linear(v: Tensor, wt: Tensor) -> Tensor:
            new = list(leaves)
            new[i], new[w] = v, wt
            for k in zeroed:
                new[k] = torch.zeros_like(leaves[k])
            a, kw = unflatten_call(new, spec)
            return func(*a, **kw)

        dz = z - z_ref
        with torch.no_grad():
            s = (dz > 0).to(dz.dtype) + 0.5 * (dz == 0).to(dz.dtype)
        pos = linear(dz * s, weight.clamp(min=0)) + linear(dz * (1 - s), weight.clamp(max=0))
        neg = linear(dz, weight) - pos
        self._store(out, pos, neg)

    # following the split through affine and structural operations
    def _propagate_affine(self, func: Any, name: str, args: tuple, kwargs: dict, leaves: list[Any],
                          varying: list[int], splits: list[_Split | None], out: Any) -> None:
        coefficients = self._affine_terms(func, name, args, kwargs, leaves, varying)
        if coefficients is None or not isinstance(out, Tensor):
            return
        pos = neg = None
        for c, sp in zip(coefficients, splits, strict=True):
            assert sp is not None
            p, n = _scaled(c, sp.pos, sp.neg)
            pos, neg = (p, n) if pos is None else (pos + p, neg + n)
        self._store(out, pos, neg)

    def _affine_terms(self, func: Any, name: str, args: tuple, kwargs: dict, leaves: list[Any],
                      varying: list[int]) -> list[Any] | None:
        """Coefficients ``c_k`` of the varying operands, or None if the call is not of that form."""
        vs = [leaves[i] for i in varying]
        first = args[0] if args else kwargs.get("input", kwargs.get("self"))
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if name in ("neg", "positive"):
            return [-1.0 if name == "neg" else 1.0] if len(vs) == 1 and vs[0] is first else None
        if name in ("add", "sub", "rsub"):
            alpha = kwargs.get("alpha", 1)
            if len(args) > 2 or isinstance(alpha, Tensor):
                return None
            c_first, c_other = {"add": (1, alpha), "sub": (1, -alpha), "rsub": (-alpha, 1)}[name]
            if first is other:
                return None
            coefficients = []
            for v in vs:
                if v is first:
                    coefficients.append(c_first)
                elif v is other:
                    coefficients.append(c_other)
                else:
                    return None
            return coefficients
        if name in ("mul", "div"):
            if len(vs) != 1 or kwargs.get("rounding_mode") is not None or len(args) > 2:
                return None
            if name == "mul":
                const = other if vs[0] is first else first
            else:
                if vs[0] is not first:
                    return None
                const = 1 / other if isinstance(other, Tensor) else (1 / other if other else None)
            if const is None or (isinstance(const, Tensor) and const.requires_grad):
                return None
            return [const.detach() if isinstance(const, Tensor) else const]
        if name == "batch_norm" and func is F.batch_norm and len(vs) == 1 and vs[0] is first:
            training = _bound_argument(func, args, kwargs, 5, "training", True)
            var = _bound_argument(func, args, kwargs, 2, "running_var", None)
            weight = _bound_argument(func, args, kwargs, 3, "weight", None)
            eps = _bound_argument(func, args, kwargs, 7, "eps", 1e-5)
            if training or not isinstance(var, Tensor) or first.dim() < 2:
                return None
            c = torch.rsqrt(var.detach() + eps)
            if isinstance(weight, Tensor):
                c = c * weight.detach()
            return [c.reshape((1, -1) + (1,) * (first.dim() - 2))]
        return None

    def _propagate_structural(self, func: Any, name: str, args: tuple, kwargs: dict, leaves: list[Any],
                              spec: Any, varying: list[int], splits: list[_Split | None], out: Any) -> None:
        for v in leaves:
            if (isinstance(v, Tensor) and not v.requires_grad and v.is_floating_point()
                    and name not in _TEMPLATE_OPS):
                return  # e.g. cat with a constant: its part of the split would not be zero
        if name == "pad":  # F.pad(input, pad, mode="constant", value=None): homogeneous unless value != 0
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else kwargs.get("value")
            if mode == "constant" and value not in (None, 0):
                return

        def apply(part: str) -> Any:
            new = list(leaves)
            for i, sp in zip(varying, splits, strict=True):
                assert sp is not None
                new[i] = getattr(sp, part)
            a, kw = unflatten_call(new, spec)
            return func(*a, **kw)

        try:
            pos, neg = apply("pos"), apply("neg")
        except Exception:  # noqa: BLE001 - an unusual call signature: no split, Rescale later
            return
        outs, _ = tree_flatten(out)
        poss, _ = tree_flatten(pos)
        negs, _ = tree_flatten(neg)
        if not (len(outs) == len(poss) == len(negs)):
            return
        for o, p, n in zip(outs, poss, negs, strict=True):
            if isinstance(o, Tensor) and isinstance(p, Tensor) and isinstance(n, Tensor) and o.requires_grad:
                self._store(o, p, n)

    # the nonlinearity
    def _apply_rule(self, func: Any, op: Any, args: tuple, kwargs: dict, leaves: list[Any], spec: Any,
                    i: int, entry: Any) -> Any:
        t: Tensor = leaves[i]
        split = self._lookup(t)
        inplace = _writes_input(func, op, args, kwargs)
        if split is None or entry is None or (inplace and not _is_first_argument(t, args, kwargs)):
            if split is None:
                self.fallback[op.name] = self.fallback.get(op.name, 0) + 1
            return super()._apply_rule(func, op, args, kwargs, leaves, spec, i, entry)
        call_with, t0, y = self._value_without_graph(func, op, leaves, spec, i, inplace)
        t_ref, y_ref = entry.leaves[i], entry.output
        if (not isinstance(y, Tensor) or not y.is_floating_point() or t_ref is None or y_ref is None
                or y_ref.shape != y.shape):
            return super()._apply_rule(func, op, args, kwargs, leaves, spec, i, entry)
        m_pos, m_neg, bad = reveal_cancel_multipliers(call_with, t0, y, t_ref, y_ref, split.pos.detach(),
                                                      exact=op.name in EXACT_SECANT_OPS)
        mod = m_pos * (split.pos - split.pos.detach()) + m_neg * (split.neg - split.neg.detach())
        if bool(bad.any()):
            y_plain = call_with(t.clone() if inplace else t)
            mod = torch.where(bad, y_plain - y_plain.detach(), mod)
        self.applied[op.name] = self.applied.get(op.name, 0) + 1
        out = y + mod
        if inplace:
            t.copy_(out)
            return t
        return out


def reveal_cancel_passes(p: Any, *, strict: bool) -> tuple[Tensor, Tensor, dict[str, int], dict[str, Any]]:
    """DeepLIFT RevealCancel's chunked passes for :func:`nbattr.engine.rules.deeplift`.

    Parameters
    ----------
    p : the :class:`~nbattr.engine.problem.Problem`.
    strict : raise on operations without a rule (see ``deeplift``).

    Returns
    -------
    grads, base_out, unsupported
        as :func:`nbattr.engine.rules._modified_gradient` returns them.
    params : ``reveal_cancel_applied`` and ``reveal_cancel_fallback`` (operation -> calls per
        forward pass that got RevealCancel / the Rescale fallback).
    """
    from . import rules

    stats = RevealCancelStats({}, {})

    def replay(method: str, multiplier: Any, tape: Any) -> _RevealCancelReplay:
        return _RevealCancelReplay(method, multiplier, tape, stats)

    grads, base_out, unsupported = rules._modified_gradient(
        p, "deeplift", rules._rescale_multiplier, reference=True, strict=strict,
        recorder_cls=_RevealCancelRecorder, replay_cls=replay)
    assert base_out is not None
    return grads, base_out, unsupported, {"reveal_cancel_applied": dict(stats.applied),
                                          "reveal_cancel_fallback": dict(stats.fallback)}
