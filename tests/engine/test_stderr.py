"""``stderr``: the sampling error of the Monte-Carlo estimators (Shapley sampling, SmoothGrad),
checked against closed forms and against the spread of the estimates over seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.perturbation import permutation_ranks


class _Quadratic(nn.Module):
    """F(x) = sum(c x^2) / 2, gradient c x: at x + s e the gradient's spread is |c| s per element."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = nn.Parameter(c, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.c * x * x).sum(1)


def test_shapley_stderr_is_zero_for_an_additive_model() -> None:
    """Every ordering gives each feature the same contribution w_i (x_i - x'_i): no sampling error."""
    torch.manual_seed(0)
    lin = nn.Linear(7, 2).double().eval()
    x = torch.randn(3, 7, dtype=torch.float64)
    r = nbattr.attribute(lin, x, method="shapley_sampling", target=1, permutations=9)
    assert r.stderr is not None and r.stderr.shape == x.shape
    assert r.stderr.abs().max() < 1e-14
    torch.testing.assert_close(r.attributions, lin.weight[1] * x)


class _Triple(nn.Module):
    """F(x) = x0 x1 x2 + x3: from a zero baseline, each of features 0-2 gets x0 x1 x2 in the orderings
    where it comes last of the three, else 0; feature 3 always x3. A three-way interaction:
    antithetic pairs do not make it exact (the reverse of "last" is "first", not "middle")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * x[:, 1] * x[:, 2] + x[:, 3]


def _triple_contributions(ranks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(P, 4)``: each feature's contribution to ``_Triple`` in each ordering, from the ranks."""
    t = float(x[0, :3].prod())
    last = ranks[:, :3] == ranks[:, :3].max(1, keepdim=True).values
    return torch.cat([last.double() * t, x[0, 3].expand(len(ranks), 1)], 1)


@pytest.mark.parametrize("permutations", [2, 5, 24])
def test_independent_orderings_stderr_is_their_standard_deviation_over_sqrt_p(permutations: int) -> None:
    x = torch.tensor([[1.5, -2.0, 0.7, 0.3]], dtype=torch.float64)
    r = nbattr.attribute(_Triple(), x, method="shapley_sampling", permutations=permutations, seed=0,
                         antithetic=False)
    c = _triple_contributions(permutation_ranks(permutations, 4, 0), x)
    assert (c[:, 0].std() > 0) or permutations < 3  # a spread to estimate
    torch.testing.assert_close(r.attributions, c.mean(0)[None])
    torch.testing.assert_close(r.stderr, (c.std(0) / math.sqrt(permutations))[None], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("permutations", [4, 7, 24])
def test_antithetic_stderr_is_over_the_pairs(permutations: int) -> None:
    x = torch.tensor([[1.5, -2.0, 0.7, 0.3]], dtype=torch.float64)
    r = nbattr.attribute(_Triple(), x, method="shapley_sampling", permutations=permutations, seed=5)
    ranks = permutation_ranks(permutations, 4, 5, antithetic=True)
    torch.testing.assert_close(ranks[1::2], 3 - ranks[0:2 * (permutations // 2):2])  # each pair: reversed
    c = _triple_contributions(ranks, x)
    m = permutations // 2
    pair_means = (c[0:2 * m:2] + c[1:2 * m:2]) / 2
    assert pair_means[:, 0].std() > 0
    var = 4 * m * pair_means.var(0) + (c.var(0) if permutations % 2 else 0)
    torch.testing.assert_close(r.attributions, c.mean(0)[None])
    torch.testing.assert_close(r.stderr, (var.sqrt() / permutations)[None], rtol=1e-12, atol=1e-15)


def test_antithetic_pairs_are_exact_for_pairwise_interactions() -> None:
    """F = sum a_i x_i + x0 x1 + 0.5 x1 x2 - x0 x3: exact Shapley values give each feature its own term
    and half of each product it is in (zero baseline); one antithetic pair gets them exactly,
    independent orderings do not."""

    class Pairwise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=x.dtype)
            return (a * x).sum(1) + x[:, 0] * x[:, 1] + 0.5 * x[:, 1] * x[:, 2] - x[:, 0] * x[:, 3]

    x = torch.tensor([[1.2, -0.7, 2.0, 1.5]], dtype=torch.float64)
    x0, x1, x2, x3 = x[0]
    a = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    exact = a * x[0] + torch.stack([(x0 * x1 - x0 * x3) / 2, (x0 * x1 + 0.5 * x1 * x2) / 2,
                                    0.5 * x1 * x2 / 2, -x0 * x3 / 2])
    for seed in range(5):
        r = nbattr.attribute(Pairwise(), x, method="shapley_sampling", permutations=2, seed=seed)
        torch.testing.assert_close(r.attributions[0], exact, rtol=1e-12, atol=1e-12)
        assert r.stderr is None  # one pair: no spread to estimate
    r4 = nbattr.attribute(Pairwise(), x, method="shapley_sampling", permutations=4)
    assert float(r4.stderr.abs().max()) < 1e-14  # every pair exact: no sampling error
    default = nbattr.attribute(Pairwise(), x, method="shapley_sampling")  # an even count: pairs only
    torch.testing.assert_close(default.attributions[0], exact, rtol=1e-12, atol=1e-12)
    odd = [nbattr.attribute(Pairwise(), x, method="shapley_sampling", permutations=3, seed=s).attributions[0]
           for s in range(5)]  # the unpaired third ordering is not exact (the docstring's warning)
    assert max(float((o - exact).abs().max()) for o in odd) > 0.1
    plain = [nbattr.attribute(Pairwise(), x, method="shapley_sampling", permutations=2, seed=s,
                              antithetic=False).attributions[0] for s in range(5)]
    assert max(float((p - exact).abs().max()) for p in plain) > 0.1


@pytest.mark.parametrize("antithetic", [False, True])
def test_shapley_stderr_predicts_the_spread_of_the_estimate_over_seeds(antithetic: bool) -> None:
    """A standard error that is too small (e.g. missing the 1/sqrt(P)'s counterpart, or the pairs'
    correlation) or too large by any factor beyond sampling noise fails here: 48 seeds of a
    10-ordering estimate."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double().eval()
    x = 2 * torch.randn(1, 8, dtype=torch.float64)
    runs = [nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=10, seed=s,
                             antithetic=antithetic) for s in range(48)]
    spread = torch.stack([r.attributions[0] for r in runs]).std(0)  # (8,) over seeds
    predicted = torch.stack([r.stderr[0] for r in runs]).pow(2).mean(0).sqrt()
    ratio = spread / predicted
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), ratio
    assert 0.8 < float(ratio.mean()) < 1.2, ratio


def test_antithetic_orderings_are_closer_to_the_exact_values() -> None:
    """Against Captum's exact Shapley values (all 6! orderings) on a random ReLU MLP, over 32 seeds."""
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)).double().eval()
    x = 2 * torch.randn(1, 6, dtype=torch.float64)
    exact = captum.ShapleyValues(net).attribute(x, target=0)[0]

    def rms_error(antithetic: bool) -> float:
        errs = [nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=8, seed=s,
                                 antithetic=antithetic).attributions[0] - exact for s in range(32)]
        return float(torch.stack(errs).pow(2).mean().sqrt())

    plain, paired = rms_error(False), rms_error(True)
    assert paired < 0.9 * plain, (paired, plain)


def test_shapley_stderr_of_groups_is_spread_over_their_elements() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    mask = torch.tensor([0, 0, 0, 1, 2, 3])
    r = nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=12, feature_mask=mask)
    s = r.stderr
    torch.testing.assert_close(s[:, 0:3], s[:, :1].expand(2, 3))
    assert (s > 0).all()


def test_no_stderr_where_it_cannot_be_estimated_or_the_method_is_exact() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    assert nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=1).stderr is None
    assert nbattr.attribute(net, x, method="smoothgrad", target=0, samples=1).stderr is None
    for variant in ("smoothgrad_sq", "vargrad"):
        assert nbattr.attribute(net, x, method="smoothgrad", target=0, samples=4, variant=variant).stderr is None
    for method in ("integrated_gradients", "saliency", "deeplift", "occlusion"):
        assert nbattr.attribute(net, x, method=method, target=0).stderr is None, method


@pytest.mark.parametrize("multiply_by_inputs", [False, True])
def test_smoothgrad_stderr_matches_the_closed_form_spread(multiply_by_inputs: bool) -> None:
    """The gradient at x + s e is c (x + s e): its mean over n samples has standard error |c| s / sqrt(n);
    with multiply_by_inputs the map is c (x + s e)^2."""
    c = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.25, 1.5], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5, -0.5]], dtype=torch.float64)
    n, level = 800, 0.2
    r = nbattr.attribute(_Quadratic(c), x, method="smoothgrad", samples=n, noise_level=level,
                         multiply_by_inputs=multiply_by_inputs)
    s = level * float(x.max() - x.min())
    if multiply_by_inputs:  # the map c z * z at z = x + s e: std |c| s sqrt(4 x^2 + 2 s^2) (normal e)
        want = c.abs() * s * (4 * x[0] ** 2 + 2 * s**2).sqrt() / math.sqrt(n)
    else:
        want = c.abs() * s / math.sqrt(n)
    ratio = r.stderr[0] / want
    assert ((ratio > 0.88) & (ratio < 1.12)).all(), ratio  # the sample std of 800 draws: a few % spread


def test_stderr_per_target_equals_a_single_target_run() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5)
    for method, opts in (("shapley_sampling", {"permutations": 5}), ("smoothgrad", {"samples": 6})):
        multi = nbattr.attribute(net, x, method=method, target=[[0, 2], [1, 0]], **opts)
        assert multi.stderr.shape == (2, 2, 5)
        for j in range(2):
            one = nbattr.attribute(net, x, method=method, target=multi.target[:, j], **opts)
            torch.testing.assert_close(multi.for_target(j).stderr, one.stderr)


def test_stderr_follows_the_input_dtype_and_shows_in_the_repr() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16).eval()
    x = torch.randn(2, 5).bfloat16()
    r = nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=4)
    assert r.stderr.dtype == torch.bfloat16
    assert "stderr<=" in repr(r)


def test_smoothgrad_times_input_averages_each_copys_map() -> None:
    """SmoothGrad of gradient x input (Smilkov et al.; Captum's NoiseTunnel(InputXGradient)) averages
    grad F(z) * z over the noisy copies z = x + s e: for F = sum(c x^2) / 2 that is c (x^2 + s^2) in
    expectation; the mean gradient times x (what it was) is c x^2, off by c s^2."""
    c = torch.tensor([0.5, -2.0, 1.0, 3.0], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    level, n = 0.25, 4000
    s = level * float(x.max() - x.min())
    r = nbattr.attribute(_Quadratic(c), x, method="smoothgrad", samples=n, noise_level=level, multiply_by_inputs=True)
    want = c * (x[0] ** 2 + s**2)
    assert ((r.attributions[0] - want).abs() < 4 * r.stderr[0]).all(), (r.attributions, want, r.stderr)
    assert ((c * x[0] ** 2 - want).abs() > 10 * r.stderr[0]).all()  # the old definition is far outside
