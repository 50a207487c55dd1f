"""On a CUDA model, attribution runs on CUDA and equals the CPU result (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

import nbattr

from .models import cnn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METHODS = ["saliency", "gradient_x_input", "integrated_gradients", "interior_gradients", "smoothgrad",
           "deeplift", "epsilon_lrp", "occlusion", "shapley_sampling"]


@pytest.mark.parametrize("method", METHODS)
def test_cuda_model_is_attributed_on_cuda(method: str) -> None:
    m = cnn(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    opts = {"permutations": 3} if method == "shapley_sampling" else {}
    cpu = nbattr.attribute(m, x, method=method, **opts)
    gpu = nbattr.attribute(m.cuda(), x, method=method, **opts)  # x on CPU is moved to the model
    assert gpu.attributions.device.type == "cuda" and gpu.target.device.type == "cuda"
    if method != "smoothgrad":  # noise is drawn by the device's generator
        torch.testing.assert_close(gpu.attributions.cpu(), cpu.attributions, rtol=1e-6, atol=1e-8)
    if gpu.delta is not None:
        assert gpu.delta.abs().max() < 1e-6


def test_oom_halving_on_cuda() -> None:
    from nbattr.engine.batching import run_chunked

    seen: list[int] = []

    def work(sl: slice) -> None:
        if sl.stop - sl.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append(sl.stop - sl.start)

    run_chunked(10, work, batch_size=10, device=torch.device("cuda"))
    assert sum(seen) == 10


def test_per_example_forward_kwargs_follow_the_model_to_cuda() -> None:
    """A CPU mask is moved to the CUDA model and indexed there with the rows."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(5, 3).double()

    def model(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return lin(x * scale)

    x, scale = torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64)
    cpu = nbattr.attribute(model, x, steps=8, forward_kwargs={"scale": scale})
    lin.cuda()
    gpu = nbattr.attribute(model, x.cuda(), steps=8, forward_kwargs={"scale": scale})
    torch.testing.assert_close(gpu.attributions.cpu(), cpu.attributions, rtol=1e-9, atol=1e-12)


def test_bfloat16_on_cuda_sums_in_float32() -> None:
    """IG of a bfloat16 linear model on CUDA: within one unit of bfloat16's last place of w * x."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 3).to(device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(8, 64, device="cuda").bfloat16()
    r = nbattr.attribute(lin, x, steps=64, target=0)
    assert r.attributions.dtype == torch.bfloat16 and r.delta.dtype == torch.bfloat16
    exact = lin.weight[0].double() * x.double()
    assert ((r.attributions.double() - exact).abs() / (exact.abs() * 2.0**-8)).max() <= 1.0


def test_a_jump_at_the_baseline_is_named_on_cuda() -> None:
    """steps='auto' hitting max_steps at a degenerate baseline: its slope at alpha = 0 (kept on the
    CPU) meets the CUDA scores in the warning's check."""
    from .test_gradient import NormalisedZero

    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64, device="cuda")
    with pytest.warns(nbattr.BaselineJumpWarning, match="The score jumps at the baseline"):
        nbattr.attribute(NormalisedZero(), x, steps="auto", baseline="zeros")
