"""A hand-written Triton kernel for the fused step: every float32 tensor of a group in one launch.

The per-tensor ``torch.compile`` kernel that ``fused=True`` runs on GPU costs one launch and
the host time of a Python call and Dynamo's guards per tensor; on a fast GPU a model's step
moves its memory in far less time than a hundred such calls take. This kernel takes a table of
tensor addresses and a list of equal blocks (as ``cpu_kernel.cpp`` does on CPU) and updates
all tensors in one launch.

``fused=True`` does not use it until it measures faster than the per-tensor kernel on a GPU;
``benchmarks/gpu_check.py`` measures it (through ``benchmarks.kernels.AnoOnTriton``). Its
arithmetic is :func:`ano_optimizer.fused.inductor._ano_math`'s in float32 (IEEE division and
square root), and tests run it on CPU through Triton's interpreter (``TRITON_INTERPRET=1``)
against the compiled kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .batches import _block_table, _group_kernel_takes

__all__ = ["triton_group_step"]

# Elements per program; a block never spans two tensors.
BLOCK = 1024


@triton.jit
def _sign(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def _noise(index, multiplier, offset):
    # rounding.hashed_noise: (index * A + B) mod 2**16, A and B hashes of the step count.
    return ((index & 0xFFFF) * multiplier + offset) & 0xFFFF


@triton.jit
def _ano_group_kernel(
    pointers,  # int64, n x 4: param, grad, exp_avg, exp_avg_sq
    numels,  # int64, n
    block_tensor,  # int64, blocks
    block_begin,  # int64, blocks
    scalars,  # float32, n x 2: 1 - beta1_k, sqrt(1 - beta2^k)
    hyper,  # float64: lr, beta1, beta2, eps, weight_decay
    amp,  # float32: found_inf, 1 / grad_scale
    noise,  # int64, n x 4: rounding noise A, B of exp_avg, then of exp_avg_sq
    MAXIMIZE: tl.constexpr,
    STATE_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.load(block_tensor + b)
    offs = tl.load(block_begin + b) + tl.arange(0, BLOCK_SIZE)
    mask = offs < tl.load(numels + t)

    param = tl.load(pointers + 4 * t).to(tl.pointer_type(tl.float32), bitcast=True)
    grad = tl.load(pointers + 4 * t + 1).to(tl.pointer_type(tl.float32), bitcast=True)
    if STATE_BF16:
        exp_avg = tl.load(pointers + 4 * t + 2).to(tl.pointer_type(tl.int16), bitcast=True)
        exp_avg_sq = tl.load(pointers + 4 * t + 3).to(tl.pointer_type(tl.int16), bitcast=True)
        m = (tl.load(exp_avg + offs, mask=mask).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        v = (tl.load(exp_avg_sq + offs, mask=mask).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        exp_avg = tl.load(pointers + 4 * t + 2).to(tl.pointer_type(tl.float32), bitcast=True)
        exp_avg_sq = tl.load(pointers + 4 * t + 3).to(tl.pointer_type(tl.float32), bitcast=True)
        m = tl.load(exp_avg + offs, mask=mask)
        v = tl.load(exp_avg_sq + offs, mask=mask)

    lr = tl.load(hyper).to(tl.float32)
    beta2 = tl.load(hyper + 2).to(tl.float32)
    eps = tl.load(hyper + 3).to(tl.float32)
    weight_decay = tl.load(hyper + 4).to(tl.float32)
    momentum_weight = tl.load(scalars + 2 * t)
    correction = tl.load(scalars + 2 * t + 1)
    skip = tl.load(amp) > 0.0

    g = tl.load(grad + offs, mask=mask) * tl.load(amp + 1)
    if MAXIMIZE:
        g = -g
    p = tl.load(param + offs, mask=mask)
    g2 = g * g
    v_new = v + (1.0 - beta2) * (_sign(g2 - v) * g2 - v)
    m_new = m + momentum_weight * (g - m)
    ratio = tl.div_rn(tl.abs(g), tl.sqrt_rn(v_new) + eps * correction)
    p_new = p * (1.0 - lr * weight_decay) - (lr * correction) * ratio * _sign(m_new)
    tl.store(param + offs, tl.where(skip, p, p_new), mask=mask)
    if STATE_BF16:
        m_bits = tl.where(skip, m, m_new).to(tl.int32, bitcast=True)
        v_bits = tl.where(skip, v, v_new).to(tl.int32, bitcast=True)
        m_noise = _noise(offs, tl.load(noise + 4 * t), tl.load(noise + 4 * t + 1))
        v_noise = _noise(offs, tl.load(noise + 4 * t + 2), tl.load(noise + 4 * t + 3))
        m_round = (m_bits + m_noise.to(tl.int32)) >> 16
        v_round = (v_bits + v_noise.to(tl.int32)) >> 16
        tl.store(exp_avg + offs, m_round.to(tl.int16), mask=mask)
        tl.store(exp_avg_sq + offs, v_round.to(tl.int16), mask=mask)
    else:
        tl.store(exp_avg + offs, tl.where(skip, m, m_new), mask=mask)
        tl.store(exp_avg_sq + offs, tl.where(skip, v, v_new), mask=mask)


def triton_group_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    weights: list[Tensor],
    corrections: list[Tensor],
    hyper: Tensor,
    skip: Tensor,
    inv_scale: Tensor,
    noise: list[Tensor],
    maximize: bool,
) -> list[int]:
    """Update every float32 tensor (float32 or bfloat16 state, contiguous) of one device's
    group with one launch per state dtype; the step counts are already incremented and
    ``weights``/``corrections`` computed. Returns the indices left to the per-tensor kernel."""
    batches: dict[torch.dtype, list[int]] = {}
    left = []
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    ):
        if _group_kernel_takes(param, grad, exp_avg, exp_avg_sq):
            if param.numel():
                batches.setdefault(exp_avg.dtype, []).append(i)
        else:
            left.append(i)
    if not batches:
        return left
    device = params[0].device
    amp = torch.stack([skip, inv_scale]).to(device=device, dtype=torch.float32)
    for state_dtype, indices in batches.items():
        numels, block_tensor, block_begin = _block_table(
            tuple(params[i].numel() for i in indices), BLOCK, device
        )
        addresses = [
            t.data_ptr()
            for i in indices
            for t in (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])
        ]
        pointers = torch.tensor(addresses, dtype=torch.int64).to(device)
        scalars = torch.stack(
            [torch.stack([weights[i] for i in indices]), torch.stack([corrections[i] for i in indices])],
            dim=1,
        ).to(device=device, dtype=torch.float32)  # fmt: skip
        table = torch.stack([noise[i] for i in indices]).to(device=device, dtype=torch.int64)
        _ano_group_kernel[(block_tensor.numel(),)](
            pointers, numels, block_tensor, block_begin, scalars, hyper, amp, table,
            MAXIMIZE=bool(maximize), STATE_BF16=state_dtype == torch.bfloat16, BLOCK_SIZE=BLOCK,
        )  # fmt: skip
    return left
