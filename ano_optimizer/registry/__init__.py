"""The optimizer registry: look optimizers up by name and hand them to a training framework.

Each optimizer is described by a frozen :class:`OptimizerSpec` whose classes are lazy
``"module:Class"`` references, so listing names never imports torch optimizers' modules, Keras
or a plugin's framework. The built-ins and third-party plugins arrive through the
``ano_optimizer.optimizers`` entry-point group (see :mod:`ano_optimizer.registry.plugins`), read once, on
the first lookup. Modelled on timm's ``OptimInfo``/``OptimizerRegistry`` and
``torch._dynamo.backends.registry``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import threading
from collections.abc import Iterable
from typing import Any

from . import plugins
from .plugins import OptimizerPluginWarning
from .spec import FRAMEWORKS, OptimizerSpec, check_framework

__all__ = [
    "FRAMEWORKS",
    "OptimizerPluginWarning",
    "OptimizerSpec",
    "create_optimizer",
    "get_optimizer_class",
    "get_optimizer_spec",
    "list_optimizers",
    "optimizer_keywords",
    "register_optimizer",
]


class _Registry:
    def __init__(self) -> None:
        self._specs: dict[str, OptimizerSpec] = {}
        self._loaded = False
        self._loading = False
        # Re-entrant: a plugin module may itself call register_optimizer while being loaded.
        self._lock = threading.RLock()

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        # Other threads wait here until loading is complete; the loading thread itself (a
        # plugin registering from its module) gets through on _loading.
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            # A plugin that registers while it is being loaded writes into this dict too; an
            # interrupted discovery (Ctrl-C) is thrown away whole and redone on the next lookup.
            self._specs = {}
            try:
                plugins.load_into(self._specs)
                self._loaded = True
            except BaseException:
                self._specs = {}
                raise
            finally:
                self._loading = False

    def register(self, spec: OptimizerSpec) -> None:
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"register_optimizer expects an OptimizerSpec, got {spec!r}")
        self._ensure_loaded()
        with self._lock:
            existing = self._specs.get(spec.name)
            if existing is not None and existing != spec:
                raise ValueError(
                    f"optimizer name {spec.name!r} is already registered (source: "
                    f"{existing.source}, torch_class={existing.torch_class!r}); choose another name"
                )
            self._specs[spec.name] = spec

    def get(self, name) -> OptimizerSpec:
        if not isinstance(name, str):
            raise TypeError(f"optimizer name must be a string, got {name!r}")
        self._ensure_loaded()
        spec = self._specs.get(name.lower())
        if spec is None:
            known = sorted(self._specs)
            close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "no close match"
            raise ValueError(
                f"unknown optimizer {name!r} ({hint}); known optimizers: {', '.join(known)}"
            )
        return spec

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._specs)


_REGISTRY = _Registry()


def register_optimizer(spec: OptimizerSpec) -> None:
    """Make ``spec`` available by name. Registering the very same spec twice is a no-op.

    Raises:
        ValueError: another spec already holds that name (built-in, plugin or earlier call).
    """
    _REGISTRY.register(spec)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the known names and the closest matches.
    """
    return _REGISTRY.get(name)


def _resolve(reference: str, what: str, *, want_class: bool):
    module_name, _, attribute_path = reference.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{what}: cannot import module {module_name!r}: {exc}") from exc
    for attribute in attribute_path.split("."):
        try:
            obj = getattr(obj, attribute)
        except AttributeError:
            raise ImportError(
                f"{what}: module {module_name!r} has no attribute {attribute_path!r}"
            ) from None
    if want_class and not isinstance(obj, type):
        raise TypeError(f"{what}: {reference!r} is {obj!r}, not a class")
    if not callable(obj):
        raise TypeError(f"{what}: {reference!r} is {obj!r}, not a function")
    return obj


def get_optimizer_class(name: str, framework: str = "torch"):
    """Import and return the optimizer of ``name`` for ``framework``.

    For "torch" and "keras" that is the optimizer class; for "optax" it is the factory
    function that returns an ``optax.GradientTransformation`` (``ano_optimizer.optax.ano``).

    Raises:
        ValueError: unknown name or framework, or the optimizer has no class for that framework.
        ImportError: the class's module cannot be imported (e.g. the framework is not installed).
    """
    check_framework(framework)
    spec = get_optimizer_spec(name)
    reference = spec.class_reference(framework)
    if reference is None:
        raise ValueError(
            f"optimizer {spec.name!r} has no {framework} implementation "
            f"(available for: {', '.join(spec.frameworks)})"
        )
    return _resolve(
        reference, f"optimizer {spec.name!r} ({framework})", want_class=framework != "optax"
    )


def list_optimizers(pattern: str | None = None, framework: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered.

    Args:
        pattern: shell-style wildcard matched case-insensitively (``"ano*"``); None for all.
        framework: "torch", "keras" or "optax" keeps the names whose spec has a class (or, for
            optax, a factory) for that framework (whether the framework is installed is not
            checked); None for all.
    """
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string or None, got {pattern!r}")
    if framework is not None:
        check_framework(framework)
    names = _REGISTRY.names()
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern.lower())]
    if framework is not None:
        names = [n for n in names if get_optimizer_spec(n).class_reference(framework)]
    return names


def optimizer_keywords(cls: type) -> dict[str, Any] | None:
    """Keyword arguments of ``cls(params, ...)`` and their defaults; None when it takes ``**kwargs``.

    The one table the registry's :func:`create_optimizer` and the Hugging Face adapter check
    user-given options against (unknown keywords are errors there, never dropped).
    """
    parameters = list(inspect.signature(cls).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    # The first parameter receives the parameters / parameter groups.
    return {p.name: p.default for p in parameters[1:] if p.kind in keyword_kinds}


def create_optimizer(
    model_or_params,
    name: str,
    lr: float | None = None,
    weight_decay: float | None = None,
    *,
    no_weight_decay: Iterable[str] = (),
    **kwargs,
):
    """Create the PyTorch optimizer registered as ``name``.

    Given an ``nn.Module``, its trainable parameters are split by
    :func:`~ano_optimizer.param_groups.param_groups_weight_decay` into a decayed group and a
    no-decay group (≤ 1-D parameters, ``.bias``, ``model.no_weight_decay()`` and the
    ``no_weight_decay`` name patterns). Given parameters or parameter groups, they are used as
    they are and ``weight_decay`` is the default of every group.

    Args:
        model_or_params: an ``nn.Module``, or an iterable of tensors or parameter-group dicts.
        name: registry name, case-insensitive (``"ano"``, ``"anolog"``, a plugin's name).
        lr: learning rate; None keeps the spec's or the class's default.
        weight_decay: decoupled weight decay of the decayed group; None takes the spec's
            ``defaults`` value, else 0.
        no_weight_decay: extra parameter-name patterns (wildcards allowed) kept out of decay;
            only used with a module.
        **kwargs: further keyword arguments of the optimizer class (``betas``, ``eps``, ...);
            they override the spec's ``defaults``.

    Raises:
        ValueError: unknown name, bad hyper-parameter, or no trainable parameter.
        TypeError: a keyword argument the optimizer does not accept.
    """
    import torch

    spec = get_optimizer_spec(name)
    cls = get_optimizer_class(spec.name, "torch")
    options = dict(spec.defaults)
    options.update(kwargs)
    if lr is not None:
        options["lr"] = lr
    if weight_decay is None:
        weight_decay = options.get("weight_decay", 0.0)
    accepted = optimizer_keywords(cls)
    # An optimizer without weight decay still works with the default weight_decay=0.
    if accepted is None or "weight_decay" in accepted or weight_decay:
        options["weight_decay"] = weight_decay
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(
                f"optimizer {spec.name!r} ({cls.__qualname__}) got unexpected keyword "
                f"argument(s) {', '.join(map(repr, unknown))}; it accepts: "
                f"{', '.join(sorted(accepted))}"
            )

    if isinstance(model_or_params, torch.nn.Module):
        from ..param_groups import param_groups_weight_decay

        params = param_groups_weight_decay(model_or_params, weight_decay, no_weight_decay)
        if not params:
            raise ValueError(
                f"create_optimizer: {type(model_or_params).__name__} has no trainable parameter "
                "(every parameter has requires_grad=False)"
            )
    else:
        if tuple(no_weight_decay):
            raise ValueError(
                "create_optimizer: no_weight_decay patterns need a model (nn.Module) to match "
                "parameter names; with parameter groups, set weight_decay per group"
            )
        params = model_or_params
    return cls(params, **options)
