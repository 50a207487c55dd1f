"""How many gradient evaluations each quadrature rule of integrated gradients needs.

For every rule (``riemann_right`` -- DeepExplain's --, ``riemann_left``, ``riemann_middle``,
``riemann_trapezoid``, ``gauss_legendre``) and for ``steps="auto"``, prints the number of
gradient evaluations per example needed to reach |delta| <= 1% and <= 0.1% of |F(x) - F(x')|,
on (a) saturating analytic networks and (b) EfficientNet-Lite0 on two photos (baseline zeros).

A fixed rule with S points needs S gradients. Its count is the smallest S among the candidates
from which the tolerance holds for EVERY larger candidate (a lucky S where the error crosses
zero does not count: a user cannot know it in advance); ``>M`` means not reached up to M. The
delta of a fixed rule only needs the path derivative f'(a) = grad F(x' + a (x - x')) . (x - x')
at its nodes, so every rule is evaluated from one cache of f' values (the same sums nbattr
computes; one is cross-checked against ``nbattr.attribute``). On the photos the candidates are
the divisors of 3 * 2^grid (1, 2, 3, 4, 6, 8, 12, ..., 96 for grid 5): a count there is an upper
bound, the true one lies above the previous candidate. ``auto`` is
``nbattr.attribute(..., steps="auto", tol=...)`` itself (its default scheme, Clenshaw-Curtis),
its gradients counted by a wrapper around the model. ``--sims`` replays other nested schemes on
the same cached f' (adaptive trapezoid and Simpson panels need the score F at their nodes,
which every gradient evaluation also gives): how the default of ``steps="auto"`` was chosen.

    python benchmarks/bench_convergence.py [--quick] [--grid 5] [--no-images]

``--quick``: smaller analytic cases and 112x112 photos. A script, not a test.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

import nbattr
from nbattr.engine.paths import quadrature

RULES = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gauss_legendre")
TOLS = (1e-2, 1e-3)


class Curve:
    """The score F and path derivative f' along x' + a (x - x') of one example, cached by a."""

    def __init__(self, model: nn.Module, x: torch.Tensor, b: torch.Tensor, target: int, chunk: int) -> None:
        self.model, self.x, self.b, self.t, self.chunk = model, x, b, target, chunk
        self.diff = x - b
        self.cache: dict[float, tuple[float, float]] = {}
        with torch.no_grad():
            self.f1 = float(model(x[None])[0, target])
            self.f0 = float(model(b[None])[0, target])
        self.gap = self.f1 - self.f0
        self.evaluated = 0

    def __call__(self, alphas) -> tuple[np.ndarray, np.ndarray]:
        alphas = [float(a) for a in alphas]
        new = sorted({a for a in alphas if a not in self.cache})
        for i in range(0, len(new), self.chunk):
            a = torch.tensor(new[i:i + self.chunk], dtype=self.x.dtype)
            z = (self.b[None] + a.view(-1, *([1] * self.x.dim())) * self.diff[None]).requires_grad_(True)
            s = self.model(z)[:, self.t]
            (g,) = torch.autograd.grad(s.sum(), z)
            fp = (g.double() * self.diff.double()[None]).flatten(1).sum(1)
            for aa, ff, pp in zip(new[i:i + self.chunk], s.detach().double().tolist(), fp.tolist()):
                self.cache[aa] = (ff, pp)
        self.evaluated += len(new)
        f = np.array([self.cache[a][0] for a in alphas])
        fp = np.array([self.cache[a][1] for a in alphas])
        return f, fp

    def score(self, a: float) -> float:
        """F at a, with the exact end values at 0 and 1 (what nbattr compares against)."""
        if a == 0.0:
            return self.f0
        if a == 1.0:
            return self.f1
        return self.cache[a][0]


def fixed_delta(c: Curve, rule: str, s: int) -> float:
    a, w = quadrature(rule, s)
    return float((w * c(a)[1]).sum() - c.gap)


def needed(c: Curve, rule: str, tol: float, candidates: list[int]) -> str:
    ok = [abs(fixed_delta(c, rule, s)) <= tol * abs(c.gap) for s in candidates]
    if not ok[-1]:
        return f">{candidates[-1]}"
    k = len(ok)
    while k > 0 and ok[k - 1]:
        k -= 1
    return str(candidates[k])


# -- other adaptive schemes, replayed on the cached curve (scalar: delta needs f' and F only) ----
def sim_adaptive(c: Curve, tol: float, panel: str, first: int = 2, max_steps: int = 4097) -> int:
    """Bisection of trapezoid or Simpson panels by their exact local error (the scheme of auto)."""
    thr = tol * abs(c.gap)
    if panel == "simpson":
        panels = [(k / first, (k + 1) / first) for k in range(first)]
    else:
        panels = [(k / (2 * first), (k + 1) / (2 * first)) for k in range(2 * first)]
    nodes = {0.0, 1.0}

    def q(a: float, b: float) -> tuple[float, float]:
        fa, fb = c([a])[1][0], c([b])[1][0]
        if panel == "simpson":
            v = (b - a) / 6 * (fa + 4 * c([(a + b) / 2])[1][0] + fb)
        else:
            v = (b - a) / 2 * (fa + fb)
        return v, v - (c.score(b) - c.score(a))

    while True:
        for a, b in panels:
            nodes |= {a, b} | ({(a + b) / 2} if panel == "simpson" else set())
        errs = [q(a, b) for a, b in panels]
        if abs(sum(v for v, _ in errs) - c.gap) <= thr or len(nodes) >= max_steps:
            return len(nodes)
        crit = [abs(e) / (thr * (b - a)) for (_, e), (a, b) in zip(errs, panels)]
        worst = max(crit)
        new = []
        for (a, b), cr in zip(panels, crit):
            if cr > 1 or (cr == worst and worst <= 1):
                m = (a + b) / 2
                new += [(a, m), (m, b)]
            else:
                new.append((a, b))
        panels = new


def sim_romberg(c: Curve, tol: float, max_level: int = 12) -> int:
    """Dyadic trapezoid sums 2^k + 1 points with Richardson extrapolation (stops on R(k, k))."""
    tab: list[list[float]] = []
    for k in range(max_level + 1):
        a, w = quadrature("riemann_trapezoid", 2**k + 1)
        row = [float((w * c(a)[1]).sum())]
        for m in range(1, k + 1):
            row.append(row[m - 1] + (row[m - 1] - tab[k - 1][m - 1]) / (4**m - 1))
        tab.append(row)
        if k >= 2 and abs(row[-1] - c.gap) <= tol * abs(c.gap):
            return 2**k + 1
    return -(2**max_level + 1)


def sim_clenshaw_curtis(c: Curve, tol: float, max_level: int = 10) -> int:
    """Nested Clenshaw-Curtis rules on 2^k + 1 Chebyshev points of [0, 1]."""
    for k in range(2, max_level + 1):
        n = 2**k
        th = np.pi * np.arange(n + 1) / n
        w = np.zeros(n + 1)
        for i in range(n + 1):
            s = sum((1 if 2 * j == n else 2) / (4 * j * j - 1) * np.cos(2 * j * th[i]) for j in range(1, n // 2 + 1))
            w[i] = (1 if i in (0, n) else 2) / n * (1 - s)
        if abs(float((w / 2 * c((1 - np.cos(th)) / 2)[1]).sum()) - c.gap) <= tol * abs(c.gap):
            return n + 1
    return -(2**max_level + 1)


class Counting(nn.Module):
    """Counts the rows the model sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


AUTO_MAX_STEPS = 1025


def auto_count(model: nn.Module, x: torch.Tensor, b: torch.Tensor, t: int, tol: float) -> tuple[int, float]:
    cm = Counting(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = nbattr.attribute(cm, x[None], baseline=b[None], target=t, steps="auto", tol=tol,
                           max_steps=AUTO_MAX_STEPS)
    used = r.params["steps"][0]
    assert cm.rows == used + 2, (cm.rows, used)  # + the forward at x and at the baseline
    gap = float(r.outputs[0] - r.baseline_outputs[0])
    return used, abs(float(r.delta[0])) / abs(gap)


# -- the cases ------------------------------------------------------------------------------
def deep_mlp(act: type[nn.Module], seed: int, gain: float, depth: int = 4, width: int = 32, d: int = 16):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan = d
    for _ in range(depth):
        lin = nn.Linear(fan, width)
        nn.init.normal_(lin.weight, std=gain / math.sqrt(fan))
        nn.init.normal_(lin.bias, std=0.5)
        layers += [lin, act()]
        fan = width
    layers.append(nn.Linear(fan, 5))
    return nn.Sequential(*layers).double().eval()


class TanhSum(nn.Module):
    """F(x) = sum tanh(10 x) (one class); saturates once |x| > 0.2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(10 * x).sum(1, keepdim=True)


def analytic_cases(quick: bool):
    torch.manual_seed(0)
    n = 2 if quick else 4
    x = torch.rand(n, 16) * 0.8 + 0.2
    yield "sum tanh(10x), x'=0", TanhSum().double(), x.double(), torch.zeros(n, 16).double()
    yield "sum tanh(10x), x'=-0.1", TanhSum().double(), x.double(), torch.full((n, 16), -0.1).double()
    for gain, act in ((4.0, nn.Tanh), (8.0, nn.Sigmoid)):
        m = deep_mlp(act, 1, gain)
        xs = torch.randn(n, 16).double()
        yield f"deep {act.__name__} MLP gain {gain:g}", m, xs, torch.zeros_like(xs)


def report(label: str, c: Curve, candidates: dict[str, list[int]], model, x, b, t, sims: bool) -> list[str]:
    rows = []
    for tol in TOLS:
        cells = [needed(c, rule, tol, candidates[rule]) for rule in RULES]
        used, err = auto_count(model, x, b, t, tol)
        right = cells[0]
        if err > tol:
            used_s = f">{used - 1}"
        else:
            used_s = str(used)
        ratio = (f"{used / int(right):.2f}" if right.isdigit() else f"<{used / int(right[1:]):.2f}")
        line = f"{label:34s} {tol:6.1%} " + " ".join(f"{v:>8s}" for v in cells) + f" {used_s:>6s} {ratio:>10s}"
        if sims:
            line += (f"   sim: trap {sim_adaptive(c, tol, 'trapezoid')}, simpson {sim_adaptive(c, tol, 'simpson')},"
                     f" romberg {sim_romberg(c, tol)}, CC {sim_clenshaw_curtis(c, tol)}")
        rows.append(line)
        print(line, flush=True)
    return rows


def header() -> None:
    print(f"{'case / example':34s} {'tol':>6s} " + " ".join(f"{r.replace('riemann_', ''):>8s}" for r in RULES)
          + f" {'auto':>6s} {'auto/right':>10s}")


def main() -> int:
    global AUTO_MAX_STEPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer analytic examples, 112x112 photos")
    ap.add_argument("--grid", type=int, default=5,
                    help="photos: fixed rules on S | 3*2^grid (S - 1 for trapezoid), from one cached grid")
    ap.add_argument("--no-images", action="store_true")
    ap.add_argument("--no-analytic", action="store_true")
    ap.add_argument("--sims", action="store_true", help="also replay other adaptive schemes")
    ap.add_argument("--auto-max-steps", type=int, default=AUTO_MAX_STEPS, help="max_steps of auto")
    ap.add_argument("--gl-max", type=int, default=48, help="photos: largest Gauss-Legendre S tried")
    args = ap.parse_args()
    AUTO_MAX_STEPS = args.auto_max_steps
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print("gradient evaluations per example to reach |delta| <= tol |F(x) - F(x')| "
          "(fixed rules: from there on for every larger candidate S)")
    header()
    t0 = time.time()
    s_max = 256 if args.quick else 1024
    # every S up to 64, then steps of about 5%
    big_s = sorted({int(round(64 * 1.05**k)) for k in range(int(math.log(s_max / 64) / math.log(1.05)) + 2)})
    cand = {r: [s for s in range(2 if r == "riemann_trapezoid" else 1, 65)] + [s for s in big_s if 64 < s <= s_max]
            for r in RULES}
    cand["gauss_legendre"] = list(range(1, 129))
    for name, model, x, b in ([] if args.no_analytic else analytic_cases(args.quick)):
        for i in range(x.shape[0]):
            with torch.no_grad():
                t = int(model(x[i:i + 1]).argmax(1))
            c = Curve(model, x[i], b[i], t, chunk=4096)
            report(f"{name} [{i}]", c, cand, model, x[i], b[i], t, args.sims)
    print(f"(analytic: {time.time() - t0:.1f} s)")
    if args.no_images:
        return 0
    try:
        from nbattr.demo import imagenet_model, photo
    except ImportError as e:
        print(f"(skipping EfficientNet-Lite0: {e})")
        return 0
    model = imagenet_model()
    size = 112 if args.quick else 224
    big = 3 * 2**args.grid
    divisors = [s for s in range(1, big + 1) if big % s == 0]
    cand_img = {r: divisors for r in RULES}
    cand_img["riemann_trapezoid"] = [s + 1 for s in divisors]
    cand_img["gauss_legendre"] = [s for s in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
                                  if s <= min(big, args.gl_max)]
    for name in ("chelsea", "coffee"):
        t1 = time.time()
        x = photo(name)
        if size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
        b = torch.zeros_like(x)
        with torch.no_grad():
            t = int(model(x[None]).argmax(1))
        c = Curve(model, x, b, t, chunk=16)
        c(np.arange(2 * big + 1) / (2 * big))  # the shared grid: every Riemann/trapezoid candidate's nodes
        # cross-check the cached sums against nbattr itself for one rule
        r = nbattr.attribute(model, x[None], baseline=b[None], target=t, steps=8, rule="riemann_middle")
        assert abs(float(r.delta[0]) - fixed_delta(c, "riemann_middle", 8)) < 1e-3 * abs(c.gap), "cache mismatch"
        report(f"EfficientNet-Lite0 {name} {size}px", c, cand_img, model, x, b, t, args.sims)
        print(f"({name}: {time.time() - t1:.1f} s, F(x) - F(x') = {c.gap:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
