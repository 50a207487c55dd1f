"""Unrolled LSTM/GRU/RNN (nbattr.engine.rnn): equal to the fused modules, restored after use, and
conserving under DeepLIFT once the gates are plain operations."""

from __future__ import annotations

import itertools
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.overrides import TorchFunctionMode

import nbattr
from nbattr.engine import rnn
from nbattr.engine.errors import UnsupportedOperationError

DT = torch.float64
TOL = dict(atol=1e-12, rtol=1e-12)
FUSED = {"lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"}


pytestmark = pytest.mark.usefixtures("float64")


class _OpNames(TorchFunctionMode):
    """Records the name of every torch function called."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", type(func).__name__))
        return func(*args, **(kwargs or {}))


def _assert_same(a, b) -> None:
    """Same structure (tuples, PackedSequence) and values to float64 rounding."""
    if isinstance(a, PackedSequence):
        assert isinstance(b, PackedSequence)
        torch.testing.assert_close(b.data, a.data, **TOL)
        assert torch.equal(b.batch_sizes, a.batch_sizes)
        for x, y in ((a.sorted_indices, b.sorted_indices), (a.unsorted_indices, b.unsorted_indices)):
            assert (x is None and y is None) or torch.equal(x, y)
        return
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
        return
    assert b.shape == a.shape
    torch.testing.assert_close(b, a, **TOL)


def _unrolled_call(m, *args):
    """The unrolled forward, checked to call no fused recurrent kernel."""
    fn = rnn.unrolled_forward(m)
    assert fn is not None
    with _OpNames() as rec:
        out = fn(m, *args)
    assert not FUSED & set(rec.names), sorted(FUSED & set(rec.names))
    return out


# -- equivalence: sequence modules ----------------------------------------------------------------
def _configs():
    for layers, bidir, batch_first, bias in itertools.product([1, 2, 3], [False, True], [False, True],
                                                               [True, False]):
        base = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias)
        yield nn.LSTM, base
        yield nn.LSTM, {**base, "proj_size": 3}
        yield nn.GRU, base
        yield nn.RNN, {**base, "nonlinearity": "tanh"}
        yield nn.RNN, {**base, "nonlinearity": "relu"}


CONFIGS = list(_configs())


def _id(c):
    cls, kw = c
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _hidden_size(cls, kw, hidden):
    return kw.get("proj_size", 0) or hidden


def _random_hx(cls, kw, n, hidden, batched=True):
    d = (2 if kw["bidirectional"] else 1) * kw["num_layers"]
    shape_h = (d, n, _hidden_size(cls, kw, hidden)) if batched else (d, _hidden_size(cls, kw, hidden))
    shape_c = (d, n, hidden) if batched else (d, hidden)
    h = torch.randn(shape_h)
    return (h, torch.randn(shape_c)) if cls is nn.LSTM else h


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_module_equals_fused(config, seed):
    cls, kw = config
    torch.manual_seed(seed)
    d_in, hidden = 3 + seed, 4 + 2 * seed
    m = cls(d_in, hidden, **kw).eval()
    steps, n = 5 + seed, 2 + seed
    x = torch.randn(n, steps, d_in) if kw["batch_first"] else torch.randn(steps, n, d_in)
    _assert_same(m(x), _unrolled_call(m, x))
    hx = _random_hx(cls, kw, n, hidden)
    _assert_same(m(x, hx), _unrolled_call(m, x, hx))
    # unbatched (L, H_in), with and without a state
    x1 = torch.randn(steps, d_in)
    _assert_same(m(x1), _unrolled_call(m, x1))
    hx1 = _random_hx(cls, kw, n, hidden, batched=False)
    _assert_same(m(x1, hx1), _unrolled_call(m, x1, hx1))


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence_equals_fused(config, enforce_sorted):
    cls, kw = config
    torch.manual_seed(3)
    m = cls(3, 4, **kw).eval()
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    padded = torch.randn(4, 6, 3)
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    _assert_same(m(packed), _unrolled_call(m, packed))
    hx = _random_hx(cls, kw, 4, 4)
    _assert_same(m(packed, hx), _unrolled_call(m, packed, hx))


def test_gradients_equal_fused():
    """Differentiating through the unrolled LSTM gives the fused LSTM's gradients."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2).eval()
    x = torch.randn(6, 2, 3, requires_grad=True)
    (g_fused,) = torch.autograd.grad(m(x)[0].square().sum(), x)
    (g_unrolled,) = torch.autograd.grad(rnn.lstm_forward(m, x)[0].square().sum(), x)
    torch.testing.assert_close(g_unrolled, g_fused, **TOL)


def test_gate_order_by_hand():
    """One LSTM and one GRU step written out from PyTorch's documented equations."""
    torch.manual_seed(1)
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    lstm = nn.LSTMCell(3, 4)
    pre = x @ lstm.weight_ih.T + lstm.bias_ih + h @ lstm.weight_hh.T + lstm.bias_hh
    i, f, g, o = pre[:, :4].sigmoid(), pre[:, 4:8].sigmoid(), pre[:, 8:12].tanh(), pre[:, 12:].sigmoid()
    c1 = f * c + i * g
    _assert_same((o * c1.tanh(), c1), rnn.lstm_cell_forward(lstm, x, (h, c)))
    gru = nn.GRUCell(3, 4)
    gi, gh = x @ gru.weight_ih.T + gru.bias_ih, h @ gru.weight_hh.T + gru.bias_hh
    r, z = (gi[:, :4] + gh[:, :4]).sigmoid(), (gi[:, 4:8] + gh[:, 4:8]).sigmoid()
    n = (gi[:, 8:] + r * gh[:, 8:]).tanh()
    _assert_same((1 - z) * n + z * h, rnn.gru_cell_forward(gru, x, h))


@pytest.mark.parametrize("cls,kw", [(nn.LSTMCell, {}), (nn.GRUCell, {}), (nn.RNNCell, {}),
                                    (nn.RNNCell, {"nonlinearity": "relu"})])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_equals_fused(cls, kw, bias, seed):
    torch.manual_seed(seed)
    d_in, hidden, n = 2 + seed, 3 + seed, 1 + 2 * seed
    m = cls(d_in, hidden, bias=bias, **kw)
    x = torch.randn(n, d_in)
    hx = (torch.randn(n, hidden), torch.randn(n, hidden)) if cls is nn.LSTMCell else torch.randn(n, hidden)
    _assert_same(m(x), _unrolled_call(m, x))
    _assert_same(m(x, hx), _unrolled_call(m, x, hx))
    hx1 = tuple(h[0] for h in hx) if cls is nn.LSTMCell else hx[0]
    _assert_same(m(x[0]), _unrolled_call(m, x[0]))
    _assert_same(m(x[0], hx1), _unrolled_call(m, x[0], hx1))


@pytest.mark.parametrize("m", [nn.LSTM(3, 4), nn.GRU(3, 4, batch_first=True), nn.RNN(3, 4)],
                         ids=["LSTM", "GRU", "RNN"])
def test_bad_input_raises_like_the_module(m):
    def error(fn):
        with pytest.raises(Exception) as e:
            fn()
        return type(e.value)

    cases = [torch.randn(2, 3, 4, 3), torch.randn(5, 2, 7)]
    for x in cases:
        assert error(lambda x=x: rnn.unrolled_forward(m)(m, x)) is error(lambda x=x: m(x))
    bad_h = torch.randn(1, 9, 4)
    x = torch.randn(5, 2, 3)
    hx = (bad_h, torch.randn(1, 2, 4)) if isinstance(m, nn.LSTM) else bad_h
    assert error(lambda: rnn.unrolled_forward(m)(m, x, hx)) is error(lambda: m(x, hx))


def test_cell_bad_input_raises():
    m = nn.GRUCell(3, 4)
    with pytest.raises(ValueError, match="1D or 2D"):
        rnn.gru_cell_forward(m, torch.randn(2, 2, 3))
    with pytest.raises(RuntimeError, match="input_size"):
        rnn.gru_cell_forward(m, torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="hidden state"):
        rnn.gru_cell_forward(m, torch.randn(2, 3), torch.randn(3, 4))


def test_forward_functions_check_the_module_kind():
    with pytest.raises(ValueError, match="nn.LSTM"):
        rnn.lstm_forward(nn.GRU(2, 3), torch.randn(4, 1, 2))
    with pytest.raises(ValueError, match="nn.GRU"):
        rnn.gru_forward(nn.LSTM(2, 3), torch.randn(4, 1, 2))
    with pytest.raises(ValueError, match="nn.RNN"):
        rnn.rnn_forward(nn.GRU(2, 3), torch.randn(4, 1, 2))


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=3, dropout=0.5)
    x = torch.randn(5, 2, 3)
    for training, expected in ((False, 0), (True, 2)):  # between layers 1-2 and 2-3
        m.train(training)
        with _OpNames() as rec:
            rnn.lstm_forward(m, x)
        assert rec.names.count("dropout") == expected
    m.eval()
    _assert_same(m(x), rnn.lstm_forward(m, x))
    m.train()  # training without dropout is deterministic: equal to the fused kernel
    m.dropout = 0.0
    _assert_same(m(x), rnn.lstm_forward(m, x))


# -- the context manager --------------------------------------------------------------------------
class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.gru = nn.GRU(4, 4, batch_first=True, bidirectional=True)
        self.cell = nn.RNNCell(8, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(self.cell(y[:, -1]))


class MyLSTM(nn.LSTM):
    def forward(self, x, hx=None):  # a subclass with its own forward: not unrolled
        return super().forward(x * 2, hx)


def _snapshot(model):
    return [(type(m), dict(vars(m)), {k: v for k, v in m.named_parameters(recurse=False)})
            for m in model.modules()]


def _assert_as_found(model, before):
    after = _snapshot(model)
    assert len(after) == len(before)
    for (t0, d0, p0), (t1, d1, p1) in zip(before, after, strict=True):
        assert t0 is t1
        assert d0.keys() == d1.keys()
        for k in d0:
            assert d1[k] is d0[k] or (k == "_flat_weights" and d1[k] == d0[k]), k
        assert p0.keys() == p1.keys() and all(p1[k] is p0[k] for k in p0)
    for m in model.modules():
        assert "forward" not in vars(m)
        assert m.forward.__func__ is type(m).forward


def _calls_fused(model, x) -> bool:
    with _OpNames() as rec:
        model(x)
    return bool(FUSED & set(rec.names))


def test_context_unrolls_every_rnn_and_restores():
    torch.manual_seed(0)
    model = Stacked().eval()
    x = torch.randn(2, 5, 3)
    expected = model(x)
    before = _snapshot(model)
    assert _calls_fused(model, x)
    with rnn.unrolled_rnns(model) as names:
        assert names == ["LSTM", "GRU", "RNNCell"]
        assert not _calls_fused(model, x)
        torch.testing.assert_close(model(x), expected, **TOL)
    _assert_as_found(model, before)
    assert _calls_fused(model, x)


def test_context_restores_after_an_exception():
    model = Stacked().eval()
    before = _snapshot(model)
    with pytest.raises(KeyError, match="boom"):
        with rnn.unrolled_rnns(model):
            assert "forward" in vars(model.lstm)
            raise KeyError("boom")
    _assert_as_found(model, before)
    with pytest.raises(RuntimeError):  # an error raised by the unrolled forward itself
        with rnn.unrolled_rnns(model):
            model(torch.randn(2, 5, 7))
    _assert_as_found(model, before)
    assert not rnn._ACTIVE


def test_context_model_is_the_rnn_and_hooks_still_run():
    m = nn.GRU(3, 4).eval()
    seen = []
    handle = m.register_forward_hook(lambda _m, _i, out: seen.append(out[0].shape))
    before = _snapshot(m)
    with rnn.unrolled_rnns(m) as names:
        assert names == ["GRU"]
        assert not _calls_fused(m, torch.randn(5, 2, 3))
    assert seen == [torch.Size([5, 2, 4])]
    handle.remove()
    _assert_as_found(m, before)


def test_context_without_rnn_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    before = _snapshot(model)
    with rnn.unrolled_rnns(model) as names:
        assert names == []
        assert all("forward" not in vars(m) for m in model.modules())
    _assert_as_found(model, before)
    with rnn.unrolled_rnns(lambda x: x) as names:  # a plain callable
        assert names == []


def test_a_callable_model_has_its_recurrent_modules_unrolled_too():
    """``lambda ids: model(ids)``: the modules it reaches are unrolled (and guarded) as the model's."""
    torch.manual_seed(0)
    model = TextRNN("lstm").eval()
    ids = torch.randint(0, 40, (2, 5))
    before = _snapshot(model)
    r = nbattr.attribute(lambda i: model(i), ids, method="deeplift", layer=model.embedding, strict=True)
    _conserves(r)
    assert r.params["unrolled"] == ["LSTM"]
    _assert_as_found(model, before)


def test_context_leaves_custom_forwards_alone():
    sub = MyLSTM(3, 4).eval()
    assert rnn.unrolled_forward(sub) is None
    own = nn.GRU(3, 4).eval()
    custom = own.forward  # a bound method stored on the instance by the user
    own.forward = custom
    model = nn.ModuleList([sub, own])
    with rnn.unrolled_rnns(model) as names:
        assert names == []
        assert "forward" not in vars(sub) and vars(own)["forward"] is custom
    assert vars(own)["forward"] is custom


def test_context_nested_and_interleaved():
    """Blocks over the same model (a widget thread and the kernel) restore only at the last exit."""
    model = Stacked().eval()
    before = _snapshot(model)
    outer = rnn.unrolled_rnns(model)
    inner = rnn.unrolled_rnns(model)
    assert outer.__enter__() == ["LSTM", "GRU", "RNNCell"]
    assert inner.__enter__() == ["LSTM", "GRU", "RNNCell"]
    outer.__exit__(None, None, None)  # the first block to open closes first
    assert "forward" in vars(model.lstm)
    inner.__exit__(None, None, None)
    _assert_as_found(model, before)

    errors = []

    def worker():
        try:
            for _ in range(50):
                with rnn.unrolled_rnns(model):
                    assert "forward" in vars(model.gru)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _assert_as_found(model, before)


# -- DeepLIFT and ε-LRP through the unrolled modules ----------------------------------------------
class TextRNN(nn.Module):
    """Embedding -> LSTM/GRU/RNN -> linear on the last step's output."""

    def __init__(self, kind: str, vocab=40, emb=8, hidden=6, classes=3, **kw) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](emb, hidden, batch_first=True, **kw)
        out = kw.get("proj_size", 0) or hidden
        self.head = nn.Linear((2 if kw.get("bidirectional") else 1) * out, classes)

    def forward(self, ids):
        out, _ = self.rnn(self.embedding(ids))
        return self.head(out[:, -1])


class PackedTextRNN(TextRNN):
    """Padded ids packed by their lengths (``pack_padded_sequence``), run, unpacked
    (``pad_packed_sequence``), and each row's last valid step read out: the usual text LSTM."""

    def forward(self, ids):
        lengths = (ids != 0).sum(1).clamp(min=1)
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.head(out[torch.arange(ids.shape[0]), lengths - 1])


class CellLoop(nn.Module):
    """A hand-written loop over an LSTMCell and a GRUCell."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 5)
        self.lstm = nn.LSTMCell(5, 4)
        self.gru = nn.GRUCell(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        e = self.embedding(ids)
        state, h2 = None, None
        for t in range(e.shape[1]):
            state = self.lstm(e[:, t], state)
            h2 = self.gru(state[0], h2)
        return self.head(h2)


def _conserves(r) -> None:
    gap = (r.outputs - r.baseline_outputs).abs()
    bound = 1e-6 * torch.clamp(gap, min=1.0)
    assert (r.delta.abs() <= bound).all(), (r.delta, gap)


TEXT_MODELS = {
    "lstm": lambda: TextRNN("lstm"),
    "gru": lambda: TextRNN("gru"),
    "rnn_tanh": lambda: TextRNN("rnn"),
    "lstm_bidirectional_2layer": lambda: TextRNN("lstm", num_layers=2, bidirectional=True),
    "gru_bidirectional_2layer": lambda: TextRNN("gru", num_layers=2, bidirectional=True),
    "lstm_proj": lambda: TextRNN("lstm", proj_size=3),
    "lstm_packed": lambda: PackedTextRNN("lstm", bidirectional=True),
    "gru_packed": lambda: PackedTextRNN("gru"),
    "cells": CellLoop,
}


@pytest.mark.parametrize("name", list(TEXT_MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deeplift_conserves_on_recurrent_text_models(name, seed):
    torch.manual_seed(seed)
    model = TEXT_MODELS[name]().eval()
    ids = torch.randint(0, model.embedding.num_embeddings, (3, 4 + seed))
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an op without a rule would warn
        r = nbattr.attribute(model, ids, method="deeplift", layer=model.embedding, strict=True)
    _conserves(r)
    assert r.unsupported == {}
    expected = {"cells": ["LSTMCell", "GRUCell"], "rnn_tanh": ["RNN"]}.get(name, [name.split("_")[0].upper()])
    assert r.params["unrolled"] == expected
    assert r.attributions.shape == (*ids.shape, model.embedding.embedding_dim)
    assert (r.outputs - r.baseline_outputs).abs().max() > 1e-3  # not conserving a zero trivially
    _assert_as_found(model, before)


@pytest.mark.parametrize("name", list(TEXT_MODELS))
def test_deeplift_reveal_cancel_conserves_on_recurrent_text_models(name):
    torch.manual_seed(7)
    model = TEXT_MODELS[name]().eval()
    ids = torch.randint(0, model.embedding.num_embeddings, (2, 5))
    r = nbattr.attribute(model, ids, method="deeplift", layer=model.embedding, rule="reveal_cancel",
                         strict=True)
    _conserves(r)
    assert r.unsupported == {} and r.params["unrolled"]


class OneStep(nn.Module):
    """(N, 2) -> one step of an LSTM with one hidden unit -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 1)
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(self.lstm(x[None])[0][0])


def test_deeplift_lstm_step_closed_form():
    """One LSTM step with zero state, two input features: DeepLIFT's split from the Rescale
    multipliers and the two-player (Shapley) product rule, written out by hand."""
    torch.manual_seed(4)
    model = OneStep().eval()
    lstm, w = model.lstm, model.head
    x, x0 = torch.tensor([[0.7, -1.3]]), torch.tensor([[-0.4, 0.9]])
    r = nbattr.attribute(model, x, method="deeplift", baseline=x0, strict=True)
    assert r.params["unrolled"] == ["LSTM"]

    def parts(v):
        pre = lstm.weight_ih_l0 @ v[0] + lstm.bias_ih_l0 + lstm.bias_hh_l0  # (4,) gates i, f, g, o
        i, g, o = pre[0].sigmoid(), pre[2].tanh(), pre[3].sigmoid()
        c = i * g
        return pre, i, g, o, c, c.tanh()

    (p, i, g, o, c, tc), (p0, i0, g0, o0, c0, tc0) = parts(x), parts(x0)

    def sec(a, b, u, v):
        return (a - b) / (u - v)

    dpre_dx = lstm.weight_ih_l0  # (4, 2)
    m_i, m_g, m_o = sec(i, i0, p[0], p0[0]), sec(g, g0, p[2], p0[2]), sec(o, o0, p[3], p0[3])
    dc_dx = 0.5 * (g + g0) * m_i * dpre_dx[0] + 0.5 * (i + i0) * m_g * dpre_dx[2]
    dh_dx = 0.5 * (tc + tc0) * m_o * dpre_dx[3] + 0.5 * (o + o0) * sec(tc, tc0, c, c0) * dc_dx
    expected = w.weight[0, 0] * dh_dx * (x - x0)[0]
    torch.testing.assert_close(r.attributions[0], expected, atol=1e-10, rtol=1e-10)
    _conserves(r)


class SeqRegressor(nn.Module):
    """Float sequences (N, L, 3) -> a batch-first 2-layer bidirectional LSTM -> one score per row."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True, num_layers=2, bidirectional=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])[:, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_deeplift_input_attribution_on_a_batch_first_lstm(seed):
    torch.manual_seed(seed)
    model = SeqRegressor().eval()
    r = nbattr.attribute(model, torch.randn(2, 5, 3), method="deeplift", baseline=0.1, strict=True)
    _conserves(r)
    assert r.params["unrolled"] == ["LSTM"]


def test_rules_report_the_fused_kernel_without_unrolling():
    """The fused LSTM is one opaque operation to the rules: reported, and conservation fails."""
    torch.manual_seed(0)
    model = TextRNN("lstm").eval()
    lstm = model.rnn
    model.rnn = MyLSTM(lstm.input_size, lstm.hidden_size, batch_first=True).eval()  # not unrolled
    model.rnn.load_state_dict(lstm.state_dict())
    fused = model
    ids = torch.randint(0, 40, (2, 5))
    with pytest.warns(nbattr.MissingRuleWarning, match="lstm"):
        r = nbattr.attribute(fused, ids, method="deeplift", layer=model.embedding)
    assert "lstm" in r.unsupported
    assert r.delta.abs().max() > 1e-4  # the same check as above fails without the unrolled gates
    with pytest.raises(UnsupportedOperationError, match="lstm"):
        nbattr.attribute(fused, ids, method="deeplift", layer=model.embedding, strict=True)


@pytest.mark.parametrize("name", ["lstm", "gru", "lstm_bidirectional_2layer", "cells"])
def test_epsilon_lrp_on_recurrent_models_has_every_rule(name):
    torch.manual_seed(0)
    model = TEXT_MODELS[name]().eval()
    ids = torch.randint(0, model.embedding.num_embeddings, (2, 5))
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = nbattr.attribute(model, ids, method="epsilon_lrp", layer=model.embedding, strict=True)
    assert r.unsupported == {}
    assert r.params["unrolled"]
    assert torch.isfinite(r.attributions).all() and r.attributions.abs().sum() > 0
    _assert_as_found(model, before)


def test_model_restored_when_attribution_raises_inside_the_unrolled_block():
    class Bad(TextRNN):
        def forward(self, ids):
            out, _ = self.rnn(self.embedding(ids))
            return self.head(torch.cumprod(out[:, -1], 1))  # no rule for cumprod

    torch.manual_seed(0)
    model = Bad("gru").eval()
    before = _snapshot(model)
    with pytest.raises(UnsupportedOperationError, match="cumprod"):
        nbattr.attribute(model, torch.randint(0, 40, (2, 5)), method="deeplift", layer=model.embedding,
                         strict=True)
    _assert_as_found(model, before)
    assert not rnn._ACTIVE


def test_no_rnn_results_report_nothing_unrolled():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    r = nbattr.attribute(model, torch.randn(2, 3), method="deeplift")
    assert r.params["unrolled"] == []
    _conserves(r)


def test_gradient_methods_unaffected():
    """Only the rule-based methods unroll: integrated gradients sees the fused module, untouched."""
    torch.manual_seed(0)
    model = TextRNN("lstm").eval()
    ids = torch.randint(0, 40, (2, 5))
    r = nbattr.attribute(model, ids, method="integrated_gradients", layer=model.embedding, steps=64)
    assert "unrolled" not in r.params
    assert r.delta.abs().max() < 1e-3
    assert all("forward" not in vars(m) for m in model.modules())
