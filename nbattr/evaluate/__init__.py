"""Checks of attributions against the model: ablation (AOPC) curves, localization, saturation along
the path, and feature groups. Built on :mod:`nbattr.engine`; plotting helpers import matplotlib
lazily."""

# exports are added below by each module (one import line each)
