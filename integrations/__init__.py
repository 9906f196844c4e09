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


def register_framework(framework: str) -> list[str]:
    """Import the adapter of ``framework`` (one of :data:`TORCH_FRAMEWORKS`, or "keras") and
    register the registry's optimizers with it; return the names it registered. Raises whatever
    importing the framework or registering raises."""
    return importlib.import_module(f"ano_optimizer.integrations.{framework}").register()


def register_all() -> list[str]:
    """Register every torch-side integration whose framework is installed; return their names.

    A framework that fails to import or to register, for whatever reason (an unsupported
    version, a broken install, a missing dependency of its own), is skipped with one warning
    naming it, so a script that does not use that framework still runs.
    """
    done = []
    for framework in TORCH_FRAMEWORKS:
        try:
            if importlib.util.find_spec(framework) is None:
                continue
            register_framework(framework)
        except Exception as error:  # any failure of a third-party import
            warnings.warn(
                f"ano-optimizer: the {framework} integration is not registered, so registry "
                f"names are not available in {framework}: {type(error).__name__}: {error}",
                stacklevel=2,
            )
            continue
        done.append(framework)
    return done
