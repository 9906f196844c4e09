"""Split a PyTorch model's parameters into a weight-decayed group and a no-decay group."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from . import hyperparameters as hp

__all__ = ["param_groups_weight_decay"]


def param_groups_weight_decay(model, weight_decay: float, no_weight_decay: Iterable[str] = ()):
    """Parameter groups for ``model`` with timm's weight-decay rule.

    A trainable parameter gets no weight decay when it has at most one dimension (biases,
    normalisation scales), its name ends in ``.bias``, or its name matches a pattern (shell
    wildcards allowed) from ``model.no_weight_decay()`` or ``no_weight_decay``. Parameters with
    ``requires_grad=False`` are left out. As in timm, ``weight_decay == 0`` puts every parameter
    in the no-decay group. Empty groups are dropped.

    Returns:
        A list of at most two dicts, no-decay first: ``{"params": [...], "param_names": [...],
        "weight_decay": ...}``. ``param_names`` lets users inspect the split, and
        ``torch.optim`` optimizers keep it in their ``state_dict``.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"param_groups_weight_decay expects an nn.Module, got {type(model)!r}")
    hp.check_weight_decay(weight_decay, owner="param_groups_weight_decay")
    if isinstance(no_weight_decay, str):
        no_weight_decay = (no_weight_decay,)
    patterns = set(no_weight_decay)
    if hasattr(model, "no_weight_decay"):
        patterns |= set(model.no_weight_decay())
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"no_weight_decay patterns must be strings, got {pattern!r}")

    decay: dict[str, torch.nn.Parameter] = {}
    no_decay: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = (
            not weight_decay
            or param.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
        )
        (no_decay if excluded else decay)[name] = param

    groups = []
    for members, group_decay in ((no_decay, 0.0), (decay, weight_decay)):
        if members:
            groups.append(
                {
                    "params": list(members.values()),
                    "param_names": list(members),
                    "weight_decay": group_decay,
                }
            )
    return groups
