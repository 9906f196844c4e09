"""Keras 3 adapter: every registry optimizer with a Keras class becomes selectable by name.

After :func:`register` (run by ``import ano_optimizer.keras``)::

    model.compile(optimizer="ano")
    keras.optimizers.get("anolog")
    keras.optimizers.get({"class_name": "ano", "config": {"learning_rate": 3e-4}})

and a ``.keras`` file whose optimizer is one of these classes loads in a fresh process. The
names resolve only where Keras resolves optimizers (they are added to Keras's table of optimizer
names), so a plugin named like a loss (``"mse"``) never changes what that loss name means.
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
    instance of that class, saved under the class's own registered name. One subclass per
    name (:func:`_by_name`), since Keras resolves names to classes."""

    name: str
    cls: type
    defaults: dict

    @classmethod
    def from_config(cls, config: dict):
        return cls.cls.from_config({**cls.defaults, **config})

    def get_config(self) -> dict:  # Keras registers only classes that have one
        return {}


# The package of the by-name classes' registered names ("ano_optimizer.by_name>ano"): a name
# with ">" can never be looked up as a loss, metric, layer or activation.
_BY_NAME_PACKAGE = "ano_optimizer.by_name"


def _by_name(name: str, cls: type, defaults: dict) -> type:
    by_name = type(
        f"ByName_{name}",
        (_ByName,),
        {"name": name, "cls": cls, "defaults": defaults, "__module__": __name__},
    )
    return keras.saving.register_keras_serializable(package=_BY_NAME_PACKAGE, name=name)(by_name)


def _keras_builtin_names() -> set[str]:
    return {
        attribute.lower()
        for attribute, value in vars(keras.optimizers).items()
        if isinstance(value, type) and issubclass(value, keras.optimizers.Optimizer)
    }


def _optimizer_names() -> dict | None:
    """The table of names that ``keras.optimizers.get`` (and ``compile(optimizer=...)``)
    resolves, and nothing else in Keras consults: ``keras.src.optimizers.ALL_OBJECTS_DICT``.
    Private to Keras, hence looked up here alone and checked; None where it is gone."""
    try:
        from keras.src import optimizers
    except ImportError:
        return None
    table = getattr(optimizers, "ALL_OBJECTS_DICT", None)
    if not isinstance(table, dict) or "adam" not in table:
        return None
    return table


def _resolved_elsewhere(name: str) -> str | None:
    """What Keras (or the user, through custom objects) already resolves ``name`` to outside
    the optimizers, or None: a global custom object of that name would shadow it."""
    if name in keras.saving.get_custom_objects():
        return "a custom object"
    kinds = {
        "loss": keras.losses.get,
        "metric": keras.metrics.get,
        "activation": keras.activations.get,
        "initializer": keras.initializers.get,
        "regularizer": keras.regularizers.get,
        "constraint": keras.constraints.get,
    }
    for kind, get in kinds.items():
        try:
            if get(name) is not None:
                return f"a Keras {kind}"
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    if name in {attribute.lower() for attribute in vars(keras.layers)}:
        return "a Keras layer"
    return None


def register() -> list[str]:
    """Register every Keras-capable registry optimizer with Keras; return the names registered.

    A name resolves where Keras resolves optimizers only (``keras.optimizers.get``,
    ``compile(optimizer=...)``): it never shadows a loss, metric, activation or layer of that
    name, nor a custom object. Idempotent. Call it again after ``register_optimizer`` adds a
    Keras-capable spec at run time. A plugin whose Keras class cannot be imported, is not a
    Keras optimizer, or whose name is a Keras built-in optimizer (``"adam"``) is skipped with a
    :class:`KerasRegistrationWarning`.
    """
    table = _optimizer_names()
    builtins = _keras_builtin_names()
    registered = []
    for name in list_optimizers(framework="keras"):
        spec = get_optimizer_spec(name)
        if name in builtins:
            _warn(f"not registering optimizer {name!r} ({spec.source}) with Keras by name: it "
                  "would hide Keras's built-in optimizer of that name")  # fmt: skip
            continue
        try:
            cls = get_optimizer_class(name, "keras")
        except Exception as exc:  # a plugin may fail in any way; the others must still register
            _warn(f"optimizer {name!r} ({spec.source}) is not available in Keras: "
                  f"{type(exc).__name__}: {exc}")  # fmt: skip
            continue
        if not issubclass(cls, keras.optimizers.Optimizer):
            _warn(f"optimizer {name!r} ({spec.source}): keras_class {spec.keras_class!r} is not a "
                  "keras.optimizers.Optimizer subclass")  # fmt: skip
            continue
        if table is None:
            taken = _resolved_elsewhere(name)
            if taken is not None:
                _warn(f"not registering optimizer {name!r} ({spec.source}) with Keras by name: "
                      f"this Keras has no table of optimizer names, and a global custom object "
                      f"{name!r} would shadow {taken} of that name")  # fmt: skip
                continue
        by_name = _by_name(name, cls, _keras_defaults(spec, cls))
        if table is not None:
            table[name] = by_name
        else:
            keras.saving.get_custom_objects()[name] = by_name
        # A .keras file names the class by its registered name: make sure one resolves to it.
        # A plugin class that is not decorated with register_keras_serializable gets a name
        # qualified by its module, which no other object's name can be.
        if keras.saving.get_registered_object(keras.saving.get_registered_name(cls)) is not cls:
            keras.saving.register_keras_serializable(package=cls.__module__)(cls)
        registered.append(name)
    return registered


def _warn(message: str) -> None:
    warnings.warn(f"ano_optimizer: {message}", KerasRegistrationWarning, stacklevel=3)
