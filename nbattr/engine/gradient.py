"""Gradient methods: saliency, gradient x input, integrated and interior gradients, SmoothGrad.

Integrated gradients, interior gradients and the score curve along the path come from one
batched pass over (path points x examples): the widget's alpha animation depends on it.

Several targets per example (a problem with ``p.multi``): every method here computes them
natively, from ONE forward per point and K backward passes batched with
``torch.autograd.grad(..., is_grads_batched=True)`` (see :func:`problem.score_gradient`); the
results carry a K axis after N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .batching import warn
from .errors import BaselineJumpWarning, CoarseDeltaWarning, InputError, MaxStepsWarning
from .paths import clenshaw_curtis, quadrature
from .problem import Problem, accumulation_dtype, score_gradient
from .registry import measures_first_forward, multi_target, register


def _per_target(p: Problem, t: Tensor) -> Tensor:
    """``(N, ...)`` -> ``(N, 1, ...)`` for a multi-target problem, so that it broadcasts over K."""
    return t.unsqueeze(1) if p.multi else t


def _col(v: Tensor, like: Tensor) -> Tensor:
    """A ``(M,)`` vector shaped to broadcast against ``like`` ``(M, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _grad_shape(p: Problem) -> tuple[int, ...]:
    return (p.n, p.k, *p.inputs.shape[1:]) if p.multi else tuple(p.inputs.shape)


def _plain_gradient(p: Problem) -> Tensor:
    first = p.take_first_graph()  # a few examples: the problem's first forward kept its graph
    if first is not None:
        return score_gradient(first[1], first[0])
    grads = torch.empty(_grad_shape(p), dtype=p.inputs.dtype, device=p.device)

    def points(idx: Tensor) -> tuple[Tensor, Tensor]:
        return p.inputs[idx], idx

    def consume(idx: Tensor, _rows: Tensor, _s: Tensor, g: Tensor) -> None:
        grads[idx] = g

    p.gradient_pass(p.n, points, consume)
    return grads


@register("saliency", "Absolute gradient of the target score (Simonyan et al. 2014); abs=False keeps the sign.")
@multi_target
def saliency(p: Problem, *, abs: bool = True) -> object:  # noqa: A002 - the option's public name
    g = _plain_gradient(p)
    return p.result("saliency", g.abs() if abs else g, params={"abs": abs})


saliency.keep_first_graph = True  # type: ignore[attr-defined]  # see Problem.first_graph


@register(
    "gradient_x_input",
    "Input-layer gradient times the input (Shrikumar et al. 2016; Ancona et al. 2018).",
    multiplies_by_inputs=True,
)
@multi_target
def gradient_x_input(p: Problem) -> object:
    return p.result("gradient_x_input", _plain_gradient(p) * _per_target(p, p.inputs))


gradient_x_input.keep_first_graph = True  # type: ignore[attr-defined]


class PathPass:
    """Gradients at x' + alpha (x - x') for every (alpha, example), in one chunked pass.

    Rows are ordered alpha-major: flat index i is alpha ``i // N`` and example ``i % N``.
    ``path`` replaces the straight line by a custom ``path(alpha) -> (N, ...)`` whose derivative
    in alpha is taken by forward-mode autodiff.
    """

    def __init__(self, p: Problem, alphas: Tensor, weights: Tensor, keep: bool,
                 path: Callable[[Tensor], Tensor] | None = None) -> None:
        self.p, self.alphas, self.weights, self.keep, self.path = p, alphas, weights, keep, path
        s = alphas.shape[0]
        shape = _grad_shape(p)  # (N, ...) or (N, K, ...)
        # sum_k w_k grad_k (* dgamma_k)
        self.integral = torch.zeros(shape, dtype=accumulation_dtype(p.inputs.dtype), device=p.device)
        self.scores = torch.empty(s, *p.outputs.shape, dtype=p.outputs.dtype, device=p.device)
        self.grads = torch.empty(s, *shape, dtype=p.inputs.dtype, device=p.device) if keep else None
        self._chunk_derivative: Tensor | None = None
        if path is None:
            self.diff = p.inputs - p.baselines

    def _custom_points(self, k: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(alpha_k)[row] and d gamma / d alpha for each (k, row) of a chunk."""
        return custom_path_points(self.p, self.path, self.alphas[k], rows)

    def run(self) -> None:
        p, n = self.p, self.p.n

        def points(idx: Tensor) -> tuple[Tensor, Tensor]:
            k, rows = idx // n, idx % n
            if self.path is None:
                z = p.baselines[rows] + p.expand(self.alphas[k], len(idx)) * self.diff[rows]
            else:
                z, self._chunk_derivative = self._custom_points(k, rows)
            return z, rows

        def consume(idx: Tensor, rows: Tensor, s: Tensor, g: Tensor) -> None:
            k = idx // n
            self.scores[k, rows] = s
            if self.keep:
                self.grads[k, rows] = g
            g = g.to(self.integral.dtype)  # (a no-op but for the half precisions)
            w = _col(self.weights[k], g)
            if self.path is not None:
                g = g * _per_target(p, self._chunk_derivative)
            self.integral.index_add_(0, rows, g * w)

        p.gradient_pass(self.alphas.shape[0] * n, points, consume)

    def endpoint_outputs(self) -> dict[str, Tensor]:
        """``{"baseline_outputs": F(x')}`` from the path's own scores when its first point is
        alpha = 0 (the point is x' exactly: trapezoid, left Riemann, the widget's frames), so the
        result needs no forward pass at the baselines; else empty."""
        if self.path is None and float(self.alphas[0]) == 0.0:
            return {"baseline_outputs": self.scores[0]}
        return {}


def custom_path_points(p: Problem, path: Callable[[Tensor], Tensor], alphas: Tensor,
                       rows: Tensor) -> tuple[Tensor, Tensor]:
    """``path(alpha)[row]`` and ``d path / d alpha`` (forward-mode) for each (alpha, row) pair."""
    shape = (len(rows), *p.inputs.shape[1:])
    val = torch.empty(shape, dtype=p.inputs.dtype, device=p.device)
    der = torch.empty_like(val)
    uniq, inv = torch.unique(alphas, return_inverse=True)
    for u in range(len(uniq)):
        a = uniq[u].clone()
        try:
            v, d = torch.func.jvp(path, (a,), (torch.ones_like(a),))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"path(alpha) must be a differentiable torch function of alpha "
                             f"returning an (N, ...) tensor: {e}") from e
        if v.shape != p.inputs.shape:
            raise InputError(f"path(alpha) returned shape {tuple(v.shape)}, expected "
                             f"{tuple(p.inputs.shape)}")
        m = inv == u
        val[m] = v.detach().to(val.dtype)[rows[m]]
        der[m] = d.detach().to(val.dtype)[rows[m]]
    return val, der


def _nodes(p: Problem, rule: str, steps: int) -> tuple[Tensor, Tensor]:
    a, w = quadrature(rule, steps)
    return (torch.as_tensor(a, dtype=p.inputs.dtype, device=p.device),
            torch.as_tensor(w, dtype=accumulation_dtype(p.inputs.dtype), device=p.device))


#: ``steps="auto"``: default tolerance on |delta| relative to |F(x) - F(x')|
AUTO_TOL = 1e-3
#: ``steps="auto"``: default most gradient evaluations per example
AUTO_MAX_STEPS = 257
#: ``steps="auto"``: the first grid has 2 * AUTO_FIRST_PANELS + 1 = 5 points
AUTO_FIRST_PANELS = 2
#: ``steps="auto"``: when F(x) ~ F(x'), |delta| may also reach tol times this fraction of max(|F(x)|, |F(x')|)
AUTO_FLOOR = 1e-2
#: ``steps="auto"``: the nested schemes, the default first; ``rule=`` picks one
AUTO_RULES = ("clenshaw_curtis", "adaptive_simpson")
#: |delta| below this many units of rounding (eps of the scores' dtype) of max(|F(x)|, |F(x')|) is
#: rounding, not quadrature error: the floor of ``steps="auto"``'s goal and of the coarse warning
#: (it matters for the half precisions: 8 eps is 3% of |F| in bfloat16, 1e-6 of it in float32)
ROUNDING_ULPS = 8


class AdaptivePath:
    """Integrated gradients with the step count chosen per example (``steps="auto"``).

    Every example stops as soon as ``|delta| <= thr`` with ``thr = tol * max(|F(x) - F(x')|,
    AUTO_FLOOR * max(|F(x)|, |F(x')|))`` (the floor keeps the goal reachable when F(x) ~ F(x')),
    or when its next refinement would exceed ``max_steps`` gradients (a warning names it). Each
    round, the new points of all examples that have not converged go through one chunked
    gradient pass; every gradient already computed is reused (the rules are nested). The check
    needs no extra model call: ``delta`` is the quadrature of the path derivative
    f'(alpha) = grad F(gamma(alpha)) . gamma'(alpha) minus F(x) - F(x'), both known.

    ``clenshaw_curtis`` (the default): the Clenshaw-Curtis rule on the n + 1 points
    (1 - cos(pi j / n)) / 2, n = 4, 8, 16, ... (5, 9, 17, 33, 65, 129, 257 gradients); doubling n
    keeps every old point. Positive weights, near Gauss-Legendre accuracy on smooth paths, and
    points crowded at both ends, where an image's score usually changes fastest (near the black
    baseline) or saturates.

    ``adaptive_simpson``: composite Simpson panels [a, b] (nodes a, (a+b)/2, b), bisected where
    needed. Each panel has an *exact* local check, since f' integrates over [a, b] to
    F(gamma(b)) - F(gamma(a)) and every node's score comes with its gradient: a round bisects each
    panel with |e| > thr (b - a), worst first (at least the worst one), 2 new gradients per
    bisection. It places points where the summed integrand is hard, which can leave the
    per-feature integrals less accurate than the sum when their errors cancel.

    Why Clenshaw-Curtis is the default (``benchmarks/bench_convergence.py --sims``): on
    EfficientNet-Lite0 it needed half the gradients of adaptive Simpson and of every fixed rule
    for 1% (chelsea: 33 vs 65, right Riemann >= 96); on saturating analytic networks the two
    are close (Simpson's finer granularity wins some cases), and Clenshaw-Curtis's per-feature
    errors were far smaller (sum tanh(10 x): 1e-4 vs 8e-3 at tol 1e-3); trapezoid panels and
    Romberg needed more.

    With K targets per example all K share the nodes; an example stops when all K targets meet
    their threshold (a Simpson panel is bisected if any target needs it). Memory: the gradient at
    every node is kept until the end (refinement changes the weights of old nodes), about
    ``sum(steps) x`` the size of one example, as with ``keep_path=True``.
    """

    def __init__(self, p: Problem, tol: float, max_steps: int, keep: bool,
                 path: Callable[[Tensor], Tensor] | None, baseline_outputs: Tensor | None,
                 scheme: str = AUTO_RULES[0]) -> None:
        self.p, self.tol, self.max_steps, self.keep, self.path = p, tol, max_steps, keep, path
        self.scheme = scheme
        self.diff = p.inputs - p.baselines if path is None else None
        #: F(x'): given, or (None) the scores at alpha = 0, which every first grid has (the point
        #: is x' exactly, so no forward pass at the baselines is needed)
        self.baseline_outputs = baseline_outputs
        self._derived = baseline_outputs is None
        self.gap = self.thr = None
        if baseline_outputs is not None:
            self._set_gap(baseline_outputs)
        # per example: alpha -> (round, position); alpha -> score (K,) and path derivative (K,)
        self.where: list[dict[float, tuple[int, int]]] = [{} for _ in range(p.n)]
        self.score: list[dict[float, np.ndarray]] = [{} for _ in range(p.n)]
        self.fprime: list[dict[float, np.ndarray]] = [{} for _ in range(p.n)]
        self.panels: list[list[tuple[float, float]]] = [[] for _ in range(p.n)]
        self.rounds: list[dict[str, Tensor | None]] = []
        self.chunks: list[int] = []
        self.delta = np.full((p.n, p.outputs.reshape(p.n, -1).shape[1]), np.nan)

    def _set_gap(self, baseline_outputs: Tensor) -> None:
        n = self.p.n
        self.gap = (self.p.outputs.double() - baseline_outputs.double()).cpu().reshape(n, -1).numpy()  # (N, K)
        scale, rounding = _scales(self.p.outputs, baseline_outputs)
        self.thr = np.maximum(self.tol * scale.cpu().reshape(n, -1).numpy(), rounding.cpu().reshape(n, -1).numpy())

    # -- one gradient pass over the new (alpha, example) pairs of a round ----------------------
    def _evaluate(self, alphas: list[float], rows: list[int]) -> None:
        p, r = self.p, len(self.rounds)
        m = len(alphas)
        a_t = torch.tensor(alphas, dtype=p.inputs.dtype, device=p.device)
        rows_t = torch.tensor(rows, dtype=torch.long, device=p.device)
        shape = _grad_shape(p)[1:]
        grads = torch.empty((m, *shape), dtype=p.inputs.dtype, device=p.device)
        ders = torch.empty((m, *p.inputs.shape[1:]), dtype=p.inputs.dtype, device=p.device) if self.path else None
        scores = torch.empty((m, *p.outputs.shape[1:]), dtype=p.outputs.dtype, device=p.device)
        acc = accumulation_dtype(p.inputs.dtype)
        fprime = torch.empty_like(scores, dtype=acc)

        def points(idx: Tensor) -> tuple[Tensor, Tensor]:
            rr = rows_t[idx]
            if self.path is None:
                z = p.baselines[rr] + _col(a_t[idx], self.diff[rr]) * self.diff[rr]
            else:
                z, ders[idx] = custom_path_points(p, self.path, a_t[idx], rr)
            return z, rr

        def consume(idx: Tensor, rr: Tensor, sc: Tensor, g: Tensor) -> None:
            scores[idx] = sc
            grads[idx] = g
            direction = self.diff[rr] if self.path is None else ders[idx]
            fprime[idx] = (g.to(acc) * _per_target(p, direction)).flatten(2 if p.multi else 1).sum(-1)

        p.stats.pop("chunks", None)
        p.gradient_pass(m, points, consume, reuse_probe=True)
        self.chunks.extend(p.stats.get("chunks", []))
        self.rounds.append({"alphas": a_t, "keys": list(alphas), "rows": rows_t, "grads": grads, "ders": ders,
                            "scores": scores})
        sc_np = scores.double().cpu().reshape(m, -1).numpy()
        fp_np = fprime.double().cpu().reshape(m, -1).numpy()
        for j, (a, i) in enumerate(zip(alphas, rows)):
            self.where[i][a] = (r, j)
            self.score[i][a] = sc_np[j]
            self.fprime[i][a] = fp_np[j]
        if self.gap is None:  # the first round: F(x') is its score at alpha = 0
            at0 = {i: j for j, (a, i) in enumerate(zip(alphas, rows)) if a == 0.0}
            self.baseline_outputs = scores[torch.tensor([at0[i] for i in range(p.n)], device=p.device)]
            self._set_gap(self.baseline_outputs)

    def _panel(self, i: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
        """Simpson's value of the integral of f' on [a, b] and its exact error, each (K,)."""
        f = self.fprime[i]
        q = (b - a) / 6.0 * (f[a] + 4.0 * f[(a + b) / 2.0] + f[b])
        return q, q - (self.score[i][b] - self.score[i][a])

    def run(self) -> None:
        if self.scheme == "clenshaw_curtis":
            self._run_clenshaw_curtis()
            return
        n0 = AUTO_FIRST_PANELS
        grid = [k / (2 * n0) for k in range(2 * n0 + 1)]
        active = list(range(self.p.n))
        for i in active:
            self.panels[i] = [(grid[2 * k], grid[2 * k + 2]) for k in range(n0)]
        self._refine({i: list(grid) for i in active}, self._bisect)

    def _refine(self, pending: dict[int, list[float]], step: Callable[[int], list[float] | None]) -> None:
        """Evaluate the ``pending`` nodes of each example, then ask ``step(i)`` for example ``i``'s
        next nodes (None: converged or at ``max_steps``, which ``step`` records); until none are left."""
        self.hit_max: list[int] = []
        while pending:
            alphas = [a for i in sorted(pending) for a in pending[i]]
            rows = [i for i in sorted(pending) for _ in pending[i]]
            self._evaluate(alphas, rows)
            nxt: dict[int, list[float]] = {}
            for i in sorted(pending):
                new = step(i)
                if new is not None:
                    nxt[i] = new
            pending = nxt

    def _bisect(self, i: int) -> list[float] | None:
        """Simpson's step for :meth:`_refine`: bisect the panels of example ``i`` whose error
        exceeds their share of the threshold, worst first; the new nodes."""
        errs = [self._panel(i, a, b) for a, b in self.panels[i]]
        self.delta[i] = sum(q for q, _ in errs) - self.gap[i]
        if np.all(np.abs(self.delta[i]) <= self.thr[i]):
            return None
        crit = [float(np.max(np.abs(e) / (self.thr[i] * (b - a) + 1e-300)))
                for (_, e), (a, b) in zip(errs, self.panels[i])]
        order = sorted(range(len(crit)), key=lambda j: -crit[j])
        chosen = [j for j in order if crit[j] > 1.0] or order[:1]
        room = (self.max_steps - len(self.where[i])) // 2
        chosen = chosen[:room]
        if not chosen:
            self.hit_max.append(i)
            return None
        new_panels, new_points = [], []
        split = set(chosen)
        for j, (a, b) in enumerate(self.panels[i]):
            if j in split:
                m = (a + b) / 2.0
                new_panels += [(a, m), (m, b)]
                new_points += [(a + m) / 2.0, (m + b) / 2.0]
            else:
                new_panels.append((a, b))
        self.panels[i] = new_panels
        return new_points

    def _run_clenshaw_curtis(self) -> None:
        """Nested Clenshaw-Curtis rules on n + 1 points, n = 4, 8, 16, ...: each round adds the n
        new points of the rule on 2n to the examples that have not converged."""
        n0 = 2 * AUTO_FIRST_PANELS
        self.level = [n0] * self.p.n
        self._refine({i: clenshaw_curtis(n0)[0].tolist() for i in range(self.p.n)}, self._double)

    def _double(self, i: int) -> list[float] | None:
        """Clenshaw-Curtis step for :meth:`_refine`: example ``i``'s rule from n + 1 to 2n + 1 points;
        the n new nodes."""
        a, w = clenshaw_curtis(self.level[i])
        self.delta[i] = sum(wj * self.fprime[i][aj] for aj, wj in zip(a.tolist(), w.tolist())) - self.gap[i]
        if np.all(np.abs(self.delta[i]) <= self.thr[i]):
            return None
        if 2 * self.level[i] + 1 > self.max_steps:
            self.hit_max.append(i)
            return None
        self.level[i] *= 2
        return clenshaw_curtis(self.level[i])[0][1::2].tolist()

    def slope0(self) -> Tensor:
        """The path derivative f'(0) of each example (``(N,)`` or ``(N, K)``): every scheme has alpha = 0."""
        v = np.stack([self.fprime[i][0.0] for i in range(self.p.n)])  # (N, K)
        return torch.as_tensor(v).reshape(self.p.outputs.shape)

    def weights(self, i: int) -> dict[float, float]:
        """Quadrature weight of each node of example ``i`` (they sum to 1)."""
        if self.scheme == "clenshaw_curtis":
            a, w = clenshaw_curtis(self.level[i])
            return dict(zip(a.tolist(), w.tolist()))
        w: dict[float, float] = {}
        for a, b in self.panels[i]:
            h = (b - a) / 6.0
            for node, c in ((a, h), ((a + b) / 2.0, 4.0 * h), (b, h)):
                w[node] = w.get(node, 0.0) + c
        return w

    def finish(self) -> tuple[Tensor, dict]:
        """The attributions and the result's path fields (alphas, path_outputs, path_gradients)."""
        p = self.p
        integral = torch.zeros(_grad_shape(p), dtype=accumulation_dtype(p.inputs.dtype), device=p.device)
        wr = [torch.zeros(len(rd["alphas"]), dtype=torch.float64) for rd in self.rounds]
        for i in range(p.n):
            for node, w in self.weights(i).items():
                r, j = self.where[i][node]
                wr[r][j] = w
        for rd, w in zip(self.rounds, wr):
            g = rd["grads"].to(integral.dtype)
            if self.path is not None:
                g = g * _per_target(p, rd["ders"])
            integral.index_add_(0, rd["rows"], g * _col(w.to(g.dtype).to(p.device), g))
        attributions = integral * _per_target(p, self.diff) if self.path is None else integral
        # the path data: the sorted union of the points used; NaN where an example has no point
        union = sorted({a for wh in self.where for a in wh})
        pos = {a: k for k, a in enumerate(union)}
        alphas = torch.tensor(union, dtype=p.inputs.dtype, device=p.device)
        path_outputs = torch.full((len(union), *p.outputs.shape), float("nan"), dtype=p.outputs.dtype,
                                  device=p.device)
        path_gradients = (torch.full((len(union), *_grad_shape(p)), float("nan"), dtype=p.inputs.dtype,
                                     device=p.device) if self.keep else None)
        for rd in self.rounds:
            k = torch.tensor([pos[a] for a in rd["keys"]], dtype=torch.long, device=p.device)
            path_outputs[k, rd["rows"]] = rd["scores"]
            if path_gradients is not None:
                path_gradients[k, rd["rows"]] = rd["grads"]
        fields = {"alphas": alphas, "path_outputs": path_outputs, "path_gradients": path_gradients}
        if self._derived:
            fields["baseline_outputs"] = self.baseline_outputs
        return attributions, fields


def _check_auto_options(steps: int | str, tol: float | None, max_steps: int | None) -> tuple[float, int]:
    if steps != "auto":
        if tol is not None or max_steps is not None:
            raise InputError("tol and max_steps apply to steps='auto' only; with a fixed number of steps "
                             f"(steps={steps!r}) leave them out")
        return AUTO_TOL, AUTO_MAX_STEPS
    tol = AUTO_TOL if tol is None else tol
    max_steps = AUTO_MAX_STEPS if max_steps is None else max_steps
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise InputError(f"tol must be a number in (0, 1) (|delta| relative to |F(x) - F(x')|), got {tol!r}")
    first = 2 * AUTO_FIRST_PANELS + 1
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < first:
        raise InputError(f"max_steps must be an int >= {first} (the first grid of steps='auto'), got {max_steps!r}")
    return float(tol), int(max_steps)


@register(
    "integrated_gradients",
    "(x - x') times the path integral of the gradient along x' + a(x - x') (Sundararajan et al. 2017).",
    completeness=True, needs_baseline=True, multiplies_by_inputs=True, path=True,
)
@multi_target
@measures_first_forward
def integrated_gradients(p: Problem, *, steps: int | str = 50, rule: str = "gauss_legendre",
                         keep_path: bool = False, path: Callable[[Tensor], Tensor] | None = None,
                         tol: float | None = None, max_steps: int | None = None) -> object:
    """Integrated gradients with a fixed quadrature (``steps``, ``rule``) or ``steps="auto"``.

    ``steps="auto"`` refines a nested rule per example (``rule``: one of :data:`AUTO_RULES`) until
    |delta| <= tol * |F(x) - F(x')| (``tol`` default :data:`AUTO_TOL`) or ``max_steps`` gradients
    (default :data:`AUTO_MAX_STEPS`) are spent; see :class:`AdaptivePath`. The default rule name
    (``gauss_legendre``) then means the default scheme; another fixed rule is an error.
    ``params["steps"]`` lists the gradients each example used, ``params["converged"]``
    whether it met the tolerance; ``alphas`` is the sorted union of the points of all examples
    and ``path_outputs`` (``path_gradients``) hold NaN where an example has no point.
    """
    auto = steps == "auto"
    tol_, max_steps_ = _check_auto_options(steps, tol, max_steps)
    extra = {}
    if path is not None:
        ends = [path(torch.tensor(a, dtype=p.inputs.dtype, device=p.device)) for a in (0.0, 1.0)]
        for a, g in zip((0, 1), ends, strict=True):
            if not isinstance(g, Tensor) or g.shape != p.inputs.shape:
                got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise InputError(f"path({a}) returned {got}; path(alpha) must return a tensor shaped "
                                 f"like x, {tuple(p.inputs.shape)}")
        g0, g1 = (g.detach() for g in ends)
        if not torch.allclose(g1, p.inputs, rtol=1e-4, atol=1e-6):
            raise InputError("path(1) must equal the attributed input x")
        rows = torch.arange(p.n, device=p.device)
        with torch.no_grad():
            extra["baseline_outputs"] = p.forward(g0, rows)
        extra["baselines"] = g0
    path_name = "custom" if path is not None else "straight"
    if auto:
        if rule in AUTO_RULES:
            scheme = rule
        elif rule == "gauss_legendre":  # the default rule of attribute(): take the default scheme
            scheme = AUTO_RULES[0]
        else:
            raise InputError(f"steps='auto' refines one of the nested schemes {AUTO_RULES}; rule={rule!r} is "
                             "a fixed rule: give steps=<int> with it, or leave rule out")
        ad = AdaptivePath(p, tol_, max_steps_, keep_path, path, extra.get("baseline_outputs"), scheme)
        ad.run()
        attributions, fields = ad.finish()
        p.stats["chunks"] = ad.chunks
        params = {"steps": [len(w) for w in ad.where], "rule": scheme, "path": path_name, "tol": tol_,
                  "max_steps": max_steps_, "converged": [i not in ad.hit_max for i in range(p.n)],
                  "rounds": len(ad.rounds)}
        r = p.result("integrated_gradients", attributions, completeness=True, uses_baseline=True,
                     params=params, **fields, **extra)
        reached = r.delta.abs().reshape(p.n, -1).amax(1).tolist()
        r.params["delta_reached"] = reached
        if ad.hit_max:
            jumps = {i: j for i, j in baseline_jumps(r, ad.slope0()).items() if i in ad.hit_max}
            warn(
                f"integrated_gradients(steps='auto'): example(s) {sorted(ad.hit_max)} reached max_steps="
                f"{max_steps_} with |delta| above tol={tol_:g} x |F(x) - F(x')| (|delta| = "
                f"{', '.join(f'{reached[i]:.3g}' for i in sorted(ad.hit_max))}); raise max_steps or tol."
                + (_jump_advice(jumps) if jumps else ""), BaselineJumpWarning if jumps else MaxStepsWarning)
        return r
    alphas, weights = _nodes(p, rule, steps)
    pp = PathPass(p, alphas, weights, keep=keep_path, path=path)
    pp.run()
    attributions = _per_target(p, pp.diff) * pp.integral if path is None else pp.integral
    if path is None:
        extra.update(pp.endpoint_outputs())
    r = p.result(
        "integrated_gradients", attributions, completeness=True, uses_baseline=True,
        params={"steps": int(steps), "rule": rule, "path": path_name},
        alphas=alphas, path_outputs=pp.scores, path_gradients=pp.grads, **extra,
    )
    _warn_if_coarse(r, f"{int(steps)} {rule} steps", lambda: _slope_at_baseline(p, r) if path is None else None)
    return r


def _slope_at_baseline(p: Problem, r: Any) -> Tensor | None:
    """f'(0) = grad F(x') . (x - x') per example (and target), from the kept path gradients when the
    path starts at alpha = 0 (the widget's frames); else None (no extra model call for a warning)."""
    if r.path_gradients is None or float(r.alphas[0]) != 0.0:
        return None
    diff = _per_target(p, p.inputs - p.baselines)
    return (r.path_gradients[0] * diff).flatten(2 if p.multi else 1).sum(-1)


#: fixed steps: warn where |delta| exceeds this fraction of |F(x) - F(x')| (the widget's red mark)
COARSE_DELTA = 0.05


#: a jump at the baseline: at least this share of F(x) - F(x') between alpha = 0 and the first
#: path point when that point lies at alpha <= JUMP_ALPHA; or a path derivative at alpha = 0 that
#: would cover |F(x) - F(x')| within alpha = JUMP_WIDTH
JUMP_SHARE, JUMP_ALPHA, JUMP_WIDTH = 0.5, 0.02, 1e-3


def _scales(fx: Tensor, fb: Tensor) -> tuple[Tensor, Tensor]:
    """What |delta| is measured against (float64, shaped like the scores): max(|F(x) - F(x')|,
    AUTO_FLOOR max(|F(x)|, |F(x')|)), and the rounding below which it is not quadrature error
    (:data:`ROUNDING_ULPS` units of the scores' dtype of max(|F(x)|, |F(x')|))."""
    big = torch.maximum(fx.double().abs(), fb.double().abs())
    scale = torch.maximum((fx.double() - fb.double()).abs(), AUTO_FLOOR * big)
    return scale.clamp_min(torch.finfo(torch.float64).tiny), ROUNDING_ULPS * torch.finfo(fx.dtype).eps * big


def baseline_jumps(r: Any, slope0: Tensor | None = None) -> dict[int, float]:
    """Examples whose score jumps at the baseline, each with the alpha by which it has risen:
    ``{i: alpha}``. Either the first path point alpha_1 > 0 lies at alpha <= :data:`JUMP_ALPHA`
    and F there already differs from F(x') by :data:`JUMP_SHARE` of |F(x) - F(x')| or more
    (``alpha`` is alpha_1), or the path derivative at alpha = 0, ``slope0`` ``(N,)``/``(N, K)``
    when the path has that point, is so steep that it covers |F(x) - F(x')| within
    :data:`JUMP_WIDTH` (``alpha`` is |F(x) - F(x')| / |f'(0)|); worst over targets. A model that
    normalises an all-zero input (a zero embedding into an RMSNorm, a bias-free convolution into
    a GroupNorm) does this: the normalisation is scale-invariant for alpha > 0 and its gradient at
    alpha = 0 is ~1/sqrt(eps) per layer, so the score rises within alpha ~ sqrt(eps) / |x|. (On
    EfficientNet-Lite0 photos with black, blurred or noise baselines, |f'(0)| / |F(x) - F(x')| is
    0.02-3, far from 1 / JUMP_WIDTH.)"""
    a, po = r.alphas, r.path_outputs
    if a is None or po is None or r.baseline_outputs is None:
        return {}
    scale = _scales(r.outputs, r.baseline_outputs)[0]
    n = po.shape[1]
    out: dict[int, float] = {}
    if slope0 is not None:
        slope = slope0.to(device=scale.device, dtype=torch.float64).abs()  # (AdaptivePath's is on the CPU)
        width = (scale / slope.clamp_min(torch.finfo(torch.float64).tiny)).reshape(n, -1).amin(1)
        out.update({i: float(width[i]) for i in range(n) if float(width[i]) <= JUMP_WIDTH})
    share = ((po.double() - r.baseline_outputs.double()[None]).abs() / scale[None])
    share = share.reshape(po.shape[0], n, -1).amax(2)  # (S, N), NaN where an example has no point
    positive = (a > 0).tolist()
    for i in range(n):
        k = next((k for k, ok in enumerate(positive) if ok and torch.isfinite(share[k, i])), None)
        if i not in out and k is not None and float(a[k]) <= JUMP_ALPHA and float(share[k, i]) >= JUMP_SHARE:
            out[i] = float(a[k])
    return out


def _jump_advice(jumps: dict[int, float]) -> str:
    shown = ", ".join(f"#{i} by alpha ~ {a:.1g}" for i, a in list(jumps.items())[:8])
    return (f" The score jumps at the baseline (it covers F(x) - F(x') for example {shown}): the model is degenerate there "
            "(it normalises an all-zero input, for instance), and the path integral needs a great many points "
            "or does not converge. Choose another baseline ('blur', 'uniform', 'mean') or use DeepLIFT.")


def _warn_if_coarse(r: Any, what: str, slope0: Callable[[], Tensor | None] | None = None) -> None:
    """A warning naming the examples whose |delta| exceeds :data:`COARSE_DELTA` of |F(x) - F(x')|
    (with the floor of ``steps="auto"`` where F(x) ~ F(x')): a quadrature too coarse for the path,
    or a path that jumps at the baseline (:func:`baseline_jumps`)."""
    if r.delta is None or r.baseline_outputs is None:
        return
    scale, rounding = _scales(r.outputs, r.baseline_outputs)
    err = r.delta.double().abs()
    off = (err > torch.maximum(COARSE_DELTA * scale, rounding)).reshape(err.shape[0], -1)  # (N, K)
    worst = torch.where(off, (err / scale).reshape(off.shape), 0.0).amax(1)
    bad = off.any(1).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"#{i} {100 * float(worst[i]):.0f}%" for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        # all-zero attributions: no gradient at any path point, which no number of steps changes
        flat = r.attributions.reshape(off.shape[0], off.shape[1], -1)
        dead = [i for i in bad if bool(((flat[i] == 0).all(-1) & off[i]).any())]
        jumps = {i: j for i, j in baseline_jumps(r, slope0() if slope0 is not None else None).items()
                 if i in bad and i not in dead}
        if dead:
            advice = (f" The target score's gradient is zero at every path point for example(s) {dead[:8]}, yet "
                      "F(x) differs from F(x'): the score does not depend differentiably on x (x.detach(), "
                      "torch.no_grad(), argmax or rounding in the model), and more steps do not help; occlusion "
                      "or Shapley sampling need no gradient.")
        elif jumps:
            advice = _jump_advice(jumps)
        else:
            advice = " The score changes too sharply along the path for so few points: use steps='auto' or more steps."
        warn(f"integrated_gradients: |delta| is more than {100 * COARSE_DELTA:g}% of |F(x) - F(x')| with {what} (per example: {shown}).{advice}",
             BaselineJumpWarning if jumps else CoarseDeltaWarning)


@register(
    "interior_gradients",
    "Gradients at the scaled inputs x' + a(x - x') for a in (0, 1] (Sundararajan et al., eq. 3); "
    "shows saturation.",
    needs_baseline=True, path=True,
)
@multi_target
@measures_first_forward
def interior_gradients(p: Problem, *, steps: int = 50, rule: str = "gauss_legendre", alpha: float = 1.0,
                       multiply_by_inputs: bool = True) -> object:
    """Path gradients at every node of ``rule`` plus ``alpha``; ``attributions`` is the interior
    gradient at ``alpha`` (times x - x' unless ``multiply_by_inputs=False``)."""
    if steps == "auto":
        raise InputError("steps='auto' is for integrated_gradients (it refines until the completeness "
                         "error is small); give interior_gradients a number of steps")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    alphas, weights = _nodes(p, rule, steps)
    hit = torch.isclose(alphas, torch.tensor(float(alpha), dtype=alphas.dtype, device=alphas.device))
    if not hit.any():
        alphas = torch.cat([alphas, alphas.new_tensor([float(alpha)])])
        weights = torch.cat([weights, weights.new_zeros(1)])
        order = torch.argsort(alphas)
        alphas, weights = alphas[order], weights[order]
        hit = torch.isclose(alphas, alphas.new_tensor(float(alpha)))
    k = int(hit.nonzero()[0, 0])
    pp = PathPass(p, alphas, weights, keep=True)
    pp.run()
    attributions = pp.grads[k] * _per_target(p, pp.diff) if multiply_by_inputs else pp.grads[k].clone()
    return p.result(
        "interior_gradients", attributions, uses_baseline=True,
        params={"steps": int(steps), "rule": rule, "alpha": float(alphas[k]),
                "multiply_by_inputs": multiply_by_inputs},
        alphas=alphas, path_outputs=pp.scores, path_gradients=pp.grads, **pp.endpoint_outputs(),
    )


SMOOTHGRAD_VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")


@register(
    "smoothgrad",
    "Gradients averaged over noisy copies of x (Smilkov et al. 2017); variants smoothgrad_sq, vargrad.",
)
@multi_target
@measures_first_forward
def smoothgrad(p: Problem, *, samples: int = 50, noise_level: float = 0.15, variant: str = "smoothgrad",
               multiply_by_inputs: bool = False, seed: int = 0) -> object:
    """``noise_level`` is the noise's standard deviation as a fraction of each example's range.

    ``multiply_by_inputs``: each noisy copy's map is its gradient times that copy,
    ``grad F(x + e) * (x + e)`` (SmoothGrad applied to gradient x input, as Smilkov et al. 2017
    average any map M over M(x + e); Captum's ``NoiseTunnel(InputXGradient)``), and the variants
    average (or square, or take the variance of) those maps.

    ``stderr`` (variant ``"smoothgrad"``, ``samples`` >= 2): the standard error of the mean map
    over the noise samples; None for the ``smoothgrad_sq`` and ``vargrad`` variants (their error
    needs fourth moments)."""
    if variant not in SMOOTHGRAD_VARIANTS:
        raise InputError(f"unknown smoothgrad variant {variant!r}; choose one of {SMOOTHGRAD_VARIANTS}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise InputError(f"samples must be a positive int, got {samples!r}")
    if (not isinstance(noise_level, (int, float)) or isinstance(noise_level, bool)
            or not math.isfinite(noise_level) or noise_level < 0):
        raise InputError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    n, x = p.n, p.inputs
    flat = x.flatten(1)
    sigma = noise_level * (flat.max(1).values - flat.min(1).values)
    total1 = torch.zeros(_grad_shape(p), dtype=accumulation_dtype(x.dtype), device=p.device)
    total2 = torch.zeros_like(total1)

    def noise(k: int) -> Tensor:
        # Noise of sample k for all examples: the same whatever the chunking.
        g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + k)
        # drawn in float32 for the half precisions: the same noise, rounded, as for a float32 input
        return torch.randn(x.shape, generator=g, device=p.device, dtype=accumulation_dtype(x.dtype)).to(x.dtype)

    chunk_points: list[Tensor] = []  # the chunk's noisy copies, for multiply_by_inputs

    def points(idx: Tensor) -> tuple[Tensor, Tensor]:
        k, rows = idx // n, idx % n
        eps = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, device=p.device)
        for kk in k.unique().tolist():
            m = k == kk
            eps[m] = noise(kk)[rows[m]]
        z = x[rows] + p.expand(sigma[rows], len(idx)) * eps
        if multiply_by_inputs:
            chunk_points[:] = [z]
        return z, rows

    def consume(_idx: Tensor, rows: Tensor, _s: Tensor, g: Tensor) -> None:
        g = g.to(total1.dtype)
        if multiply_by_inputs:  # this copy's gradient x input
            g = g * _per_target(p, chunk_points.pop().to(total1.dtype))
        total1.index_add_(0, rows, g)
        total2.index_add_(0, rows, g * g)

    p.gradient_pass(samples * n, points, consume)
    mean1, mean2 = total1 / samples, total2 / samples
    spread = (mean2 - mean1 * mean1).clamp_min(0)  # the maps' variance over the noise (1/samples)
    out = {"smoothgrad": mean1, "smoothgrad_sq": mean2, "vargrad": spread}[variant]
    # the mean's standard error: sample variance / samples (below ~sqrt(eps) |mean| it is rounding)
    stderr = (spread / (samples - 1)).sqrt() if variant == "smoothgrad" and samples > 1 else None
    return p.result("smoothgrad", out, params={"samples": samples, "noise_level": noise_level,
                                               "variant": variant, "seed": seed,
                                               "multiply_by_inputs": multiply_by_inputs},
                    stderr=stderr)
