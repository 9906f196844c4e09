"""Per-step scalars for every path: the step's ``1 - β1_k`` and ``sqrt(1 - β2^k)`` for a list
of tensors at once, the hyper-parameters and ``GradScaler`` values as device tensors (so that
nothing recompiles or reads the host when they change), the rounding noise parameters, and the
unscale-or-skip of a group that is not fused.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import rounding

__all__ = ["unscale_or_skip"]


def unscale_or_skip(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None):
    """For a group that is not fused under ``torch.amp.GradScaler``: return True when the step
    must be skipped (inf/nan found), else divide the gradients by the scale, in place."""
    if found_inf is not None and bool(found_inf.item()):
        return True
    if grad_scale is not None:
        torch._foreach_mul_(grads, torch.reciprocal(grad_scale.double()).item())
    return False


def _step_scalars(steps, beta1, beta2, logarithmic_schedule, dtype, device):
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


def _hyper_tensor(lr, beta1, beta2, eps, weight_decay, device) -> Tensor:
    if isinstance(lr, Tensor) and not torch.compiler.is_compiling():
        lr = lr.to(device=device, dtype=torch.float64)
        return torch.cat(
            [lr.reshape(1), _float64_vector((beta1, beta2, eps, weight_decay), device)]
        )
    return _float64_vector((lr, beta1, beta2, eps, weight_decay), device)


def _float64_vector(values: tuple, device: torch.device) -> Tensor:
    """``values`` as a float64 tensor on ``device``. Off the CPU it is filled by kernels that
    carry the values as arguments: a host-to-device copy cannot be captured in a CUDA graph."""
    if torch.compiler.is_compiling() or device.type == "cpu":
        return torch.tensor(values, dtype=torch.float64, device=device)
    vector = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, value in enumerate(values):
        vector[i].fill_(value)
    return vector


def _noise_parameters(steps, exp_avgs, exp_avg_sqs, device) -> list[Tensor]:
    """Per tensor: its two moments' rounding noise parameters for this step (``A``, ``B`` for
    exp_avg, then for exp_avg_sq) as a 4-element int64 tensor on ``device``, from the (already
    incremented) step counts with a handful of kernels for the whole list and no host read.
    Zeros where no state is bfloat16 (no rounding)."""
    if torch.bfloat16 not in {t.dtype for t in (*exp_avgs, *exp_avg_sqs)}:
        return [_no_noise(device)] * len(steps)
    counts = torch.stack([s.reshape(()).to(device) for s in steps])
    table = torch.cat(
        [
            rounding.noise_parameter_tensor(counts, rounding.EXP_AVG_STREAM),
            rounding.noise_parameter_tensor(counts, rounding.EXP_AVG_SQ_STREAM),
        ],
        dim=1,
    )
    return list(table.unbind(0))


def _no_noise(device: torch.device) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.zeros(4, device=device, dtype=torch.int64)
    return _cached_no_noise(device)


@functools.cache
def _cached_no_noise(device: torch.device) -> Tensor:
    return torch.zeros(4, device=device, dtype=torch.int64)


@functools.cache
def _no_amp(device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.zeros((), device=device), torch.ones((), device=device)


def _amp_tensors(grad_scale, found_inf, device) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():
        # Traced constants; the cached pair would be traced through anyway.
        no_skip, one = torch.zeros((), device=device), torch.ones((), device=device)
    else:
        no_skip, one = _no_amp(device)
    skip = found_inf.to(device=device, dtype=torch.float32) if found_inf is not None else no_skip
    inv_scale = (
        torch.reciprocal(grad_scale.to(device=device, dtype=torch.float64)).float()
        if grad_scale is not None
        else one
    )
    return skip, inv_scale
