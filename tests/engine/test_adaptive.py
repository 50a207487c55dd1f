"""Integrated gradients with steps="auto": nested Simpson panels refined to a completeness tolerance."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.gradient import AUTO_FLOOR, AUTO_MAX_STEPS, AUTO_RULES, AUTO_TOL
from nbattr.engine.paths import clenshaw_curtis

from .models import CallCounter, mlp

pytestmark = pytest.mark.usefixtures("float64")


class TanhSum(nn.Module):
    """F(x) = sum_i tanh(10 x_i): saturating; IG is exactly tanh(10 x_i) - tanh(10 x'_i) per feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(10 * x).sum(1)


class SigmoidDot(nn.Module):
    """F(x) = sigmoid(w . x); IG_i = w_i (x_i - x'_i) (s(u1) - s(u0)) / (u1 - u0) with u = w . x."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.w)


def _cases():
    torch.manual_seed(0)
    x = torch.rand(3, 16) * 0.8 + 0.2
    b = torch.full_like(x, -0.1)
    yield "tanh", TanhSum(), x, b, torch.tanh(10 * x) - torch.tanh(10 * b)
    w = torch.randn(8) * 2
    xs, bs = torch.randn(3, 8), torch.zeros(3, 8)
    u1, u0 = xs @ w, bs @ w
    yield "sigmoid", SigmoidDot(w), xs, bs, w * (xs - bs) * ((torch.sigmoid(u1) - torch.sigmoid(u0)) / (u1 - u0))[:, None]


def _threshold(r: nbattr.Attribution, tol: float) -> torch.Tensor:
    gap = (r.outputs - r.baseline_outputs).abs()
    return tol * torch.maximum(gap, AUTO_FLOOR * torch.maximum(r.outputs.abs(), r.baseline_outputs.abs()))


@pytest.mark.parametrize("rule", AUTO_RULES)
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-5])
@pytest.mark.parametrize("case", ["tanh", "sigmoid"])
def test_reaches_the_tolerance_and_the_closed_form(case: str, tol: float, rule: str) -> None:
    name, f, x, b, exact = next(c for c in _cases() if c[0] == case)
    r = nbattr.attribute(f, x, baseline=b, steps="auto", tol=tol, rule=rule)
    gap = (r.outputs - r.baseline_outputs).abs()
    assert (r.delta.abs() <= tol * gap).all(), (r.delta, gap)
    assert all(r.params["converged"]) and r.params["rule"] == rule
    assert r.params["delta_reached"] == r.delta.abs().tolist()
    # each feature, not only the sum, is close to the closed form
    err = (r.attributions - exact).abs().amax(1)
    assert (err <= 10 * tol * gap).all(), (err, gap)
    if tol <= 1e-3:  # a tighter tolerance never buys fewer points
        looser = nbattr.attribute(f, x, baseline=b, steps="auto", tol=tol * 10, rule=rule)
        assert sum(r.params["steps"]) >= sum(looser.params["steps"])


def _first_s(f, x, b, rule: str, err: float, s_max: int) -> int | None:
    """Smallest S at which the fixed rule's |delta| reaches ``err`` (its luckiest count), if any."""
    lo = 2 if rule == "riemann_trapezoid" else 1
    for s in range(lo, s_max + 1):
        if abs(float(nbattr.attribute(f, x, baseline=b, steps=s, rule=rule).delta[0])) <= err:
            return s
    return None


@pytest.mark.parametrize("rule", AUTO_RULES)
@pytest.mark.parametrize("case", ["tanh", "sigmoid"])
def test_fewer_gradients_than_right_riemann_and_trapezoid_at_the_same_error(case: str, rule: str) -> None:
    _, f, x, b, _ = next(c for c in _cases() if c[0] == case)
    m = CallCounter(f)
    r = nbattr.attribute(m, x, baseline=b, steps="auto", tol=1e-3, rule=rule)
    assert r.params["rule"] == rule
    used = sum(m.calls) - x.shape[0]  # minus the forward at x (F(x') is the score at alpha = 0)
    assert used == sum(r.params["steps"])
    for i in range(x.shape[0]):
        steps_i, err_i = r.params["steps"][i], abs(float(r.delta[i]))
        for rule in ("riemann_right", "riemann_trapezoid"):
            s = _first_s(f, x[i:i + 1], b[i:i + 1], rule, err_i, s_max=2 * steps_i)
            # a fixed rule needs more points than auto to reach auto's error, even at its luckiest S
            assert s is None or s > steps_i, (case, i, rule, s, steps_i)
            if rule == "riemann_right":
                assert s is None, (case, i, s, steps_i)  # right Riemann needs over twice as many


@pytest.mark.parametrize("rule", AUTO_RULES)
def test_each_example_stops_on_its_own(rule: str) -> None:
    torch.manual_seed(1)
    x = torch.rand(3, 16) * 0.8 + 0.2
    x[1] = 0.01  # tanh(10 x) is nearly linear on [0, 0.01]: the first 5 points suffice
    m = CallCounter(TanhSum())
    r = nbattr.attribute(m, x, steps="auto", tol=1e-4, batch_size=1, rule=rule)
    steps = r.params["steps"]
    assert steps[1] == 5 and steps[0] > 5 and steps[2] > 5
    assert sum(m.calls) == 3 + sum(steps)  # the forward at x, then the path: none at x' alone
    # the union of points and the score curve: NaN exactly where an example has no point
    have = ~torch.isnan(r.path_outputs)
    assert have.sum(0).tolist() == steps
    assert torch.equal(r.alphas, torch.sort(r.alphas).values) and r.alphas[0] == 0 and r.alphas[-1] == 1
    for i in range(3):
        a = r.alphas[have[:, i]]
        torch.testing.assert_close(r.path_outputs[have[:, i], i], TanhSum()(a[:, None] * x[i]))
    first = torch.linspace(0, 1, 5) if rule == "adaptive_simpson" else torch.as_tensor(clenshaw_curtis(4)[0])
    assert torch.equal(r.alphas[have[:, 1]], first)


def test_max_steps_warns_and_names_the_examples() -> None:
    m = mlp(3, act=nn.Tanh)
    x = torch.randn(3, 6) * 4
    x[1] = 1e-3
    with pytest.warns(nbattr.MaxStepsWarning, match=r"example\(s\) \[0, 2\] reached max_steps=9"):
        r = nbattr.attribute(m, x, steps="auto", tol=1e-9, max_steps=9)
    assert r.params["converged"] == [False, True, False]
    assert max(r.params["steps"]) <= 9 and r.params["max_steps"] == 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbattr.attribute(m, x, steps="auto", tol=1e-3)


@pytest.mark.parametrize("rule", AUTO_RULES)
@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_chunking_does_not_change_the_result(batch_size: int, rule: str) -> None:
    m = mlp(4, act=nn.Sigmoid)
    x = torch.randn(4, 6) * 3
    ref = nbattr.attribute(m, x, steps="auto", tol=1e-5, keep_path=True, rule=rule)
    r = nbattr.attribute(m, x, steps="auto", tol=1e-5, keep_path=True, batch_size=batch_size, rule=rule)
    assert r.params["steps"] == ref.params["steps"]
    torch.testing.assert_close(r.attributions, ref.attributions, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(r.path_gradients, ref.path_gradients, rtol=1e-13, atol=1e-13, equal_nan=True)
    assert sum(r.params["chunks"]) == sum(r.params["steps"])


@pytest.mark.parametrize("rule", AUTO_RULES)
def test_float32_model(rule: str) -> None:
    m = mlp(6, act=nn.Tanh).float()
    x = torch.randn(2, 6, dtype=torch.float32) * 3
    r = nbattr.attribute(m, x, steps="auto", tol=1e-3, rule=rule, keep_path=True)
    assert r.attributions.dtype == torch.float32 and all(r.params["converged"])
    assert (r.delta.abs() <= _threshold(r, 1e-3) * 1.01).all()
    assert r.path_outputs.dtype == torch.float32 and (~torch.isnan(r.path_outputs)).sum(0).tolist() == r.params["steps"]


def test_linear_model_is_exact_on_the_first_grid() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double().eval()
    x, b = torch.randn(4, 5), torch.randn(4, 5)
    r = nbattr.attribute(lin, x, baseline=b, steps="auto", target=[0, 1, 2, 1])
    assert r.params["steps"] == [5] * 4 and r.params["rounds"] == 1
    torch.testing.assert_close(r.attributions, lin.weight[r.target] * (x - b), rtol=1e-12, atol=1e-12)


def test_keep_path_gradients_are_the_interior_gradients() -> None:
    m = mlp(5, act=nn.Tanh)
    x = torch.randn(2, 6)
    r = nbattr.attribute(m, x, steps="auto", keep_path=True)
    have = ~torch.isnan(r.path_outputs)
    for i in range(2):
        a = r.alphas[have[:, i]]
        z = (a[:, None] * x[i]).requires_grad_(True)
        (g,) = torch.autograd.grad(m(z)[:, r.target[i]].sum(), z)
        torch.testing.assert_close(r.path_gradients[have[:, i], i], g)
    assert torch.isnan(r.path_gradients[~have[:, 0], 0]).all()


def test_equal_scores_use_the_floor() -> None:
    """F(x) = F(x'): a relative tolerance alone could never be met; the floor makes it reachable."""

    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (torch.tanh(3 * x) ** 2).sum(1)

    x = torch.tensor([[0.7, -0.2, 1.3]])
    r = nbattr.attribute(Square(), x, baseline=-x, steps="auto", tol=1e-4)
    assert abs(float(r.outputs[0] - r.baseline_outputs[0])) < 1e-12
    assert r.params["converged"] == [True]
    assert abs(float(r.delta[0])) <= float(_threshold(r, 1e-4)[0])
    # symmetric path: IG of an even function from -x to x is exactly zero per feature
    torch.testing.assert_close(r.attributions, torch.zeros_like(x), atol=1e-4 * 0.05, rtol=0)


def test_custom_path_with_auto_steps() -> None:
    f = TanhSum()
    x = torch.tensor([[0.3, 0.9, 0.5], [0.1, 0.2, 0.7]])

    def path(a: torch.Tensor) -> torch.Tensor:
        return a**2 * x

    r = nbattr.attribute(f, x, path=path, steps="auto", tol=1e-6)
    torch.testing.assert_close(r.attributions, torch.tanh(10 * x), rtol=1e-5, atol=1e-5)
    assert (r.delta.abs() <= 1e-6 * (r.outputs - r.baseline_outputs).abs()).all()
    assert r.params["path"] == "custom"


def test_options_are_checked() -> None:
    m, x = mlp(0), torch.randn(2, 6)
    with pytest.raises(nbattr.InputError, match="apply to steps='auto' only"):
        nbattr.attribute(m, x, steps=10, tol=1e-3)
    with pytest.raises(nbattr.InputError, match="tol must be a number in \\(0, 1\\)"):
        nbattr.attribute(m, x, steps="auto", tol=0)
    with pytest.raises(nbattr.InputError, match="max_steps must be an int >= 5"):
        nbattr.attribute(m, x, steps="auto", max_steps=3)
    with pytest.raises(nbattr.InputError, match="integrated_gradients"):
        nbattr.attribute(m, x, method="interior_gradients", steps="auto")
    with pytest.raises(nbattr.InputError, match="rule='riemann_right' is a fixed rule"):
        nbattr.attribute(m, x, steps="auto", rule="riemann_right")
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        nbattr.attribute(m, x, steps=8, rule="clenshaw_curtis")
    opts = nbattr.methods()["integrated_gradients"].options
    assert "tol" in opts and "max_steps" in opts and AUTO_TOL == 1e-3 and AUTO_MAX_STEPS == 257


def test_clenshaw_curtis_rule_is_nested_positive_and_exact_on_polynomials() -> None:
    for n in (4, 8, 16, 64):
        a, w = clenshaw_curtis(n)
        assert (w > 0).all() and abs(w.sum() - 1) < 1e-14 and a[0] == 0 and a[-1] == 1
        for d in range(n + 2):  # exact up to degree n + 1 (n even)
            assert abs((w * a**d).sum() - 1 / (d + 1)) < 1e-13, (n, d)
        coarse = set(clenshaw_curtis(n // 2)[0].tolist()) if n > 4 else set(clenshaw_curtis(2)[0].tolist())
        assert coarse <= set(a.tolist())  # bit-for-bit nested: old gradients are reused
    with pytest.raises(ValueError, match="even n"):
        clenshaw_curtis(5)
