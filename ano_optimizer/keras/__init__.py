"""Ano and Anolog for Keras 3 (:mod:`.optimizers`), selectable by name once this is imported.

Importing this package registers every Keras-capable optimizer of the registry with Keras by
name (``model.compile(optimizer="ano")``, ``keras.optimizers.get("anolog")``) through the Keras
adapter, :mod:`ano_optimizer.integrations.keras`. The classes are defined, in their own module,
before the adapter resolves them. ``import ano_optimizer`` alone never imports Keras.
"""

from __future__ import annotations

from ano_optimizer.integrations.keras import register

from .optimizers import Ano, Anolog, AnoTF

__all__ = ["Ano", "AnoTF", "Anolog"]

register()
