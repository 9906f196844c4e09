"""Framework adapters, installed as ``ano_optimizer.integrations``.

Each adapter module imports its framework only when imported itself, and offers an idempotent
``register()`` that makes every optimizer of the registry selectable by name in that framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

# Torch-side frameworks only: importing TensorFlow before triton crashes this process later,
# so the Keras adapter is never registered from here.
TORCH_FRAMEWORKS = ("transformers", "timm")


def register_all() -> list[str]:
    """Register every torch-side integration whose framework is installed; return their names.

    A framework whose installed version the adapter cannot support (its ``register()`` raises
    ``RuntimeError`` naming the version) is skipped with a warning, so a script that uses only
    the other framework still runs.
    """
    done = []
    for framework in TORCH_FRAMEWORKS:
        if importlib.util.find_spec(framework) is None:
            continue
        try:
            importlib.import_module(f"ano_optimizer.integrations.{framework}").register()
        except RuntimeError as error:
            warnings.warn(f"ano-optimizer: {framework} not registered: {error}", stacklevel=2)
            continue
        done.append(framework)
    return done
