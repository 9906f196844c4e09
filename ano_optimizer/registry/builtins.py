"""The built-in optimizer specs, published through the ``ano_optimizer.optimizers`` entry points.

``pyproject.toml`` points the entry points ``ano``, ``anolog``, ``ano8bit`` and ``anolog8bit``
at :data:`ANO`, :data:`ANOLOG`, :data:`ANO8BIT` and :data:`ANOLOG8BIT`, exactly as a
third-party plugin points at its own spec. The registry also falls back on
:data:`BUILTIN_SPECS` when this project's metadata is missing (a source checkout that was never
installed), so these names are always there.
"""

from __future__ import annotations

import torch

from .spec import OptimizerSpec

ANO = OptimizerSpec(
    name="ano",
    description="Ano: sign-of-momentum direction, gradient-magnitude step, additive second moment",
    torch_class="ano_optimizer.optimizer:Ano",
    keras_class="ano_optimizer.keras.optimizers:Ano",
    optax_factory="ano_optimizer.optax:ano",
)

ANOLOG = OptimizerSpec(
    name="anolog",
    description="Anolog: Ano with the logarithmic momentum schedule beta1 = 1 - 1/ln(k + 2)",
    torch_class="ano_optimizer.optimizer:Anolog",
    keras_class="ano_optimizer.keras.optimizers:Anolog",
    optax_factory="ano_optimizer.optax:anolog",
)

# The 8-bit variants are the same classes with blockwise 8-bit moments (PyTorch only).
ANO8BIT = OptimizerSpec(
    name="ano8bit",
    description="Ano with blockwise 8-bit moments (state_dtype=torch.uint8): a quarter of the state",
    torch_class="ano_optimizer.optimizer:Ano",
    defaults={"state_dtype": torch.uint8},
)

ANOLOG8BIT = OptimizerSpec(
    name="anolog8bit",
    description="Anolog with blockwise 8-bit moments (state_dtype=torch.uint8)",
    torch_class="ano_optimizer.optimizer:Anolog",
    defaults={"state_dtype": torch.uint8},
)

BUILTIN_SPECS = (ANO, ANOLOG, ANO8BIT, ANOLOG8BIT)
