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
