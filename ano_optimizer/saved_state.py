"""What ``load_state_dict`` accepts: every field of a saved state dict is checked before anything
loads, and older saves are converted to today's form.

torch's loader changes the optimizer as it goes and checks little on the way (a step of
``"abc"`` failed inside it with the optimizer half-replaced; a step of -1 or of two numbers, a
negative or NaN second moment, loaded and spoilt later steps). Here a state dict is checked
whole first, against the optimizer it is loaded into, and a refused one raises ``ValueError``
naming the field, with the optimizer left exactly as it was.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch
from torch import Tensor

from . import blockwise8
from ._torch_internals import dtensor_class, scalar_dtype
from .group_options import GROUP_OPTIONS, check_group_options
from .tensor_checks import STATE_DTYPES, storage_holds

__all__ = ["checked_state_dict", "keep_state_dtype_on_load", "moment_for", "moments_for"]

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
# Options every saved Ano/Anolog group holds (the flags were added over time: a group
# without one takes the optimizer's value, as torch.optim does).
_REQUIRED_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "logarithmic_schedule")
_RELEASE_1_0_0_GROUP_KEYS = {"lr", "betas", "weight_decay", "eps", "params"}


def is_release_1_0_0_group(saved_group) -> bool:
    """The 1.0.0 release saved exactly these group keys (its schedule was an attribute)."""
    return isinstance(saved_group, dict) and set(saved_group) == _RELEASE_1_0_0_GROUP_KEYS


@functools.cache
def _foreign_group_keys() -> frozenset[str]:
    """The hyper-parameter names of torch.optim's optimizers that Ano does not have
    (``amsgrad``, ``momentum``, ``nesterov``, ...): a saved group holding one of them was saved
    by another optimizer, whatever else was added to it."""
    names: set[str] = set()
    for value in vars(torch.optim).values():
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
            try:
                names.update(inspect.signature(value).parameters)
            except (TypeError, ValueError):
                continue
    return frozenset(names - set(GROUP_OPTIONS) - {"params", "defaults", "self"})


def checked_state_dict(optimizer, state_dict, owner: str) -> dict:
    """Check ``state_dict`` against ``optimizer`` and return what torch's loader should load: a
    copy in which 1.0.0 groups get the optimizer's ``logarithmic_schedule``, the
    ``differentiable=False`` that 1.1.0 wrote into groups is dropped, and every step count is a
    0-d float tensor. ``state_dict`` itself is not changed."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{owner}: expected a dict with 'state' and 'param_groups'")
    saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved_state, dict) or not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"{owner}: 'state' must be a dict and 'param_groups' a list")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{owner}: the state dict has {len(saved_groups)} parameter groups, "
            f"this optimizer has {len(optimizer.param_groups)}"
        )
    groups = [
        _checked_group(index, saved, group, optimizer.defaults, owner)
        for index, (saved, group) in enumerate(
            zip(saved_groups, optimizer.param_groups, strict=True)
        )
    ]
    state = dict(saved_state)
    for index, (saved, group) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        for position, (saved_id, param) in enumerate(
            zip(saved["params"], group["params"], strict=True)
        ):
            entry = saved_state.get(saved_id)
            if entry is not None:
                where = f"parameter {position} of parameter group {index} (state key {saved_id!r})"
                state[saved_id] = _checked_entry(entry, param, where, owner)
    return {**state_dict, "state": state, "param_groups": groups}


def _checked_group(index: int, saved, group: dict, defaults: dict, owner: str) -> dict:
    where = f"{owner}: parameter group {index}"
    if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
        raise ValueError(f"{where} must be a dict with a 'params' list")
    if is_release_1_0_0_group(saved):
        saved = {"logarithmic_schedule": group["logarithmic_schedule"], **saved}
    missing = [key for key in _REQUIRED_GROUP_KEYS if key not in saved]
    if missing:
        raise ValueError(
            f"{where} has no {missing}: this state dict was not saved by Ano/Anolog (its group "
            f"keys are {sorted(k for k in saved if k != 'params')})"
        )
    saved = dict(saved)
    if saved.get("differentiable") is False:
        del saved["differentiable"]  # torch's default, which 1.1.0 copied into its groups
    # A key that this optimizer's own group holds too (a user's "momentum" in a group dict,
    # saved with it) is not another optimizer's option.
    foreign = sorted((_foreign_group_keys() & saved.keys()) - group.keys())
    if foreign:
        raise ValueError(
            f"{where} holds {foreign}, options of another optimizer that Ano/Anolog do not have: "
            "this state dict was not saved by Ano/Anolog"
        )
    check_group_options({**defaults, **group, **saved}, where)
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(
            f"{where} holds {len(saved['params'])} parameters in the state dict and "
            f"{len(group['params'])} in this optimizer"
        )
    # How the moments are stored is this optimizer's choice, not the checkpoint's: saved
    # moments are converted into it (8-bit codes dequantized, float moments quantized).
    saved["state_dtype"] = group["state_dtype"]
    return saved


def _checked_entry(entry, param: Tensor, where: str, owner: str) -> dict:
    def fail(message: str):
        raise ValueError(f"{owner}: {where}: {message}")

    # Wrappers such as timm's Lookahead keep their own buffers beside Ano's state.
    if not isinstance(entry, dict) or not set(STATE_KEYS) <= set(entry):
        keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        fail(
            f"its state has keys {keys}, expected at least {list(STATE_KEYS)}: not an Ano/Anolog state dict"
        )
    entry = dict(entry)
    entry["step"] = _checked_step(entry["step"], fail)
    for key in ("exp_avg", "exp_avg_sq"):
        moment, scale = entry[key], entry.get(f"{key}_scale")
        if scale is not None or (isinstance(moment, Tensor) and moment.dtype == torch.uint8):
            _check_codes(moment, scale, key, param, fail)
        else:
            _check_moment(moment, key, param, fail)
    return entry


def _check_codes(codes, scale, key: str, param: Tensor, fail) -> None:
    """8-bit codes and their block scales (:mod:`.blockwise8`)."""
    problem = blockwise8.codes_problem(codes, scale, param, key)
    if problem is not None:
        fail(problem)
    for what, t in ((f"state[{key!r}]", codes), (f"state['{key}_scale']", scale)):
        if t.layout != torch.strided or (_readable(t) and not storage_holds(t)):
            fail(f"{what} must be a dense tensor with storage holding its elements")
    if _readable(scale) and not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        fail(f"state['{key}_scale'] holds NaN, infinite or negative values")


def _checked_step(step, fail):
    """A step count as a 0-d float tensor: a whole, finite, non-negative number, given as a
    number or a 1-element real tensor."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            fail(
                f"state['step'] must be one real number, got a {step.dtype} tensor of shape {tuple(step.shape)}"
            )
        if not _readable(step):
            return step  # a meta or fake tensor: nothing to read, nothing to check
        value = float(_local(step).reshape(()).item())
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    else:
        fail(f"state['step'] must be a number or a 1-element tensor, got {step!r}")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        fail(f"state['step'] must be a whole number >= 0, got {value!r}")
    return torch.tensor(value, dtype=scalar_dtype())


def _check_moment(t, key: str, param: Tensor, fail) -> None:
    if not isinstance(t, Tensor) or t.layout != torch.strided:
        fail(f"state[{key!r}] must be a dense tensor, got {type(t).__name__}")
    # A complex parameter's state is complex like it, or its real view in a real state dtype.
    real_view = param.is_complex() and not t.is_complex()
    expected = (*param.shape, 2) if real_view else tuple(param.shape)
    if tuple(t.shape) != expected:
        fail(
            f"state[{key!r}] has shape {tuple(t.shape)}, but the parameter has shape {tuple(param.shape)}"
        )
    allowed = (*STATE_DTYPES, *((param.dtype,) if param.is_complex() else ()))
    if t.dtype not in allowed:
        fail(f"state[{key!r}] has dtype {t.dtype}; expected one of {list(allowed)}")
    if not _readable(t):
        return
    local = _local(t)
    if not storage_holds(local):
        fail(f"state[{key!r}] has storage too small for its elements (freed or resized?)")
    values = torch.view_as_real(local) if local.is_complex() else local
    if not bool(torch.isfinite(values).all()):
        fail(f"state[{key!r}] holds NaN or infinite values (saved from a run that diverged?)")
    if key == "exp_avg_sq" and not bool((values >= 0).all()):
        fail("state['exp_avg_sq'] holds negative values; Ano's second moment is never negative")


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (its values are checked where they are), else ``t``."""
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t


def _readable(t: Tensor) -> bool:
    """Whether ``t`` holds values that can be read here: not a meta, fake or wrapper tensor
    (those are checked by shape and dtype only)."""
    local = _local(t)
    if local.device.type == "meta":
        return False
    try:
        local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def keep_state_dtype_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep ``exp_avg``/``exp_avg_sq`` in each group's
    ``state_dtype``.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
    parameter's dtype: bfloat16 state would come back as float32 (twice the memory), and float32
    state of a bfloat16 parameter would lose its precision. A pre-hook keeps the saved tensors, a
    post-hook puts them back from those originals in the group's ``state_dtype``.
    """
    optimizer.register_load_state_dict_pre_hook(_remember_saved_state)
    optimizer.register_load_state_dict_post_hook(_restore_state_dtype)


def _remember_saved_state(optimizer, state_dict):
    optimizer._ano_saved_state = state_dict
    return None


def _restore_state_dtype(optimizer) -> None:
    saved = optimizer.__dict__.pop("_ano_saved_state", None)
    if saved is None:
        return
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for saved_id, param in zip(saved_group["params"], group["params"], strict=True):
            entry = saved["state"].get(saved_id)
            if entry is None or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            moments = moments_for(param, entry, group.get("state_dtype"))
            for key in ("exp_avg_scale", "exp_avg_sq_scale"):
                if key not in moments:  # torch's loader copied a saved scale
                    state.pop(key, None)
            state.update(moments)


def moments_for(param: Tensor, entry: dict, state_dtype: torch.dtype | None) -> dict:
    """A saved entry's moments as ``param``'s state in ``state_dtype``: 8-bit codes are copied
    as they are, or dequantized into another state dtype; moments of another dtype are
    converted (:func:`moment_for`), and quantized to nearest for a ``torch.uint8`` group."""
    moments = {}
    wants_codes = state_dtype is torch.uint8 and blockwise8.takes_codes(param)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        saved, scale = entry.get(key), entry.get(f"{key}_scale")
        if not isinstance(saved, Tensor):
            continue
        if scale is not None and wants_codes:
            moments[key] = saved.to(param.device, copy=True).contiguous()
            moments[f"{key}_scale"] = scale.to(param.device, torch.float32, copy=True)
            continue
        if scale is not None:
            saved = blockwise8.on_shards(blockwise8.dequantize, saved, scale.float(), signed=signed)
        if wants_codes:
            values = moment_for(param, saved, torch.float32).contiguous()
            codes, scale = blockwise8.on_shards(blockwise8.quantize, values, None, signed=signed)
            moments[key], moments[f"{key}_scale"] = codes, scale
        else:
            moments[key] = moment_for(
                param, saved, blockwise8.float_state_dtype(param, state_dtype)
            )
    return moments


def moment_for(param: Tensor, saved: Tensor, state_dtype: torch.dtype | None) -> Tensor:
    """A saved moment as ``param``'s state in ``state_dtype`` (None: the parameter's dtype), on
    the parameter's device, as a copy; a complex parameter's real-view state becomes complex
    again, and the reverse."""
    if param.is_complex() and state_dtype is None:
        if not saved.is_complex():
            real = saved.to(device=param.device, dtype=torch.view_as_real(param).dtype)
            return torch.view_as_complex(real.contiguous()).clone()
        return saved.to(device=param.device, dtype=param.dtype, copy=True)
    if param.is_complex() and saved.is_complex():
        saved = torch.view_as_real(saved)
    return saved.to(device=param.device, dtype=state_dtype or param.dtype, copy=True)
