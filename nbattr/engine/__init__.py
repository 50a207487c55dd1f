"""The attribution engine: pure PyTorch, no widget or plotting imports."""

from .api import attribute
from .batching import watch
from .dataset import attribute_dataset
from .errors import (
    Cancelled,
    InputError,
    NbattrError,
    NoGradientPathError,
    TargetError,
    UnsupportedOperationError,
)
from .registry import MethodInfo, methods, register
from .result import Attribution

__all__ = [
    "Attribution",
    "Cancelled",
    "InputError",
    "MethodInfo",
    "NbattrError",
    "NoGradientPathError",
    "TargetError",
    "UnsupportedOperationError",
    "attribute",
    "attribute_dataset",
    "methods",
    "register",
    "watch",
]
