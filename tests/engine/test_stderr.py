"""``stderr``: the sampling error of the Monte-Carlo estimators (Shapley sampling, SmoothGrad),
checked against closed forms and against the spread of the estimates over seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.perturbation import permutation_ranks


class _Interaction(nn.Module):
    """F(x) = x0 * x1 + x2: from a zero baseline, feature 0 contributes x0 x1 when it comes after
    feature 1 in an ordering and 0 before it (and so does feature 1); feature 2 always x2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * x[:, 1] + x[:, 2]


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


@pytest.mark.parametrize("permutations", [2, 5, 24])
def test_shapley_stderr_is_the_standard_deviation_of_the_orderings_over_sqrt_p(permutations: int) -> None:
    x = torch.tensor([[1.5, -2.0, 0.7]], dtype=torch.float64)
    r = nbattr.attribute(_Interaction(), x, method="shapley_sampling", permutations=permutations, seed=0)
    ranks = permutation_ranks(permutations, 3, 0)
    after = (ranks[:, 0] > ranks[:, 1]).double()  # orderings where feature 0 comes after feature 1
    assert 0 < float(after.mean()) < 1  # both cases drawn: a spread to estimate
    prod = float(x[0, 0] * x[0, 1])
    m0, m1 = after * prod, (1 - after) * prod  # the contributions of features 0 and 1, per ordering
    want = torch.tensor([[m0.std() / math.sqrt(permutations), m1.std() / math.sqrt(permutations), 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(r.attributions, torch.stack([m0.mean(), m1.mean(), x[0, 2]])[None])
    torch.testing.assert_close(r.stderr, want, rtol=1e-12, atol=1e-15)


def test_shapley_stderr_predicts_the_spread_of_the_estimate_over_seeds() -> None:
    """A standard error that is too small (e.g. missing the 1/sqrt(P)'s counterpart) or too large by
    any factor beyond sampling noise fails here: 48 seeds of a 10-ordering estimate."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double().eval()
    x = 2 * torch.randn(1, 8, dtype=torch.float64)
    runs = [nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=10, seed=s)
            for s in range(48)]
    spread = torch.stack([r.attributions[0] for r in runs]).std(0)  # (8,) over seeds
    predicted = torch.stack([r.stderr[0] for r in runs]).pow(2).mean(0).sqrt()
    ratio = spread / predicted
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), ratio
    assert 0.8 < float(ratio.mean()) < 1.2, ratio


def test_shapley_stderr_of_groups_is_spread_over_their_elements() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    mask = torch.tensor([0, 0, 0, 1, 2, 2])
    r = nbattr.attribute(net, x, method="shapley_sampling", target=0, permutations=6, feature_mask=mask)
    s = r.stderr
    torch.testing.assert_close(s[:, 0:3], s[:, :1].expand(2, 3))
    torch.testing.assert_close(s[:, 4:6], s[:, 4:5].expand(2, 2))
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
    """The gradient at x + s e is c (x + s e): its mean over n samples has standard error |c| s / sqrt(n)."""
    c = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.25, 1.5], dtype=torch.float64)
    x = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5, -0.5]], dtype=torch.float64)
    n, level = 800, 0.2
    r = nbattr.attribute(_Quadratic(c), x, method="smoothgrad", samples=n, noise_level=level,
                         multiply_by_inputs=multiply_by_inputs)
    s = level * float(x.max() - x.min())
    want = c.abs() * s / math.sqrt(n) * (x[0].abs() if multiply_by_inputs else 1)
    keep = want > 0
    ratio = r.stderr[0][keep] / want[keep]
    assert ((ratio > 0.88) & (ratio < 1.12)).all(), ratio  # the sample std of 800 normals: ~2.5% spread
    if multiply_by_inputs:
        assert float(r.stderr[0][~keep].abs().max()) == 0.0  # x_i = 0


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
