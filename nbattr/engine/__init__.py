"""The attribution engine: pure PyTorch, no widget or plotting imports."""

from .api import attribute
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
    "methods",
    "register",
]
