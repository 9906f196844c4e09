"""Ano and Anolog optimizers, and a registry that hands them to training frameworks by name.

``import ano_optimizer`` imports torch only: TensorFlow, Keras, transformers and timm are
imported by the modules that need them, when those are imported.
"""

from .optimizer import Ano, Anolog, ano
from .param_groups import param_groups_weight_decay
from .registry import (
    OptimizerPluginWarning,
    OptimizerSpec,
    create_optimizer,
    get_optimizer_class,
    get_optimizer_spec,
    list_optimizers,
    register_optimizer,
)

__version__ = "1.1.0"

__all__ = [
    "Ano",
    "Anolog",
    "OptimizerPluginWarning",
    "OptimizerSpec",
    "__version__",
    "ano",
    "create_optimizer",
    "get_optimizer_class",
    "get_optimizer_spec",
    "list_optimizers",
    "param_groups_weight_decay",
    "register_optimizer",
]
