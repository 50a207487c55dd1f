"""nbattr: feature attributions for PyTorch models, computed on the model's device and shown live
in any Jupyter front end."""

from .engine import (
    Attribution,
    Cancelled,
    InputError,
    NbattrError,
    NoGradientPathError,
    TargetError,
    UnsupportedOperationError,
    attribute,
    attribute_dataset,
    methods,
    watch,
)
from .widget import Explain  # the live widget (imports without the JS bundle)

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Cancelled",
    "Explain",
    "InputError",
    "NbattrError",
    "NoGradientPathError",
    "TargetError",
    "UnsupportedOperationError",
    "__version__",
    "attribute",
    "attribute_dataset",
    "methods",
    "watch",
]
