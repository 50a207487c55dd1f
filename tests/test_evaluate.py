"""nbattr.evaluate: ablation curves / AOPC, localization and saturation against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.errors import InputError, TargetError
from nbattr.evaluate import ablation_curve, localization, plot_ablation, plot_saturation, saturation

# ----------------------------------------------------------------------------- helpers


def linear(d: int = 12, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d, classes).double().eval()


def expected_curve(contrib: np.ndarray, bias: float, counts: list[int], mode: str,
                   base_contrib: np.ndarray | None = None) -> np.ndarray:
    """Closed form of a linear model's score after removing/inserting the top-k contributions.

    ``contrib[i] = w_i x_i`` is feature i's term at x, ``base_contrib[i] = w_i x'_i`` its term at
    the baseline; features are ranked by ``contrib - base_contrib`` (the true importance).
    """
    if base_contrib is None:
        base_contrib = np.zeros_like(contrib)
    order = np.argsort(-(contrib - base_contrib), kind="stable")
    out = []
    for k in counts:
        chosen = np.zeros(len(contrib), bool)
        chosen[order[:k]] = True
        if mode == "deletion":
            out.append(bias + base_contrib[chosen].sum() + contrib[~chosen].sum())
        else:
            out.append(bias + contrib[chosen].sum() + base_contrib[~chosen].sum())
    return np.array(out)


class Recording(nn.Module):
    """Wraps a model; records every input batch and whether grad mode was on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.model(x)


# ----------------------------------------------------------------------------- ablation


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("steps", [4, 12, 5])
def test_linear_closed_form(mode: str, steps: int) -> None:
    model = linear(12)
    torch.manual_seed(1)
    x = torch.randn(3, 12, dtype=torch.float64)
    target = [0, 2, 1]
    w, b = model.weight.detach(), model.bias.detach()
    attr = w[target] * x  # the true contribution of each feature (= IG with zero baseline)
    r = ablation_curve(model, x, attr, target=target, steps=steps, mode=mode, importance="signed")
    assert r.fractions.tolist() == pytest.approx([k / steps for k in range(steps + 1)])
    for i, t in enumerate(target):
        counts = [round(k / steps * 12) for k in range(steps + 1)]
        assert r.counts[:, i].tolist() == counts
        exp = expected_curve(attr[i].numpy(), float(b[t]), counts, mode)
        np.testing.assert_allclose(r.scores[:, i].numpy(), exp, rtol=1e-12, atol=1e-12)
        fx = float(b[t] + attr[i].sum())
        if mode == "deletion":
            aopc = np.mean(fx - exp)
        else:
            aopc = np.mean(exp - float(b[t]))
        assert float(r.aopc[i]) == pytest.approx(aopc, rel=1e-12, abs=1e-12)
        assert float(r.original[i]) == pytest.approx(fx, rel=1e-12)
        assert float(r.baseline_score[i]) == pytest.approx(float(b[t]), rel=1e-12)
    np.testing.assert_allclose(r.drop.numpy(), (r.original[None] - r.scores).numpy())


def test_linear_closed_form_tensor_baseline_and_abs_importance() -> None:
    model = linear(10, classes=2, seed=3)
    torch.manual_seed(4)
    x = torch.randn(2, 10, dtype=torch.float64)
    xb = torch.randn(10, dtype=torch.float64)  # one baseline for every example
    w, b = model.weight.detach(), model.bias.detach()
    r0 = model(x).argmax(1)
    attr = w[r0] * (x - xb)
    # make every contribution positive so that |attr| and the signed ranking agree
    x = torch.where(attr < 0, 2 * xb - x, x)
    attr = w[r0] * (x - xb)
    assert (attr > 0).all()
    r = ablation_curve(model, x, attr, target=r0, baseline=xb, steps=5)
    for i in range(2):
        t = int(r0[i])
        counts = [round(k / 5 * 10) for k in range(6)]
        exp = expected_curve((w[t] * x[i]).numpy(), float(b[t]), counts, "deletion", (w[t] * xb).numpy())
        np.testing.assert_allclose(r.scores[:, i].numpy(), exp, rtol=1e-12, atol=1e-12)


def test_true_importance_beats_random_order() -> None:
    model = linear(20, classes=1, seed=5)
    torch.manual_seed(6)
    x = torch.randn(1, 20, dtype=torch.float64)
    w = model.weight.detach()[0]
    x = x.abs() * w.sign()  # every contribution w_i x_i > 0 and distinct
    attr = w * x
    best = ablation_curve(model, x, attr, steps=20)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        rand = torch.rand(1, 20, generator=gen, dtype=torch.float64)
        other = ablation_curve(model, x, rand, steps=20)
        # the top-k contributions have the largest sum of any k features: a strictly larger AOPC
        assert float(best.aopc[0]) > float(other.aopc[0])
        assert (best.scores[:, 0] <= other.scores[:, 0] + 1e-12).all()
    # insertion: the true order rises fastest
    ins = ablation_curve(model, x, attr, steps=20, mode="insertion")
    ins_rand = ablation_curve(model, x, torch.rand(1, 20, generator=gen, dtype=torch.float64),
                              steps=20, mode="insertion")
    assert float(ins.aopc[0]) > float(ins_rand.aopc[0])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).reshape(x.shape[0], -1))


def cnn() -> nn.Module:
    torch.manual_seed(11)
    return SmallCNN().double().eval()


@pytest.mark.parametrize("baseline", ["zeros", "blur", 0.5])
def test_edges_deletion_and_insertion(baseline) -> None:
    model = cnn()
    torch.manual_seed(12)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    attr = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dele = ablation_curve(model, x, attr, baseline=baseline, steps=6)
    ins = ablation_curve(model, x, attr, baseline=baseline, steps=6, mode="insertion")
    with torch.no_grad():
        out = model(x)
        fx = out.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    xb = nbattr.engine.baselines.resolve(baseline, x)
    with torch.no_grad():
        fb = model(xb).gather(1, out.argmax(1, keepdim=True)).squeeze(1)
    for r in (dele, ins):
        torch.testing.assert_close(r.original, fx)
        torch.testing.assert_close(r.baseline_score, fb)
        assert r.target.tolist() == out.argmax(1).tolist()
        assert r.n_features.tolist() == [36, 36]  # one feature per pixel
    torch.testing.assert_close(dele.scores[0], fx)
    torch.testing.assert_close(dele.scores[-1], fb)
    torch.testing.assert_close(ins.scores[0], fb)
    torch.testing.assert_close(ins.scores[-1], fx)
    torch.testing.assert_close(dele.aopc, (fx[None] - dele.scores).mean(0))
    torch.testing.assert_close(ins.aopc, (ins.scores - fb[None]).mean(0))


def test_image_default_removes_whole_pixels_by_channel_abs_sum() -> None:
    model = Recording(cnn())
    torch.manual_seed(13)
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64) + 0.1
    attr = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    r = ablation_curve(model, x, attr, steps=[0.0, 0.25, 0.5, 1.0], batch_size=1)
    pix = attr.abs().sum(1)[0].flatten()
    order = torch.argsort(pix, descending=True, stable=True)
    calls = model.inputs[1:]  # the first call is the validation forward at x
    assert len(calls) >= 4
    for k, frac in enumerate([0.0, 0.25, 0.5, 1.0]):
        z = calls[k][0]
        removed = (z == 0)  # baseline zeros; x > 0 everywhere
        # whole pixels: all channels of a pixel go together
        assert (removed.all(0) == removed.any(0)).all()
        n = round(frac * 36)
        exp = torch.zeros(36, dtype=torch.bool)
        exp[order[:n]] = True
        assert removed[0].flatten().tolist() == exp.tolist()
    assert r.counts[:, 0].tolist() == [0, 9, 18, 36]
    assert not any(model.grad_enabled[1:])  # forward passes under no_grad


def test_feature_mask_groups_closed_form() -> None:
    model = linear(6, classes=1, seed=8)
    x = torch.ones(1, 6, dtype=torch.float64)
    w, b = model.weight.detach()[0], float(model.bias.detach()[0])
    mask = torch.tensor([0, 0, 1, 1, 2, 2])
    attr = torch.tensor([[5.0, 0.0, 1.0, 1.0, 0.0, 3.0]], dtype=torch.float64)  # groups: 5, 2, 3
    r = ablation_curve(model, x, attr, feature_mask=mask, steps=3, importance="signed")
    assert r.n_features.tolist() == [3]
    c = (w * x[0]).numpy()
    g = [c[0:2].sum(), c[2:4].sum(), c[4:6].sum()]
    total = b + sum(g)
    exp = [total, total - g[0], total - g[0] - g[2], b]  # ranked group 0, then 2, then 1
    np.testing.assert_allclose(r.scores[:, 0].numpy(), exp, rtol=1e-12, atol=1e-12)


def test_explicit_fractions_counts_and_probability() -> None:
    model = linear(10, classes=4, seed=9)
    torch.manual_seed(10)
    x = torch.randn(2, 10, dtype=torch.float64)
    attr = torch.randn(2, 10, dtype=torch.float64)
    r = ablation_curve(model, x, attr, steps=[0.0, 0.25, 0.5, 1.0], probability=True)
    assert r.counts[:, 0].tolist() == [0, 2, 5, 10]  # round(2.5) = 2 (round half to even)
    with torch.no_grad():
        p = model(x).softmax(1)
    torch.testing.assert_close(r.original, p.max(1).values)
    torch.testing.assert_close(r.scores[0], p.max(1).values)
    assert ((r.scores >= 0) & (r.scores <= 1)).all()


def test_accepts_attribution_and_uses_its_target() -> None:
    model = linear(8, classes=3, seed=14)
    torch.manual_seed(15)
    x = torch.randn(2, 8, dtype=torch.float64)
    res = nbattr.attribute(model, x, method="integrated_gradients", target=[2, 0], steps=8)
    a = ablation_curve(model, x, res, steps=4)
    b = ablation_curve(model, x, res.attributions, target=[2, 0], steps=4)
    assert a.target.tolist() == [2, 0]
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.aopc, b.aopc)


def test_batch_size_does_not_change_the_curve() -> None:
    model = cnn()
    torch.manual_seed(16)
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    attr = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    a = ablation_curve(model, x, attr, steps=5, batch_size=1)
    b = ablation_curve(model, x, attr, steps=5, batch_size="auto")
    c = ablation_curve(model, x, attr, steps=5, batch_size=7)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.scores, c.scores)


def test_ablation_and_saturation_pass_per_example_forward_kwargs() -> None:
    """A model scaled per example: the curves equal those of each example run alone."""
    lin = linear(6, 3, seed=4)

    def model(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return lin(x * scale)

    torch.manual_seed(5)
    x, scale = torch.rand(3, 6, dtype=torch.float64), torch.rand(3, 6, dtype=torch.float64) + 0.5
    attr = torch.randn(3, 6, dtype=torch.float64)
    a = ablation_curve(model, x, attr, steps=3, batch_size=2, forward_kwargs={"scale": scale})
    s = saturation(model, x, steps=4, batch_size=2, forward_kwargs={"scale": scale})
    for i in range(3):
        one = dict(forward_kwargs={"scale": scale[i:i + 1]})
        torch.testing.assert_close(a.scores[:, i:i + 1], ablation_curve(model, x[i:i + 1], attr[i:i + 1], steps=3,
                                                                        **one).scores)
        torch.testing.assert_close(s.logits[:, i:i + 1], saturation(model, x[i:i + 1], steps=4, **one).logits)


def test_ablation_errors() -> None:
    model = linear(6, classes=3)
    x = torch.randn(2, 6, dtype=torch.float64)
    attr = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(InputError, match="shape"):
        ablation_curve(model, x, attr[:, :5])
    with pytest.raises(InputError, match="mode"):
        ablation_curve(model, x, attr, mode="erase")
    with pytest.raises(InputError, match="importance"):
        ablation_curve(model, x, attr, importance="square")
    with pytest.raises(TargetError, match="out of range"):
        ablation_curve(model, x, attr, target=3)
    with pytest.raises(TargetError, match="3 entries for 2 examples"):
        ablation_curve(model, x, attr, target=[0, 1, 2])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ablation_curve(model, x, attr, steps=[0.0, 1.5])
    with pytest.raises(InputError, match="increasing"):
        ablation_curve(model, x, attr, steps=[0.5, 0.2])
    with pytest.raises(InputError, match="positive"):
        ablation_curve(model, x, attr, steps=0)
    with pytest.raises(InputError, match="integer group ids"):
        ablation_curve(model, x, attr, feature_mask=torch.zeros(6))
    with pytest.raises(InputError, match="does not broadcast"):
        ablation_curve(model, x, attr, feature_mask=torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="tensor or an Attribution"):
        ablation_curve(model, x, attr.numpy())
    with pytest.raises(InputError, match="finite"):
        ablation_curve(model, x, attr * float("nan"))


def test_several_targets_per_example_are_refused() -> None:
    model = linear(6, classes=3)
    x = torch.randn(2, 6, dtype=torch.float64)
    attr = torch.randn(2, 6, dtype=torch.float64)
    # (N, K) targets: refused with a clear error (by the engine, or here when the engine accepts them)
    with pytest.raises(TargetError, match="per example"):
        ablation_curve(model, x, attr, target=[[0, 1], [1, 2]])
    with pytest.raises(TargetError, match="per example"):
        saturation(model, x, target=[[0, 1], [1, 2]])


def test_model_left_as_found_even_after_an_error() -> None:
    model = linear(6, classes=3).train()
    grads = [torch.ones_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    x = torch.randn(2, 6, dtype=torch.float64)
    ablation_curve(model, x, torch.randn(2, 6, dtype=torch.float64), steps=3)
    with pytest.raises(InputError):
        ablation_curve(model, x, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(InputError):
        saturation(model, x, layers=["nope"])
    saturation(model, x, layers={"lin": model}, steps=3)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert not model._forward_hooks


# ----------------------------------------------------------------------------- localization


def test_localization_by_construction() -> None:
    a = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    a[0, 0, 2, 3] = 3.0   # inside (2..4, 3..6)
    a[0, 2, 0, 0] = -1.0  # outside
    a[1, 1, 4, 5] = -2.0  # inside
    box = (2, 3, 5, 6)
    np.testing.assert_allclose(localization(a, box).numpy(), [0.75, 1.0])
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[2:5, 3:6] = True
    np.testing.assert_allclose(localization(a, m).numpy(), [0.75, 1.0])
    # one box per example; the end of a box is excluded
    np.testing.assert_allclose(localization(a, [(0, 0, 1, 1), (0, 0, 4, 5)]).numpy(), [0.25, 0.0])
    # a uniform map scores the box's share of the area (chance level)
    u = torch.ones(1, 3, 8, 8)
    assert float(localization(u, (0, 0, 4, 8))[0]) == pytest.approx(0.5)
    # an Attribution is accepted; an all-zero map gives NaN
    res = nbattr.Attribution(attributions=torch.zeros(1, 8, 8), method="x", target=torch.zeros(1),
                             outputs=torch.zeros(1))
    assert math.isnan(float(localization(res, (0, 0, 2, 2))[0]))
    # a per-element mask on non-image attributions
    t = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    assert float(localization(t, torch.tensor([True, False, True, False]))[0]) == pytest.approx(0.75)


def test_localization_errors() -> None:
    a = torch.randn(2, 3, 8, 8)
    with pytest.raises(InputError, match="0 <= y0 < y1"):
        localization(a, (4, 0, 2, 8))
    with pytest.raises(InputError, match="0 <= y0 < y1"):
        localization(a, (0, 0, 9, 8))
    with pytest.raises(InputError, match="four ints"):
        localization(a, (0, 0, 2))
    with pytest.raises(InputError, match="bool"):
        localization(a, torch.ones(8, 8))
    with pytest.raises(InputError, match="does not broadcast"):
        localization(a, torch.ones(7, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="3 boxes for 2 examples"):
        localization(a, [(0, 0, 1, 1)] * 3)
    with pytest.raises(InputError, match="pass a bool mask"):
        localization(torch.randn(2, 5), (0, 0, 1, 1))


# ----------------------------------------------------------------------------- saturation


class Analytic(nn.Module):
    """logits = [3 tanh(s), 0, -1] with s = sum(x): saturates as x grows; plus a named layer."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 3).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 1.0, 1.0],
                                                [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
            self.lin.bias.copy_(torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.relu(self.lin(x))  # an activation that the score does not use (for the layer curves)
        s = x.sum(1)
        return torch.stack([3 * torch.tanh(s), torch.zeros_like(s), -torch.ones_like(s)], 1)


def test_saturation_closed_form() -> None:
    model = Analytic()
    x = torch.tensor([[0.5, 1.0, 0.25, 0.75], [-0.2, 0.1, 0.3, 0.4]], dtype=torch.float64)
    r = saturation(model, x, steps=10, layers=["lin", "relu"])
    a = torch.arange(11, dtype=torch.float64) / 10
    torch.testing.assert_close(r.alphas, a)
    s = x.sum(1)
    logit = 3 * torch.tanh(a[:, None] * s[None])  # (S, N)
    torch.testing.assert_close(r.logits, logit)
    prob = torch.exp(logit) / (torch.exp(logit) + 1 + math.exp(-1))
    torch.testing.assert_close(r.probs, prob)
    assert r.target.tolist() == [0, 0]
    w, b = model.lin.weight.detach(), model.lin.bias.detach()
    u = x @ w.T  # (N, 3): the layer is a(alpha x) = alpha u + b
    for i in range(2):
        ax = u[i] + b
        for k, al in enumerate(a.tolist()):
            az = al * u[i] + b
            assert float(r.l2["lin"][k, i]) == pytest.approx((1 - al) * float(u[i].norm()), abs=1e-12)
            cos = float(az @ ax / (az.norm() * ax.norm()))
            assert float(r.cosine["lin"][k, i]) == pytest.approx(1 - cos, abs=1e-12)
            rz, rx = torch.relu(az), torch.relu(ax)
            assert float(r.l2["relu"][k, i]) == pytest.approx(float((rz - rx).norm()), abs=1e-12)
        assert float(r.norms["lin"][i]) == pytest.approx(float(ax.norm()))
    torch.testing.assert_close(r.relative_l2("lin"), r.l2["lin"] / r.norms["lin"][None])
    assert r.l2["lin"][-1].abs().max() == 0 and r.cosine["lin"][-1].abs().max() < 1e-12


def test_saturation_baseline_target_and_layer_specs() -> None:
    model = Analytic()
    x = torch.tensor([[0.5, 1.0, 0.25, 0.75]], dtype=torch.float64)
    xb = torch.full((1, 4), 0.1, dtype=torch.float64)
    r = saturation(model, x, baseline=xb, steps=4, target=2, layers={"L": model.lin})
    a = torch.arange(5, dtype=torch.float64) / 4
    z = xb + a[:, None] * (x - xb)
    logits = torch.stack([3 * torch.tanh(z.sum(1)), torch.zeros(5, dtype=torch.float64),
                          -torch.ones(5, dtype=torch.float64)], 1)
    torch.testing.assert_close(r.logits[:, 0], logits[:, 2])
    torch.testing.assert_close(r.probs[:, 0], logits.softmax(1)[:, 2])
    assert r.layers == ["L"]
    # a module given without a name gets its path in the model
    r2 = saturation(model, x, steps=2, layers=[model.relu])
    assert r2.layers == ["relu"]
    assert not model.lin._forward_hooks and not model.relu._forward_hooks
    # a callable that uses the model: names are looked up in the module it uses
    r3 = saturation(lambda z: model(z) * 1.0, x, steps=2, layers=["relu"])
    assert r3.layers == ["relu"]
    torch.testing.assert_close(r3.l2["relu"], r2.l2["relu"])


def test_saturation_scalar_model_has_no_probs() -> None:
    model = nn.Sequential(nn.Linear(3, 1).double(), nn.Flatten(0))
    x = torch.randn(2, 3, dtype=torch.float64)
    r = saturation(model, x, steps=5)
    assert r.probs is None
    w, b = model[0].weight.detach()[0], float(model[0].bias.detach()[0])
    a = torch.arange(6, dtype=torch.float64) / 5
    torch.testing.assert_close(r.logits, a[:, None] * (x @ w)[None] + b)


def test_saturation_errors() -> None:
    model = Analytic()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="no module named 'nope'"):
        saturation(model, x, layers="nope")
    with pytest.raises(InputError, match="not called"):
        saturation(model, x, layers={"other": nn.Linear(2, 2)})
    with pytest.raises(InputError, match="positive int"):
        saturation(model, x, steps=0)
    with pytest.raises(TargetError):
        saturation(model, x, target=7)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    with pytest.raises(InputError, match="more than once"):
        saturation(Twice(), x, layers=["lin"])


# ----------------------------------------------------------------------------- plots


def test_plots_draw_the_results() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model = Analytic()
    x = torch.tensor([[0.5, 1.0, 0.25, 0.75]], dtype=torch.float64)
    r = saturation(model, x, steps=8, layers=["lin"])
    fig = plot_saturation(r)
    axes = fig.axes
    assert len(axes) == 3
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), r.probs[:, 0].numpy())
    np.testing.assert_allclose(axes[1].lines[0].get_ydata(), r.logits[:, 0].numpy())
    np.testing.assert_allclose(axes[2].lines[0].get_ydata(), r.relative_l2("lin")[:, 0].numpy())
    np.testing.assert_allclose(axes[2].lines[1].get_ydata(), r.cosine["lin"][:, 0].numpy())
    lin = linear(6, classes=2)
    xx = torch.randn(2, 6, dtype=torch.float64)
    res = {"a": ablation_curve(lin, xx, torch.randn(2, 6, dtype=torch.float64), steps=3),
           "b": ablation_curve(lin, xx, torch.randn(2, 6, dtype=torch.float64), steps=3)}
    fig = plot_ablation(res)
    lines = fig.axes[0].lines
    assert len(lines) == 2
    np.testing.assert_allclose(lines[1].get_ydata(), res["b"].scores.mean(1).numpy())
    assert "AOPC" in lines[0].get_label()
    import matplotlib.pyplot as plt

    plt.close("all")


def test_several_target_results_are_refused_with_the_way_out():
    """group_shares, localization and ablation_curve take one target per example: a top-K result
    (attributions (N, K, ...)) is refused with the fix named, not read as K x more features."""
    import nbattr
    from nbattr import evaluate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5)).eval()
    x = torch.randn(2, 4)
    r = nbattr.attribute(net, x, method="saliency", target="top3")
    calls = [lambda: evaluate.group_shares(r, {"a": [0, 1]}),
             lambda: evaluate.localization(r, torch.tensor([True, True, False, False])),
             lambda: evaluate.ablation_curve(net, x, r)]
    for call in calls:
        with pytest.raises(nbattr.InputError, match=r"holds 3 .*r\.for_target\(j\)"):
            call()
    one = r.for_target(1)
    torch.testing.assert_close(evaluate.group_shares(one, {"a": [0, 1]}).totals[:, 0], one.attributions[:, :2].sum(1),
                               check_dtype=False)


def test_numpy_step_counts_and_bad_layer_specs_are_read_or_named():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    attr = torch.randn(2, 4)
    a = ablation_curve(net, x, attr, steps=np.int64(4))  # a count, as steps=4 (it was read as one fraction)
    torch.testing.assert_close(a.fractions, ablation_curve(net, x, attr, steps=4).fractions)
    with pytest.raises(InputError, match="layers must be a module name"):
        saturation(net, x, layers=5)


def test_plot_ablation_names_both_modes_on_shared_axes():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, attr = torch.randn(2, 4), torch.randn(2, 4)
    curves = [ablation_curve(net, x, attr, mode=m, steps=4) for m in ("deletion", "insertion")]
    fig = plot_ablation(curves)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "fraction of features removed / inserted"
    assert ax.get_title().startswith("deletion and insertion curves")
    fig2 = plot_ablation(curves[1])
    assert fig2.axes[0].get_xlabel() == "fraction of features inserted"
