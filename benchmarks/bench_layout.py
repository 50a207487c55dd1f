"""Channels-last or the usual layout: which is faster for the engine on a device?

nbattr hands image batches to the model channels-last on the device types in
``nbattr.engine.problem.CHANNELS_LAST_DEVICES`` (CPU: measured 0.6-0.8x the time). This script
measures it on any device by running the same calls with and without the device in that set,
alternating, and prints the median time ratio (channels-last / usual; below 1: channels-last is
faster) and the largest difference of the attributions. A script, not a test.

    python benchmarks/bench_layout.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_captum import small_cnn  # noqa: E402

import nbattr  # noqa: E402
from nbattr.engine import problem  # noqa: E402


def _once(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, r


def compare(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median ratio channels-last / usual, median usual seconds, max |difference|)."""
    usual = set(problem.CHANNELS_LAST_DEVICES) - {device.type}
    cl = usual | {device.type}
    ratios, base = [], []
    results = {}
    for i in range(repeats + 1):  # the first round warms up both
        order = [(cl, "cl"), (usual, "usual")] if i % 2 else [(usual, "usual"), (cl, "cl")]
        t = {}
        for devices, name in order:
            problem.CHANNELS_LAST_DEVICES = devices
            problem._USUAL_LAYOUT.clear()
            t[name], results[name] = _once(fn, device)
        if i:
            ratios.append(t["cl"] / t["usual"])
            base.append(t["usual"])
    diff = (results["cl"].attributions - results["usual"].attributions).abs().max().item()
    return statistics.median(ratios), statistics.median(base), diff


def calls(model: torch.nn.Module, x: torch.Tensor) -> dict:
    return {
        "IG (32 steps)": lambda: nbattr.attribute(model, x, steps=32),
        "SmoothGrad (16)": lambda: nbattr.attribute(model, x, method="smoothgrad", samples=16),
        "DeepLIFT": lambda: nbattr.attribute(model, x, method="deeplift"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small CNN only")
    args = ap.parse_args()
    device = torch.device(args.device)
    saved = set(problem.CHANNELS_LAST_DEVICES)
    torch.manual_seed(0)
    models = [("small CNN, 4x3x64x64", small_cnn(), torch.rand(4, 3, 64, 64))]
    if not args.quick:
        try:
            from nbattr.demo import imagenet_model, photo

            models.append(("EfficientNet-Lite0, 2x3x224x224", imagenet_model(),
                           torch.stack([photo("chelsea"), photo("coffee")])))
        except ImportError as e:
            print(f"(skipping EfficientNet-Lite0: {e})")
    print(f"device={device} torch={torch.__version__} repeats={args.repeats}; ratio = channels-last / usual")
    try:
        for name, model, x in models:
            model, x = model.to(device), x.to(device)
            for label, fn in calls(model, x).items():
                ratio, usual_s, diff = compare(fn, device, args.repeats)
                print(f"{name:34s} {label:18s} usual {usual_s:8.3f} s   ratio {ratio:5.2f}   "
                      f"max |diff| {diff:.2e}", flush=True)
    finally:
        problem.CHANNELS_LAST_DEVICES = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
