"""``AnoTF``: the seed's TensorFlow entry point, a Keras 3 optimizer (``tf.keras`` is Keras 3).

Usage exactly as in the 1.0.0 README::

    from ano_optimizer.tensorflow import AnoTF
    optimizer = AnoTF(learning_rate=1e-4)                            # Ano
    optimizer = AnoTF(learning_rate=1e-4, logarithmic_schedule=True)  # Anolog
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))

``AnoTF`` is :class:`ano_optimizer.keras.Ano` with the seed's signature. It is defined in
:mod:`ano_optimizer.keras`, so that importing that module is enough to load a ``.keras`` file
saved with any of the three classes.
"""

from .keras import AnoTF

__all__ = ["AnoTF"]
