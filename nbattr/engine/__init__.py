"""The attribution engine: pure PyTorch, no widget or plotting imports."""

from .api import attribute
from .batching import watch
from .dataset import attribute_dataset
from .errors import (
    BaselineJumpWarning,
    Cancelled,
    CoarseDeltaWarning,
    CompletenessWarning,
    InputError,
    MaxStepsWarning,
    MissingRuleWarning,
    NbattrError,
    NbattrWarning,
    NoGradientPathError,
    NonFiniteWarning,
    TargetError,
    TrainingModeWarning,
    UnsupportedOperationError,
)
from .registry import MethodInfo, methods, register
from .result import Attribution

__all__ = [
    "Attribution",
    "BaselineJumpWarning",
    "Cancelled",
    "CoarseDeltaWarning",
    "CompletenessWarning",
    "InputError",
    "MaxStepsWarning",
    "MethodInfo",
    "MissingRuleWarning",
    "NbattrError",
    "NbattrWarning",
    "NoGradientPathError",
    "NonFiniteWarning",
    "TargetError",
    "TrainingModeWarning",
    "UnsupportedOperationError",
    "attribute",
    "attribute_dataset",
    "methods",
    "register",
    "watch",
]
