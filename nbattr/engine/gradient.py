"""Gradient methods: saliency, gradient x input, integrated and interior gradients, SmoothGrad.

Integrated gradients, interior gradients and the score curve along the path come from one
batched pass over (path points x examples): the widget's alpha animation depends on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import InputError
from .paths import quadrature
from .problem import Problem
from .registry import register


def _plain_gradient(p: Problem) -> Tensor:
    grads = torch.empty_like(p.inputs)

    def points(idx: Tensor) -> tuple[Tensor, Tensor]:
        return p.inputs[idx], idx

    def consume(idx: Tensor, _rows: Tensor, _s: Tensor, g: Tensor) -> None:
        grads[idx] = g

    p.gradient_pass(p.n, points, consume)
    return grads


@register("saliency", "Absolute gradient of the target score (Simonyan et al. 2014); abs=False keeps the sign.")
def saliency(p: Problem, *, abs: bool = True) -> object:  # noqa: A002 - the option's public name
    g = _plain_gradient(p)
    return p.result("saliency", g.abs() if abs else g, params={"abs": abs})


@register(
    "gradient_x_input",
    "Input-layer gradient times the input (Shrikumar et al. 2016; Ancona et al. 2018).",
    multiplies_by_inputs=True,
)
def gradient_x_input(p: Problem) -> object:
    return p.result("gradient_x_input", _plain_gradient(p) * p.inputs)


class PathPass:
    """Gradients at x' + alpha (x - x') for every (alpha, example), in one chunked pass.

    Rows are ordered alpha-major: flat index i is alpha ``i // N`` and example ``i % N``.
    ``path`` replaces the straight line by a custom ``path(alpha) -> (N, ...)`` whose derivative
    in alpha is taken by forward-mode autodiff.
    """

    def __init__(self, p: Problem, alphas: Tensor, weights: Tensor, keep: bool,
                 path: Callable[[Tensor], Tensor] | None = None) -> None:
        self.p, self.alphas, self.weights, self.keep, self.path = p, alphas, weights, keep, path
        s, n = alphas.shape[0], p.n
        self.integral = torch.zeros_like(p.inputs)  # sum_k w_k * grad_k (* dgamma_k for a path)
        self.scores = torch.empty(s, n, dtype=p.outputs.dtype, device=p.device)
        self.grads = torch.empty(s, *p.inputs.shape, dtype=p.inputs.dtype, device=p.device) if keep else None
        self._chunk_derivative: Tensor | None = None
        if path is None:
            self.diff = p.inputs - p.baselines

    def _custom_points(self, k: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(alpha_k)[row] and d gamma / d alpha for each (k, row) of a chunk."""
        shape = (len(k), *self.p.inputs.shape[1:])
        val = torch.empty(shape, dtype=self.p.inputs.dtype, device=self.p.device)
        der = torch.empty_like(val)
        for kk in k.unique().tolist():
            a = self.alphas[kk].clone()
            try:
                v, d = torch.func.jvp(self.path, (a,), (torch.ones_like(a),))
            except Exception as e:  # noqa: BLE001
                raise InputError(f"path(alpha) must be a differentiable torch function of alpha "
                                 f"returning an (N, ...) tensor: {e}") from e
            if v.shape != self.p.inputs.shape:
                raise InputError(f"path(alpha) returned shape {tuple(v.shape)}, expected "
                                 f"{tuple(self.p.inputs.shape)}")
            m = k == kk
            val[m] = v.detach().to(val.dtype)[rows[m]]
            der[m] = d.detach().to(val.dtype)[rows[m]]
        return val, der

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
            w = p.expand(self.weights[k], len(idx))
            if self.path is not None:
                g = g * self._chunk_derivative
            self.integral.index_add_(0, rows, g * w)

        p.gradient_pass(self.alphas.shape[0] * n, points, consume)


def _nodes(p: Problem, rule: str, steps: int) -> tuple[Tensor, Tensor]:
    a, w = quadrature(rule, steps)
    return (torch.as_tensor(a, dtype=p.inputs.dtype, device=p.device),
            torch.as_tensor(w, dtype=p.inputs.dtype, device=p.device))


@register(
    "integrated_gradients",
    "(x - x') times the path integral of the gradient along x' + a(x - x') (Sundararajan et al. 2017).",
    completeness=True, needs_baseline=True, multiplies_by_inputs=True, path=True,
)
def integrated_gradients(p: Problem, *, steps: int = 50, rule: str = "gauss_legendre",
                         keep_path: bool = False, path: Callable[[Tensor], Tensor] | None = None) -> object:
    alphas, weights = _nodes(p, rule, steps)
    pp = PathPass(p, alphas, weights, keep=keep_path, path=path)
    extra = {}
    if path is None:
        pp.run()
        attributions = pp.diff * pp.integral
    else:
        g0 = path(torch.tensor(0.0, dtype=p.inputs.dtype, device=p.device)).detach()
        g1 = path(torch.tensor(1.0, dtype=p.inputs.dtype, device=p.device)).detach()
        if not torch.allclose(g1, p.inputs, rtol=1e-4, atol=1e-6):
            raise InputError("path(1) must equal the attributed input x")
        rows = torch.arange(p.n, device=p.device)
        with torch.no_grad():
            extra["baseline_outputs"] = p.forward(g0, rows)
        extra["baselines"] = g0
        pp.run()
        attributions = pp.integral
    return p.result(
        "integrated_gradients", attributions, completeness=True, uses_baseline=True,
        params={"steps": int(steps), "rule": rule, "path": "custom" if path is not None else "straight"},
        alphas=alphas, path_outputs=pp.scores, path_gradients=pp.grads, **extra,
    )


@register(
    "interior_gradients",
    "Gradients at the scaled inputs x' + a(x - x') for a in (0, 1] (Sundararajan et al., eq. 3); "
    "shows saturation.",
    needs_baseline=True, path=True,
)
def interior_gradients(p: Problem, *, steps: int = 50, rule: str = "gauss_legendre", alpha: float = 1.0,
                       multiply_by_inputs: bool = True) -> object:
    """Path gradients at every node of ``rule`` plus ``alpha``; ``attributions`` is the interior
    gradient at ``alpha`` (times x - x' unless ``multiply_by_inputs=False``)."""
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
    attributions = pp.grads[k] * pp.diff if multiply_by_inputs else pp.grads[k].clone()
    return p.result(
        "interior_gradients", attributions, uses_baseline=True,
        params={"steps": int(steps), "rule": rule, "alpha": float(alphas[k]),
                "multiply_by_inputs": multiply_by_inputs},
        alphas=alphas, path_outputs=pp.scores, path_gradients=pp.grads,
    )


SMOOTHGRAD_VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")


@register(
    "smoothgrad",
    "Gradients averaged over noisy copies of x (Smilkov et al. 2017); variants smoothgrad_sq, vargrad.",
)
def smoothgrad(p: Problem, *, samples: int = 50, noise_level: float = 0.15, variant: str = "smoothgrad",
               multiply_by_inputs: bool = False, seed: int = 0) -> object:
    """``noise_level`` is the noise's standard deviation as a fraction of each example's range."""
    if variant not in SMOOTHGRAD_VARIANTS:
        raise InputError(f"unknown smoothgrad variant {variant!r}; choose one of {SMOOTHGRAD_VARIANTS}")
    if not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples must be a positive int, got {samples!r}")
    if noise_level < 0:
        raise InputError(f"noise_level must be >= 0, got {noise_level}")
    n, x = p.n, p.inputs
    flat = x.flatten(1)
    sigma = noise_level * (flat.max(1).values - flat.min(1).values)
    total1 = torch.zeros_like(x)
    total2 = torch.zeros_like(x)

    def noise(k: int) -> Tensor:
        # Noise of sample k for all examples: the same whatever the chunking.
        g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + k)
        return torch.randn(x.shape, generator=g, device=p.device, dtype=x.dtype)

    def points(idx: Tensor) -> tuple[Tensor, Tensor]:
        k, rows = idx // n, idx % n
        eps = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, device=p.device)
        for kk in k.unique().tolist():
            m = k == kk
            eps[m] = noise(kk)[rows[m]]
        return x[rows] + p.expand(sigma[rows], len(idx)) * eps, rows

    def consume(_idx: Tensor, rows: Tensor, _s: Tensor, g: Tensor) -> None:
        total1.index_add_(0, rows, g)
        total2.index_add_(0, rows, g * g)

    p.gradient_pass(samples * n, points, consume)
    mean1, mean2 = total1 / samples, total2 / samples
    out = {"smoothgrad": mean1, "smoothgrad_sq": mean2, "vargrad": (mean2 - mean1 * mean1).clamp_min(0)}[variant]
    if multiply_by_inputs:
        out = out * x
    return p.result("smoothgrad", out, params={"samples": samples, "noise_level": noise_level,
                                               "variant": variant, "seed": seed,
                                               "multiply_by_inputs": multiply_by_inputs})
