"""Feature groups (nbattr.evaluate.groups): closed forms on linear models, shares, masks, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import nbattr
from nbattr.evaluate import GroupShares, group_by, group_shares
from nbattr.evaluate.groups import DELTA, REMAINDER, TOTAL

DT = torch.float64


def linear(d: int = 6, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d, classes).to(DT).eval()


def data(n: int = 5, d: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT)


GROUPS = {"a": [0, 2], "b": [1], "c": [3, 4]}  # feature 5 is in no group


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ig_linear_group_totals_closed_form(seed: int) -> None:
    # IG on a linear model is exactly w * (x - x'); a group's total is sum_{i in group} w_i (x_i - x'_i).
    model, x = linear(seed=seed), data(seed=seed + 10)
    base = x.mean(0)
    r = nbattr.attribute(model, x, method="integrated_gradients", baseline=base, steps=8)
    g = group_shares(r, GROUPS)
    w = model.weight.detach()[r.target]  # (N, F)
    contrib = w * (x - base)
    expect = torch.stack([contrib[:, idx].sum(1) for idx in GROUPS.values()], 1)
    torch.testing.assert_close(g.totals, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.remainder, contrib[:, 5], rtol=1e-12, atol=1e-12)
    change = model(x).gather(1, r.target[:, None])[:, 0] - model(base[None])[0, r.target]
    torch.testing.assert_close(g.change, change.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.shares, expect / change.detach()[:, None], rtol=1e-10, atol=1e-12)
    assert g.delta.abs().max() < 1e-12
    # shares of the groups and the remainder add up to 1 (complete method)
    torch.testing.assert_close(g.shares.sum(1) + g.remainder_share, torch.ones(5, dtype=DT))
    assert g.sizes.tolist() == [[2, 1, 2]] * 5 and g.remainder_size.tolist() == [1] * 5
    assert g.names == ("a", "b", "c") and g.method == "integrated_gradients"


def test_abs_shares_closed_form() -> None:
    model, x = linear(), data()
    r = nbattr.attribute(model, x, baseline="zeros", steps=4)
    g = group_shares(r, GROUPS)
    a = (model.weight.detach()[r.target] * x).abs()
    expect = torch.stack([a[:, idx].sum(1) for idx in GROUPS.values()], 1) / a.sum(1, keepdim=True)
    torch.testing.assert_close(g.abs_shares, expect)
    torch.testing.assert_close(g.abs_shares.sum(1) + g.abs_remainder_share, torch.ones(5, dtype=DT))


def test_shapley_group_totals_equal_exact_group_shapley_values_on_linear_model() -> None:
    # With feature_mask = the groups, shapley_sampling's group totals are the groups' Shapley
    # values; for a linear model every ordering gives exactly sum_{i in g} w_i (x_i - x'_i).
    model, x = linear(), data()
    ids = torch.tensor([0, 1, 0, 2, 2, 3])
    r = nbattr.attribute(model, x, method="shapley_sampling", baseline="zeros", feature_mask=ids,
                         permutations=3)
    g = group_shares(r, ids, names=["a", "b", "c", "rest"])
    contrib = model.weight.detach()[r.target] * x
    expect = torch.stack([contrib[:, ids == k].sum(1) for k in range(4)], 1)
    torch.testing.assert_close(g.totals, expect, rtol=1e-10, atol=1e-12)
    assert g.remainder_size.sum() == 0 and g.delta.abs().max() < 1e-12


def test_integer_mask_mapping_and_bool_masks_agree() -> None:
    model, x = linear(), data()
    r = nbattr.attribute(model, x, baseline="zeros", steps=4)
    by_map = group_shares(r, GROUPS)
    ids = torch.tensor([0, 1, 0, 2, 2, -1])
    by_ids = group_shares(r, ids, names={0: "a", 1: "b", 2: "c"})
    bools = {k: torch.isin(torch.arange(6), torch.tensor(v)) for k, v in GROUPS.items()}
    by_bool = group_shares(r, bools)
    by_np = group_shares(r, {k: v.numpy() for k, v in bools.items()})
    by_list = group_shares(r, {k: v.tolist() for k, v in bools.items()})
    for other in (by_ids, by_bool, by_np, by_list):
        assert other.names == by_map.names
        torch.testing.assert_close(other.totals, by_map.totals)
        torch.testing.assert_close(other.remainder, by_map.remainder)


def test_feature_names_and_group_by() -> None:
    names = ["mean radius", "mean texture", "radius error", "texture error", "worst radius", "worst texture"]
    by_stat = group_by(names, lambda s: "se" if s.endswith("error") else s.split()[0])
    assert by_stat == {"mean": [0, 1], "se": [2, 3], "worst": [4, 5]}
    by_meas = group_by(names, lambda s: "radius" if "radius" in s else None)
    assert by_meas == {"radius": [0, 2, 4]}
    attr = torch.arange(1.0, 7.0, dtype=DT)[None]  # one example
    g = group_shares(attr, {"r": ["mean radius", "worst radius"], "t": [1]}, feature_names=names)
    torch.testing.assert_close(g.totals, torch.tensor([[6.0, 2.0]], dtype=DT))
    assert float(g.remainder[0]) == 3.0 + 4.0 + 6.0


def test_raw_tensor_without_change_uses_sum_of_attributions() -> None:
    attr = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=DT)  # 1-D: one example
    g = group_shares(attr, {"x": [0, 1], "y": [2]})
    assert g.n == 1 and g.change is None and g.delta is None and g.reference == "sum of attributions"
    torch.testing.assert_close(g.shares, torch.tensor([[-1.0 / 6.0, 3.0 / 6.0]], dtype=DT))
    torch.testing.assert_close(g.abs_shares, torch.tensor([[3.0 / 10, 3.0 / 10]], dtype=DT))
    rows = g.table(0)
    assert [r["group"] for r in rows] == ["x", "y", REMAINDER, "sum of attributions"]
    assert rows[-1]["total"] == 6.0 and rows[-1]["share"] == 1.0


def test_delta_is_reported_separately_not_spread() -> None:
    # Attributions that sum to 7 for a change of 5: delta = 2; shares are fractions of 5, unscaled,
    # and groups + remainder - delta = the change exactly.
    attr = torch.tensor([[1.0, 2.0, 4.0]], dtype=DT)
    g = group_shares(attr, {"a": [0], "b": [1]}, change=5.0)
    torch.testing.assert_close(g.delta, torch.tensor([2.0], dtype=DT))
    torch.testing.assert_close(g.shares, torch.tensor([[0.2, 0.4]], dtype=DT))
    torch.testing.assert_close(g.remainder_share, torch.tensor([0.8], dtype=DT))
    torch.testing.assert_close(g.delta_share, torch.tensor([0.4], dtype=DT))
    rows = g.table(0)
    assert [r["group"] for r in rows] == ["a", "b", REMAINDER, DELTA, TOTAL]
    assert math.isclose(sum(r["total"] for r in rows[:-1]), 5.0)
    assert math.isclose(sum(r["share"] for r in rows[:-1]), 1.0)
    assert rows[-1]["total"] == 5.0 and rows[3]["total"] == -2.0


def test_non_complete_method_still_reports_delta() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT).eval()
    x = 3 * data()
    # interior gradients at alpha = 0.5 (times x - x') have a baseline but no completeness
    r = nbattr.attribute(model, x, method="interior_gradients", baseline="zeros", alpha=0.5)
    assert r.delta is None
    g = group_shares(r, GROUPS)
    torch.testing.assert_close(g.change, r.outputs - r.baseline_outputs)
    torch.testing.assert_close(g.delta, r.attributions.sum(1) - (r.outputs - r.baseline_outputs))
    assert g.delta.abs().min() > 1e-3  # a nonlinear model: not complete
    torch.testing.assert_close(g.shares.sum(1) + g.remainder_share - g.delta_share, torch.ones(5, dtype=DT))
    s = nbattr.attribute(model, x, method="saliency")
    gs = group_shares(s, GROUPS)
    assert gs.change is None and gs.reference == "sum of attributions"


def test_change_argument_overrides_and_is_validated() -> None:
    attr = torch.ones(3, 4, dtype=DT)
    g = group_shares(attr, {"a": [0, 1]}, change=[4.0, 8.0, 2.0])
    torch.testing.assert_close(g.shares[:, 0], torch.tensor([0.5, 0.25, 1.0], dtype=DT))
    with pytest.raises(nbattr.InputError, match="change has 2 entries for 3 examples"):
        group_shares(attr, {"a": [0]}, change=[1.0, 2.0])
    with pytest.raises(nbattr.InputError, match="NaN"):
        group_shares(attr, {"a": [0]}, change=[1.0, math.nan, 2.0])


def test_zero_change_gives_nan_share_not_inf() -> None:
    g = group_shares(torch.tensor([[1.0, -1.0]], dtype=DT), {"a": [0]}, change=0.0)
    assert math.isnan(float(g.shares[0, 0]))


def test_image_region_mask_and_per_example_masks() -> None:
    attr = torch.arange(2 * 3 * 4 * 4, dtype=DT).view(2, 3, 4, 4)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True  # an (H, W) region over every channel
    g = group_shares(attr, {"corner": region})
    torch.testing.assert_close(g.totals[:, 0], attr[:, :, :2, :2].sum((1, 2, 3)))
    assert g.sizes[:, 0].tolist() == [12, 12]
    # per-example integer mask (N, F): each example its own grouping
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=DT)
    ids = torch.tensor([[0, 0, 1], [1, -1, 0]])
    g2 = group_shares(a, ids)
    torch.testing.assert_close(g2.totals, torch.tensor([[3.0, 3.0], [6.0, 4.0]], dtype=DT))
    torch.testing.assert_close(g2.remainder, torch.tensor([0.0, 5.0], dtype=DT))
    assert g2.names == ("group 0", "group 1")
    # per-example bool mask in a mapping
    g3 = group_shares(a, {"first": torch.tensor([[True, False, False], [False, False, True]])})
    torch.testing.assert_close(g3.totals[:, 0], torch.tensor([1.0, 6.0], dtype=DT))


def test_mean_and_pooled_tables() -> None:
    attr = torch.tensor([[1.0, 1.0], [3.0, 1.0]], dtype=DT)
    g = group_shares(attr, {"a": [0], "b": [1]}, change=[2.0, 4.0])
    mean = {r["group"]: r for r in g.table("mean")}
    assert math.isclose(mean["a"]["share"], (0.5 + 0.75) / 2)  # mean of ratios
    assert math.isclose(mean["a"]["total"], 2.0)
    p = g.pooled()
    assert p.n == 1 and p.pooled_from == 2
    assert math.isclose(float(p.shares[0, 0]), 4.0 / 6.0)  # ratio of means
    assert "pooled over 2 examples" in p.text(0)


def test_table_sort_and_text() -> None:
    attr = torch.tensor([[1.0, -5.0, 2.0, 0.5]], dtype=DT)
    g = group_shares(attr, {"small": [0], "big": [1], "mid": [2]}, change=-1.5)
    rows = g.table(0, sort=True)
    assert [r["group"] for r in rows[:3]] == ["big", "mid", "small"]
    txt = g.text(0)
    assert "small" in txt and "F(x) - F(x')" in txt and "%" in txt
    assert str(g) == g.text(0)
    assert isinstance(g, GroupShares)


def test_plot_draws_one_bar_per_row() -> None:
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    attr = torch.tensor([[1.0, -2.0, 3.0, 4.0]], dtype=DT)
    g = group_shares(attr, {"a": [0], "b": [1], "c": [2]}, change=5.0)
    ax = g.plot(0)
    heights = sorted(round(p.get_width(), 6) for p in ax.patches)
    # a 20%, b -40%, c 60%, remainder 80%, -delta -20%
    assert heights == [-40.0, -20.0, 20.0, 60.0, 80.0]
    ax2 = g.plot(0, kind="abs_share")
    assert len(ax2.patches) == 4
    plt.close("all")
    with pytest.raises(nbattr.InputError, match="kind"):
        g.plot(0, kind="nope")


def test_overlapping_groups_are_rejected() -> None:
    with pytest.raises(nbattr.InputError, match=r"groups 'a' and 'b' overlap \(1 shared"):
        group_shares(torch.ones(2, 4), {"a": [0, 1], "b": [1, 2]})
    m1 = torch.tensor([True, True, False, False])
    with pytest.raises(nbattr.InputError, match="overlap"):
        group_shares(torch.ones(2, 4), {"a": m1, "b": [0]})


@pytest.mark.parametrize(
    ("groups", "kw", "msg"),
    [
        ({"a": [4]}, {}, r"index 4 is out of range for 4 features"),
        ({"a": [-1]}, {}, r"index -1 is out of range"),
        ({"a": []}, {}, r"group 'a' is empty"),
        ({"a": torch.zeros(4, dtype=torch.bool)}, {}, r"group 'a' is empty"),
        ({"a": [0, 0]}, {}, r"lists feature 0 more than once"),
        ({"a": [0.5]}, {}, r"indices must be ints"),
        ({"a": torch.tensor([0.0, 1.0])}, {}, r"indices must be integers"),
        ({"a": torch.ones(3, dtype=torch.bool)}, {}, r"bool mask of shape \(3,\) broadcasts neither"),
        ({"a": ["x"]}, {}, r"pass feature_names="),
        ({"a": ["nope"]}, {"feature_names": ["w", "x", "y", "z"]}, r"unknown feature name 'nope'"),
        ({"a": [0]}, {"feature_names": ["w", "w", "y", "z"]}, r"feature_names has duplicates"),
        ({}, {}, r"empty mapping"),
        ({"a": object()}, {}, r"must be feature indices"),
        ({"a": [0]}, {"names": ["x"]}, r"names= is for an integer group-id mask"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), {}, r"must hold integers"),
        (torch.tensor([True, False, True, False]), {}, r"bool tensor is one group's mask"),
        (torch.tensor([0, 1, 2]), {}, r"broadcasts neither to the feature shape \(4,\)"),
        (torch.tensor([0, 1, -2, 0]), {}, r"group ids must be >= 0 \(or -1"),
        (torch.tensor([-1, -1, -1, -1]), {}, r"every element in no group"),
        (torch.tensor([0, 1, 2, 0]), {"names": ["x", "y"]}, r"names has 2 entries; the mask uses group id 2"),
        (torch.tensor([0, 1, 1, 0]), {"names": {0: "x"}}, r"names has no entry for group id\(s\) \[1\]"),
        (torch.tensor([0, 1, 1, 0]), {"names": ["x", "x"]}, r"group names must be unique"),
        ("abc", {}, r"group-id mask must hold integers|must be a mapping or an integer mask"),
    ],
)
def test_bad_groups_raise_clear_errors(groups: object, kw: dict, msg: str) -> None:
    with pytest.raises(nbattr.InputError, match=msg):
        group_shares(torch.ones(2, 4), groups, **kw)


def test_bad_attributions_raise_clear_errors() -> None:
    with pytest.raises(nbattr.InputError, match="must be an nbattr Attribution or a tensor"):
        group_shares(np.ones((2, 4)), {"a": [0]})
    with pytest.raises(nbattr.InputError, match="NaN or Inf"):
        group_shares(torch.tensor([[1.0, math.inf]]), {"a": [0]})
    with pytest.raises(nbattr.InputError, match="floating point"):
        group_shares(torch.ones(2, 4, dtype=torch.long), {"a": [0]})
    with pytest.raises(nbattr.InputError, match="need"):
        group_shares(torch.tensor(1.0), {"a": [0]})
    g = group_shares(torch.ones(2, 4), {"a": [0]})
    with pytest.raises(nbattr.InputError, match="out of range for 2 example"):
        g.table(2)
    with pytest.raises(nbattr.InputError, match="'mean'"):
        g.table("median")


def test_tensors_stay_on_the_attributions_device_and_dtype() -> None:
    g = group_shares(torch.ones(2, 4, dtype=torch.float32), {"a": [0, 1]}, change=[2.0, 4.0])
    assert g.totals.dtype == torch.float32 and g.change.dtype == torch.float32
    assert g.totals.device == torch.device("cpu")


def test_plot_leaves_out_a_negligible_delta_row() -> None:
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    g = group_shares(torch.tensor([[1.0, 4.0]], dtype=DT), {"a": [0], "b": [1]}, change=5.0 - 1e-6)
    ax = g.plot(0, sort=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]  # no "-delta" row
    plt.close("all")


def test_float32_sums_are_accumulated_accurately() -> None:
    # 150528 float32 elements (an ImageNet-sized map) spread evenly over 16 squares, as Shapley
    # sampling does: the group totals must add up to the attributions' sum to float32 precision.
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(16, generator=g, dtype=DT)
    tile = torch.arange(4).repeat_interleave(56)
    squares = tile[:, None] * 4 + tile[None, :]
    attr = (phi[squares] / (3 * 56 * 56)).expand(3, 224, 224)[None].to(torch.float32)
    res = group_shares(attr, squares, change=float(phi.sum()))
    torch.testing.assert_close(res.totals[0].double(), phi, rtol=1e-6, atol=1e-7)
    assert abs(float(res.delta[0])) < 1e-6 * float(phi.abs().sum())
    with pytest.raises(nbattr.InputError, match="change must be"):
        group_shares(attr, squares, change="big")
