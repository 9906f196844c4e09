"""timm adapter: every PyTorch optimizer of the registry, selectable by name in timm.

Importing this module registers them, so timm's ``train.py`` needs no change::

    python train.py DATA --model resnet18 --opt ano --device-modules ano_optimizer.integrations.timm

(``train.py`` imports every ``--device-modules`` module before it builds the optimizer.) In
Python, call :func:`register` explicitly, then use ``timm.optim.create_optimizer_v2(model,
opt="ano")``: timm builds its own parameter groups (weight decay, layer decay with ``lr_scale``,
``model.no_weight_decay()``), and ``lookahead_<name>`` wraps any of these names in timm's
``Lookahead``.

timm 1.0.12 and later keep their optimizer table in ``timm.optim._optim_factory.default_registry``
and offer no public way to add to it, so this module registers through that private object and
checks its shape first: if a timm release moves or changes it, :func:`register` raises an error
that names the installed timm version instead of failing somewhere inside timm.
"""

from __future__ import annotations

import warnings

import timm
import timm.optim

from ano_optimizer.registry import get_optimizer_class, get_optimizer_spec, list_optimizers

__all__ = ["TimmNameTakenWarning", "optim_info", "register"]

# The OptimInfo this module put into timm, by name: lets register() recognise its own entries,
# so calling it again is a no-op while a name timm itself owns is never touched.
_REGISTERED: dict[str, timm.optim.OptimInfo] = {}
_WARNED_TAKEN: set[str] = set()


class TimmNameTakenWarning(UserWarning):
    """A registry optimizer was not added to timm: timm already has an optimizer of that name."""


def _timm_registry() -> timm.optim.OptimizerRegistry:
    """timm's global optimizer registry, after checking it is the one the public factory uses."""
    version = getattr(timm, "__version__", "unknown")
    registry_class = getattr(timm.optim, "OptimizerRegistry", None)
    try:
        from timm.optim import _optim_factory

        registry = _optim_factory.default_registry
    except (ImportError, AttributeError):
        registry = None
    factory_registry = getattr(timm.optim.create_optimizer_v2, "__globals__", {}).get(
        "default_registry"
    )
    if (
        not isinstance(registry_class, type)
        or not isinstance(getattr(timm.optim, "OptimInfo", None), type)
        or not isinstance(registry, registry_class)
        or factory_registry is not registry
        or not all(
            callable(getattr(registry, method, None))
            for method in ("register", "get_optimizer_info", "list_optimizers")
        )
    ):
        raise RuntimeError(
            f"ano_optimizer.integrations.timm: timm {version} has no usable "
            "timm.optim._optim_factory.default_registry (an OptimizerRegistry used by "
            "create_optimizer_v2, as in timm 1.0.12 to 1.0.31), so optimizers cannot be "
            "registered in it. Install a timm release in that range, or create the optimizer "
            "directly with ano_optimizer.create_optimizer(model, name)."
        )
    return registry


def optim_info(name: str) -> timm.optim.OptimInfo:
    """The timm ``OptimInfo`` describing registry optimizer ``name`` (not registered by this call).

    The class stays a lazy dotted reference, as timm's own string entries are, so registering
    does not import a plugin's module; timm imports it when the optimizer is first created.

    Raises:
        ValueError: unknown name, or the optimizer has no PyTorch class.
        RuntimeError: the installed timm has no usable optimizer registry (names its version).
    """
    _timm_registry()
    spec = get_optimizer_spec(name)
    if spec.torch_class is None:
        raise ValueError(
            f"optimizer {spec.name!r} has no PyTorch class (frameworks: "
            f"{', '.join(spec.frameworks)}), so timm cannot use it"
        )
    module, _, qualname = spec.torch_class.partition(":")
    # timm imports "module.Class" by splitting at the last dot: a nested class cannot be written
    # that way, so that rare case is imported now.
    opt_class = f"{module}.{qualname}" if "." not in qualname else get_optimizer_class(spec.name)
    return timm.optim.OptimInfo(
        name=spec.name,
        opt_class=opt_class,
        description=spec.description,
        has_eps=spec.has_eps,
        has_momentum=spec.has_momentum,
        has_betas=spec.has_betas,
        num_betas=2,
        defaults=dict(spec.defaults) or None,
    )


def register() -> list[str]:
    """Add every PyTorch optimizer of the registry to timm; return the names timm now takes from us.

    Idempotent. A name timm already has for an optimizer of its own is left alone, with one
    :class:`TimmNameTakenWarning`; that optimizer stays available through
    ``ano_optimizer.create_optimizer``. Optimizers registered in ``ano_optimizer`` after this call
    reach timm on the next call.

    Raises:
        RuntimeError: the installed timm has no usable optimizer registry (names its version).
    """
    registry = _timm_registry()
    ours = []
    for name in list_optimizers(framework="torch"):
        info = optim_info(name)
        current = registry.get_optimizer_info(name) if name in registry.list_optimizers() else None
        if current is None or (current is _REGISTERED.get(name) and current != info):
            # New, or ours and its spec changed since: (re-)register.
            registry.register(info)
            _REGISTERED[name] = info
        elif current == info:
            # Ours already (possibly put there by a reloaded copy of this module).
            _REGISTERED[name] = current
        else:
            _warn_taken(name, current)
            continue
        ours.append(name)
    return ours


def _warn_taken(name: str, current: timm.optim.OptimInfo) -> None:
    if name in _WARNED_TAKEN:
        return
    _WARNED_TAKEN.add(name)
    warnings.warn(
        f"ano_optimizer: timm {timm.__version__} already has an optimizer named {name!r} "
        f"({current.opt_class!r}); the registry's {name!r} (source: "
        f"{get_optimizer_spec(name).source}) is not registered in timm. Create it with "
        f"ano_optimizer.create_optimizer(model, {name!r}).",
        TimmNameTakenWarning,
        stacklevel=3,
    )


# timm's train.py imports each --device-modules module and expects that to be enough.
register()
