"""The spec type: what the registry knows about one optimizer, as a frozen record of lazy
references. A leaf module: the built-ins, the plugin loader and the lookups all import it.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FRAMEWORKS", "OptimizerSpec", "check_framework", "spec_with_source"]


# timm splits optimizer names on "_" (e.g. "lookahead_adamw"), so names keep to [a-z0-9].
_NAME_RE = re.compile(r"[a-z0-9]+")
# framework -> the spec field holding its lazy "module:attribute" reference
_REFERENCE_FIELDS = {"torch": "torch_class", "keras": "keras_class", "optax": "optax_factory"}
FRAMEWORKS = tuple(_REFERENCE_FIELDS)
_REFERENCE_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class OptimizerSpec:
    """What the registry knows about one optimizer, without importing it.

    Args:
        name: lower-case letters and digits only; lookups are case-insensitive.
        description: one line, shown by ``ano-optimizer list``.
        torch_class: ``"module:Class"`` of the PyTorch optimizer, or None.
        keras_class: ``"module:Class"`` of the Keras optimizer, or None.
        optax_factory: ``"module:function"`` of a function returning an
            ``optax.GradientTransformation`` (as ``optax.adamw`` does), or None.
        defaults: keyword arguments added when the optimizer is created (the caller's win).
        has_betas: accepts ``betas=(beta1, beta2)``.
        has_eps: accepts ``eps``.
        has_momentum: accepts ``momentum``.
        source: ``"built-in"``, or the distribution of the plugin that registered it.
    """

    name: str
    description: str
    torch_class: str | None = None
    keras_class: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)
    has_betas: bool = True
    has_eps: bool = True
    has_momentum: bool = False
    source: str = "built-in"
    optax_factory: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"OptimizerSpec: invalid name {self.name!r}; a name is lower-case letters and "
                "digits only (no '_', '-' or spaces: timm splits optimizer names on '_')"
            )
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"OptimizerSpec {self.name!r}: description must be a non-empty string")
        if not self.description.isprintable():
            raise ValueError(
                f"OptimizerSpec {self.name!r}: description must be one line of printable text, "
                f"without control characters, got {self.description!r}"
            )
        for attribute in _REFERENCE_FIELDS.values():
            reference = getattr(self, attribute)
            if reference is not None and (
                not isinstance(reference, str) or not _REFERENCE_RE.fullmatch(reference)
            ):
                raise ValueError(
                    f"OptimizerSpec {self.name!r}: invalid {attribute}={reference!r}; expected a "
                    "lazy reference 'package.module:Name' or None"
                )
        if all(getattr(self, attribute) is None for attribute in _REFERENCE_FIELDS.values()):
            raise ValueError(
                f"OptimizerSpec {self.name!r}: give at least one of torch_class, keras_class "
                "and optax_factory"
            )
        if not isinstance(self.defaults, Mapping):
            raise ValueError(
                f"OptimizerSpec {self.name!r}: defaults must be a mapping, got {self.defaults!r}"
            )
        for key in self.defaults:
            if not isinstance(key, str) or not key.isidentifier() or key == "params":
                raise ValueError(
                    f"OptimizerSpec {self.name!r}: invalid defaults key {key!r}; keys are "
                    "keyword-argument names of the optimizer (not 'params')"
                )
        for flag in ("has_betas", "has_eps", "has_momentum"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(
                    f"OptimizerSpec {self.name!r}: {flag} must be True or False, "
                    f"got {getattr(self, flag)!r}"
                )
        if not isinstance(self.source, str) or not self.source or not self.source.isprintable():
            raise ValueError(
                f"OptimizerSpec {self.name!r}: source must be a non-empty string of printable "
                f"text, got {self.source!r}"
            )
        # A read-only copy: a spec is shared by every caller and must not change under them.
        object.__setattr__(self, "defaults", types.MappingProxyType(dict(self.defaults)))

    def class_reference(self, framework: str) -> str | None:
        """The lazy reference for ``framework``: ``torch_class``, ``keras_class`` or
        ``optax_factory`` (for "torch", "keras", "optax"), or None."""
        check_framework(framework)
        return getattr(self, _REFERENCE_FIELDS[framework])

    @property
    def frameworks(self) -> tuple[str, ...]:
        """The frameworks this spec has a class for (whether or not they are installed here)."""
        return tuple(f for f in FRAMEWORKS if self.class_reference(f) is not None)


def check_framework(framework) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; expected one of {list(FRAMEWORKS)}")


def spec_with_source(spec: OptimizerSpec, source: str) -> OptimizerSpec:
    return spec if spec.source == source else dataclasses.replace(spec, source=source)
