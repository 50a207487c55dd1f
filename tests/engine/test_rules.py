"""DeepLIFT (Rescale) and epsilon-LRP from operation-level rules (nbattr.engine.rules)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbattr
from nbattr.engine import rules

from .models import Flaky, mode_stack_empty

captum_attr = pytest.importorskip("captum.attr")
EpsilonRule = pytest.importorskip("captum.attr._utils.lrp_rules").EpsilonRule

SEEDS = [0, 1, 2]
DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64")




def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def deeplift(model, x, baseline, target=None, **kw):
    return nbattr.attribute(model, x, method="deeplift", baseline=baseline, target=target, **kw)


# -- models -------------------------------------------------------------------------------------
ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": lambda: nn.CELU(0.7),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "mish": nn.Mish,
    "hardtanh": nn.Hardtanh,
    "relu6": nn.ReLU6,
    "hardsigmoid": nn.Hardsigmoid,
    "hardswish": nn.Hardswish,
    "logsigmoid": nn.LogSigmoid,
    "softsign": nn.Softsign,
    "prelu": lambda: nn.PReLU(8, init=0.2),
}


def mlp(act, d_in=6, hidden=8, classes=3):
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, classes)).eval()


class SmallCNN(nn.Module):
    """conv -> eval BatchNorm -> act -> avg-pool -> conv -> act -> adaptive avg-pool -> linear."""

    def __init__(self, act=nn.ReLU, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act1 = act()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.act2 = act()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, classes)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)
        self.eval()

    def forward(self, x):
        h = self.pool(self.act1(self.bn(self.conv1(x))))
        h = self.gap(self.act2(self.conv2(h)))
        return self.fc(h.flatten(1))


class LRPCNN(nn.Module):
    """A CNN made only of modules Captum's LRP accepts (flatten is done in forward)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(4 * 2 * 2, 6)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)
        self.eval()

    def forward(self, x):
        h = self.pool(self.relu1(self.conv1(x)))
        h = self.relu2(self.conv2(h))
        return self.fc2(self.relu3(self.fc1(h.flatten(1))))


class Functional(nn.Module):
    """Functional calls and methods that module hooks cannot see, and one reused module."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                              nn.Linear(8, 3))
        self.act = nn.Softplus()  # reused three times
        self.eval()

    def forward(self, x):
        h = torch.relu(self.l1(x))
        h = self.act(F.sigmoid(self.l2(h)) + self.act(h))
        h = self.act(self.l3(h).tanh())
        return self.l4(F.gelu(h) - 0.3 * F.elu(h))


class Elementwise(nn.Module):
    """exp, log, sqrt, rsqrt, pow, square, abs, sin, cos, clamp, reciprocal, c / t, 2 ** t."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.eval()

    def forward(self, x):
        h = self.l1(x)
        s = F.softplus(h) + 0.5  # positive
        a = torch.exp(0.3 * h) + torch.log(s) + s.sqrt() + torch.rsqrt(s) + h ** 2 + torch.square(h)
        b = h.abs() + torch.sin(h) + torch.cos(h) + h.clamp(min=-0.2, max=0.4) + torch.clip(h, -1.0, 1.0)
        c = torch.reciprocal(s) + 1.0 / s + 2 ** (0.5 * h) + torch.pow(s, 1.5)
        return self.l2(a + b + c)


class InplaceMethods(nn.Module):
    """In-place activations, some with their return value ignored."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                              nn.Linear(8, 3))
        self.relu = nn.ReLU(inplace=inplace)
        self.eval()

    def forward(self, x):
        ip = self.inplace
        h = self.l1(x)
        if ip:
            h.relu_()  # return value ignored
        else:
            h = h.relu()
        h = self.relu(self.l2(h))
        h = F.leaky_relu(h - 0.5, 0.2, inplace=ip) + F.elu(h - 0.3, inplace=ip)
        g = self.l3(h)
        g = (F.hardtanh(g * 1, -0.5, 0.5, inplace=ip) + F.relu6(g * 4, inplace=ip)
             + F.silu(g - 0.1, inplace=ip))
        if ip:
            torch.sigmoid_(g)
            g.tanh_()
        else:
            g = g.sigmoid().tanh()
        return self.l4(g)


# -- DeepLIFT ---------------------------------------------------------------------------------------
def test_registered():
    info = nbattr.methods()["deeplift"]
    assert info.completeness and info.needs_baseline and info.multiplies_by_inputs
    assert info.options == {"strict": False, "rule": "rescale"}
    info = nbattr.methods()["epsilon_lrp"]
    assert info.multiplies_by_inputs and not info.completeness
    assert info.options == {"epsilon": 1e-9, "strict": False}


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_model_is_weight_times_difference(seed):
    torch.manual_seed(seed)
    model = nn.Linear(6, 3).eval()
    x, b = torch.randn(5, 6), torch.randn(5, 6)
    r = deeplift(model, x, b, target=2)
    assert torch.allclose(r.attributions, (x - b) * model.weight[2].detach(), atol=1e-12)
    gxi = nbattr.attribute(model, x, method="integrated_gradients", baseline=b, target=2, steps=4)
    assert torch.allclose(r.attributions, gxi.attributions, atol=1e-12)
    assert r.delta.abs().max() < 1e-12
    assert r.unsupported == {} and r.params["unsupported"] == []
    assert r.params["rule"] == "rescale"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_mlp_conserves(act, seed):
    torch.manual_seed(seed)
    model = mlp(ACTIVATIONS[act])
    x, b = torch.randn(6, 6), torch.randn(6, 6)
    r = _no_warnings(deeplift, model, x, b)
    assert r.delta.abs().max() < 1e-5
    assert r.unsupported == {}
    assert torch.allclose(r.baseline_outputs, model(b).gather(1, r.target[:, None]).squeeze(1).detach())
    assert torch.allclose(r.outputs, model(x).gather(1, r.target[:, None]).squeeze(1).detach())
    assert mode_stack_empty()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "silu", "gelu"])
def test_cnn_conserves(act, seed):
    torch.manual_seed(seed)
    model = SmallCNN(ACTIVATIONS[act])
    x, b = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8) * 0.5
    r = _no_warnings(deeplift, model, x, b)
    assert r.attributions.shape == x.shape
    assert r.delta.abs().max() < 1e-5
    assert r.unsupported == {}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("model_cls", [Functional, Elementwise, InplaceMethods])
def test_functional_reused_and_elementwise_conserve(model_cls, seed):
    torch.manual_seed(seed)
    model = model_cls()
    x, b = torch.randn(5, 6), torch.randn(5, 6)
    r = _no_warnings(deeplift, model, x, b)
    assert r.delta.abs().max() < 1e-5
    assert r.unsupported == {}


class Residual(nn.Module):
    """In-place ReLU on the input itself, ``out += identity``, functional eval batch norm and
    dropout, bilinear interpolation, a transpose property, division by a constant."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.register_buffer("rm", torch.rand(3) - 0.5)
        self.register_buffer("rv", torch.rand(3) + 0.5)
        self.fc = nn.Linear(3, 4)
        self.eval()

    def forward(self, x):
        x.relu_()
        out = self.relu(F.batch_norm(self.c1(x), self.rm, self.rv))
        out = F.dropout(self.c2(out), 0.3, training=False)
        out += x
        out = F.interpolate(self.relu(out), scale_factor=2, mode="bilinear")
        h = out.mean((2, 3))
        return self.fc(h.T.T) / 2 + (1 / (h.exp() + 1)).sum(1, keepdim=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_residual_with_inplace_on_the_input_conserves(seed):
    torch.manual_seed(seed)
    x, b = torch.randn(3, 3, 6, 6), torch.randn(3, 3, 6, 6) * 0.1
    r = _no_warnings(deeplift, Residual(), x, b)
    assert r.delta.abs().max() < 1e-5
    assert r.unsupported == {}


@pytest.mark.parametrize("seed", SEEDS)
def test_inplace_matches_out_of_place(seed):
    torch.manual_seed(seed)
    a = InplaceMethods(inplace=True)
    b_model = InplaceMethods(inplace=False)
    b_model.load_state_dict(a.state_dict())
    x, b = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(a(x.clone()), b_model(x.clone()))
    for method, kw in (("deeplift", {"baseline": b}), ("epsilon_lrp", {})):
        ra = nbattr.attribute(a, x, method=method, target=1, **kw)
        rb = nbattr.attribute(b_model, x, method=method, target=1, **kw)
        assert torch.allclose(ra.attributions, rb.attributions, atol=1e-12)
        assert torch.allclose(ra.outputs, rb.outputs)


def test_inplace_keeps_identity_inside_the_mode():
    torch.manual_seed(0)
    w = torch.randn(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    h = x @ w
    calls = [
        lambda t: t.relu_(), lambda t: torch.relu_(t), lambda t: F.relu(t, inplace=True),
        lambda t: nn.ReLU(inplace=True)(t), lambda t: F.leaky_relu(t, 0.1, True),
        lambda t: F.elu(t, inplace=True), lambda t: F.hardtanh(t, inplace=True),
        lambda t: F.relu6(t, inplace=True), lambda t: F.silu(t, inplace=True),
    ]
    for call in calls:
        t = h.clone()
        expected = call(t.detach().clone())
        with rules._Replay("test", rules._epsilon_multiplier(1e-9)):
            out = call(t)
        assert out is t
        assert torch.allclose(t, expected)
    assert mode_stack_empty()


@pytest.mark.parametrize("seed", SEEDS)
def test_deeplift_matches_captum_mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8),
                          nn.Tanh(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 8), nn.Softplus(),
                          nn.Linear(8, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3)).eval()
    x, b = torch.randn(5, 6), torch.randn(5, 6)
    target = torch.tensor([0, 1, 2, 1, 0])
    ours = deeplift(model, x, b, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.DeepLift(model).attribute(x, baselines=b, target=target)
    assert torch.allclose(ours.attributions, ref.detach(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_deeplift_matches_captum_cnn(seed):
    torch.manual_seed(seed)
    model = SmallCNN(nn.ReLU)
    x, b = torch.randn(4, 2, 8, 8), torch.rand(4, 2, 8, 8)
    target = torch.tensor([2, 0, 1, 2])
    ours = deeplift(model, x, b, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.DeepLift(model).attribute(x, baselines=b, target=target)
    assert torch.allclose(ours.attributions, ref.detach(), rtol=1e-7, atol=1e-10)


def test_batching_does_not_change_the_result():
    torch.manual_seed(0)
    model = SmallCNN(nn.Tanh)
    x, b = torch.randn(5, 2, 8, 8), torch.randn(5, 2, 8, 8)
    r1 = deeplift(model, x, b, batch_size=2)
    r2 = deeplift(model, x, b)
    assert r1.params["chunks"] == [2, 2, 1]
    assert torch.allclose(r1.attributions, r2.attributions, atol=1e-12)
    assert torch.allclose(r1.baseline_outputs, r2.baseline_outputs, atol=1e-12)


def test_rule_option():
    model = mlp(nn.ReLU)
    x = torch.randn(2, 6)
    assert nbattr.attribute(model, x, method="deeplift").params["rule"] == "rescale"
    assert nbattr.attribute(model, x, method="deeplift", rule="rescale").params["rule"] == "rescale"
    with pytest.raises(nbattr.InputError, match="choose 'rescale' or 'reveal_cancel'"):
        nbattr.attribute(model, x, method="deeplift", rule="bogus")


# -- epsilon-LRP -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_lrp_tends_to_gradient_x_input_on_relu_net(seed):
    torch.manual_seed(seed)
    model = SmallCNN(nn.ReLU)
    x = torch.randn(4, 2, 8, 8)
    r = _no_warnings(nbattr.attribute, model, x, method="epsilon_lrp", epsilon=1e-12)
    g = nbattr.attribute(model, x, method="gradient_x_input")
    assert torch.allclose(r.attributions, g.attributions, rtol=1e-6, atol=1e-12)
    assert r.delta is None and r.unsupported == {}


@pytest.mark.parametrize("seed", SEEDS)
def test_lrp_matches_captum_mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8),
                          nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    target = torch.tensor([0, 1, 2, 1, 0])
    ours = nbattr.attribute(model, x, method="epsilon_lrp", target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.LRP(model).attribute(x, target=target)
    assert torch.allclose(ours.attributions, ref.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_lrp_matches_captum_cnn(seed):
    torch.manual_seed(seed)
    model = LRPCNN()
    x = torch.randn(3, 2, 8, 8)
    # Captum puts epsilon in the denominators of its linear layers (average pooling included),
    # DeepExplain's formulation at the nonlinearities: both agree as epsilon -> 0.
    eps = 1e-12
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.Linear)):
            m.rule = EpsilonRule(epsilon=eps)
    ours = nbattr.attribute(model, x, method="epsilon_lrp", target=1, epsilon=eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.LRP(model).attribute(x, target=1)
    assert torch.allclose(ours.attributions, ref.detach(), rtol=1e-6, atol=1e-11)
    default = nbattr.attribute(model, x, method="epsilon_lrp", target=1)
    assert torch.allclose(default.attributions, ref.detach(), rtol=1e-4, atol=1e-7)


def test_lrp_epsilon_changes_the_result_and_is_validated():
    torch.manual_seed(0)
    model = mlp(nn.Tanh)
    x = torch.randn(3, 6)
    small = nbattr.attribute(model, x, method="epsilon_lrp", epsilon=1e-9)
    big = nbattr.attribute(model, x, method="epsilon_lrp", epsilon=10.0)
    assert not torch.allclose(small.attributions, big.attributions)
    assert big.params["epsilon"] == 10.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(nbattr.InputError, match="epsilon"):
            nbattr.attribute(model, x, method="epsilon_lrp", epsilon=bad)


# -- operations without a rule ------------------------------------------------------------------
class WithoutRule(nn.Module):
    """cumprod (a running product of varying terms) and erfcx: no rule for either."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 2 * 2, 3)
        self.eval()

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv(x)), 4)
        h = torch.cumprod(torch.tanh(h.flatten(1)), 1) + torch.special.erfcx(h.flatten(1))
        return self.fc(h)


class ThreeFactors(nn.Module):
    """An einsum of three varying operands (a three-player product: no rule)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.eval()

    def forward(self, x):
        return self.fc(torch.einsum("ni,ni,ni->ni", x, x.tanh(), x.sigmoid()) + x * x)


@pytest.mark.parametrize("method", ["deeplift", "epsilon_lrp"])
def test_unsupported_ops_are_reported(method):
    torch.manual_seed(0)
    with pytest.warns(nbattr.MissingRuleWarning, match=r"no rule for cumprod \(x1\), special_erfcx \(x1\)"):
        r = nbattr.attribute(WithoutRule(), torch.randn(2, 2, 8, 8), method=method)
    assert r.unsupported == {"cumprod": 1, "special_erfcx": 1}
    assert r.params["unsupported"] == ["cumprod", "special_erfcx"]
    assert "operations without a rule" in repr(r)
    with pytest.warns(nbattr.MissingRuleWarning, match=r"einsum \(x1\)"):
        r = nbattr.attribute(ThreeFactors(), torch.randn(2, 4), method=method, batch_size=1)
    assert r.unsupported == {"einsum": 1}  # x * x has a rule (a product of two varying operands)


@pytest.mark.parametrize("method", ["deeplift", "epsilon_lrp"])
def test_strict_raises(method):
    torch.manual_seed(0)
    with pytest.raises(nbattr.UnsupportedOperationError, match="cumprod.*special_erfcx"):
        nbattr.attribute(WithoutRule(), torch.randn(2, 2, 8, 8), method=method, strict=True)
    with pytest.raises(nbattr.UnsupportedOperationError, match="einsum"):
        nbattr.attribute(ThreeFactors(), torch.randn(2, 4), method=method, strict=True)
    assert mode_stack_empty()
    # strict passes when every operation has a rule
    r = _no_warnings(nbattr.attribute, mlp(nn.GELU), torch.randn(2, 6), method=method, strict=True)
    assert r.unsupported == {}


def test_training_mode_batch_norm_is_unsupported():
    torch.manual_seed(0)
    model = SmallCNN(nn.ReLU).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = deeplift(model, torch.randn(3, 2, 8, 8), torch.zeros(3, 2, 8, 8))
    assert r.unsupported == {"batch_norm": 1}
    assert model.training  # the guard restored the flag


# -- layer mode -----------------------------------------------------------------------------------
class TextModel(nn.Module):
    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, classes)
        self.eval()

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.fc2(torch.tanh(self.fc1(h)))


@pytest.mark.parametrize("seed", SEEDS)
def test_layer_mode_embedding_conserves(seed):
    torch.manual_seed(seed)
    model = TextModel()
    ids = torch.randint(0, 20, (4, 5))
    r = _no_warnings(nbattr.attribute, model, ids, method="deeplift", layer=model.emb)
    assert r.attributions.shape == (4, 5, 8)
    assert r.delta.abs().max() < 1e-5
    assert r.unsupported == {}
    assert torch.allclose(r.baseline_outputs, model.fc2(torch.tanh(model.fc1.bias)).detach()[r.target])
    lrp = nbattr.attribute(model, ids, method="epsilon_lrp", layer=model.emb)
    assert lrp.attributions.shape == (4, 5, 8)


# -- hygiene ----------------------------------------------------------------------------------------
def _plain_forward_is_normal():
    torch.manual_seed(5)
    w = torch.randn(6, 6)
    x = torch.randn(3, 6, requires_grad=True)
    y = torch.sigmoid(x @ w)
    (g,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(x @ w).detach()
    return torch.allclose(g, (s * (1 - s)) @ w.T)


# call 1 is Problem's forward (for deeplift inside its recorder: the recording at the input; the
# model failing there is retried on x[None], whose output of the wrong shape lets the model's own
# error stand); call 2 is deeplift's pass at the reference, epsilon_lrp's pass at the input.
@pytest.mark.parametrize(("method", "fail_on"), [("deeplift", 1), ("deeplift", 2), ("epsilon_lrp", 2)])
def test_no_mode_left_after_an_exception(method, fail_on):
    model = Flaky(fail_on)
    with pytest.raises(RuntimeError, match="boom"):
        nbattr.attribute(model, torch.randn(3, 6), method=method)
    assert model.calls >= fail_on
    assert mode_stack_empty()
    assert _plain_forward_is_normal()
    assert model(torch.randn(2, 6)).shape == (2, 3)


def test_no_mode_left_after_success():
    model = Functional()
    r = deeplift(model, torch.randn(3, 6), "zeros")
    assert mode_stack_empty()
    assert _plain_forward_is_normal()
    x = torch.randn(3, 6)
    assert torch.equal(model(x), model(x))
    assert r.delta.abs().max() < 1e-5


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.eval()

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(torch.tanh(x))
        return self.fc(torch.sigmoid(x) + torch.relu(x))


def test_control_flow_mismatch_raises():
    x = torch.rand(2, 4) + 0.1
    with pytest.raises(nbattr.InputError, match="control flow differs"):
        deeplift(Branching(), x, "zeros")
    assert mode_stack_empty()
    # same branch at input and reference: fine
    r = deeplift(Branching(), x, 0.05)
    assert r.delta.abs().max() < 1e-5


@pytest.mark.parametrize("method", ["deeplift", "epsilon_lrp"])
def test_a_users_full_backward_hook_is_no_missing_rule(method: str) -> None:
    """A module's full backward hook wraps its tensors in an identity Function (x.view_as(x) under
    no_grad): it was reported as an operation without a rule (strict=True raised). The hook still
    fires and stays registered; the result is the hook-free model's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    plain = nbattr.attribute(m, x, method=method)
    fired = []
    m[2].register_full_backward_hook(lambda mod, gi, go: fired.append(1))
    r = nbattr.attribute(m, x, method=method, strict=True)
    assert r.unsupported == {} and fired and len(m[2]._backward_hooks) == 1
    torch.testing.assert_close(r.attributions, plain.attributions, rtol=0, atol=0)
