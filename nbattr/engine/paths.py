"""Quadrature rules on [0, 1]: alphas and weights for the path integral of IG.

These are the fixed rules (``steps=<int>``). ``steps="auto"`` uses nested composite Simpson
panels refined per example until the completeness error is below a tolerance, reusing every
gradient; it lives beside the path pass, in :class:`nbattr.engine.gradient.AdaptivePath`.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gauss_legendre")


def clenshaw_curtis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The Clenshaw-Curtis rule on the n + 1 points (1 - cos(pi j / n)) / 2 of [0, 1] (n even).

    Nested: the points for n are among those for 2n (bit for bit: each node is computed from
    its reduced fraction j/n). Weights are positive and sum to 1; exact for polynomials of
    degree n + 1 and close to Gauss-Legendre for smooth integrands (Trefethen 2008).
    """
    if n < 2 or n % 2:
        raise ValueError(f"clenshaw_curtis needs an even n >= 2, got {n!r}")
    j = np.arange(n + 1)
    g = np.gcd(j, n)
    alphas = (1.0 - np.cos(np.pi * (j // g) / (n // g))) / 2.0
    theta = np.pi * j / n
    m = np.arange(1, n // 2 + 1)
    b = np.where(2 * m == n, 1.0, 2.0)
    s = (b / (4.0 * m * m - 1.0))[None, :] * np.cos(2.0 * m[None, :] * theta[:, None])
    c = np.where((j == 0) | (j == n), 1.0, 2.0)
    w = c / n * (1.0 - s.sum(1)) / 2.0
    return alphas, w


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alphas`` and ``weights`` (float64, length ``steps``) with sum(weights) = 1.

    ``riemann_left``: alpha = k/S, k = 0..S-1. ``riemann_right``: k = 1..S.
    ``riemann_middle``: (k + 1/2)/S. ``riemann_trapezoid``: S points from 0 to 1 inclusive,
    spacing 1/(S-1), end weights halved. ``gauss_legendre``: the S-point Gauss-Legendre rule
    mapped to [0, 1] (exact for polynomials of degree 2S-1).
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive int (or 'auto' for integrated_gradients), got {steps!r}")
    s = int(steps)
    if rule == "riemann_left":
        return np.arange(s) / s, np.full(s, 1.0 / s)
    if rule == "riemann_right":
        return np.arange(1, s + 1) / s, np.full(s, 1.0 / s)
    if rule == "riemann_middle":
        return (np.arange(s) + 0.5) / s, np.full(s, 1.0 / s)
    if rule == "riemann_trapezoid":
        if s < 2:
            raise InputError("riemann_trapezoid needs steps >= 2")
        w = np.full(s, 1.0 / (s - 1))
        w[0] /= 2
        w[-1] /= 2
        return np.linspace(0.0, 1.0, s), w
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(s)
        return (x + 1.0) / 2.0, w / 2.0
    raise InputError(f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}")
