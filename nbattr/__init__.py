"""nbattr: feature attributions for PyTorch models, computed on the model's device and shown live
in any Jupyter front end."""

from .engine import (
    Attribution,
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
    attribute,
    attribute_dataset,
    methods,
    watch,
)


def __getattr__(name: str) -> object:
    # The widget (anywidget, ipywidgets) is imported on first use of ``nbattr.Explain``: a script,
    # a torchrun worker or a GPU server without Jupyter imports the engine alone.
    if name == "Explain":
        from .widget import Explain

        return Explain
    raise AttributeError(f"module 'nbattr' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "BaselineJumpWarning",
    "Cancelled",
    "CoarseDeltaWarning",
    "CompletenessWarning",
    "Explain",
    "InputError",
    "MaxStepsWarning",
    "MissingRuleWarning",
    "NbattrError",
    "NbattrWarning",
    "NoGradientPathError",
    "NonFiniteWarning",
    "TargetError",
    "TrainingModeWarning",
    "UnsupportedOperationError",
    "__version__",
    "attribute",
    "attribute_dataset",
    "methods",
    "watch",
]
