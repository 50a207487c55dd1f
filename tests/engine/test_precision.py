"""Half precision: sums kept in float32, attributions returned in the input's dtype, delta taken
wide, rounding not mistaken for quadrature error; a dtype mismatch is named."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nbattr


def _bf16_linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(32, 3).to(torch.bfloat16).eval()


def test_integrated_gradients_of_a_bfloat16_linear_model_is_exact_to_its_last_rounding() -> None:
    """The gradient is w at every point; 64 weighted bfloat16 additions drifted by up to 2-3 units
    in the last place, a float32 sum leaves only the final rounding (<= 1 unit)."""
    lin = _bf16_linear()
    x = torch.randn(4, 32).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # delta is rounding here: no "more than 5%" warning
        r = nbattr.attribute(lin, x, steps=64, target=0)
    assert r.attributions.dtype == torch.bfloat16
    exact = lin.weight[0].double() * x.double()
    ulps = (r.attributions.double() - exact).abs() / (exact.abs() * 2.0**-8)
    assert ulps.max() <= 1.0, ulps.max()
    wide = r.attributions.double().sum(1) - (r.outputs.double() - r.baseline_outputs.double())
    torch.testing.assert_close(r.delta, wide.to(torch.bfloat16), rtol=0, atol=0)  # not rounded to the scores' bits


@pytest.mark.parametrize("method,opts", [
    ("integrated_gradients", {"steps": 32}), ("integrated_gradients", {"steps": "auto", "tol": 1e-2}),
    ("deeplift", {}), ("smoothgrad", {"samples": 8}), ("shapley_sampling", {"permutations": 4}),
    ("occlusion", {"window": 1}), ("epsilon_lrp", {}),
])
def test_bfloat16_model_and_input(method: str, opts: dict) -> None:
    torch.manual_seed(1)
    m32 = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3)).eval()
    m16 = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3)).eval()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})  # the same rounded weights
    x = torch.randn(3, 6).bfloat16()
    r16 = nbattr.attribute(m16, x, method=method, target=[0, 1, 2], **opts)
    r32 = nbattr.attribute(m32, x.float(), method=method, target=[0, 1, 2], **opts)
    assert r16.attributions.dtype == torch.bfloat16
    scale = r32.attributions.abs().max()
    assert (r16.attributions.float() - r32.attributions).abs().max() < 0.05 * scale
    if r16.delta is not None:
        assert r16.delta.dtype == torch.bfloat16
        assert (r16.delta.float().abs() < 0.05 * (r32.outputs.abs().max() + 1)).all(), r16.delta


def test_a_model_in_another_dtype_than_x_is_named() -> None:
    with pytest.raises(nbattr.InputError, match=r"parameters are torch.bfloat16 and x is torch.float32: "
                                                r"pass x.to\(torch.bfloat16\)"):
        nbattr.attribute(_bf16_linear(), torch.randn(2, 32))
