"""Which tensors the group-at-once kernels take (the C++ kernel on CPU, the Triton kernel on
GPU), and the table of equal blocks they work through."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._torch_internals import is_zero_tensor

_CPU_STATE_TYPES = {torch.float32: "float", torch.bfloat16: "uint16_t"}


_PLAIN_DISPATCH = Tensor.__torch_dispatch__


def _addressable(tensors) -> bool:
    """Whether a flat alias of each tensor's storage can be handed to a compiled kernel: plain
    tensors (and subclasses that leave ``__torch_dispatch__`` alone, such as ``nn.Parameter``)
    with data of their own. Wrapper subclasses (torchao's float8 weights, DTensor pieces
    under FSDP2), zero tensors and meta tensors have none: they run the eager math."""
    return all(
        type(t).__torch_dispatch__ is _PLAIN_DISPATCH
        and not is_zero_tensor(t)
        and t.device.type != "meta"
        for t in tensors
    )


def _group_kernel_takes(param, grad, exp_avg, exp_avg_sq) -> bool:
    """Whether a group kernel (cpu.py's, or triton.py's on GPU) updates
    these tensors: float32 parameter and gradient, both moments float32 or both bfloat16, all
    contiguous, each with storage of its own."""
    return (
        param.dtype == grad.dtype == torch.float32
        and exp_avg.dtype == exp_avg_sq.dtype
        and exp_avg.dtype in _CPU_STATE_TYPES
        and all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))
        and _addressable((param, grad, exp_avg, exp_avg_sq))
    )


@functools.lru_cache(maxsize=64)
def _block_table(
    numels: tuple[int, ...], block: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The work list of a group kernel (cpu.py's, or triton.py's on GPU)
    for these tensor sizes: the sizes, and for each block of ``block`` elements its tensor and
    its first element. Cached: the sizes rarely change from step to step."""
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = (sizes + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    block_begin = (torch.arange(int(counts.sum())) - first_block[block_tensor]) * block
    return sizes.to(device), block_tensor.to(device), block_begin.to(device)


def _real_views(tensors):
    """Complex tensors as their real views (a real state tensor of a complex parameter is kept
    as that view already)."""
    return tuple(torch.view_as_real(t) if t.is_complex() else t for t in tensors)
