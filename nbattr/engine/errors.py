"""Errors raised and warnings given by the engine. Each names the problem it found."""


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


class NbattrWarning(UserWarning):
    """Base class of every warning the engine gives. Silence one kind with
    ``warnings.filterwarnings("ignore", category=nbattr.CoarseDeltaWarning)``; inside
    :func:`nbattr.watch` the ``warn`` callable receives the warning instead (``str(w)`` is its
    message, ``type(w)`` its kind)."""


class CompletenessWarning(NbattrWarning):
    """A completeness error (``delta``) larger than asked for or than a fixed rule should give."""


class CoarseDeltaWarning(CompletenessWarning):
    """Integrated gradients with a fixed step count: |delta| is more than 5% of |F(x) - F(x')|
    (too few steps for how sharply the score changes along the path)."""


class MaxStepsWarning(CompletenessWarning):
    """``steps="auto"`` reached ``max_steps`` before |delta| <= tol x |F(x) - F(x')|."""


class BaselineJumpWarning(CompletenessWarning):
    """A large |delta| whose cause is a jump of the score at the baseline (a model that normalises
    an all-zero input): more steps do not help there, another baseline or DeepLIFT does. Given
    instead of :class:`CoarseDeltaWarning` or :class:`MaxStepsWarning` when the jump is found."""


class MissingRuleWarning(NbattrWarning):
    """DeepLIFT or epsilon-LRP met operations it has no rule for and used their plain gradient
    there (``Attribution.unsupported`` names them; ``strict=True`` raises instead)."""


class TrainingModeWarning(NbattrWarning):
    """The model is in training mode: dropout and batch-norm make attributions random."""


class NonFiniteWarning(NbattrWarning):
    """Some attributions are NaN or inf (made by the model's gradient or a rule)."""


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
