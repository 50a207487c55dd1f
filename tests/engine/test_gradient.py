"""Gradient methods against closed forms, autograd and Captum."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.paths import RULES, quadrature

from .models import CallCounter, cnn, mlp, text

pytestmark = pytest.mark.usefixtures("float64")


class Analytic(nn.Module):
    """F(x) = 5 x0 + x1^2 + sin(x2) + tanh(3 x3) (saturating), as (N,) scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5 * x[:, 0] + x[:, 1] ** 2 + torch.sin(x[:, 2]) + torch.tanh(3 * x[:, 3])


def linear_model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(5, 3).double().eval()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ig_linear_is_exact_for_every_rule(rule: str, seed: int) -> None:
    m = linear_model(seed)
    x, b = torch.randn(4, 5), torch.randn(4, 5)
    r = nbattr.attribute(m, x, baseline=b, rule=rule, steps=7, target=[0, 1, 2, 1])
    w = m.weight[r.target]
    torch.testing.assert_close(r.attributions, w * (x - b), rtol=1e-12, atol=1e-12)
    assert r.delta.abs().max() < 1e-12


def test_ig_analytic_closed_form_and_delta_shrinks() -> None:
    f = Analytic()
    x = torch.tensor([[1.0, 2.0, 0.5, 1.5]])
    exact = torch.tensor([[5.0, 4.0, math.sin(0.5), math.tanh(4.5)]])
    r = nbattr.attribute(f, x, steps=20)  # Gauss-Legendre: exact on polynomials, near-exact on smooth ones
    torch.testing.assert_close(r.attributions, exact, rtol=1e-10, atol=1e-10)
    for rule in ("riemann_right", "riemann_middle", "riemann_trapezoid"):
        deltas = [nbattr.attribute(f, x, rule=rule, steps=s).delta.abs().item() for s in (8, 32, 128)]
        assert deltas[0] > deltas[1] > deltas[2], (rule, deltas)
    torch.testing.assert_close(r.outputs, f(x))
    torch.testing.assert_close(r.baseline_outputs, f(torch.zeros_like(x)))


def test_a_coarse_fixed_quadrature_warns_and_names_the_examples() -> None:
    """F = tanh(x0 x1): right Riemann with 4 steps is far off where the path is steep, exact where F is linear along it."""
    import warnings

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x[:, 0] * x[:, 1])

    x = torch.tensor([[1.0, 0.1], [1.0, 30.0], [2.0, 0.1]])  # only example 1 is steep (0 and 2: tanh(0.1 a))
    with pytest.warns(nbattr.CoarseDeltaWarning, match=r"more than 5% of \|F\(x\) - F\(x'\)\| with 4 riemann_right steps "
                                         r"\(per example: #1 \d+%\).*steps='auto'"):
        r = nbattr.attribute(model, x, baseline=torch.tensor([0.0, 0.1]).expand(3, 2), steps=4, rule="riemann_right")
    rel = (r.delta.abs() / (r.outputs - r.baseline_outputs).abs()).tolist()
    assert rel[1] > 0.05 and rel[0] < 0.05 and rel[2] < 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbattr.attribute(model, x, baseline=torch.tensor([0.0, 0.1]).expand(3, 2), steps=64)  # fine: no warning
        nbattr.attribute(model, x, baseline=torch.tensor([0.0, 0.1]).expand(3, 2), steps="auto")


class NormalisedZero(nn.Module):
    """F(x) = w . x / sqrt(mean(x^2) + eps): an RMSNorm on the input, scale-invariant for x != 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.linspace(-1.0, 2.0, x.shape[1], dtype=x.dtype, device=x.device)
        return (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)) @ w


@pytest.mark.parametrize("steps", [4, 16, "auto"])
def test_a_jump_at_a_degenerate_baseline_is_named(steps) -> None:
    """Zero baseline: F rises to F(x) within alpha ~ 1e-4, which IG's points cannot resolve; the
    warning says so and advises another baseline. A baseline off zero is fine."""
    import warnings

    from nbattr.engine.gradient import baseline_jumps

    x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.3, 0.2, -0.1, 0.4]])
    # 4 trapezoid steps: the first point at alpha = 0.25; the slope at alpha = 0 (a kept path point) tells
    opts = {"rule": "riemann_trapezoid", "keep_path": True} if steps == 4 else {}
    with pytest.warns(nbattr.BaselineJumpWarning, match=r"The score jumps at the baseline \(it covers F\(x\) - F\(x'\) for example "
                                         r"#0 by alpha ~ [0-9.e-]+.*another baseline"):
        r = nbattr.attribute(NormalisedZero(), x, steps=steps, baseline="zeros", **opts)
    if steps != 4:  # from the path points alone (with 4 steps only the slope at alpha = 0 shows it)
        assert 0 in baseline_jumps(r)  # (auto resolves the wider rise of example 1: 257 points, the first at 4e-5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = nbattr.attribute(NormalisedZero(), x, steps=steps, baseline=x * 0.3 + 0.5, **opts)
    assert baseline_jumps(r) == {} and not any("jumps" in str(w.message) for w in seen)  # 4 steps: coarse only


def test_quadrature_weights_sum_to_one_and_integrate_polynomials() -> None:
    for rule in RULES:
        a, w = quadrature(rule, 9)
        assert abs(w.sum() - 1) < 1e-12 and a.min() >= 0 and a.max() <= 1
    a, w = quadrature("gauss_legendre", 4)
    assert abs((w * a**7).sum() - 1 / 8) < 1e-14  # exact up to degree 2S-1
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        quadrature("simpson", 4)


def test_saliency_and_gradient_x_input_match_autograd() -> None:
    m = mlp(0, act=nn.Tanh)
    x = torch.randn(3, 6)
    xr = x.clone().requires_grad_(True)
    out = m(xr)
    t = out.argmax(1)
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xr)
    s = nbattr.attribute(m, x, method="saliency")
    torch.testing.assert_close(s.attributions, g.abs())
    assert s.delta is None and s.baseline_outputs is None
    torch.testing.assert_close(nbattr.attribute(m, x, method="saliency", abs=False).attributions, g)
    torch.testing.assert_close(nbattr.attribute(m, x, method="gradient_x_input").attributions, g * x)


def test_interior_gradients_one_pass_matches_ig_path() -> None:
    m = mlp(1, act=nn.Sigmoid)
    x = torch.randn(2, 6)
    ig = nbattr.attribute(m, x, rule="riemann_trapezoid", steps=11, keep_path=True)
    ins = nbattr.attribute(m, x, method="interior_gradients", rule="riemann_trapezoid", steps=11)
    assert ig.path_gradients.shape == (11, 2, 6) and ig.path_outputs.shape == (11, 2)
    torch.testing.assert_close(ig.path_gradients, ins.path_gradients)
    torch.testing.assert_close(ins.alphas, torch.linspace(0, 1, 11))
    # the score along the path equals the model at the scaled inputs; its ends are F(x') and F(x)
    pts = ins.alphas[:, None, None] * x[None]
    want = m(pts.reshape(-1, 6)).reshape(11, 2, -1).gather(2, ins.target.view(1, 2, 1).expand(11, 2, 1))[..., 0]
    torch.testing.assert_close(ins.path_outputs, want)
    torch.testing.assert_close(ins.path_outputs[-1], ins.outputs)
    # attributions are the interior gradient at alpha = 1 times the input: gradient x input
    torch.testing.assert_close(ins.attributions, nbattr.attribute(m, x, method="gradient_x_input").attributions)
    assert ins.delta is None
    # IG is the weighted sum of those same interior gradients
    _, w = quadrature("riemann_trapezoid", 11)
    torch.testing.assert_close(ig.attributions, x * (torch.as_tensor(w)[:, None, None] * ig.path_gradients).sum(0))


def test_interior_gradients_alpha_not_on_grid_is_added() -> None:
    m = mlp(2, act=nn.Tanh)
    x = torch.randn(1, 6)
    r = nbattr.attribute(m, x, method="interior_gradients", steps=4, alpha=0.02)
    assert r.params["alpha"] == pytest.approx(0.02) and r.alphas.shape == (5,)
    xr = (0.02 * x).requires_grad_(True)
    (g,) = torch.autograd.grad(m(xr)[0, r.target[0]], xr)
    torch.testing.assert_close(r.attributions, g * x)


def test_custom_path_ig_completeness() -> None:
    f = Analytic()
    x = torch.tensor([[1.0, 2.0, 0.5, 1.5], [0.3, -1.0, 2.0, -0.2]])

    def path(a: torch.Tensor) -> torch.Tensor:  # a curved path from 0 to x: gamma(a) = a^2 x
        return a**2 * x

    r = nbattr.attribute(f, x, path=path, steps=32)
    assert r.delta.abs().max() < 1e-10
    # non-linear path, different split than the straight line on the non-separable... here separable, so equal
    straight = nbattr.attribute(f, x, steps=32)
    torch.testing.assert_close(r.attributions, straight.attributions, rtol=1e-8, atol=1e-8)
    with pytest.raises(nbattr.InputError, match="path\\(1\\)"):
        nbattr.attribute(f, x, path=lambda a: a * x + 1)


def test_custom_path_differs_on_interactions() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:  # F = x0 * x1
        return x[:, 0] * x[:, 1]

    x = torch.tensor([[2.0, 3.0]])

    def path(a: torch.Tensor) -> torch.Tensor:  # first along x0, then x1 (piecewise smooth via clamps)
        return torch.stack([torch.clamp(2 * a, max=1.0) * x[:, 0], torch.clamp(2 * a - 1, min=0.0) * x[:, 1]], 1)

    r = nbattr.attribute(f, x, path=path, rule="riemann_middle", steps=400)
    torch.testing.assert_close(r.attributions, torch.tensor([[0.0, 6.0]]), atol=1e-9, rtol=0)
    torch.testing.assert_close(nbattr.attribute(f, x).attributions, torch.tensor([[3.0, 3.0]]))


@pytest.mark.parametrize("variant", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_closed_form_on_linear(variant: str) -> None:
    m = linear_model(3)
    x = torch.randn(2, 5)
    r = nbattr.attribute(m, x, method="smoothgrad", variant=variant, samples=7, target=1)
    w = m.weight[1].expand(2, 5)
    want = {"smoothgrad": w, "smoothgrad_sq": w * w, "vargrad": torch.zeros_like(w)}[variant]
    torch.testing.assert_close(r.attributions, want, atol=1e-12, rtol=1e-12)


def test_smoothgrad_is_noise_average_and_chunk_independent() -> None:
    f = Analytic()
    x = torch.tensor([[1.0, 2.0, 0.5, 1.5]])
    a = nbattr.attribute(f, x, method="smoothgrad", samples=64, noise_level=0.1, batch_size=5)
    b = nbattr.attribute(f, x, method="smoothgrad", samples=64, noise_level=0.1)
    torch.testing.assert_close(a.attributions, b.attributions)
    assert a.attributions[0, 0] == pytest.approx(5.0)  # a linear coordinate is unaffected by noise
    c = nbattr.attribute(f, x, method="smoothgrad", samples=64, noise_level=0.1, seed=1)
    assert not torch.equal(b.attributions, c.attributions)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_any_chunking_equals_none(batch_size: int) -> None:
    m = CallCounter(mlp(4, act=nn.Tanh))
    x = torch.randn(3, 6)
    ref = nbattr.attribute(m, x, steps=10, batch_size=10_000, keep_path=True)
    m.calls.clear()
    r = nbattr.attribute(m, x, steps=10, batch_size=batch_size, keep_path=True)
    torch.testing.assert_close(r.attributions, ref.attributions, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(r.path_gradients, ref.path_gradients, rtol=1e-13, atol=1e-13)
    # one forward on x, one on the baselines, then the 30 path points in chunks of batch_size
    path_calls = m.calls[1:-1] if len(m.calls) > 2 else []
    assert m.calls[0] == 3
    assert sum(m.calls) - 3 - 3 == 30
    assert max(c for c in m.calls) <= max(batch_size, 3)
    assert len(m.calls) == 2 + math.ceil(30 / batch_size), (m.calls, path_calls)


def test_auto_batching_under_small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbattr.engine import batching

    m = CallCounter(cnn(0))
    x = torch.randn(2, 3, 16, 16)
    ref = nbattr.attribute(m, x, steps=16, batch_size=10_000)
    monkeypatch.setattr(batching, "CPU_BUDGET_BYTES", 200_000)
    m.calls.clear()
    r = nbattr.attribute(m, x, steps=16)
    chunks = r.params["chunks"]
    # 2 examples: the first forward measured the bytes per row, so no probe chunk comes first
    assert sum(chunks) == 32 and len(chunks) > 2 and len(set(chunks[:-1])) == 1
    assert r.params["batch_size"] == "auto"
    torch.testing.assert_close(r.attributions, ref.attributions, rtol=1e-12, atol=1e-12)
    x8 = torch.randn(8, 3, 16, 16)  # more than PROBE_ROWS examples: the first chunk measures
    big = nbattr.attribute(m, x8, steps=4)
    assert big.params["chunks"][0] == batching.PROBE_ROWS and sum(big.params["chunks"]) == 32
    torch.testing.assert_close(big.attributions, nbattr.attribute(m, x8, steps=4, batch_size=100).attributions,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["integrated_gradients", "interior_gradients"])
def test_a_path_starting_at_the_baseline_needs_no_baseline_forward(method: str) -> None:
    """With alpha = 0 among the nodes (trapezoid: the widget's frames) F(x') is the path's first
    score: the calls are the first forward at x and the path, nothing at the baselines alone."""
    m = CallCounter(mlp(4, act=nn.Tanh))
    x, b = torch.randn(3, 6), torch.randn(3, 6) * 0.1
    r = nbattr.attribute(m, x, method=method, baseline=b, steps=8, rule="riemann_trapezoid", batch_size=100)
    assert m.calls == [3, 3 * 8]  # 8 nodes from 0 to 1
    torch.testing.assert_close(r.baseline_outputs, m.model(b)[torch.arange(3), r.target].detach(),
                               rtol=1e-12, atol=1e-12)
    if method == "integrated_gradients":
        assert r.delta.abs().max() < 1e-2
    m.calls.clear()
    nbattr.attribute(m, x, method=method, baseline=b, steps=8, batch_size=100)  # Gauss-Legendre: no endpoint
    assert m.calls == [3, 3 * (8 if method == "integrated_gradients" else 9), 3]
    if method == "integrated_gradients":  # steps="auto": every first grid starts at alpha = 0
        for rule in ("clenshaw_curtis", "adaptive_simpson"):
            m.calls.clear()
            r = nbattr.attribute(m, x, baseline=b, steps="auto", rule=rule, batch_size=100)
            assert m.calls[0] == 3 and sum(m.calls) == 3 + sum(r.params["steps"])
            torch.testing.assert_close(r.baseline_outputs, m.model(b)[torch.arange(3), r.target].detach(),
                                       rtol=1e-12, atol=1e-12)
            assert (r.delta.abs() <= 1e-3 * (r.outputs - r.baseline_outputs).abs() + 1e-9).all()


def test_layer_attribution_over_embedding() -> None:
    m = text(0, vocab=20, classes=2)
    ids = torch.tensor([[1, 5, 7], [2, 2, 9]])
    r = nbattr.attribute(m, ids, layer=m.emb, steps=64)
    assert r.attributions.shape == (2, 3, 4)
    assert r.delta.abs().max() < 1e-10
    torch.testing.assert_close(r.inputs, m.emb(ids))
    torch.testing.assert_close(r.baseline_outputs, m.fc(torch.zeros(2, 4)).gather(1, r.target[:, None])[:, 0])
    g = nbattr.attribute(m, ids, layer=m.emb, method="gradient_x_input")
    assert g.attributions.shape == (2, 3, 4)
    with pytest.raises(nbattr.InputError, match="floating-point"):
        nbattr.attribute(m, ids)


def test_named_baselines() -> None:
    m = cnn(1)
    x = torch.rand(2, 3, 16, 16)
    for name in ("zeros", "blur", "uniform", "mean", 0.5):
        r = nbattr.attribute(m, x, baseline=name, steps=16)
        assert r.baselines.shape == x.shape and r.params["baseline"] == str(name)
        assert r.delta.abs().max() < 1e-3 * max(1.0, (r.outputs - r.baseline_outputs).abs().max())
    blur = nbattr.attribute(m, x, baseline="blur", steps=4).baselines
    assert blur.std() < x.std() and torch.allclose(blur.mean((2, 3)), x.mean((2, 3)), atol=0.05)
    u = nbattr.attribute(m, x, baseline="uniform", steps=4).baselines
    assert (u >= x.amin((1, 2, 3), keepdim=True)).all() and (u <= x.amax((1, 2, 3), keepdim=True)).all()
    from nbattr.engine.baselines import uniform  # each row's noise is its own, whatever the other rows
    torch.testing.assert_close(uniform(x[1:]), nbattr.attribute(m, x[1:], baseline="uniform", steps=4).baselines)
    torch.testing.assert_close(uniform(x[1:], rows=[1]), u[1:])
    assert not torch.equal(uniform(x[1:]), u[1:])
    f = nbattr.attribute(m, x, baseline=lambda t: t * 0.5, steps=4)
    torch.testing.assert_close(f.baselines, x * 0.5)


def test_methods_registry_lists_options() -> None:
    ms = nbattr.methods()
    for name in ("saliency", "gradient_x_input", "integrated_gradients", "interior_gradients", "smoothgrad"):
        assert name in ms and ms[name].description
    assert ms["integrated_gradients"].completeness and ms["integrated_gradients"].options["steps"] == 50
    assert ms["smoothgrad"].options["variant"] == "smoothgrad"
    with pytest.raises(ValueError, match="unknown attribution method"):
        nbattr.attribute(mlp(), torch.randn(1, 6), method="nope")
    with pytest.raises(nbattr.InputError, match="no option"):
        nbattr.attribute(mlp(), torch.randn(1, 6), method="saliency", steps_typo=3)


# ---------------------------------------------------------------- against Captum (oracle)
captum_attr = pytest.importorskip("captum.attr")

CAPTUM_RULE = {"riemann_left": "riemann_left", "riemann_right": "riemann_right",
               "riemann_middle": "riemann_middle", "riemann_trapezoid": "riemann_trapezoid",
               "gauss_legendre": "gausslegendre"}


@pytest.mark.parametrize("make,shape", [(mlp, (3, 6)), (cnn, (2, 3, 16, 16))])
@pytest.mark.parametrize("rule", RULES)
def test_ig_matches_captum(make, shape, rule: str) -> None:
    m = make(5)
    x, b = torch.randn(shape), torch.randn(shape) * 0.1
    target = [1, 0, 2][: shape[0]]
    steps = 16
    ours = nbattr.attribute(m, x, baseline=b, target=target, steps=steps, rule=rule)
    theirs, delta = captum_attr.IntegratedGradients(m).attribute(
        x, baselines=b, target=target, n_steps=steps, method=CAPTUM_RULE[rule], return_convergence_delta=True)
    if rule == "riemann_trapezoid":
        # Captum's trapezoid weights are (1/S)[1/2, 1, ..., 1, 1/2] (they sum to 1 - 1/S); the rule's
        # spacing is 1/(S-1). Ours is the textbook rule, hence exact on linear paths; the two differ by S/(S-1).
        theirs = theirs * steps / (steps - 1)
    # Captum computes its alphas in float32, so agreement is to ~1e-7 relative
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,shape", [(mlp, (3, 6)), (cnn, (2, 3, 16, 16))])
def test_saliency_and_gxi_match_captum(make, shape) -> None:
    m = make(6)
    x = torch.randn(shape)
    target = [1, 0, 2][: shape[0]]
    torch.testing.assert_close(nbattr.attribute(m, x, method="saliency", target=target).attributions,
                               captum_attr.Saliency(m).attribute(x, target=target))
    torch.testing.assert_close(nbattr.attribute(m, x, method="gradient_x_input", target=target).attributions,
                               captum_attr.InputXGradient(m).attribute(x, target=target))


def test_no_gradient_along_the_path_is_not_called_coarse() -> None:
    """A target score computed from x.detach() while another output column keeps the graph: IG is
    all zeros and 100% off; the warning says why instead of advising more steps."""
    import warnings

    lin = nn.Linear(3, 1).double()

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x), (x.detach() ** 2).sum(1, keepdim=True)], 1)

    x = torch.randn(2, 3, dtype=torch.float64) + 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = nbattr.attribute(model, x, target=1, steps=8)
    assert (r.attributions == 0).all()
    msgs = [str(w.message) for w in caught if issubclass(w.category, nbattr.CompletenessWarning)]
    assert msgs and "gradient is zero at every path point for example(s) [0, 1]" in msgs[0]
    assert "more steps do not help" in msgs[0] and "use steps='auto'" not in msgs[0]
