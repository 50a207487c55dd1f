"""nbattr against Captum, timed in one run on the same model, batch, steps and baseline.

Prints the median time of each side over repeats and the ratio nbattr / Captum (< 1: nbattr is
faster). A script, not a test: timings depend on the machine.

    python benchmarks/bench_captum.py [--device cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import nbattr


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10)).eval()


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cases(model: nn.Module, x: torch.Tensor, steps: int):
    from captum import attr as ca

    b = torch.zeros_like(x)
    t = nbattr.attribute(model, x, method="saliency").target
    yield ("IG gauss_legendre",
           lambda: nbattr.attribute(model, x, baseline=b, target=t, steps=steps, rule="gauss_legendre"),
           lambda: ca.IntegratedGradients(model).attribute(x, b, target=t, n_steps=steps, method="gausslegendre"))
    yield ("IG riemann_right",
           lambda: nbattr.attribute(model, x, baseline=b, target=t, steps=steps, rule="riemann_right"),
           lambda: ca.IntegratedGradients(model).attribute(x, b, target=t, n_steps=steps, method="riemann_right"))
    if "deeplift" in nbattr.methods():
        yield ("DeepLIFT rescale",
               lambda: nbattr.attribute(model, x, method="deeplift", baseline=b, target=t),
               lambda: ca.DeepLift(model).attribute(x, b, target=t))
    yield ("SmoothGrad (16 samples)",
           lambda: nbattr.attribute(model, x, method="smoothgrad", target=t, samples=16, noise_level=0.15),
           lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
               x, nt_type="smoothgrad", nt_samples=16, stdevs=0.15, target=t, abs=False))
    w = max(1, x.shape[-1] // 8)
    yield (f"Occlusion ({x.shape[1]}x{w}x{w})",
           lambda: nbattr.attribute(model, x, method="occlusion", window=w, baseline=b, target=t),
           lambda: ca.Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], w, w),
                                                 strides=(x.shape[1], w, w), baselines=0, target=t))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="small CNN only")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = [("small CNN, 4x3x64x64", small_cnn(), torch.rand(4, 3, 64, 64))]
    if not args.quick:
        try:
            from nbattr.demo import imagenet_model, photo

            x = torch.stack([photo("chelsea"), photo("coffee")])
            models.append(("EfficientNet-Lite0, 2x3x224x224", imagenet_model(), x))
        except ImportError as e:
            print(f"(skipping EfficientNet-Lite0: {e})")
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"steps={args.steps} repeats={args.repeats}")
    print(f"{'model':34s} {'method':26s} {'nbattr s':>9s} {'captum s':>9s} {'ratio':>6s}")
    for name, model, x in models:
        model, x = model.to(device), x.to(device)
        for label, ours, theirs in cases(model, x, args.steps):
            to = timed(ours, args.repeats, device)
            tc = timed(theirs, args.repeats, device)
            print(f"{name:34s} {label:26s} {to:9.3f} {tc:9.3f} {to / tc:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
