"""Methods looked up by name, so that a user interface can list what exists."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

_METHODS: dict[str, MethodInfo] = {}


@dataclass(frozen=True)
class MethodInfo:
    """What a registered attribution method is and which options it takes.

    Attributes
    ----------
    name : registry name, passed as ``method=`` to :func:`nbattr.attribute`.
    description : one line.
    options : option name -> default value (keyword arguments of the method).
    completeness : whether sum(attributions) = F(x) - F(x') is promised (and ``delta`` reported).
    needs_baseline : whether the ``baseline`` argument changes the result.
    multiplies_by_inputs : whether attributions are scaled by (x - x') or x (a "global" method).
    path : whether the method evaluates the model along x' + a (x - x') (steps and rule apply).
    """

    name: str
    description: str
    fn: Callable[..., Any] = field(repr=False)
    options: dict[str, Any]
    completeness: bool = False
    needs_baseline: bool = False
    multiplies_by_inputs: bool = False
    path: bool = False


def register(
    name: str,
    description: str,
    *,
    completeness: bool = False,
    needs_baseline: bool = False,
    multiplies_by_inputs: bool = False,
    path: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(problem, **options) -> Attribution`` under ``name``.

    The options (and their defaults) are read from the keyword-only parameters of ``fn``.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"attribution method {name!r} is registered twice")
        sig = inspect.signature(fn)
        options = {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        _METHODS[name] = MethodInfo(
            name=name,
            description=description,
            fn=fn,
            options=options,
            completeness=completeness,
            needs_baseline=needs_baseline,
            multiplies_by_inputs=multiplies_by_inputs,
            path=path,
        )
        return fn

    return deco


def multi_target(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method as computing several targets per example natively (one forward per point and
    K backward passes; the perturbation methods read all K scores off each forward): :func:`nbattr.attribute`
    loops over the targets otherwise, and the widget prefetches the other top classes only for such methods."""
    fn.multi_target = True  # type: ignore[attr-defined]
    return fn


def targets_share_forwards(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a native multi-target method whose K targets cost about what one does (a perturbation
    method reads all K scores off each forward and needs no backward pass): the widget computes
    the other top classes together with the chosen one instead of prefetching them afterwards."""
    fn.targets_share_forwards = True  # type: ignore[attr-defined]
    return fn


def measures_first_forward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method whose work is gradient passes over rows like x's: with ``batch_size="auto"``
    the problem's first forward (on up to ``PROBE_ROWS`` examples) runs with grad and counts the
    bytes autograd saves per row, so the passes need no probe chunk (``Problem.saved_row_bytes``)."""
    fn.measure_first_forward = True  # type: ignore[attr-defined]
    return fn


def get(name: str) -> MethodInfo:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise InputError(f"unknown attribution method {name!r}; known methods: {known}") from None


def methods() -> dict[str, MethodInfo]:
    """Every registered method by name, with its options and a one-line description."""
    _load_builtin()
    return dict(_METHODS)


def _load_builtin() -> None:
    # Importing the method modules registers them.
    from . import gradient, perturbation, rules  # noqa: F401
