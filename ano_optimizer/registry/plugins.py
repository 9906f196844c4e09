"""Entry-point discovery: the built-ins and third-party optimizers of ``ano_optimizer.optimizers``.

A distribution plugs an optimizer in by declaring, in its ``pyproject.toml``::

    [project.entry-points."ano_optimizer.optimizers"]
    myopt = "my_package.specs:MYOPT"       # an ano_optimizer.OptimizerSpec named "myopt"

This project declares ``ano`` and ``anolog`` the same way. The registry calls :func:`load_into`
on its first lookup (again on the next one, should that discovery be interrupted). The built-ins
are the spec objects of :mod:`ano_optimizer.registry.builtins`, registered first whatever the metadata says:
an entry point that resolves to one of them is the built-in itself (this project's own, or a
stale copy of its metadata), and any other spec that claims a built-in's name is refused. A
broken plugin, whatever it raises on import (``SystemExit`` included; ``KeyboardInterrupt`` is
let through), costs one :class:`OptimizerPluginWarning` and is skipped; it never takes other
names down. Set ``ANO_OPTIMIZER_DISABLE_PLUGINS=1`` to load the built-ins only.
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import EntryPoint, entry_points

from .builtins import BUILTIN_SPECS
from .spec import OptimizerSpec, spec_with_source

__all__ = [
    "DISABLE_PLUGINS_ENV",
    "ENTRY_POINT_GROUP",
    "OptimizerPluginWarning",
    "load_into",
    "plugins_disabled",
]

ENTRY_POINT_GROUP = "ano_optimizer.optimizers"
DISABLE_PLUGINS_ENV = "ANO_OPTIMIZER_DISABLE_PLUGINS"


class OptimizerPluginWarning(UserWarning):
    """A plugin entry point was skipped: it failed to load, or it claimed a taken name."""


def plugins_disabled() -> bool:
    """True when ``ANO_OPTIMIZER_DISABLE_PLUGINS`` is set to anything but empty/0/false/no/off."""
    value = os.environ.get(DISABLE_PLUGINS_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _distribution(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return dist.name if dist is not None and dist.name else "<unknown distribution>"


def _shown(text: str) -> str:
    """``text`` as a warning may print it: escaped where it holds control characters."""
    return text if text.isprintable() else repr(text)[1:-1]


def _warn(entry: EntryPoint, distribution: str, problem: str) -> None:
    warnings.warn(
        f"ano_optimizer: skipped optimizer plugin entry point "
        f"'{_shown(entry.name)} = {_shown(entry.value)}' of distribution "
        f"'{_shown(distribution)}': {_shown(problem)}",
        OptimizerPluginWarning,
        stacklevel=5,
    )


def _load(entry: EntryPoint, distribution: str) -> OptimizerSpec | None:
    try:
        spec = entry.load()
    # A plugin may fail in any way, sys.exit() at import included; it must not take the
    # registry, or the program that looked a name up, down. Ctrl-C still interrupts.
    except (Exception, SystemExit) as exc:
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
    for spec in BUILTIN_SPECS:
        specs[spec.name] = spec
    if plugins_disabled():
        return
    try:
        entries = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # unreadable metadata of some distribution: built-ins only
        warnings.warn(
            f"ano_optimizer: cannot read the {ENTRY_POINT_GROUP!r} entry points, so no "
            f"optimizer plugin is loaded: {type(exc).__name__}: {exc}",
            OptimizerPluginWarning,
            stacklevel=4,
        )
        return
    # Sorted, so which of two clashing plugins wins does not depend on sys.path order.
    candidates = sorted(
        ((_distribution(entry), entry) for entry in entries),
        key=lambda item: (item[0].lower(), item[1].name),
    )
    for distribution, entry in candidates:
        spec = _load(entry, distribution)
        if spec is None or any(spec is builtin for builtin in BUILTIN_SPECS):
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
        try:
            specs[spec.name] = spec_with_source(spec, distribution)
        except ValueError as exc:  # a distribution name that cannot be shown as a source
            _warn(entry, distribution, str(exc))
