"""The options of an Ano parameter group: their names and the one check of their values.

The constructor, ``add_param_group``, every ``step()`` (a scheduler or a user may change a group
after construction) and ``load_state_dict`` all check groups here, so a value is accepted or
refused with the same message wherever it comes from.
"""

from __future__ import annotations

import warnings

import torch

from . import hyperparameters as hp

__all__ = [
    "GROUP_OPTIONS",
    "STATE_DTYPE_CHOICES",
    "check_group_options",
    "check_state_dtype",
    "warn_near_misses",
]

# Every per-group option, in the order of the constructor's arguments.
GROUP_OPTIONS = (
    "lr",
    "betas",
    "weight_decay",
    "eps",
    "logarithmic_schedule",
    "maximize",
    "foreach",
    "fused",
    "capturable",
    "state_dtype",
)
# torch.uint8: blockwise 8-bit codes (:mod:`.blockwise8`).
STATE_DTYPE_CHOICES = (
    None,
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.uint8,
)
# Keys torch.optim keeps in a group beside the options (named parameters).
_BOOKKEEPING_KEYS = ("params", "param_names")


def check_state_dtype(state_dtype, owner: str = "Ano") -> None:
    if not any(state_dtype is choice for choice in STATE_DTYPE_CHOICES):
        raise ValueError(
            f"{owner}: invalid state_dtype={state_dtype!r}; it must be None (the parameter's "
            "dtype), torch.float32, torch.float64, torch.bfloat16, torch.float16 or torch.uint8 "
            "(blockwise 8-bit)"
        )


def check_group_options(group, owner: str, *, read_tensor_lr: bool = True) -> tuple[float, float]:
    """Check every option of ``group`` (a dict holding all of :data:`GROUP_OPTIONS`); raise
    ``ValueError`` naming the value and what is allowed. Return ``betas`` as two floats.

    ``read_tensor_lr=False`` checks a tensor learning rate's shape and dtype but not its value,
    which would read a device tensor on the host (a sync, and an error during CUDA-graph
    capture)."""
    lr = group["lr"]
    read = read_tensor_lr or not isinstance(lr, torch.Tensor) or lr.device.type == "cpu"
    if isinstance(lr, torch.Tensor) and lr.device.type != "cpu" and not group["capturable"]:
        _check_lr_device(lr, group.get("params"), owner)
    hp.check_lr(lr, owner, read_tensor=read)
    betas = hp.check_betas(group["betas"], owner)
    hp.check_eps(group["eps"], owner)
    hp.check_weight_decay(group["weight_decay"], owner)
    for flag in ("logarithmic_schedule", "maximize", "capturable"):
        hp.check_flag(flag, group[flag], owner)
    for flag in ("foreach", "fused"):
        hp.check_optional_flag(flag, group[flag], owner)
    if group["fused"] and group["foreach"]:
        raise ValueError(f"{owner}: fused=True and foreach=True are exclusive; pass one of them")
    check_state_dtype(group["state_dtype"], owner)
    return betas


def _check_lr_device(lr: torch.Tensor, params, owner: str) -> None:
    """A tensor learning rate off the CPU must be on the parameters' device (where the
    parameters are not known yet, any device but meta: a meta tensor holds no value, and a step
    on CPU tensors that read it would do nothing). Capturable groups check this per parameter."""
    devices = {p.device for p in params or () if isinstance(p, torch.Tensor)}
    if devices == {lr.device} or (not devices and not lr.is_meta):
        return
    if not devices:
        raise ValueError(
            f"{owner}: a tensor lr must hold a value (on the CPU or the parameters' device), "
            "got a meta tensor"
        )
    raise ValueError(
        f"{owner}: a tensor lr must be on the CPU or on the parameters' device "
        f"({', '.join(sorted(map(str, devices)))}), got one on {lr.device}"
    )


def warn_near_misses(group: dict, owner: str, stacklevel: int) -> None:
    """Warn about a group key one edit from an option name (``weight_decy``): the optimizer
    keeps such a key and ignores it, which a typo should not do silently."""
    keys = [key for key in group if key not in _BOOKKEEPING_KEYS]
    for key, option in hp.near_misses(keys, GROUP_OPTIONS).items():
        warnings.warn(
            f"{owner}: parameter group key {key!r} is not an option of {owner}, so it is kept "
            f"and ignored; did you mean {option!r}?",
            UserWarning,
            stacklevel=stacklevel,
        )
