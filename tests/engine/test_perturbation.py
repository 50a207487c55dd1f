"""Occlusion and Shapley value sampling: Captum as oracle, closed forms, efficiency, chunking."""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import Occlusion, ShapleyValues
from torch import nn

import nbattr
from nbattr.engine.perturbation import default_window, resolve_window, tile_labels, window_positions
from nbattr.engine.problem import Problem

DT = torch.float64


def mlp(d_in: int = 6, d_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, 8), nn.Softplus(),
                         nn.Linear(8, d_out)).to(DT).eval()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).to(DT).eval()


class Additive(nn.Module):
    """f(x) = sum_i g_i(x_i): every ordering gives the exact Shapley value g_i(x_i) - g_i(x'_i)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 2.0, d, dtype=DT))
        self.b = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sin(self.a * x) + self.b * x ** 2
        return torch.stack([g.sum(1), -g.sum(1)], 1)


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


class TinyText(nn.Module):
    """Token ids (N, L) -> embedding (N, L, E) -> scores (N, 2)."""

    def __init__(self, vocab: int = 11, length: int = 5, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim).to(DT)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(length * dim, 6), nn.Tanh(),
                                  nn.Linear(6, 2)).to(DT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(ids))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    # Captum's Occlusion divides by the coverage count in float32 (``.float() / weight``).
    assert a.shape == b.shape
    torch.testing.assert_close(a.to(DT), b.to(DT), rtol=tol, atol=tol)


# -- windows -------------------------------------------------------------------------------
def test_default_windows_and_tiling():
    assert default_window((7,)) == (1,)
    assert default_window((5, 16)) == (1, 16)
    assert default_window((3, 8, 8)) == (3, 1, 1)
    assert default_window((3, 224, 224)) == (3, 28, 28)
    assert default_window((1, 28, 28)) == (1, 4, 4)  # 3.5 rounds half up
    assert default_window((3, 20, 40)) == (3, 3, 3)  # 2.5 rounds half up
    assert resolve_window(2, (5, 16)) == (2, 16)
    assert resolve_window(3, (3, 8, 8)) == (3, 3, 3)
    assert resolve_window(2, (7,)) == (2,)
    assert window_positions((8,), (3,), (2,)) == [4]  # 0, 2, 4, 6 (the last one cut at 8)
    lab = tile_labels((2, 5, 4), (2, 2, 2))
    assert lab.shape == (2, 5, 4) and int(lab.max()) == 5
    assert lab[0, 4, 3] == 5 and lab[1, 0, 0] == 0 and lab[0, 2, 1] == 2


# -- occlusion against Captum ----------------------------------------------------------------
@pytest.mark.parametrize("window,stride", [(1, None), (2, 1), (3, 2), (2, None)])
def test_occlusion_matches_captum_mlp(window, stride):
    m = mlp()
    torch.manual_seed(1)
    x, b = torch.randn(4, 6, dtype=DT), torch.randn(1, 6, dtype=DT)
    a = nbattr.attribute(m, x, method="occlusion", window=window, stride=stride, baseline=b, target=2)
    c = Occlusion(m).attribute(x, sliding_window_shapes=(window,),
                               strides=stride if stride is not None else window, baselines=b, target=2)
    close(a.attributions, c, 1e-6)
    assert a.delta is None and a.params["window"] == (window,)


@pytest.mark.parametrize("window,stride", [((3, 3, 3), (1, 2, 2)), ((1, 2, 2), 1), ((3, 4, 4), None),
                                           ((2, 5, 3), (1, 3, 2))])
def test_occlusion_matches_captum_cnn(window, stride):
    m = cnn()
    torch.manual_seed(2)
    x, b = torch.randn(3, 3, 8, 8, dtype=DT), torch.randn(3, 3, 8, 8, dtype=DT)
    target = torch.tensor([0, 2, 1])
    a = nbattr.attribute(m, x, method="occlusion", window=window, stride=stride, baseline=b, target=target)
    c = Occlusion(m).attribute(x, sliding_window_shapes=window,
                               strides=stride if stride is not None else window, baselines=b, target=target)
    close(a.attributions, c, 1e-6)


def test_occlusion_fill_number_and_default_window():
    m = cnn()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    a = nbattr.attribute(m, x, method="occlusion", fill=0.25, baseline="uniform", target=1)
    assert a.params["window"] == (3, 1, 1) and a.params["fill"] == 0.25
    assert a.baselines is None and "baseline" not in a.params
    c = Occlusion(m).attribute(x, sliding_window_shapes=(3, 1, 1), baselines=0.25, target=1)
    close(a.attributions, c, 1e-6)


# -- closed forms ----------------------------------------------------------------------------
def test_linear_closed_forms():
    torch.manual_seed(4)
    lin = nn.Linear(7, 3).to(DT).eval()
    x, xb = torch.randn(5, 7, dtype=DT), torch.randn(5, 7, dtype=DT)
    w = lin.weight[1].detach()
    a = nbattr.attribute(lin, x, method="occlusion", window=1, fill=0.5, target=1)
    torch.testing.assert_close(a.attributions, w * (x - 0.5), rtol=1e-12, atol=1e-12)
    s = nbattr.attribute(lin, x, method="shapley_sampling", permutations=3, baseline=xb, target=1)
    torch.testing.assert_close(s.attributions, w * (x - xb), rtol=1e-12, atol=1e-12)


# -- Shapley sampling against Captum ---------------------------------------------------------
def test_shapley_matches_captum_exact_within_sampling_error():
    m = mlp(d_in=5)
    torch.manual_seed(5)
    x, b = torch.randn(3, 5, dtype=DT), torch.randn(1, 5, dtype=DT)
    exact = ShapleyValues(m).attribute(x, baselines=b, target=0)
    a = nbattr.attribute(m, x, method="shapley_sampling", permutations=200, baseline=b, target=0)
    scale = exact.abs().max()
    assert (a.attributions - exact).abs().max() < 0.05 * scale
    # More orderings: the error shrinks (a consistent estimator of the exact values).
    a8 = nbattr.attribute(m, x, method="shapley_sampling", permutations=1600, baseline=b, target=0)
    assert (a8.attributions - exact).abs().max() < (a.attributions - exact).abs().max()
    assert a.params["groups"] == 5 and a.params["permutations"] == 200


def test_shapley_feature_mask_group_sums_match_captum():
    m = mlp(d_in=5)
    torch.manual_seed(6)
    x = torch.randn(2, 5, dtype=DT)
    mask = torch.tensor([0, 0, 1, 2, 2])
    exact = ShapleyValues(m).attribute(x, target=1, feature_mask=mask[None])
    a = nbattr.attribute(m, x, method="shapley_sampling", permutations=300, feature_mask=mask, target=1)
    group_sums = torch.stack([a.attributions[:, mask == g].sum(1) for g in range(3)], 1)
    captum_groups = torch.stack([exact[:, (mask == g).nonzero()[0, 0]] for g in range(3)], 1)
    assert (group_sums - captum_groups).abs().max() < 0.05 * captum_groups.abs().max()
    # Spread evenly inside a group.
    assert torch.equal(a.attributions[:, 0], a.attributions[:, 1])
    assert torch.equal(a.params["feature_mask"], mask) and a.params["groups"] == 3
    assert a.delta.abs().max() < 1e-10


def test_shapley_exact_for_additive_model():
    m = Additive(5).eval()
    torch.manual_seed(7)
    x, b = torch.randn(4, 5, dtype=DT), torch.randn(4, 5, dtype=DT)
    exact = ShapleyValues(m).attribute(x, baselines=b, target=0)
    a = nbattr.attribute(m, x, method="shapley_sampling", permutations=2, baseline=b, target=0)
    close(a.attributions, exact, 1e-5)  # Captum accumulates in float32 here
    g = torch.sin(m.a * x) + m.b * x ** 2 - (torch.sin(m.a * b) + m.b * b ** 2)
    torch.testing.assert_close(a.attributions, g.detach(), rtol=1e-12, atol=1e-12)


# -- efficiency and determinism --------------------------------------------------------------
def test_shapley_efficiency_random_mlp_and_images():
    m = mlp(d_in=10, seed=8)
    torch.manual_seed(8)
    x = torch.randn(6, 10, dtype=DT)
    a = nbattr.attribute(m, x, method="shapley_sampling", permutations=7, baseline="mean")
    assert a.delta.abs().max() < 1e-10
    torch.testing.assert_close(a.total(), a.outputs - a.baseline_outputs, rtol=0, atol=1e-10)
    img = nbattr.attribute(cnn(), torch.randn(2, 3, 8, 8, dtype=DT), method="shapley_sampling",
                           permutations=2)
    assert img.params["groups"] == 64 and img.params["feature_mask"].shape == (3, 8, 8)
    assert img.delta.abs().max() < 1e-10


def test_shapley_per_example_mask_equals_separate_runs():
    m = mlp(d_in=6, seed=9)
    torch.manual_seed(9)
    x = torch.randn(2, 6, dtype=DT)
    masks = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    both = nbattr.attribute(m, x, method="shapley_sampling", permutations=5, feature_mask=masks, target=0)
    assert both.params["feature_mask"].shape == (2, 6)
    for i in range(2):
        one = nbattr.attribute(m, x[i:i + 1], method="shapley_sampling", permutations=5,
                               feature_mask=masks[i], target=0)
        torch.testing.assert_close(both.attributions[i:i + 1], one.attributions, rtol=1e-12, atol=1e-12)
    assert both.delta.abs().max() < 1e-10


def test_shapley_seed():
    m, x = mlp(seed=10), torch.randn(2, 6, dtype=DT)
    a = nbattr.attribute(m, x, method="shapley_sampling", permutations=4, seed=1)
    b = nbattr.attribute(m, x, method="shapley_sampling", permutations=4, seed=1)
    c = nbattr.attribute(m, x, method="shapley_sampling", permutations=4, seed=2)
    assert torch.equal(a.attributions, b.attributions)
    assert not torch.allclose(a.attributions, c.attributions)


# -- chunking ----------------------------------------------------------------------------------
def _problem_forwards(model: Counting, x: torch.Tensor, baseline: bool) -> int:
    """Model calls :class:`Problem` makes itself (first forward, and F(x') if used)."""
    model.calls = 0
    p = Problem(model, x)
    if baseline:
        p.baseline_outputs  # noqa: B018 - the property runs the model
    n, model.calls = model.calls, 0
    return n


def test_chunking_same_result_and_call_count():
    torch.manual_seed(11)
    m = Counting(cnn(seed=11)).eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)

    occ_auto = nbattr.attribute(m, x, method="occlusion", window=(3, 3, 3), stride=(1, 2, 2))
    const = _problem_forwards(m, x, baseline=False)
    occ = nbattr.attribute(m, x, method="occlusion", window=(3, 3, 3), stride=(1, 2, 2), batch_size=3)
    points = 16 * 2  # 4 x 4 windows, 2 examples
    assert sum(occ.params["chunks"]) == points
    assert m.calls == math.ceil(points / 3) + const
    torch.testing.assert_close(occ.attributions, occ_auto.attributions, rtol=1e-12, atol=1e-12)

    mask = torch.arange(3 * 8 * 8).view(3, 8, 8) % 5
    sh_auto = nbattr.attribute(m, x, method="shapley_sampling", permutations=4, feature_mask=mask)
    const = _problem_forwards(m, x, baseline=True)
    sh = nbattr.attribute(m, x, method="shapley_sampling", permutations=4, feature_mask=mask, batch_size=3)
    points = 4 * 2 * (5 - 1)  # end points F(x), F(x') are shared by every ordering
    assert sum(sh.params["chunks"]) == points
    assert m.calls == math.ceil(points / 3) + const
    torch.testing.assert_close(sh.attributions, sh_auto.attributions, rtol=1e-12, atol=1e-12)


# -- layer mode ----------------------------------------------------------------------------
def test_layer_mode_token_occlusion_and_shapley():
    model = TinyText().eval()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [0, 3, 0, 3, 0]])
    emb = model.emb(ids).detach()
    a = nbattr.attribute(model, ids, method="occlusion", layer=model.emb, target=1)
    assert a.attributions.shape == (3, 5, 4) and a.params["window"] == (1, 4)
    c = Occlusion(model.body).attribute(emb, sliding_window_shapes=(1, 4), baselines=0.0, target=1)
    close(a.attributions, c, 1e-6)
    # a whole token per window: every element of a token gets that token's drop
    assert torch.allclose(a.attributions, a.attributions[:, :, :1].expand(-1, -1, 4))

    s = nbattr.attribute(model, ids, method="shapley_sampling", layer=model.emb, permutations=50, target=1)
    assert s.params["groups"] == 5 and s.params["feature_mask"].shape == (5, 4)
    assert s.delta.abs().max() < 1e-10
    token_mask = torch.arange(5).view(5, 1).repeat(1, 4)
    exact = ShapleyValues(model.body).attribute(emb, target=1, feature_mask=token_mask[None])
    token_sums = s.attributions.sum(2)
    assert (token_sums - exact[:, :, 0]).abs().max() < 0.1 * exact.abs().max()


def test_unbatched_input():
    m = mlp()
    x = torch.randn(6, dtype=DT)
    a = nbattr.attribute(m, x, method="occlusion", target=0)
    b = nbattr.attribute(m, x[None], method="occlusion", target=0)
    assert a.params.get("unbatched") and torch.equal(a.attributions, b.attributions)
    s = nbattr.attribute(m, x, method="shapley_sampling", target=0)
    assert s.attributions.shape == (1, 6) and s.delta.abs().max() < 1e-10


# -- bad options ---------------------------------------------------------------------------
@pytest.mark.parametrize("opts,msg", [
    ({"window": 9}, "larger than"),
    ({"window": (3, 9, 2)}, "larger than"),
    ({"window": (3, 2)}, "one entry per dimension"),
    ({"window": 0}, ">= 1"),
    ({"window": 2.5}, "int or a tuple"),
    ({"window": 2, "stride": 0}, "stride entries must be >= 1"),
    ({"window": 2, "stride": (1, 3, 3)}, "never be occluded"),
    ({"window": 2, "stride": (1, 1)}, "stride"),
    ({"fill": "zeros"}, "fill"),
])
def test_occlusion_bad_options(opts, msg):
    with pytest.raises(nbattr.InputError, match=msg):
        nbattr.attribute(cnn(), torch.randn(1, 3, 8, 8, dtype=DT), method="occlusion", **opts)


@pytest.mark.parametrize("opts,msg", [
    ({"permutations": 0}, "permutations"),
    ({"permutations": 2.0}, "permutations"),
    ({"feature_mask": torch.zeros(4, dtype=torch.long)}, "broadcasts neither"),
    ({"feature_mask": torch.zeros(3, 6, dtype=torch.long)}, "broadcasts neither"),
    ({"feature_mask": torch.zeros(6)}, "integer"),
    ({"feature_mask": torch.tensor([0, 0, 1, 3, 3, 3])}, "label no element"),
    ({"feature_mask": torch.tensor([0, 0, 1, -1, 1, 1])}, ">= 0"),
    ({"seed": "a"}, "seed"),
    ({"antithetic": 1}, "antithetic must be True or False"),
])
def test_shapley_bad_options(opts, msg):
    with pytest.raises(nbattr.InputError, match=msg):
        nbattr.attribute(mlp(), torch.randn(2, 6, dtype=DT), method="shapley_sampling", **opts)


def test_registered():
    info = nbattr.methods()
    assert info["occlusion"].needs_baseline and not info["occlusion"].completeness
    assert info["shapley_sampling"].completeness and info["shapley_sampling"].needs_baseline
    assert info["shapley_sampling"].options == {"permutations": 24, "feature_mask": None, "seed": 0, "antithetic": True}
