"""Per-step scalars of the eager paths: the step's ``1 - β1_k`` and ``sqrt(1 - β2^k)`` for a
list of tensors at once as device tensors (``capturable``: nothing read on the host), and the
unscale-or-skip of a group that is not fused under ``torch.amp.GradScaler``. (The fused step
computes its own: :mod:`.fused.torch_step`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_tensor_scalars", "unscale_or_skip"]


def unscale_or_skip(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None):
    """For a group that is not fused under ``torch.amp.GradScaler``: return True when the step
    must be skipped (inf/nan found), else divide the gradients by the scale, in place."""
    if found_inf is not None and bool(found_inf.item()):
        return True
    if grad_scale is not None:
        torch._foreach_mul_(grads, torch.reciprocal(grad_scale.double()).item())
    return False


def per_tensor_scalars(steps, beta1, beta2, logarithmic_schedule, dtype, device):
    """Per tensor: ``1 - β1_k`` and ``sqrt(1 - β2^k)`` as 0-d tensors, with a handful of
    ``torch._foreach_*`` calls for the whole list (no per-tensor Python, no host sync)."""
    steps = (
        [s.to(device=device, dtype=torch.float64) for s in steps]
        if (dtype == torch.float64 or steps[0].device != device)
        else steps
    )
    corrections = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(corrections)
    torch._foreach_add_(corrections, 1.0)
    torch._foreach_sqrt_(corrections)
    if logarithmic_schedule:
        weights = torch._foreach_add(steps, 2.0)
        torch._foreach_log_(weights)
        torch._foreach_reciprocal_(weights)
    else:
        weights = [torch.full((), 1.0 - beta1, dtype=steps[0].dtype, device=device)] * len(steps)
    return weights, corrections
