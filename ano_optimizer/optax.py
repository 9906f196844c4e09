"""Ano and Anolog for JAX, as optax gradient transformations (``pip install 'ano-optimizer[optax]'``).

Written the way optax writes its own optimizers: :func:`scale_by_ano` is the Ano rescaling
alone, and :func:`ano` / :func:`anolog` chain it with ``optax.add_decayed_weights`` (decoupled
weight decay, optionally masked) and ``optax.scale_by_learning_rate`` (a float or a schedule),
exactly as ``optax.adamw`` chains ``scale_by_adam``. The math is the one of
:class:`ano_optimizer.Ano`, on every leaf of the parameter pytree::

    k  = count + 1
    b1 = 1 - 1 / ln(k + 2)  if logarithmic_schedule  else b1
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * sign(g**2 - nu) * g**2
    update = |g| * sign(mu) / (sqrt(nu / (1 - b2**k)) + eps)

Two differences from the PyTorch class follow optax's conventions. The step count is one
``count`` for the whole pytree (optax has no "parameter without a gradient on this step"; a zero
gradient is a gradient). To maximise, negate the gradients (``optax.chain(optax.scale(-1.0),
ano(...))``), as with every optax optimizer. The moments of bfloat16 and float16 leaves are kept
in float32 (the additive second moment's small decreases would be rounded away in 8 bits of
mantissa), and the update comes back in each gradient's own dtype.

The numeric hyper-parameters may also be scalar arrays, so ``optax.inject_hyperparams(ano)(
learning_rate=1e-3)`` works and the rate can be read or changed in the optimizer state.

This module imports jax and optax; ``import ano_optimizer`` does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import hyperparameters as hp

__all__ = ["ScaleByAnoState", "ano", "anolog", "scale_by_ano"]


class ScaleByAnoState(NamedTuple):
    """State of :func:`scale_by_ano`: the step count and the two moments, one leaf per parameter."""

    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates  # first moment (momentum), no bias correction
    nu: optax.Updates  # additive second moment


def _state_dtype(leaf) -> jnp.dtype:
    dtype = jnp.asarray(leaf).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"ano (optax): every parameter leaf must be a real floating-point array, got a "
            f"leaf of dtype {dtype} and shape {jnp.shape(leaf)}; keep non-trainable leaves out "
            "of the optimized pytree (or use optax.masked / optax.partition)"
        )
    return jnp.promote_types(dtype, jnp.float32)


def scale_by_ano(
    b1: float = hp.DEFAULT_BETAS[0],
    b2: float = hp.DEFAULT_BETAS[1],
    eps: float = hp.DEFAULT_EPS,
    logarithmic_schedule: bool = False,
) -> optax.GradientTransformation:
    """Rescale updates by Ano's rule: direction ``sign(mu)``, size ``|g| / (sqrt(nu_hat) + eps)``.

    Args:
        b1: momentum coefficient, in [0, 1); unused when ``logarithmic_schedule`` is True.
        b2: second-moment coefficient, in [0.5, 1).
        eps: added to the denominator, finite and > 0.
        logarithmic_schedule: Anolog's schedule ``b1 = 1 - 1/ln(k + 2)`` at step k.

    Raises:
        ValueError: a hyper-parameter outside its range (the message names it).
    """
    return _scale_by_ano("scale_by_ano", b1, b2, eps, logarithmic_schedule)


def _check_number(owner: str, name: str, value, allowed: str, ok: Callable[[float], bool]):
    """Check a numeric hyper-parameter: a real number, or a scalar array (as
    ``optax.inject_hyperparams`` passes them). A traced array (under jit) cannot be read and is
    let through; it was checked when ``inject_hyperparams`` was called with the concrete value."""
    if isinstance(value, (jax.Array, np.ndarray)):
        if value.shape != ():
            raise ValueError(
                f"{owner}: invalid {name}: an array must be a scalar, got shape {value.shape}"
            )
        if isinstance(value, jax.core.Tracer):
            return
        number = float(value)
    elif hp.is_real_number(value):
        number = float(value)
    else:
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"{owner}: invalid {name}={value!r}; it must be {allowed}")


def _check_coefficient(owner: str, name: str, value, low: float) -> None:
    _check_number(owner, name, value, f"a float in [{low:g}, 1)", lambda v: low <= v < 1.0)


def _scale_by_ano(owner, b1, b2, eps, logarithmic_schedule) -> optax.GradientTransformation:
    _check_coefficient(owner, "b1", b1, 0.0)
    # Below 0.5 the additive second moment can turn negative and sqrt gives NaN.
    _check_coefficient(owner, "b2", b2, 0.5)
    _check_number(owner, "eps", eps, "finite and > 0", lambda v: v > 0.0)
    hp.check_flag("logarithmic_schedule", logarithmic_schedule, owner=owner)

    def init_fn(params):
        def zeros(leaf):
            return jnp.zeros(jnp.shape(leaf), _state_dtype(leaf))

        return ScaleByAnoState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)

        def leaf(g, mu, nu):
            if g is None:
                return None, mu, nu
            grad = jnp.asarray(g).astype(mu.dtype)
            k = count.astype(mu.dtype)
            beta1 = 1.0 - 1.0 / jnp.log(k + 2.0) if logarithmic_schedule else b1
            mu = beta1 * mu + (1.0 - beta1) * grad
            grad_sq = grad * grad
            nu = b2 * nu + (1.0 - b2) * jnp.sign(grad_sq - nu) * grad_sq
            nu_hat = nu / (1.0 - b2**k)
            update = jnp.abs(grad) * jnp.sign(mu) / (jnp.sqrt(nu_hat) + eps)
            return update.astype(jnp.asarray(g).dtype), mu, nu

        triples = jax.tree.map(leaf, updates, state.mu, state.nu, is_leaf=lambda x: x is None)
        treedef = jax.tree.structure(updates, is_leaf=lambda x: x is None)
        flat = treedef.flatten_up_to(triples)
        new_updates = treedef.unflatten([t[0] for t in flat])
        mu = treedef.unflatten([t[1] for t in flat])
        nu = treedef.unflatten([t[2] for t in flat])
        return new_updates, ScaleByAnoState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _check_learning_rate(learning_rate, owner: str) -> None:
    if callable(learning_rate):  # an optax schedule: step count -> rate
        return
    _check_number(
        owner, "learning_rate", learning_rate, "a finite float >= 0 or an optax schedule",
        lambda v: v >= 0.0,
    )  # fmt: skip


def ano(
    learning_rate: float | optax.ScalarOrSchedule = hp.DEFAULT_LR,
    b1: float = hp.DEFAULT_BETAS[0],
    b2: float = hp.DEFAULT_BETAS[1],
    eps: float = hp.DEFAULT_EPS,
    weight_decay: float = hp.DEFAULT_WEIGHT_DECAY,
    logarithmic_schedule: bool = False,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """Ano for optax: :func:`scale_by_ano`, decoupled weight decay, then the learning rate.

    Args:
        learning_rate: a float >= 0 or an optax schedule (``optax.cosine_decay_schedule(...)``).
        b1: momentum coefficient, in [0, 1).
        b2: second-moment coefficient, in [0.5, 1).
        eps: added to the denominator, finite and > 0.
        weight_decay: decoupled weight decay (``p *= 1 - learning_rate * weight_decay``), >= 0.
        logarithmic_schedule: Anolog's momentum schedule (see :func:`anolog`).
        mask: as in ``optax.adamw``: a pytree of booleans shaped like the parameters, or a
            function of the parameters returning one; weight decay applies where it is True.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from ano_optimizer.optax import ano
        >>> params = {"w": jnp.ones(3)}
        >>> optimizer = ano(learning_rate=1e-2)
        >>> state = optimizer.init(params)
        >>> updates, state = optimizer.update({"w": jnp.array([1.0, -2.0, 0.0])}, state, params)
        >>> optax.apply_updates(params, updates)["w"].tolist()
        [0.9900000095367432, 1.0099999904632568, 1.0]

    Raises:
        ValueError: a hyper-parameter outside its range (the message names it).
    """
    return _chain("ano", learning_rate, b1, b2, eps, weight_decay, logarithmic_schedule, mask)


def anolog(
    learning_rate: float | optax.ScalarOrSchedule = hp.DEFAULT_LR,
    b2: float = hp.DEFAULT_BETAS[1],
    eps: float = hp.DEFAULT_EPS,
    weight_decay: float = hp.DEFAULT_WEIGHT_DECAY,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """Anolog for optax: :func:`ano` with the momentum schedule ``b1 = 1 - 1/ln(k + 2)``.

    It has no ``b1``: the schedule replaces it. The other arguments are :func:`ano`'s.
    """
    b1 = hp.DEFAULT_BETAS[0]  # checked, then unused
    return _chain("anolog", learning_rate, b1, b2, eps, weight_decay, True, mask)


def _chain(owner, learning_rate, b1, b2, eps, weight_decay, logarithmic_schedule, mask):
    _check_learning_rate(learning_rate, owner=owner)
    _check_number(owner, "weight_decay", weight_decay, "finite and >= 0", lambda v: v >= 0.0)
    return optax.chain(
        _scale_by_ano(owner, b1, b2, eps, logarithmic_schedule),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
