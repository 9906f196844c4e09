"""Framework adapters, installed as ``ano_optimizer.integrations``.

Each adapter module imports its framework only when imported itself, and offers an idempotent
``register()`` that makes every optimizer of the registry selectable by name in that framework.
"""

from __future__ import annotations

import importlib
import importlib.util

# Torch-side frameworks only: importing TensorFlow before triton crashes this process later,
# so the Keras adapter is never registered from here.
TORCH_FRAMEWORKS = ("transformers", "timm")


def register_all() -> list[str]:
    """Register every torch-side integration whose framework is installed; return their names."""
    done = []
    for framework in TORCH_FRAMEWORKS:
        if importlib.util.find_spec(framework) is None:
            continue
        importlib.import_module(f"ano_optimizer.integrations.{framework}").register()
        done.append(framework)
    return done
