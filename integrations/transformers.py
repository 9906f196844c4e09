"""Hugging Face ``transformers`` integration: registry names as ``TrainingArguments(optim=...)``.

Two routes:

* :func:`register` (opt-in, idempotent) makes every registry optimizer with a PyTorch class a
  value of ``optim``: ``TrainingArguments(optim="ano")``, ``--optim anolog`` on the command line
  of an unchanged ``HfArgumentParser`` script, ``args.set_optimizer(name="ano")``.
* :func:`optimizer_cls_and_kwargs` patches nothing: its result goes to the public
  ``Trainer(optimizer_cls_and_kwargs=...)`` argument.

transformers has no public extension point for optimizer names. ``TrainingArguments`` turns
``optim`` into its ``OptimizerNames`` enum and ``HfArgumentParser`` offers that enum's values as
argparse choices, so :func:`register` adds enum members. The optimizer itself is built by
``Trainer.get_optimizer_cls_and_kwargs``, a documented static method that :func:`register` wraps:
registry names go to :func:`optimizer_cls_and_kwargs`, every other name to the original. The
private handler table behind it is left alone on purpose: it receives ``optim_args`` already
split on every comma, which cannot carry a tuple such as ``betas=(0.9,0.99)``, and it only
exists since transformers 5. The ``Trainer`` still builds the parameter groups itself, with its
own ``get_decay_parameter_names``, exactly as for AdamW.
"""

from __future__ import annotations

import ast
import difflib
import enum
import functools
import inspect
import re
import threading
import warnings
from typing import Any

import torch

from ano_optimizer.registry import (
    get_optimizer_class,
    get_optimizer_spec,
    list_optimizers,
    optimizer_keywords,
)

__all__ = ["optimizer_cls_and_kwargs", "parse_optim_args", "register", "registered_names"]

_LOCK = threading.Lock()
# Registry names this module added to OptimizerNames; only those are built by the wrapper, so a
# name transformers defines itself keeps its own meaning.
_ADDED: set[str] = set()
_PATCH_MARK = "_ano_optimizer_original"

_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_MALFORMED = object()


# --------------------------------------------------------------------------- optim_args parsing


def _split_top_level(text: str) -> list[str]:
    """Split ``text`` on the commas that are outside brackets and quotes."""
    items, depth, quote, start = [], 0, None, 0
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return items


def _is_plain_value(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_plain_value(v) for v in value)


def _parse_value(key: str, raw: str):
    if raw.lower() in ("true", "false"):  # transformers' own optim_args spell booleans this way
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if _BARE_WORD.fullmatch(raw):  # an unquoted word is a string option (e.g. mode=fast)
            return raw
        value = _MALFORMED
    if value is _MALFORMED or not _is_plain_value(value):
        raise ValueError(
            f"optim_args: malformed value {raw!r} for key {key!r}; expected a number, "
            "true/false, None, a word or quoted string, or a tuple such as (0.9,0.99)"
        )
    return tuple(value) if isinstance(value, list) else value


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """Parse ``TrainingArguments.optim_args`` (``"key=value,key=value"``) into typed values.

    Values become floats, ints, booleans (``true``/``True``), ``None``, strings, or tuples:
    ``"eps=1e-7, betas=(0.9,0.99), logarithmic_schedule=true"`` gives
    ``{"eps": 1e-07, "betas": (0.9, 0.99), "logarithmic_schedule": True}``.

    Raises:
        ValueError: an entry without ``=``, a key that is not an identifier, a key given twice,
            or a value that is none of the above; the message names the entry or key.
    """
    if text is None:
        return {}
    if not isinstance(text, str):
        raise ValueError(
            f"optim_args must be a string like 'eps=1e-7,betas=(0.9,0.99)', got {text!r}"
        )
    parsed: dict[str, Any] = {}
    for item in _split_top_level(text):
        if not item.strip():
            continue
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier():
            raise ValueError(
                f"optim_args: malformed entry {item.strip()!r}; expected key=value pairs "
                "separated by commas, e.g. 'eps=1e-7,betas=(0.9,0.99)'"
            )
        if key in parsed:
            raise ValueError(f"optim_args: key {key!r} is given twice")
        if not raw:
            raise ValueError(f"optim_args: key {key!r} has no value")
        parsed[key] = _parse_value(key, raw)
    return parsed


# ---------------------------------------------------------------------- building the optimizer


def _takes_a_dtype(cls: type, key: str, default) -> bool:
    """Whether keyword ``key`` of ``cls`` is a torch dtype (by its default or its annotation)."""
    if isinstance(default, torch.dtype):
        return True
    annotation = inspect.signature(cls).parameters[key].annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "torch.dtype" in text


def _dtype_from_name(name: str, key: str, value) -> torch.dtype | None:
    if value is None:
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"optim_args: key {key!r} of optimizer {name!r} must be a torch dtype name such as "
            f"bfloat16 or float32 (or None), got {value!r}"
        )
    return dtype


def _typed_against_signature(name: str, cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``cls``'s keyword arguments; dtype names become dtypes."""
    if "weight_decay" in options:
        raise ValueError(
            "optim_args: key 'weight_decay' is not allowed: the Trainer gives each parameter "
            "group its own weight decay, so set TrainingArguments.weight_decay (--weight_decay)"
        )
    accepted = optimizer_keywords(cls)
    if accepted is None:
        return dict(options)
    accepted.pop("weight_decay", None)
    typed = {}
    for key, value in options.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"optim_args: unknown key {key!r} for optimizer {name!r} "
                f"({cls.__module__}.{cls.__qualname__}){hint}; it accepts: "
                f"{', '.join(sorted(accepted))}"
            )
        default = accepted[key]
        expected = None
        if _takes_a_dtype(cls, key, default):
            value = _dtype_from_name(name, key, value)
        elif isinstance(default, bool):
            expected, ok = "true or false", isinstance(value, bool)
        elif isinstance(default, (int, float)):
            expected = "a number"
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, tuple):
            expected, ok = f"a tuple like {default!r}", isinstance(value, tuple)
        if expected is not None and not ok:
            raise ValueError(
                f"optim_args: key {key!r} of optimizer {name!r} must be {expected}, got {value!r}"
            )
        typed[key] = value
    return typed


def optimizer_cls_and_kwargs(args, name: str | None = None) -> tuple[type, dict[str, Any]]:
    """The optimizer class and keyword arguments for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Follows transformers' convention for its adaptive optimizers: ``lr`` from
    ``args.learning_rate``; ``betas`` from ``args.adam_beta1``/``adam_beta2`` and ``eps`` from
    ``args.adam_epsilon`` when the registry spec says the optimizer takes them; then the spec's
    ``defaults`` are overridden by those, and everything by ``args.optim_args``. Weight decay is
    not in the keyword arguments: the ``Trainer`` puts it on its decay/no-decay groups.

    Args:
        args: a ``transformers.TrainingArguments``.
        name: registry name (case-insensitive); None takes ``args.optim``, which must then be a
            registry name (after :func:`register`).

    Raises:
        ValueError: unknown name, or an ``optim_args`` key the optimizer does not accept or a
            malformed value (the message names the key).
    """
    if name is None:
        name = getattr(args.optim, "value", args.optim)
    spec = get_optimizer_spec(name)
    cls = get_optimizer_class(spec.name, "torch")
    kwargs = dict(spec.defaults)
    kwargs["lr"] = args.learning_rate
    if spec.has_betas:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
    if spec.has_eps:
        kwargs["eps"] = args.adam_epsilon
    overrides = parse_optim_args(args.optim_args)
    kwargs.update(_typed_against_signature(spec.name, cls, overrides))
    return cls, kwargs


# ------------------------------------------------------------------------------- registration


def _unsupported(version: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"ano_optimizer.integrations.transformers.register() does not support transformers "
        f"{version}: {what}. Use the public route instead, which patches nothing: "
        "Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, 'ano'))"
    )


def _check_pieces(version: str, optimizer_names, training_args_cls, trainer_cls) -> None:
    """Raise the version-naming error if a piece :func:`register` changes is missing or changed."""
    if not (
        isinstance(optimizer_names, type)
        and issubclass(optimizer_names, enum.Enum)
        and issubclass(optimizer_names, str)
        and isinstance(getattr(optimizer_names, "_member_map_", None), dict)
        and isinstance(getattr(optimizer_names, "_value2member_map_", None), dict)
        and isinstance(getattr(optimizer_names, "_member_names_", None), list)
    ):
        raise _unsupported(version, "OptimizerNames is not the str Enum this relies on")
    if "optim" not in getattr(training_args_cls, "__dataclass_fields__", {}):
        raise _unsupported(version, "TrainingArguments has no 'optim' field")
    method = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs", None)
    if not isinstance(method, staticmethod):
        raise _unsupported(version, "Trainer.get_optimizer_cls_and_kwargs is not a static method")
    if list(inspect.signature(method.__func__).parameters)[:2] != ["args", "model"]:
        raise _unsupported(
            version, "Trainer.get_optimizer_cls_and_kwargs does not take (args, model)"
        )


def _checked_pieces():
    """Import and check the transformers pieces :func:`register` changes, before changing any."""
    import transformers
    from transformers import Trainer, TrainingArguments

    version = transformers.__version__
    try:
        from transformers.training_args import OptimizerNames
    except ImportError:
        raise _unsupported(
            version, "transformers.training_args.OptimizerNames is missing"
        ) from None
    _check_pieces(version, OptimizerNames, TrainingArguments, Trainer)
    return version, OptimizerNames, Trainer


def _add_member(enum_cls, name: str, version: str) -> None:
    member_name = name.upper()
    if member_name in enum_cls._member_map_ or hasattr(enum_cls, member_name):
        member_name = f"REGISTRY_{member_name}"
    member = str.__new__(enum_cls, name)
    member._name_ = member_name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    setattr(enum_cls, member_name, member)
    enum_cls._member_map_[member_name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(member_name)
    if enum_cls(name) is not member or member not in list(enum_cls):
        raise _unsupported(version, f"adding {name!r} to OptimizerNames did not take effect")


def _wrap(original):
    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs(args, model=None):
        name = getattr(args.optim, "value", args.optim)
        if name in _ADDED:
            return optimizer_cls_and_kwargs(args, name)
        return original(args, model)

    setattr(get_optimizer_cls_and_kwargs, _PATCH_MARK, original)
    return staticmethod(get_optimizer_cls_and_kwargs)


def register() -> list[str]:
    """Make every registry optimizer with a PyTorch class a value of ``TrainingArguments.optim``.

    Call it before ``TrainingArguments(...)``/``HfArgumentParser(...)`` are created, and before
    a saved ``training_args.bin`` or arguments JSON naming such an optimizer is read back.
    Calling it again is harmless and picks up optimizers registered since. A registry name that
    transformers already uses for its own optimizer is left to transformers, with a warning.

    Returns:
        The registry names now selectable through ``optim``, sorted.

    Raises:
        RuntimeError: the installed transformers lacks the pieces this relies on; the message
            names its version. Nothing has been changed then.
    """
    with _LOCK:
        version, optimizer_names, trainer_cls = _checked_pieces()
        for name in list_optimizers(framework="torch"):
            if name in _ADDED:
                continue
            if name in optimizer_names._value2member_map_:
                warnings.warn(
                    f"registry optimizer {name!r} is not selectable through "
                    f"TrainingArguments(optim={name!r}): transformers {version} uses that name for "
                    "its own optimizer; use optimizer_cls_and_kwargs(args, name) instead",
                    stacklevel=2,
                )
                continue
            _add_member(optimizer_names, name, version)
            _ADDED.add(name)
        current = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs").__func__
        if not hasattr(current, _PATCH_MARK):
            trainer_cls.get_optimizer_cls_and_kwargs = _wrap(current)
        return sorted(_ADDED)


def registered_names() -> list[str]:
    """The registry names :func:`register` has made selectable so far in this process."""
    return sorted(_ADDED)
