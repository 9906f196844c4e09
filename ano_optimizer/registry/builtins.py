"""The built-in optimizer specs, published through the ``ano_optimizer.optimizers`` entry points.

``pyproject.toml`` points the entry points ``ano`` and ``anolog`` at :data:`ANO` and
:data:`ANOLOG`, exactly as a third-party plugin points at its own spec. The registry also falls
back on :data:`BUILTIN_SPECS` when this project's metadata is missing (a source checkout that was
never installed), so these two names are always there.
"""

from __future__ import annotations

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

BUILTIN_SPECS = (ANO, ANOLOG)
