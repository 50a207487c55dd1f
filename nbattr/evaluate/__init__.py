"""Checks of attributions against the model: ablation (AOPC) curves, localization, saturation along
the path, and feature groups. Built on :mod:`nbattr.engine`; plotting helpers import matplotlib
lazily."""

# exports are added below by each module (one import line each)
from .ablation import AblationResult, ablation_curve  # noqa: F401
from .groups import GroupShares, group_by, group_shares  # noqa: F401
from .localization import localization  # noqa: F401
from .plots import plot_ablation, plot_saturation  # noqa: F401
from .saturation import SaturationResult, saturation  # noqa: F401
