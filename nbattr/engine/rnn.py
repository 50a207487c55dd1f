"""Unrolled equivalents of PyTorch's recurrent modules, so operation-level rules see the gates.

PyTorch runs ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (and their cells) through fused kernels
(``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.lstm_cell``, ...). DeepLIFT and ε-LRP
(:mod:`nbattr.engine.rules`) intercept operations, so a fused kernel is one opaque call to them:
its sigmoids, tanhs and gate products get no rule. The functions here compute exactly what the
modules compute, from the module's own parameters, with plain operations only (``F.linear``,
``chunk``, ``sigmoid``, ``tanh``, ``relu``, ``*``, ``+``, ``cat``/``stack``, indexing), one time
step at a time:

* LSTM (gate order i, f, g, o as in PyTorch's weights)::

      i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)
      c' = σ(f) * c + σ(i) * tanh(g)
      h' = σ(o) * tanh(c')            (then h' = W_hr h' when proj_size > 0)

* GRU (gate order r, z, n)::

      r = σ(W_ir x + b_ir + W_hr h + b_hr)
      z = σ(W_iz x + b_iz + W_hz h + b_hz)
      n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
      h' = (1 - z) * n + z * h

* RNN: ``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` with ``act`` = tanh or relu.

Every option of the modules is honoured: ``num_layers``, ``bidirectional`` (the reverse direction
runs from the last step to the first; the layer output concatenates both directions),
``batch_first``, ``bias=False``, ``proj_size`` (LSTM), unbatched input, an initial state ``hx``
(default zeros), and :class:`~torch.nn.utils.rnn.PackedSequence` input (at step ``t`` only the
first ``batch_sizes[t]`` sequences advance; the others keep their state, as in the fused kernel).
Dropout between layers is applied with :func:`torch.nn.functional.dropout` when the module is in
training mode, so it draws a different random mask than the fused kernel; attribution runs models
in eval mode, where both are the identity. Sequence modules check their input with the
module's own ``check_forward_args`` (same errors as the fused forward); the cells check input
and state shapes as the cells do.

:func:`unrolled_rnns` makes every recurrent module of a model run through these functions for the
duration of a ``with`` block: it sets an instance attribute ``forward`` on each module (which
``nn.Module.__call__`` uses in place of the class's ``forward``; hooks still run) and deletes it
on exit, also after an exception. Modules whose class overrides ``forward``, or that already have
an instance ``forward``, are left alone. The patch is reference-counted under a lock, so nested or
concurrent blocks over the same model (a widget computing in a thread) restore the module only
when the last block exits.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .guard import modules_of

__all__ = [
    "UNROLLED",
    "gru_cell_forward",
    "gru_forward",
    "lstm_cell_forward",
    "lstm_forward",
    "rnn_cell_forward",
    "rnn_forward",
    "unrolled_forward",
    "unrolled_rnns",
]

State = tuple[Tensor, ...]  # (h,) or (h, c)
Step = Callable[[Tensor, State], State]


# -- one time step --------------------------------------------------------------------------------
def _lstm_step(w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None) -> Step:
    """LSTM step from the input projection ``gi = W_ih x + b_ih`` and the state ``(h, c)``."""

    def step(gi: Tensor, state: State) -> State:
        h, c = state
        i, f, g, o = (gi + F.linear(h, w_hh, b_hh)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, c

    return step


def _gru_step(w_hh: Tensor, b_hh: Tensor | None) -> Step:
    """GRU step from the input projection ``gi = W_ih x + b_ih`` and the state ``(h,)``."""

    def step(gi: Tensor, state: State) -> State:
        (h,) = state
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return ((1 - z) * n + z * h,)

    return step


def _rnn_step(w_hh: Tensor, b_hh: Tensor | None, nonlinearity: str) -> Step:
    """Elman RNN step (tanh or relu) from the input projection and the state ``(h,)``."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity: {nonlinearity!r} (expected 'tanh' or 'relu')")
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def step(gi: Tensor, state: State) -> State:
        (h,) = state
        return (act(gi + F.linear(h, w_hh, b_hh)),)

    return step


# -- a sequence -----------------------------------------------------------------------------------
def _run_direction(step: Step, gi: Sequence[Tensor], state: State, sizes: list[int] | None,
                   reverse: bool) -> tuple[list[Tensor], State]:
    """Run ``step`` over the time steps ``gi`` (per-step input projections).

    ``sizes`` (PackedSequence ``batch_sizes``) gives the number of sequences active at each step:
    the first ``sizes[t]`` rows of the state advance, the others keep theirs. Returns the per-step
    outputs ``h_t`` (in time order) and the final state.
    """
    outputs: list[Tensor | None] = [None] * len(gi)
    order = range(len(gi) - 1, -1, -1) if reverse else range(len(gi))
    for t in order:
        b = None if sizes is None else sizes[t]
        if b is None or b == state[0].shape[0]:
            state = step(gi[t], state)
            outputs[t] = state[0]
        else:
            new = step(gi[t], tuple(s[:b] for s in state))
            state = tuple(torch.cat([n, s[b:]], 0) for n, s in zip(new, state, strict=True))
            outputs[t] = new[0]
    return outputs, state  # type: ignore[return-value]


def _split(data: Tensor, sizes: list[int] | None) -> Sequence[Tensor]:
    """Per-step tensors of a time-major ``(T, N, ...)`` tensor, or of packed data."""
    return data.unbind(0) if sizes is None else data.split(sizes, 0)


def _join(steps: Sequence[Tensor], sizes: list[int] | None) -> Tensor:
    return torch.stack(list(steps), 0) if sizes is None else torch.cat(list(steps), 0)


def _layer_params(m: nn.RNNBase, layer: int, direction: int) -> dict[str, Tensor | None]:
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {n: getattr(m, n + sfx, None) for n in names}


def _step_for(m: nn.RNNBase, w: dict[str, Tensor | None]) -> Step:
    b_hh = w["bias_hh"] if m.bias else None
    if m.mode == "LSTM":
        return _lstm_step(w["weight_hh"], b_hh, w["weight_hr"] if m.proj_size > 0 else None)
    if m.mode == "GRU":
        return _gru_step(w["weight_hh"], b_hh)
    if m.mode in ("RNN_TANH", "RNN_RELU"):
        return _rnn_step(w["weight_hh"], b_hh, "tanh" if m.mode == "RNN_TANH" else "relu")
    raise ValueError(f"unknown RNN mode {m.mode!r}")


def _sequence_forward(m: nn.RNNBase, input: Tensor | PackedSequence, hx: Any) -> tuple[Any, Any]:
    """The unrolled forward of an ``nn.RNNBase`` (LSTM, GRU, RNN); see the module docstring."""
    lstm = m.mode == "LSTM"
    d = 2 if m.bidirectional else 1
    h_size = m.proj_size if lstm and m.proj_size > 0 else m.hidden_size
    packed = isinstance(input, PackedSequence)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        sizes: list[int] | None = [int(b) for b in batch_sizes]
        n = sizes[0]
        batched = True
        if hx is not None and sorted_indices is not None:
            hx = tuple(h[:, sorted_indices] for h in hx) if lstm else hx[:, sorted_indices]
    else:
        batch_sizes = sorted_indices = unsorted_indices = None
        sizes = None
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(m).__name__}: Expected input to be 2D or 3D, got {input.dim()}D "
                             "tensor instead")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if m.batch_first else 1)
            if hx is not None:
                hs = hx if lstm else (hx,)
                if any(h.dim() != 2 for h in hs):
                    raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got "
                                       f"{[h.dim() for h in hs]}-D tensor(s)")
                hx = tuple(h.unsqueeze(1) for h in hs) if lstm else hx.unsqueeze(1)
        elif hx is not None:
            hs = hx if lstm else (hx,)
            if any(h.dim() != 3 for h in hs):
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got "
                                   f"{[h.dim() for h in hs]}-D tensor(s)")
        data = input.transpose(0, 1) if m.batch_first else input
        n = data.shape[1]
    if hx is None:
        z = torch.zeros(m.num_layers * d, n, h_size, dtype=data.dtype, device=data.device)
        hx = (z, torch.zeros(m.num_layers * d, n, m.hidden_size, dtype=data.dtype, device=data.device)) \
            if lstm else z
    # the module's own checks (dtype, input size, hidden sizes), with its own errors
    m.check_forward_args(data if packed else input, hx, batch_sizes)

    h0 = hx if lstm else (hx,)
    layer_input = data
    finals: list[State] = []
    for layer in range(m.num_layers):
        outs = []
        for direction in range(d):
            w = _layer_params(m, layer, direction)
            gi = _split(F.linear(layer_input, w["weight_ih"], w["bias_ih"] if m.bias else None), sizes)
            k = layer * d + direction
            steps, state = _run_direction(_step_for(m, w), gi, tuple(h[k] for h in h0), sizes,
                                          reverse=direction == 1)
            outs.append(steps)
            finals.append(state)
        steps = outs[0] if d == 1 else [torch.cat(pair, -1) for pair in zip(*outs, strict=True)]
        layer_input = _join(steps, sizes)
        if m.training and m.dropout > 0 and layer < m.num_layers - 1:
            layer_input = F.dropout(layer_input, m.dropout, training=True)
    output = layer_input
    hidden: Any = tuple(torch.stack([s[j] for s in finals], 0) for j in range(len(h0)))
    if packed:
        if unsorted_indices is not None:
            hidden = tuple(h[:, unsorted_indices] for h in hidden)
        output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
    else:
        if m.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(0 if m.batch_first else 1)
            hidden = tuple(h.squeeze(1) for h in hidden)
    return output, (hidden if lstm else hidden[0])


def lstm_forward(m: nn.LSTM, input: Tensor | PackedSequence,
                 hx: tuple[Tensor, Tensor] | None = None) -> tuple[Any, tuple[Tensor, Tensor]]:
    """Unrolled ``nn.LSTM`` forward with the module's weights.

    Parameters
    ----------
    m : the LSTM (any ``num_layers``, ``bidirectional``, ``batch_first``, ``bias``, ``proj_size``).
    input : ``(L, N, H_in)`` (``(N, L, H_in)`` when ``batch_first``), ``(L, H_in)`` unbatched, or a
        PackedSequence.
    hx : ``(h_0, c_0)`` or None (zeros).

    Returns
    -------
    tuple
        ``(output, (h_n, c_n))`` exactly as ``m(input, hx)`` returns them.
    """
    if m.mode != "LSTM":
        raise ValueError(f"lstm_forward needs an nn.LSTM, got {type(m).__name__} (mode {m.mode})")
    return _sequence_forward(m, input, hx)


def gru_forward(m: nn.GRU, input: Tensor | PackedSequence,
                hx: Tensor | None = None) -> tuple[Any, Tensor]:
    """Unrolled ``nn.GRU`` forward with the module's weights; returns ``(output, h_n)`` as ``m``
    does. Parameters as in :func:`lstm_forward`, with ``hx`` the tensor ``h_0``."""
    if m.mode != "GRU":
        raise ValueError(f"gru_forward needs an nn.GRU, got {type(m).__name__} (mode {m.mode})")
    return _sequence_forward(m, input, hx)


def rnn_forward(m: nn.RNN, input: Tensor | PackedSequence,
                hx: Tensor | None = None) -> tuple[Any, Tensor]:
    """Unrolled ``nn.RNN`` forward (tanh or relu) with the module's weights; returns
    ``(output, h_n)`` as ``m`` does. Parameters as in :func:`lstm_forward`."""
    if m.mode not in ("RNN_TANH", "RNN_RELU"):
        raise ValueError(f"rnn_forward needs an nn.RNN, got {type(m).__name__} (mode {m.mode})")
    return _sequence_forward(m, input, hx)


# -- cells ----------------------------------------------------------------------------------------
def _cell_prepare(m: nn.RNNCellBase, input: Tensor, hx: Any, n_states: int
                  ) -> tuple[Tensor, State, bool]:
    """Batch an unbatched cell input and default the state to zeros (as the cells do)."""
    name = type(m).__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    states = None if hx is None else (tuple(hx) if n_states == 2 else (hx,))
    if states is not None:
        for idx, value in enumerate(states):
            if value.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hidden state {idx} to be 1D or 2D, got "
                                 f"{value.dim()}D instead")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if states is None:
        z = torch.zeros(input.size(0), m.hidden_size, dtype=input.dtype, device=input.device)
        states = (z,) * n_states
    elif not batched:
        states = tuple(s.unsqueeze(0) for s in states)
    if input.size(1) != m.input_size:
        raise RuntimeError(f"{name}: input has {input.size(1)} features, expected input_size "
                           f"{m.input_size}")
    for s in states:
        if s.shape != (input.size(0), m.hidden_size):
            raise RuntimeError(f"{name}: hidden state has shape {tuple(s.shape)}, expected "
                               f"{(input.size(0), m.hidden_size)}")
    return input, states, batched


def _cell_bias(m: nn.RNNCellBase, name: str) -> Tensor | None:
    return getattr(m, name) if m.bias else None


def lstm_cell_forward(m: nn.LSTMCell, input: Tensor,
                      hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Unrolled ``nn.LSTMCell`` forward: ``(h', c')`` as the cell returns them."""
    x, state, batched = _cell_prepare(m, input, hx, 2)
    gi = F.linear(x, m.weight_ih, _cell_bias(m, "bias_ih"))
    h, c = _lstm_step(m.weight_hh, _cell_bias(m, "bias_hh"), None)(gi, state)
    return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


def gru_cell_forward(m: nn.GRUCell, input: Tensor, hx: Tensor | None = None) -> Tensor:
    """Unrolled ``nn.GRUCell`` forward: ``h'`` as the cell returns it."""
    x, state, batched = _cell_prepare(m, input, hx, 1)
    gi = F.linear(x, m.weight_ih, _cell_bias(m, "bias_ih"))
    (h,) = _gru_step(m.weight_hh, _cell_bias(m, "bias_hh"))(gi, state)
    return h if batched else h.squeeze(0)


def rnn_cell_forward(m: nn.RNNCell, input: Tensor, hx: Tensor | None = None) -> Tensor:
    """Unrolled ``nn.RNNCell`` forward (tanh or relu): ``h'`` as the cell returns it."""
    step = _rnn_step(m.weight_hh, _cell_bias(m, "bias_hh"), m.nonlinearity)
    x, state, batched = _cell_prepare(m, input, hx, 1)
    (h,) = step(F.linear(x, m.weight_ih, _cell_bias(m, "bias_ih")), state)
    return h if batched else h.squeeze(0)


# -- patching a model -------------------------------------------------------------------------------
#: Stock classes whose ``forward`` has an unrolled equivalent.
UNROLLED: dict[type[nn.Module], Callable[..., Any]] = {
    nn.LSTM: lstm_forward,
    nn.GRU: gru_forward,
    nn.RNN: rnn_forward,
    nn.LSTMCell: lstm_cell_forward,
    nn.GRUCell: gru_cell_forward,
    nn.RNNCell: rnn_cell_forward,
}


def unrolled_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The unrolled forward function ``fn(module, input, hx=None)`` for a recurrent module, or
    None when there is none (not a recurrent module, or its class overrides ``forward``)."""
    if not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return None
    for cls, fn in UNROLLED.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return fn
    return None


_LOCK = threading.Lock()
_ACTIVE: dict[int, list[Any]] = {}  # id(module) -> [module, number of open blocks]


@contextlib.contextmanager
def unrolled_rnns(model: Any) -> Iterator[list[str]]:
    """Run every recurrent module of ``model`` through its unrolled forward inside the block.

    Parameters
    ----------
    model : an ``nn.Module`` (the model itself may be a recurrent module) or any callable (then
        the modules it reaches, :func:`~nbattr.engine.guard.modules_of`).

    Yields
    ------
    list of str
        The class names of the modules that run unrolled in the block, in ``model.modules()``
        order (empty when the model has none: then nothing was changed).

    Notes
    -----
    On exit, also after an exception, each module is exactly as found: the instance attribute
    ``forward`` that was set is deleted. A module whose class overrides ``forward``, or that
    already has an instance ``forward`` of its own, is left alone.
    """
    mine: list[nn.Module] = []
    names: list[str] = []
    try:
        for m in (m for top in modules_of(model) for m in top.modules()):
            if not isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
                continue
            fn = unrolled_forward(m)
            if fn is None:
                continue
            with _LOCK:
                entry = _ACTIVE.get(id(m))
                if entry is None:
                    if "forward" in m.__dict__:  # the user's own instance forward: keep it
                        continue
                    m.__dict__["forward"] = types.MethodType(fn, m)
                    _ACTIVE[id(m)] = [m, 1]
                else:
                    entry[1] += 1
                mine.append(m)
            names.append(type(m).__name__)
        yield names
    finally:
        with _LOCK:
            for m in mine:
                entry = _ACTIVE[id(m)]
                entry[1] -= 1
                if entry[1] == 0:
                    del _ACTIVE[id(m)]
                    m.__dict__.pop("forward", None)
