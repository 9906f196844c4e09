"""Keras 3 adapter: every registry optimizer with a Keras class becomes selectable by name.

After :func:`register` (run by ``import ano_optimizer.keras``)::

    model.compile(optimizer="ano")
    keras.optimizers.get("anolog")
    keras.optimizers.get({"class_name": "ano", "config": {"learning_rate": 3e-4}})

and a ``.keras`` file whose optimizer is one of these classes loads in a fresh process.
A name is looked up by Keras as written: use the registry's lower-case names.
"""

from __future__ import annotations

import inspect
import warnings

import keras

from ano_optimizer.registry import get_optimizer_class, get_optimizer_spec, list_optimizers

__all__ = ["KerasRegistrationWarning", "register"]


class KerasRegistrationWarning(UserWarning):
    """A registry optimizer could not be made available to Keras by name."""


def _keras_names(spec) -> dict[str, str]:
    """How the spec's (PyTorch-style) default keyword names are spelled in Keras."""
    names = {"lr": "learning_rate"}
    if spec.has_eps:
        names["eps"] = "epsilon"
    return names


def _keras_defaults(spec, cls) -> dict:
    """The spec's ``defaults`` in Keras spelling, keeping only what ``cls`` accepts.

    Defaults are written for ``create_optimizer`` (PyTorch); one that the Keras class has no
    argument for (``foreach``, ...) concerns the PyTorch class only.
    """
    renamed = {}
    for key, value in spec.defaults.items():
        if key == "betas" and spec.has_betas:
            renamed["beta_1"], renamed["beta_2"] = value
        else:
            renamed[_keras_names(spec).get(key, key)] = value
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return renamed
    accepted = {p.name for p in parameters}
    return {key: value for key, value in renamed.items() if key in accepted}


class _ByName:
    """What Keras finds under a registry name: it builds the spec's Keras class, with the
    spec's defaults under the caller's config. The optimizer it returns is an ordinary
    instance of that class, saved under the class's own registered name."""

    def __init__(self, name: str, cls: type, defaults: dict) -> None:
        self.name = name
        self.cls = cls
        self.defaults = defaults

    def from_config(self, config: dict):
        return self.cls.from_config({**self.defaults, **config})

    def __call__(self, **config):
        return self.from_config(config)

    def __repr__(self) -> str:
        return f"<Keras optimizer {self.name!r}: {self.cls.__module__}.{self.cls.__qualname__}>"


def _keras_builtin_names() -> set[str]:
    return {
        attribute.lower()
        for attribute, value in vars(keras.optimizers).items()
        if isinstance(value, type) and issubclass(value, keras.optimizers.Optimizer)
    }


def register() -> list[str]:
    """Register every Keras-capable registry optimizer with Keras; return the names registered.

    Idempotent. Call it again after ``register_optimizer`` adds a Keras-capable spec at run
    time. A plugin whose Keras class cannot be imported, is not a Keras optimizer, or whose name
    is a Keras built-in (``"adam"``) is skipped with a :class:`KerasRegistrationWarning`.
    """
    custom_objects = keras.saving.get_custom_objects()
    builtins = _keras_builtin_names()
    registered = []
    for name in list_optimizers(framework="keras"):
        spec = get_optimizer_spec(name)
        if name in builtins:
            warnings.warn(
                f"ano_optimizer: not registering optimizer {name!r} ({spec.source}) with Keras "
                "by name: it would hide Keras's built-in optimizer of that name",
                KerasRegistrationWarning,
                stacklevel=2,
            )
            continue
        try:
            cls = get_optimizer_class(name, "keras")
        except Exception as exc:  # a plugin may fail in any way; the others must still register
            warnings.warn(
                f"ano_optimizer: optimizer {name!r} ({spec.source}) is not available in Keras: "
                f"{type(exc).__name__}: {exc}",
                KerasRegistrationWarning,
                stacklevel=2,
            )
            continue
        if not issubclass(cls, keras.optimizers.Optimizer):
            warnings.warn(
                f"ano_optimizer: optimizer {name!r} ({spec.source}): keras_class "
                f"{spec.keras_class!r} is not a keras.optimizers.Optimizer subclass",
                KerasRegistrationWarning,
                stacklevel=2,
            )
            continue
        custom_objects[name] = _ByName(name, cls, _keras_defaults(spec, cls))
        # A .keras file names the class by its registered name: make sure one resolves to it,
        # also for plugin classes that are not decorated with register_keras_serializable.
        custom_objects.setdefault(keras.saving.get_registered_name(cls), cls)
        registered.append(name)
    return registered
