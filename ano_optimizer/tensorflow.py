"""``AnoTF``: the seed's TensorFlow entry point, a Keras 3 optimizer (``tf.keras`` is Keras 3).

Usage exactly as in the 1.0.0 README::

    from ano_optimizer.tensorflow import AnoTF
    optimizer = AnoTF(learning_rate=1e-4)                            # Ano
    optimizer = AnoTF(learning_rate=1e-4, logarithmic_schedule=True)  # Anolog
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))

It is :class:`ano_optimizer.keras.Ano` with the seed's signature, so it also works with
``model.compile``/``fit`` and saves to and loads from ``.keras`` files.
"""

from __future__ import annotations

import inspect

import keras

from . import hyperparameters as hp
from .keras import Ano

__all__ = ["AnoTF"]


def _base_optimizer_arguments() -> frozenset[str]:
    # The keyword-only arguments of Ano are exactly Keras's base optimizer arguments plus
    # this project's weight-decay filter; "name" is spelled out in AnoTF's signature.
    parameters = inspect.signature(Ano.__init__).parameters.values()
    return frozenset(
        p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "name"
    )


@keras.saving.register_keras_serializable(package="ano_optimizer")
class AnoTF(Ano):
    """Ano for TensorFlow/Keras with the seed signature.

    ``kwargs`` are the Keras base optimizer's arguments (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``) and
    ``exclude_1d_from_weight_decay``; any other keyword is a ``TypeError``.
    """

    def __init__(
        self,
        learning_rate=hp.DEFAULT_LR,
        beta_1=hp.DEFAULT_BETAS[0],
        beta_2=hp.DEFAULT_BETAS[1],
        weight_decay=hp.DEFAULT_WEIGHT_DECAY,
        epsilon=hp.DEFAULT_EPS,
        logarithmic_schedule=False,
        name=None,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _base_optimizer_arguments())
        if unknown:
            raise TypeError(
                f"AnoTF got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"besides its own it accepts: {', '.join(sorted(_base_optimizer_arguments()))}"
            )
        super().__init__(
            learning_rate,
            beta_1,
            beta_2,
            weight_decay,
            epsilon,
            logarithmic_schedule,
            name=name,
            **kwargs,
        )
