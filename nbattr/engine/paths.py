"""Quadrature rules on [0, 1]: alphas and weights for the path integral of IG."""

from __future__ import annotations

import numpy as np

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gauss_legendre")


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alphas`` and ``weights`` (float64, length ``steps``) with sum(weights) = 1.

    ``riemann_left``: alpha = k/S, k = 0..S-1. ``riemann_right``: k = 1..S.
    ``riemann_middle``: (k + 1/2)/S. ``riemann_trapezoid``: S points from 0 to 1 inclusive,
    spacing 1/(S-1), end weights halved. ``gauss_legendre``: the S-point Gauss-Legendre rule
    mapped to [0, 1] (exact for polynomials of degree 2S-1).
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    s = int(steps)
    if rule == "riemann_left":
        return np.arange(s) / s, np.full(s, 1.0 / s)
    if rule == "riemann_right":
        return np.arange(1, s + 1) / s, np.full(s, 1.0 / s)
    if rule == "riemann_middle":
        return (np.arange(s) + 0.5) / s, np.full(s, 1.0 / s)
    if rule == "riemann_trapezoid":
        if s < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2")
        w = np.full(s, 1.0 / (s - 1))
        w[0] /= 2
        w[-1] /= 2
        return np.linspace(0.0, 1.0, s), w
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(s)
        return (x + 1.0) / 2.0, w / 2.0
    raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)}")
