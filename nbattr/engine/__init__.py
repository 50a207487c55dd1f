"""The attribution engine: pure PyTorch, no widget or plotting imports."""

from .api import attribute
from .dataset import attribute_dataset
from .errors import (
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
]
