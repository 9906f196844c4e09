"""Deprecated import path, kept for code written against 1.1.0: the plugin loader lives in
:mod:`ano_optimizer.registry.plugins`, and :class:`OptimizerPluginWarning` is also
``ano_optimizer.OptimizerPluginWarning``."""

from __future__ import annotations

import warnings

from .registry.plugins import (
    DISABLE_PLUGINS_ENV,
    ENTRY_POINT_GROUP,
    OptimizerPluginWarning,
    plugins_disabled,
)

__all__ = ["DISABLE_PLUGINS_ENV", "ENTRY_POINT_GROUP", "OptimizerPluginWarning", "plugins_disabled"]

warnings.warn(
    "ano_optimizer.plugins is deprecated: import OptimizerPluginWarning from ano_optimizer, "
    "and the rest from ano_optimizer.registry.plugins",
    DeprecationWarning,
    stacklevel=2,
)
