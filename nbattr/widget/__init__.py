"""The live Jupyter widget (anywidget). Importing this never needs the JS bundle to exist."""

from .explain import Explain

__all__ = ["Explain"]
