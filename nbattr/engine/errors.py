"""Errors raised by the engine. Each names the problem it found."""


class NbattrError(Exception):
    """Base class of every error nbattr raises on purpose."""


class InputError(NbattrError, ValueError):
    """The input, baseline or an option has the wrong shape, dtype or value (NaN, Inf)."""


class TargetError(NbattrError, IndexError):
    """A target class index is out of range for the model's output."""


class NoGradientPathError(NbattrError, RuntimeError):
    """The model's output does not depend (differentiably) on the attributed tensor."""


class UnsupportedOperationError(NbattrError, RuntimeError):
    """A rule-based method met an operation it has no rule for, and ``strict=True`` was given."""


class Cancelled(NbattrError):
    """The ``cancel`` callable of :func:`nbattr.watch` returned True: the call stopped before its
    next chunk of work (the model is left as it was found, as after any error)."""


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` called by the caller of this function that points
    at the first frame outside the ``nbattr`` package (the user's line), however deep the call."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root):
        frame, level = frame.f_back, level + 1
    return level
