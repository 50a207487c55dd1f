"""nbattr against Captum, timed in one run on the same model, batch, steps and baseline.

Prints the median time of each side over repeats and the median ratio nbattr / Captum of the
rounds (< 1: nbattr is faster; the sides alternate, so a shared machine's slow spells hit both).
Every nbattr result carries its completeness error ``delta``; Captum computes it only when asked
(``return_convergence_delta=True``: a forward pass at the inputs and one at the baselines), so for
the methods with completeness (IG, DeepLIFT) a second ratio compares against Captum doing that
same work. Then the peak memory of one call of each side: on CUDA ``torch.cuda.max_memory_allocated``
above what was allocated before the call; on CPU the rise of the process's resident set size
(``/proc/self/statm``) sampled every millisecond by a thread during the call (tracemalloc does not
see torch's allocations; ``getrusage`` maxrss is a lifetime high-water mark, blind to a call that
stays under an earlier peak). The CPU figure is a lower bound: memory an earlier call freed and
the allocator kept is reused without a rise (small calls then read 0.0). For each model it also
prints IG's time over its floor, ``steps`` x one forward+backward on the same N examples. A script,
not a test: timings depend on the machine.

    python benchmarks/bench_captum.py [--device cuda] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
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


def _once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_rounds(fns: list[Callable[[], object]], repeats: int, device: torch.device
                 ) -> tuple[list[float], list[float]]:
    """Median time of each function and the median per-round ratio of the first (ours) to each
    of the others. They run in alternation, forwards then backwards (a, b, c, c, b, a, ...), so a
    shared machine's slow spells hit all."""
    for f in fns:  # warm-up
        f()
    times: list[list[float]] = [[] for _ in fns]
    ratios: list[list[float]] = [[] for _ in fns[1:]]
    for i in range(repeats):
        order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
        t = {k: _once(fns[k], device) for k in order}
        for k in range(len(fns)):
            times[k].append(t[k])
        for k in range(1, len(fns)):
            ratios[k - 1].append(t[0] / t[k])
    return [statistics.median(v) for v in times], [statistics.median(v) for v in ratios]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB one call of ``fn`` needs above what was in use before it (None where not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(0, max(peak[0], _rss()) - start) / 2**20


def cases(model: nn.Module, x: torch.Tensor, steps: int):
    from captum import attr as ca

    b = torch.zeros_like(x)
    t = nbattr.attribute(model, x, method="saliency").target
    yield ("IG gauss_legendre",
           lambda: nbattr.attribute(model, x, baseline=b, target=t, steps=steps, rule="gauss_legendre"),
           lambda: ca.IntegratedGradients(model).attribute(x, b, target=t, n_steps=steps, method="gausslegendre"),
           lambda: ca.IntegratedGradients(model).attribute(x, b, target=t, n_steps=steps, method="gausslegendre",
                                                           return_convergence_delta=True))
    yield ("IG riemann_right",
           lambda: nbattr.attribute(model, x, baseline=b, target=t, steps=steps, rule="riemann_right"),
           lambda: ca.IntegratedGradients(model).attribute(x, b, target=t, n_steps=steps, method="riemann_right"),
           lambda: ca.IntegratedGradients(model).attribute(x, b, target=t, n_steps=steps, method="riemann_right",
                                                           return_convergence_delta=True))
    if "deeplift" in nbattr.methods():
        yield ("DeepLIFT rescale",
               lambda: nbattr.attribute(model, x, method="deeplift", baseline=b, target=t),
               lambda: ca.DeepLift(model).attribute(x, b, target=t),
               lambda: ca.DeepLift(model).attribute(x, b, target=t, return_convergence_delta=True))
    yield ("SmoothGrad (16 samples)",
           lambda: nbattr.attribute(model, x, method="smoothgrad", target=t, samples=16, noise_level=0.15),
           lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(
               x, nt_type="smoothgrad", nt_samples=16, stdevs=0.15, target=t, abs=False), None)
    w = max(1, x.shape[-1] // 8)
    win = (x.shape[1], w, w)
    yield (f"Occlusion ({x.shape[1]}x{w}x{w})",
           lambda: nbattr.attribute(model, x, method="occlusion", window=w, baseline=b, target=t),
           lambda: ca.Occlusion(model).attribute(x, sliding_window_shapes=win, strides=win, baselines=0,
                                                 target=t), None)
    # Several classes per example (Captum #612): nbattr takes target="top5" in one call (IG: one
    # forward per path point and 5 backward passes; occlusion: the forwards of one class), Captum
    # one call per class.
    t5 = nbattr.attribute(model, x, method="saliency", target="top5").target
    per_class = [t5[:, j].tolist() for j in range(t5.shape[1])]
    yield ("IG gauss_legendre, top-5",
           lambda: nbattr.attribute(model, x, baseline=b, target=t5, steps=steps, rule="gauss_legendre"),
           lambda: [ca.IntegratedGradients(model).attribute(x, b, target=c, n_steps=steps, method="gausslegendre")
                    for c in per_class],
           lambda: [ca.IntegratedGradients(model).attribute(x, b, target=c, n_steps=steps, method="gausslegendre",
                                                            return_convergence_delta=True) for c in per_class])
    yield ("Occlusion, top-5",
           lambda: nbattr.attribute(model, x, method="occlusion", window=w, baseline=b, target=t5),
           lambda: [ca.Occlusion(model).attribute(x, sliding_window_shapes=win, strides=win, baselines=0, target=c)
                    for c in per_class], None)


def floor_ratio(model: nn.Module, x: torch.Tensor, steps: int, repeats: int, device: torch.device,
                rule: str = "gauss_legendre") -> tuple[float, float]:
    """IG's time over its physical floor: ``steps`` times one forward + backward (the gradient with
    respect to the input only, as IG needs) on the same batch of N examples. Below 1 where IG's
    chunks of N x steps rows use the hardware better than N rows do (a GPU)."""
    t = nbattr.attribute(model, x, method="saliency").target
    rows = torch.arange(x.shape[0], device=x.device)

    def fwd_bwd() -> None:
        z = x.detach().clone().requires_grad_(True)
        torch.autograd.grad(model(z)[rows, t].sum(), z)

    def ig() -> None:
        nbattr.attribute(model, x, target=t, steps=steps, rule=rule)

    ig(), fwd_bwd()
    t_ig = statistics.median(_once(ig, device) for _ in range(repeats))
    t_fb = statistics.median(_once(fwd_bwd, device) for _ in range(max(repeats, 5)))
    return t_ig / (steps * t_fb), t_fb


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="small CNN only")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = [("small CNN, 4x3x64x64", small_cnn(), torch.rand(4, 3, 64, 64)),
              # one small image: the fixed cost of a call (first forward, the chunk that measures
              # memory, the guard) weighs most here
              ("small CNN, 1x3x32x32", small_cnn(), torch.rand(1, 3, 32, 32))]
    if not args.quick:
        try:
            from nbattr.demo import imagenet_model, photo

            x = torch.stack([photo("chelsea"), photo("coffee")])
            models.append(("EfficientNet-Lite0, 2x3x224x224", imagenet_model(), x))
        except ImportError as e:
            print(f"(skipping EfficientNet-Lite0: {e})")
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"steps={args.steps} repeats={args.repeats}")
    mem = "peak MiB (CUDA allocated)" if device.type == "cuda" else "peak MiB (RSS rise, sampled)"
    print(f"{'model':34s} {'method':26s} {'nbattr s':>9s} {'captum s':>9s} {'ratio':>6s} "
          f"{'+delta s':>9s} {'ratio':>6s}   {mem}: nbattr, captum")
    print("(+delta: Captum with return_convergence_delta=True, the completeness error every nbattr "
          "result carries)")
    for name, model, x in models:
        model, x = model.to(device), x.to(device)
        for label, ours, theirs, theirs_delta in cases(model, x, args.steps):
            fns = [ours, theirs] + ([theirs_delta] if theirs_delta is not None else [])
            (to, tc, *td), (ratio, *rd) = timed_rounds(fns, args.repeats, device)
            mo, mc = peak_memory(ours, device), peak_memory(theirs, device)
            ms = "n/a" if mo is None or mc is None else f"{mo:8.1f} {mc:8.1f}"
            vs_delta = f"{td[0]:9.3f} {rd[0]:6.2f}" if td else f"{'-':>9s} {'-':>6s}"
            print(f"{name:34s} {label:26s} {to:9.3f} {tc:9.3f} {ratio:6.2f} {vs_delta}   {ms}", flush=True)
        fr, t_fb = floor_ratio(model, x, args.steps, args.repeats, device)
        print(f"{name:34s} IG time / ({args.steps} x one forward+backward at N={x.shape[0]}, "
              f"{t_fb * 1000:.1f} ms) = {fr:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
