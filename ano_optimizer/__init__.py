"""Ano and Anolog optimizers, and a registry that hands them to training frameworks by name.

``import ano_optimizer`` imports torch only: TensorFlow, Keras, transformers and timm are
imported by the modules that need them, when those are imported.
"""

from .optimizer import Ano, Anolog, ano

__version__ = "1.1.0"

__all__ = ["Ano", "Anolog", "__version__", "ano"]
