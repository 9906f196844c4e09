"""Defaults and valid ranges of Ano's hyper-parameters, shared by the PyTorch and Keras optimizers.

Kept free of torch/keras imports so either framework can validate with the same messages.
"""

from __future__ import annotations

import math
import numbers

DEFAULT_LR = 1e-4
DEFAULT_BETAS = (0.92, 0.99)
DEFAULT_EPS = 1e-8
DEFAULT_WEIGHT_DECAY = 0.0


def is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_lr(lr, owner: str = "Ano", *, read_tensor: bool = True) -> None:
    """``lr`` must be a finite number >= 0; a 1-element real floating-point tensor is checked by
    value, unless ``read_tensor`` is False (its value would be read on the host: a sync, and an
    error inside CUDA-graph capture)."""
    if hasattr(lr, "numel") and hasattr(lr, "item"):  # torch.Tensor, without importing torch
        if lr.numel() != 1:
            raise ValueError(
                f"{owner}: Tensor lr must be 1-element, got a tensor of shape {tuple(lr.shape)}"
            )
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"{owner}: a tensor lr must be real floating-point, got {lr.dtype}")
        if lr.requires_grad:
            raise ValueError(f"{owner}: a tensor lr must not require grad")
        if not read_tensor:
            return
        value = float(lr.detach().item())
    elif is_real_number(lr):
        value = float(lr)
    else:
        raise ValueError(f"{owner}: lr must be a float or a 1-element tensor, got {lr!r}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{owner}: invalid lr={value!r}; lr must be finite and >= 0")


def check_betas(betas, owner: str = "Ano") -> tuple[float, float]:
    """Return ``betas`` as a tuple of two floats, after checking 0 <= beta1 < 1 and 0.5 <= beta2 < 1."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}") from None
    for index, beta in enumerate((beta1, beta2)):
        if not is_real_number(beta):
            raise ValueError(f"{owner}: betas[{index}] must be a float, got {beta!r}")
    beta1, beta2 = float(beta1), float(beta2)
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{owner}: invalid beta1={beta1!r} (betas[0]); it must be in [0, 1)")
    if not 0.5 <= beta2 < 1.0:
        raise ValueError(
            f"{owner}: invalid beta2={beta2!r} (betas[1]); it must be in [0.5, 1) "
            "(below 0.5 the additive second moment can turn negative and sqrt gives NaN)"
        )
    return beta1, beta2


def check_eps(eps, owner: str = "Ano") -> None:
    if not is_real_number(eps) or not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"{owner}: invalid eps={eps!r}; eps must be finite and > 0")


def check_weight_decay(weight_decay, owner: str = "Ano") -> None:
    if not is_real_number(weight_decay) or not (
        math.isfinite(weight_decay) and weight_decay >= 0.0
    ):
        raise ValueError(
            f"{owner}: invalid weight_decay={weight_decay!r}; it must be finite and >= 0"
        )


def check_flag(name: str, value, owner: str = "Ano") -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def check_optional_flag(name: str, value, owner: str = "Ano") -> None:
    """``value`` must be None, True or False itself: 1, 0.0 or "yes" are errors, not flags."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be None, True or False, got {value!r}")


def one_edit_apart(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by exactly one inserted, deleted or replaced character,
    or by two neighbouring characters swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
        )
    short, long = sorted((a, b), key=len)
    i = next((i for i, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    return short[i:] == long[i + 1 :]


def near_misses(keys, options) -> dict[str, str]:
    """``{key: option}`` for each key that is not an option but one edit from one (a typo such
    as ``weight_decy``). Other keys (``initial_lr``, ``param_names``, ``lr_scale``, ...) are
    what frameworks add to parameter groups and are not reported."""
    options = tuple(options)
    return {
        key: option
        for key in keys
        if isinstance(key, str) and key not in options
        for option in options
        if one_edit_apart(key, option)
    }
