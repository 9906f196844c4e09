"""Entry-point discovery: the built-ins and third-party optimizers of ``ano_optimizer.optimizers``.

A distribution plugs an optimizer in by declaring, in its ``pyproject.toml``::

    [project.entry-points."ano_optimizer.optimizers"]
    myopt = "my_package.specs:MYOPT"       # an ano_optimizer.OptimizerSpec named "myopt"

This project declares ``ano`` and ``anolog`` the same way. The registry calls :func:`load_into`
once, on its first lookup. A broken plugin costs one :class:`OptimizerPluginWarning` and is
skipped; it never takes other names down. Set ``ANO_OPTIMIZER_DISABLE_PLUGINS=1`` to load the
built-ins only.
"""

from __future__ import annotations

import os
import re
import warnings
from importlib.metadata import EntryPoint, entry_points

from .registry import OptimizerSpec, _spec_with_source

__all__ = [
    "DISABLE_PLUGINS_ENV",
    "ENTRY_POINT_GROUP",
    "OptimizerPluginWarning",
    "load_into",
    "plugins_disabled",
]

ENTRY_POINT_GROUP = "ano_optimizer.optimizers"
DISABLE_PLUGINS_ENV = "ANO_OPTIMIZER_DISABLE_PLUGINS"
PROJECT_DISTRIBUTION = "ano-optimizer"


class OptimizerPluginWarning(UserWarning):
    """A plugin entry point was skipped: it failed to load, or it claimed a taken name."""


def plugins_disabled() -> bool:
    """True when ``ANO_OPTIMIZER_DISABLE_PLUGINS`` is set to anything but empty/0/false/no/off."""
    value = os.environ.get(DISABLE_PLUGINS_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _normalize(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _distribution(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return dist.name if dist is not None and dist.name else "<unknown distribution>"


def _warn(entry: EntryPoint, distribution: str, problem: str) -> None:
    warnings.warn(
        f"ano_optimizer: skipped optimizer plugin entry point '{entry.name} = {entry.value}' "
        f"of distribution '{distribution}': {problem}",
        OptimizerPluginWarning,
        stacklevel=5,
    )


def _load(entry: EntryPoint, distribution: str) -> OptimizerSpec | None:
    try:
        spec = entry.load()
    except Exception as exc:  # a plugin may fail in any way; it must not take the registry down
        _warn(entry, distribution, f"{type(exc).__name__}: {exc}")
        return None
    if not isinstance(spec, OptimizerSpec):
        _warn(entry, distribution, f"it is {spec!r}, not an ano_optimizer.OptimizerSpec")
        return None
    if entry.name.lower() != spec.name:
        _warn(
            entry,
            distribution,
            f"the entry point is named {entry.name!r} but its spec is named {spec.name!r}",
        )
        return None
    return spec


def load_into(specs: dict[str, OptimizerSpec]) -> None:
    """Add the built-ins, then every third-party plugin, to ``specs`` (name -> spec)."""
    from .specs import BUILTIN_SPECS

    own: list[EntryPoint] = []
    third_party: list[tuple[str, EntryPoint]] = []
    if not plugins_disabled():
        try:
            entries = entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # unreadable metadata of some distribution: built-ins only
            warnings.warn(
                f"ano_optimizer: cannot read the {ENTRY_POINT_GROUP!r} entry points, so no "
                f"optimizer plugin is loaded: {type(exc).__name__}: {exc}",
                OptimizerPluginWarning,
                stacklevel=4,
            )
            entries = ()
        for entry in entries:
            distribution = _distribution(entry)
            if _normalize(distribution) == PROJECT_DISTRIBUTION:
                own.append(entry)
            else:
                third_party.append((distribution, entry))

    for entry in own:
        spec = _load(entry, PROJECT_DISTRIBUTION)
        if spec is not None:
            specs[spec.name] = _spec_with_source(spec, "built-in")
    # Without this project's metadata (a source checkout never installed, or plugins disabled)
    # the built-ins come straight from their module.
    for spec in BUILTIN_SPECS:
        specs.setdefault(spec.name, spec)

    # Sorted, so which of two clashing plugins wins does not depend on sys.path order.
    for distribution, entry in sorted(
        third_party, key=lambda item: (item[0].lower(), item[1].name)
    ):
        spec = _load(entry, distribution)
        if spec is None:
            continue
        existing = specs.get(spec.name)
        if existing is not None:
            _warn(
                entry,
                distribution,
                f"the name {spec.name!r} is already taken (source: {existing.source}); "
                "keeping the optimizer registered first",
            )
            continue
        specs[spec.name] = _spec_with_source(spec, distribution)
