"""Ano and Anolog for Keras 3, on any Keras backend (TensorFlow, JAX, PyTorch), and ``AnoTF``
(the seed's TensorFlow class, exported as ``ano_optimizer.tensorflow.AnoTF``).

The classes are registered for ``.keras`` loading, as ``@keras.saving.register_keras_serializable``
classes are, when this module is imported; :mod:`ano_optimizer.keras` also makes them (and every
other Keras-capable optimizer of the registry) selectable by name.

Step count: Keras has one step counter per optimizer, ``iterations``, shared by every variable,
so step ``k`` of the update rule is ``iterations + 1`` for every variable (torch counts steps per
tensor; the two differ only for a variable that misses gradients on some steps).
"""

from __future__ import annotations

import inspect
import numbers

import keras
from keras import ops

from .. import hyperparameters as hp

if not hasattr(keras.optimizers.Optimizer, "add_optimizer_variables"):
    raise ImportError(
        f"ano_optimizer.keras needs Keras 3.10 or later (Optimizer.add_optimizer_variables); "
        f"this is Keras {keras.__version__}: pip install -U 'keras>=3.10'"
    )

__all__ = ["Ano", "AnoTF", "Anolog"]

_PACKAGE = "ano_optimizer"


def _checked_learning_rate(learning_rate, owner: str):
    """Numbers are range-checked (ints become floats); schedules and callables pass through."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule) or callable(
        learning_rate
    ):
        return learning_rate
    if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
        hp.check_lr(float(learning_rate), owner)
        return float(learning_rate)
    raise ValueError(
        f"{owner}: invalid learning_rate={learning_rate!r}; it must be a float >= 0, a "
        "keras.optimizers.schedules.LearningRateSchedule, or a callable taking no arguments"
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Ano(keras.optimizers.Optimizer):
    """Ano (Kegreisz, 2025) as a Keras 3 optimizer.

    Per variable, with ``k = iterations + 1``::

        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * sign(g**2 - v) * g**2
        variable = variable * (1 - learning_rate * weight_decay)      # Keras base class
        variable -= learning_rate * |g| * sign(m) / (sqrt(v / (1 - beta_2**k)) + epsilon)

    Args:
        learning_rate: float >= 0, a ``keras.optimizers.schedules.LearningRateSchedule``, or a
            callable taking no arguments. Defaults to ``1e-4``.
        beta_1: momentum decay in ``[0, 1)``; unused with ``logarithmic_schedule=True``.
        beta_2: second-moment decay in ``[0.5, 1)``.
        weight_decay: decoupled weight decay ``>= 0`` (or ``None``), applied once per step by
            the Keras base class as ``variable * (1 - learning_rate * weight_decay)``.
        epsilon: ``> 0``, added outside the square root.
        logarithmic_schedule: use ``beta_1 = 1 - 1 / ln(k + 2)`` (Anolog).
        exclude_1d_from_weight_decay: skip weight decay on every variable with at most one
            dimension (biases, normalization scales and offsets), like the PyTorch side's
            no-decay parameter group. Keras's ``exclude_from_weight_decay()`` also applies.
        clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
        loss_scale_factor, gradient_accumulation_steps, name: as in every Keras optimizer.
    """

    def __init__(
        self,
        learning_rate=hp.DEFAULT_LR,
        beta_1=hp.DEFAULT_BETAS[0],
        beta_2=hp.DEFAULT_BETAS[1],
        weight_decay=hp.DEFAULT_WEIGHT_DECAY,
        epsilon=hp.DEFAULT_EPS,
        logarithmic_schedule=False,
        *,
        exclude_1d_from_weight_decay=False,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
    ):
        owner = type(self).__name__
        # Every check runs before the base class creates any variable.
        learning_rate = _checked_learning_rate(learning_rate, owner)
        beta_1, beta_2 = hp.check_betas((beta_1, beta_2), owner)
        hp.check_eps(epsilon, owner)
        if weight_decay is not None:
            hp.check_weight_decay(weight_decay, owner)
            weight_decay = float(weight_decay)
        hp.check_flag("logarithmic_schedule", logarithmic_schedule, owner)
        hp.check_flag("exclude_1d_from_weight_decay", exclude_1d_from_weight_decay, owner)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = float(epsilon)
        self.logarithmic_schedule = logarithmic_schedule
        self.exclude_1d_from_weight_decay = exclude_1d_from_weight_decay

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._exp_avgs, self._exp_avg_sqs = self.add_optimizer_variables(
            var_list, ["exp_avg", "exp_avg_sq"]
        )

    def _use_weight_decay(self, variable):
        if self.exclude_1d_from_weight_decay and len(variable.shape) <= 1:
            return False
        return super()._use_weight_decay(variable)

    def _apply_weight_decay(self, variables):
        # weight_decay=0.0 (the default) would otherwise cost a multiply per variable per step.
        if not self.weight_decay:
            return
        super()._apply_weight_decay(variables)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        exp_avg = self._exp_avgs[index]
        exp_avg_sq = self._exp_avg_sqs[index]

        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        # convert_to_tensor, not cast: TensorFlow's cast of a Python float goes through float32,
        # which would round 0.92 in a float64 variable's update.
        if self.logarithmic_schedule:
            beta_1 = 1.0 - 1.0 / ops.log(step + 2.0)
        else:
            beta_1 = ops.convert_to_tensor(self.beta_1, dtype)
        beta_2 = ops.convert_to_tensor(self.beta_2, dtype)
        epsilon = ops.convert_to_tensor(self.epsilon, dtype)

        grad_sq = ops.square(grad)
        new_exp_avg = beta_1 * exp_avg + (1.0 - beta_1) * grad
        new_exp_avg_sq = (
            beta_2 * exp_avg_sq + (1.0 - beta_2) * ops.sign(grad_sq - exp_avg_sq) * grad_sq
        )
        self.assign(exp_avg, new_exp_avg)
        self.assign(exp_avg_sq, new_exp_avg_sq)

        v_hat = new_exp_avg_sq / (1.0 - ops.power(beta_2, step))
        denom = ops.sqrt(v_hat) + epsilon
        self.assign_sub(variable, lr * ops.abs(grad) * ops.sign(new_exp_avg) / denom)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "logarithmic_schedule": self.logarithmic_schedule,
                "exclude_1d_from_weight_decay": self.exclude_1d_from_weight_decay,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Anolog(Ano):
    """Anolog: :class:`Ano` with ``beta_1 = 1 - 1 / ln(k + 2)`` (0.09, 0.28, 0.38, ... at
    steps 1, 2, 3). Same arguments as :class:`Ano` without ``logarithmic_schedule``; ``beta_1``
    is accepted for compatibility and unused."""

    def __init__(
        self,
        learning_rate=hp.DEFAULT_LR,
        beta_1=hp.DEFAULT_BETAS[0],
        beta_2=hp.DEFAULT_BETAS[1],
        weight_decay=hp.DEFAULT_WEIGHT_DECAY,
        epsilon=hp.DEFAULT_EPS,
        **base_arguments,
    ):
        if "logarithmic_schedule" in base_arguments:
            raise TypeError(
                "Anolog always uses the logarithmic schedule; use Ano(logarithmic_schedule=...) "
                "to choose"
            )
        super().__init__(
            learning_rate,
            beta_1,
            beta_2,
            weight_decay,
            epsilon,
            True,
            **base_arguments,
        )

    def get_config(self):
        config = super().get_config()
        del config["logarithmic_schedule"]
        return config


def _base_optimizer_arguments() -> frozenset[str]:
    # The keyword-only arguments of Ano are exactly Keras's base optimizer arguments plus
    # this project's weight-decay filter; "name" is spelled out in AnoTF's signature.
    parameters = inspect.signature(Ano.__init__).parameters.values()
    return frozenset(
        p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "name"
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
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
