"""DeepLIFT RevealCancel (nbattr.engine.reveal_cancel): closed forms, an independent reference
implementation of the paper's rules, conservation, equivalence with Rescale, and hygiene."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbattr
from nbattr.engine.reveal_cancel import reveal_cancel_multipliers

from .models import Flaky, mode_stack_empty

DT = torch.float64
SEEDS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("float64")


def rc(model, x, baseline="zeros", target=None, **kw):
    return nbattr.attribute(model, x, method="deeplift", rule="reveal_cancel", baseline=baseline,
                            target=target, **kw)


def rescale(model, x, baseline="zeros", target=None, **kw):
    return nbattr.attribute(model, x, method="deeplift", rule="rescale", baseline=baseline,
                            target=target, **kw)


def assert_conserves(r):
    scale = torch.clamp((r.outputs - r.baseline_outputs).abs(), min=1.0)
    assert (r.delta.abs() <= 1e-6 * scale).all(), r.delta


# -- the paper's motivating example, by hand ------------------------------------------------------
class Min(nn.Module):
    """o = min(i1, i2) = i1 - h2 with h1 = i1 - i2 (a linear layer) and h2 = relu(h1)."""

    def __init__(self):
        super().__init__()
        self.h1 = nn.Linear(2, 1, bias=False)
        self.out = nn.Linear(3, 1, bias=False)  # o = i1 + 0 i2 - h2
        with torch.no_grad():
            self.h1.weight.copy_(torch.tensor([[1.0, -1.0]]))
            self.out.weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        self.eval()

    def forward(self, x):
        h2 = torch.relu(self.h1(x))
        return self.out(torch.cat([x, h2], 1))


# Reference (0, 0). Derivation for (i1, i2) = (3, 1): the terms of Δh1 are +3 (from i1) and
# -1 (from i2), Δh1 = 2, Δh2 = 2.
#   Rescale: m = Δh2/Δh1 = 1; i1 gets 3 (1 - m) = 0 and i2 gets 1 * m = 1: all of min = 1 to i2.
#   RevealCancel: Δh2+ = ½(relu(3) - relu(0)) + ½(relu(2) - relu(-1)) = 2.5,
#                 Δh2- = ½(relu(-1) - relu(0)) + ½(relu(2) - relu(3)) = -0.5   (sum 2 = Δh2),
#   m+ = 2.5/3, m- = 0.5; i1 gets 3 - 3 m+ = 0.5, i2 gets -(-1) m- = 0.5.
# (1, 3): terms +1, -3; h2 = 0 so Rescale's m = 0: i1 gets 1, i2 gets 0. RevealCancel:
#   Δh2+ = ½ relu(1) + ½(relu(-2) - relu(-3)) = 0.5, Δh2- = ½ relu(-3) + ½(relu(-2) - relu(1)) = -0.5;
#   m+ = 0.5, m- = 1/6; i1 gets 1 - 0.5 = 0.5, i2 gets -(-3)(1/6) = 0.5.
# (2, 2): Δh1 = 0 so Rescale uses the derivative relu'(0) = 0: i1 gets 2, i2 gets 0. RevealCancel:
#   terms +2, -2: Δh2+ = ½ relu(2) + ½(relu(0) - relu(-2)) = 1, Δh2- = -1, m+ = m- = ½;
#   i1 gets 2 - 1 = 1, i2 gets 1.
# In general for i1, i2 > 0 each input gets min(i1, i2) / 2 under RevealCancel (the paper:
# RevealCancel gives both inputs 0.5 min(i1, i2), where gradient-based methods and Rescale give
# everything to one of them).
# (2, -1): both terms positive (+2, +1): Δh1- = 0 and RevealCancel equals Rescale: (0, -1).
MIN_CASES = [
    # x, Rescale, RevealCancel
    ((3.0, 1.0), (0.0, 1.0), (0.5, 0.5)),
    ((1.0, 3.0), (1.0, 0.0), (0.5, 0.5)),
    ((2.0, 2.0), (2.0, 0.0), (1.0, 1.0)),
    ((2.0, -1.0), (0.0, -1.0), (0.0, -1.0)),
]


def test_min_network_by_hand():
    model = Min()
    x = torch.tensor([c[0] for c in MIN_CASES])
    res = rescale(model, x, target=0)
    rev = rc(model, x, target=0)
    assert torch.allclose(res.attributions, torch.tensor([c[1] for c in MIN_CASES]), atol=1e-12)
    assert torch.allclose(rev.attributions, torch.tensor([c[2] for c in MIN_CASES]), atol=1e-12)
    assert torch.allclose(rev.outputs, x.min(1).values)
    assert rev.delta.abs().max() < 1e-12
    assert rev.params["rule"] == "reveal_cancel"
    assert rev.params["reveal_cancel_applied"] == {"relu": 1}
    assert rev.params["reveal_cancel_fallback"] == {}


def test_min_network_splits_min_equally():
    torch.manual_seed(0)
    x = torch.rand(20, 2) * 5 + 0.1
    r = rc(Min(), x, target=0)
    half = x.min(1).values / 2
    assert torch.allclose(r.attributions, torch.stack([half, half], 1), atol=1e-12)


def test_multipliers_closed_form():
    # f = relu at t' = 0 with Δt+ = 3, Δt- = -1 (the (3, 1) case) and a smooth f checked by its
    # definition; Δy+ + Δy- = Δy exactly.
    t_ref, dpos, dneg = torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([-1.0])
    t = t_ref + dpos + dneg
    mp, mn, bad = reveal_cancel_multipliers(torch.relu, t, torch.relu(t), t_ref, torch.relu(t_ref), dpos)
    assert torch.allclose(mp, torch.tensor([2.5 / 3])) and torch.allclose(mn, torch.tensor([0.5]))
    assert not bad.any()
    torch.manual_seed(1)
    t_ref, dpos, dneg = torch.randn(50), torch.rand(50) * 3, -torch.rand(50) * 3
    t = t_ref + dpos + dneg
    f = torch.tanh
    mp, mn, _ = reveal_cancel_multipliers(f, t, f(t), t_ref, f(t_ref), dpos)
    want_p = 0.5 * (f(t_ref + dpos) - f(t_ref)) + 0.5 * (f(t) - f(t_ref + dneg))
    want_n = 0.5 * (f(t_ref + dneg) - f(t_ref)) + 0.5 * (f(t) - f(t_ref + dpos))
    assert torch.allclose(mp * dpos, want_p, atol=1e-12) and torch.allclose(mn * dneg, want_n, atol=1e-12)
    assert torch.allclose(mp * dpos + mn * dneg, f(t) - f(t_ref), atol=1e-12)


def test_multipliers_limit_where_one_side_is_empty():
    # Δt- = 0: m- is the limit ½ (f'(t') + f'(t' + Δt+)), m+ the Rescale secant.
    t_ref, dpos = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 2.0])
    t = t_ref + dpos
    mp, mn, bad = reveal_cancel_multipliers(torch.tanh, t, torch.tanh(t), t_ref, torch.tanh(t_ref), dpos)
    d = lambda v: 1 - torch.tanh(v) ** 2  # noqa: E731
    assert torch.allclose(mp, (torch.tanh(t) - torch.tanh(t_ref)) / dpos, atol=1e-12)
    assert torch.allclose(mn, 0.5 * (d(t_ref) + d(t)), atol=1e-12)
    assert not bad.any()
    # Δt+ = 0: m+ is the limit ½ (f'(t') + f'(t' + Δt-)), m- the secant.
    dneg = -dpos
    t = t_ref + dneg
    mp, mn, bad = reveal_cancel_multipliers(torch.tanh, t, torch.tanh(t), t_ref, torch.tanh(t_ref),
                                            torch.zeros_like(dneg))
    assert torch.allclose(mn, (torch.tanh(t) - torch.tanh(t_ref)) / dneg, atol=1e-12)
    assert torch.allclose(mp, 0.5 * (d(t_ref) + d(t)), atol=1e-12)
    assert not bad.any()


# -- an independent reference: the paper's rules, connection by connection -------------------------
ACTS = {
    "relu": (torch.relu, lambda t: (t > 0).to(t.dtype)),
    "tanh": (torch.tanh, lambda t: 1 - torch.tanh(t) ** 2),
    "sigmoid": (torch.sigmoid, lambda t: torch.sigmoid(t) * (1 - torch.sigmoid(t))),
    "softplus": (F.softplus, torch.sigmoid),
}


def reference_reveal_cancel(layers, x, x_ref, target):
    """DeepLIFT RevealCancel for one example through ``layers``: ("linear", W, b) or ("act", name).

    Written from §3.5.1 and §3.5.3 directly: the term of connection (o, j) is W_oj Δz_j; it
    belongs to Δt+ if positive and to Δt- if negative; a linear layer passes G+ to the
    positive terms and G- to the negative ones (ties Δz_j = 0 take the mean).
    """
    zs, zrs = [x], [x_ref]
    for layer in layers:
        if layer[0] == "linear":
            _, w, b = layer
            zs.append(w @ zs[-1] + b)
            zrs.append(w @ zrs[-1] + b)
        else:
            f = ACTS[layer[1]][0]
            zs.append(f(zs[-1]))
            zrs.append(f(zrs[-1]))
    g_pos = g_neg = torch.zeros_like(zs[-1])
    g_pos = g_neg = g_pos.index_fill(0, torch.tensor([target]), 1.0)
    for k in range(len(layers) - 1, -1, -1):
        layer = layers[k]
        z, zr = zs[k], zrs[k]
        dz = z - zr
        if layer[0] == "act":
            f, df = ACTS[layer[1]]
            w, _b = layers[k - 1][1], layers[k - 1][2]
            zin, zin_ref = zs[k - 1], zrs[k - 1]
            terms = w * (zin - zin_ref)[None, :]
            tp, tn = terms.clamp(min=0).sum(1), terms.clamp(max=0).sum(1)
            dyp = 0.5 * (f(zr + tp) - f(zr)) + 0.5 * (f(zr + tn + tp) - f(zr + tn))
            dyn = 0.5 * (f(zr + tn) - f(zr)) + 0.5 * (f(zr + tp + tn) - f(zr + tp))
            mp = torch.where(tp == 0, 0.5 * (df(zr) + df(zr + tn)), dyp / torch.where(tp == 0, 1.0, tp))
            mn = torch.where(tn == 0, 0.5 * (df(zr) + df(zr + tp)), dyn / torch.where(tn == 0, 1.0, tn))
            assert torch.equal(g_pos, g_neg)  # an act's output feeds a linear layer only
            g_pos, g_neg = g_pos * mp, g_neg * mn
        else:
            w = layer[1]
            terms = w * dz[None, :]
            pos, neg, tie = (terms > 0).to(w.dtype), (terms < 0).to(w.dtype), (dz == 0).to(w.dtype)[None, :]
            g = ((w * pos).T @ g_pos + (w * neg).T @ g_neg + 0.5 * (w * tie).T @ (g_pos + g_neg))
            g_pos = g_neg = g
    return (x - x_ref) * g_pos


def dense_layers(modules, in_shape):
    """The modules as ("linear", W, b) / ("act", name) layers on flattened tensors."""
    layers, shape = [], in_shape
    for m in modules:
        if isinstance(m, (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Softplus)):
            layers.append(("act", {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                                   nn.Softplus: "softplus"}[type(m)]))
            continue
        if isinstance(m, nn.Flatten):
            shape = (int(torch.tensor(shape).prod()),)
            continue
        n = int(torch.tensor(shape).prod())
        with torch.no_grad():
            basis = torch.eye(n).reshape(n, *shape)
            b = m(torch.zeros(1, *shape))
            w = (m(basis) - b).reshape(n, -1).T
        shape = tuple(b.shape[1:])
        if isinstance(m, nn.BatchNorm2d) and layers and layers[-1][0] == "linear":
            _, w0, b0 = layers.pop()  # an affine map folded into the layer before: same terms
            w, b = w @ w0, (w @ b0 + b.flatten())
        layers.append(("linear", w, b.flatten()))
    return layers


def mlp(act, seed, d_in=6, hidden=8, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, classes)).eval()


def cnn(act, seed, bn=False):
    torch.manual_seed(seed)
    mods = [nn.Conv2d(2, 3, 3, padding=1)]
    if bn:
        b = nn.BatchNorm2d(3)
        with torch.no_grad():
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
            b.weight.copy_(torch.tensor([1.3, -0.7, 0.9]))  # a negative scale swaps the parts
            b.bias.uniform_(-0.3, 0.3)
        mods.append(b)
    mods += [act(), nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, stride=1), act(), nn.Flatten(), nn.Linear(16, 3)]
    return nn.Sequential(*mods).eval()


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Softplus])
@pytest.mark.parametrize("seed", SEEDS)
def test_mlp_matches_reference(act, seed):
    model = mlp(act, seed)
    x, base = torch.randn(4, 6), torch.randn(4, 6) * 0.3
    target = torch.tensor([0, 1, 2, 1])
    r = rc(model, x, base, target)
    layers = dense_layers(model, (6,))
    want = torch.stack([reference_reveal_cancel(layers, x[i], base[i], int(target[i])) for i in range(4)])
    assert torch.allclose(r.attributions, want, rtol=1e-9, atol=1e-12)
    assert_conserves(r)
    assert r.params["reveal_cancel_fallback"] == {} and r.unsupported == {}
    # and it is not Rescale
    assert not torch.allclose(r.attributions, rescale(model, x, base, target).attributions, atol=1e-6)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("seed", SEEDS)
def test_cnn_matches_reference(act, bn, seed):
    model = cnn(act, seed, bn)
    x, base = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8) * 0.2
    r = rc(model, x, base, target=1)
    layers = dense_layers(model, (2, 8, 8))
    want = torch.stack([reference_reveal_cancel(layers, x[i].flatten(), base[i].flatten(), 1)
                        for i in range(3)]).reshape(x.shape)
    assert torch.allclose(r.attributions, want, rtol=1e-9, atol=1e-12)
    assert_conserves(r)
    assert r.params["reveal_cancel_fallback"] == {}
    assert r.params["reveal_cancel_applied"] == {act.__name__.lower(): 2}


class Difference(nn.Module):
    """tanh(c * (A x + a) - B x): the terms of both linear calls, those of B with their sign
    turned, those of A scaled by a constant c of mixed sign."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(5, 6), nn.Linear(5, 6, bias=False), nn.Linear(6, 2)
        self.register_buffer("c", torch.tensor([1.5, -0.5, 2.0, -1.0, 0.7, -2.0]))
        self.eval()

    def forward(self, x):
        return self.fc(torch.tanh(self.a(x) * self.c - self.b(x)))


@pytest.mark.parametrize("seed", SEEDS)
def test_difference_of_linear_calls_matches_reference(seed):
    torch.manual_seed(seed)
    model = Difference()
    x, base = torch.randn(3, 5), torch.randn(3, 5) * 0.3
    r = rc(model, x, base, target=0)
    # the same terms as one linear layer on [x, x] with weight [diag(c) A, -B]
    w = torch.cat([model.c[:, None] * model.a.weight, -model.b.weight], 1).detach()
    layers = [("linear", w, (model.c * model.a.bias).detach()),
              ("act", "tanh"), ("linear", model.fc.weight.detach(), model.fc.bias.detach())]
    for i in range(3):
        want = reference_reveal_cancel(layers, torch.cat([x[i], x[i]]), torch.cat([base[i], base[i]]), 0)
        assert torch.allclose(r.attributions[i], want[:5] + want[5:], rtol=1e-9, atol=1e-12)
    assert r.params["reveal_cancel_applied"] == {"tanh": 1}


# -- conservation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.GELU, nn.SiLU])
@pytest.mark.parametrize("seed", SEEDS)
def test_mlp_conserves(act, seed):
    model = mlp(act, seed, d_in=10, hidden=16, classes=4)
    x = torch.randn(6, 10) * 2
    r = rc(model, x, "zeros")
    assert_conserves(r)
    assert r.params["reveal_cancel_fallback"] == {}


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.SiLU])
@pytest.mark.parametrize("seed", SEEDS)
def test_cnn_conserves(act, seed):
    model = cnn(act, seed, bn=True)
    x = torch.randn(5, 2, 8, 8)
    r = rc(model, x, "blur")
    assert_conserves(r)
    assert r.params["reveal_cancel_fallback"] == {}


@pytest.mark.parametrize("scale", [1e-10, 1e-5, 1e4])
def test_relu_network_is_scale_free(scale):
    """A bias-free ReLU network is homogeneous, f(c x) = c f(x), and so are its RevealCancel
    attributions: the split's tolerance is relative for a piecewise-linear f. (With an absolute
    floor of 1 every Δt± of activations ~1e-10 took the limit, a kink inside nearly each: 70-280%
    off on randomly initialised MobileNetV2 and MnasNet.)"""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 6, 3, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3, bias=False)).eval()
    x, base = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8) * 0.5
    r1, rc_ = rc(model, x, base, target=1), rc(model, x * scale, base * scale, target=1)
    assert torch.allclose(rc_.attributions, r1.attributions * scale, rtol=1e-7, atol=1e-12 * scale)
    gap = (rc_.outputs - rc_.baseline_outputs).abs()
    assert (rc_.delta.abs() <= 1e-9 * gap).all(), rc_.delta / gap


class Gates(nn.Module):
    """A gate as in an LSTM: W x + U x' + b, chunked, with functional and in-place calls, a
    matmul with a constant matrix, a 1-d conv and a negative scale before a nonlinearity."""

    def __init__(self):
        super().__init__()
        self.w, self.u = nn.Linear(6, 8), nn.Linear(6, 8, bias=False)
        self.m = nn.Parameter(torch.randn(4, 5))
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.fc = nn.Linear(5 + 4 + 12 + 6, 3)
        self.eval()

    def forward(self, x):
        i, g = (self.w(x) + self.u(x.flip(1))).chunk(2, 1)
        h = torch.sigmoid(i) + F.relu(g, inplace=False)
        a = torch.tanh(h @ self.m + 0.1)
        c = F.softplus(-2.0 * self.conv(x[:, None, :]).flatten(1))
        d = nn.functional.relu(self.w(x)[:, :6] * 0.5, inplace=True)
        return self.fc(torch.cat([a, h, c, d], 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_gates_and_functional_calls_conserve_without_fallback(seed):
    torch.manual_seed(seed)
    model = Gates()
    x = torch.randn(4, 6)
    r = rc(model, x, torch.randn(4, 6) * 0.1)
    assert_conserves(r)
    assert r.params["reveal_cancel_fallback"] == {}
    assert r.params["reveal_cancel_applied"] == {"sigmoid": 1, "relu": 2, "tanh": 1, "softplus": 1}


class Stacked(nn.Module):
    """tanh(relu(W x)): the tanh's input comes from a nonlinearity, not from a linear call."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 2)
        self.eval()

    def forward(self, x):
        return self.l2(torch.tanh(torch.relu(self.l1(x))))


def test_fallback_to_rescale_is_reported_and_conserves():
    torch.manual_seed(3)
    model = Stacked()
    x = torch.randn(5, 5)
    r = rc(model, x)
    assert r.params["reveal_cancel_fallback"] == {"tanh": 1}
    assert r.params["reveal_cancel_applied"] == {"relu": 1}
    assert_conserves(r)


# -- equivalence with Rescale on single-term networks -------------------------------------------
class SingleTerm(nn.Module):
    """Every nonlinearity input has one contribution term per unit: diagonal linear layers and
    a depthwise 1x1 convolution (a per-channel scale) of either sign."""

    def __init__(self, act):
        super().__init__()
        self.d1, self.d2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.conv = nn.Conv2d(6, 6, 1, groups=6)
        self.act = act()
        self.fc = nn.Linear(6 * 4, 3)
        with torch.no_grad():
            self.d1.weight.copy_(torch.diag(torch.tensor([1.5, -0.7, 0.3, -2.0, 1.0, 0.8])))
            self.d2.weight.copy_(torch.diag(torch.tensor([-1.1, 0.4, 2.0, 0.9, -0.6, 1.3])))
        self.eval()

    def forward(self, x):
        h = self.act(self.d2(self.act(self.d1(x))))
        h = self.act(self.conv(h[:, :, None, None].expand(-1, -1, 2, 2)))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Softplus])
@pytest.mark.parametrize("seed", SEEDS)
def test_single_term_network_equals_rescale(act, seed):
    torch.manual_seed(seed)
    model = SingleTerm(act)
    x, base = torch.randn(4, 6), torch.randn(4, 6) * 0.5
    r = rc(model, x, base)
    s = rescale(model, x, base)
    assert r.params["reveal_cancel_fallback"] == {}
    assert r.params["reveal_cancel_applied"] == {act.__name__.lower(): 3}
    assert torch.allclose(r.attributions, s.attributions, rtol=1e-9, atol=1e-12)
    assert_conserves(r)


# -- options, batching, in-place ------------------------------------------------------------------
def test_rule_option_documented_and_validated():
    info = nbattr.methods()["deeplift"]
    assert info.options["rule"] == "rescale"
    assert "reveal_cancel" in info.description and "rescale" in info.description
    with pytest.raises(nbattr.InputError, match="'rescale' or 'reveal_cancel'"):
        nbattr.attribute(mlp(nn.ReLU, 0), torch.randn(2, 6), method="deeplift", rule="revealcancel")


def test_batching_does_not_change_the_result():
    model = cnn(nn.ReLU, 0, bn=True)
    x = torch.randn(5, 2, 8, 8)
    a = rc(model, x, batch_size=1)
    b = rc(model, x, batch_size=5)
    assert torch.allclose(a.attributions, b.attributions, rtol=1e-10, atol=1e-13)


def test_inplace_relu_matches_out_of_place():
    torch.manual_seed(4)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    inplace = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True),
                            nn.Linear(8, 3)).eval()
    inplace.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6)
    a, b = rc(plain, x), rc(inplace, x)
    assert torch.allclose(a.attributions, b.attributions, atol=1e-12)
    assert b.params["reveal_cancel_applied"] == {"relu": 2}


def test_inplace_calls_keep_or_drop_the_split():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 2)
            self.eval()

        def forward(self, x):
            h = self.l1(x)
            h.add_(0.5)  # affine: the split follows
            h.clamp_(min=-0.5)  # a nonlinearity in place: gets RevealCancel, h is no longer linear
            return self.l2(torch.tanh(h))  # so tanh falls back to Rescale

    torch.manual_seed(5)
    r = rc(InPlace(), torch.randn(3, 4) * 2)
    assert_conserves(r)
    assert r.params["reveal_cancel_applied"] == {"clamp": 1}
    assert r.params["reveal_cancel_fallback"] == {"tanh": 1}


# -- the model is left as found -------------------------------------------------------------------
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(p.requires_grad, p.grad) for p in model.parameters()],
            [m.training for m in model.modules()],
            [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()])


def _same(model, snap):
    state, params, training, hooks = snap
    now = _snapshot(model)
    return (all(torch.equal(state[k], now[0][k]) for k in state) and params == now[1]
            and training == now[2] and hooks == now[3])


def test_model_left_as_found_after_success():
    model = cnn(nn.ReLU, 1, bn=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.requires_grad_(False)
    snap = _snapshot(model)
    r = rc(model, torch.randn(2, 2, 8, 8))
    assert _same(model, snap) and mode_stack_empty()
    assert_conserves(r)


# call 1 is Problem's forward; then the reference pass (2) and the input pass (3).
@pytest.mark.parametrize("fail_on", [2, 3])
def test_model_left_as_found_after_an_exception(fail_on):
    model = Flaky(fail_on)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        rc(model, torch.randn(3, 6))
    assert _same(model, snap) and mode_stack_empty()
    x = torch.randn(2, 6, requires_grad=True)
    y = torch.sigmoid(x @ torch.eye(6))
    (g,) = torch.autograd.grad(y.sum(), x)  # plain autograd again outside the call
    assert torch.allclose(g, torch.sigmoid(x) * (1 - torch.sigmoid(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fail_on = 0
        assert_conserves(rc(model, torch.randn(3, 6)))


class Branching(nn.Module):
    """An extra linear call only when the input sums to more than 0 (no nonlinearity taped)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.eval()

    def forward(self, x):
        if x.sum() > 0:
            x = self.a(x)
        return self.b(x)


def test_control_flow_mismatch_in_linear_calls_raises():
    x = torch.rand(2, 4) + 0.1
    with pytest.raises(nbattr.InputError, match="control flow differs"):
        rc(Branching(), x, "zeros")
    assert mode_stack_empty()
    assert_conserves(rc(Branching(), x, 0.05))


def test_strict_applies_to_reveal_cancel():
    class NoRule(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 2)
            self.eval()

        def forward(self, x):
            return self.l2(torch.cumprod(torch.tanh(self.l1(x)), 1))

    with pytest.raises(nbattr.UnsupportedOperationError, match="cumprod"):
        rc(NoRule(), torch.randn(2, 4), strict=True)
    assert mode_stack_empty()
