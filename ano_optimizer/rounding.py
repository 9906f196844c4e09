"""Stochastic rounding of float32 optimizer state to bfloat16, with noise that the state decides.

bfloat16 is the upper half of a float32: adding 16 random low bits to the bit pattern and
truncating rounds the magnitude up with probability equal to the discarded fraction, so the
rounded value is unbiased, ``E[round(x)] = x``. With round-to-nearest, a small decrease of
``exp_avg_sq`` (``β2 = 0.999`` removes 0.1 % of it per step, less than half a bfloat16 ulp)
would be absorbed every time and the second moment would stay stuck too high.

The 16 noise bits of element ``i`` of a tensor at step ``k`` are ``(i * A + B) mod 2**16``, where
the odd multiplier ``A`` and the offset ``B`` are 32-bit integer hashes of the tensor's own step
count and the stream (1 for ``exp_avg``, 2 for ``exp_avg_sq``). No random number generator is
involved: two optimizers in the same state round alike whatever else draws random numbers in
between, a resumed run rounds exactly as the uninterrupted one, and DDP replicas stay identical.
Within a step, 65536 consecutive elements get every noise value once; over the steps, each
element's noise and the noise differences between elements change at random (a fixed multiplier
kept those differences constant, and measured worse than random noise). The per-element part is
two integer operations and reads no memory, so the fused kernels stay memory-bound (a
per-element hash or ``torch.rand_like`` made them several times slower).

Every path computes the same bits: :func:`noise_parameters` on Python numbers (eager steps),
:func:`noise_parameter_tensor` on step tensors (capturable and compiled steps), and
``fused/kernel.cpp`` in C++.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EXP_AVG_SQ_STREAM",
    "EXP_AVG_STREAM",
    "hashed_noise",
    "noise_of_indices",
    "noise_parameter_tensor",
    "noise_parameters",
    "round_with_noise",
    "stochastic_round_to_bfloat16",
]

EXP_AVG_STREAM = 1
EXP_AVG_SQ_STREAM = 2
_MASK32 = 0xFFFFFFFF
# Every product of a value below 2**32 and a constant below 2**31 fits in int64, which keeps the
# tensor form exact on every device; a multiplier below 2**15 keeps (i mod 2**16) * A in int32.
_STEP_MULTIPLIER = 0x1E3779B1
_KEY_MULTIPLIER = 0x05EBCA77
_MIX1 = 0x7FEB352D
_MIX2 = 0x2C1B3C6D


def _hash(step: int, key: int) -> int:
    x = (step * _STEP_MULTIPLIER + key * _KEY_MULTIPLIER) & _MASK32
    x ^= x >> 16
    x = (x * _MIX1) & _MASK32
    x ^= x >> 15
    x = (x * _MIX2) & _MASK32
    return x ^ (x >> 16)


def noise_parameters(step: float, stream: int) -> tuple[int, int]:
    """``(A, B)`` of a tensor's noise at step ``step`` (a whole number) for ``stream``."""
    count = int(step) if math.isfinite(step) and abs(step) < 9.0e18 else 0
    return (_hash(count, 2 * stream + 1) & 0x7FFF) | 1, _hash(count, 2 * stream) & 0xFFFF


def noise_parameter_tensor(steps: Tensor, stream: int) -> Tensor:
    """:func:`noise_parameters` of each element of the floating-point tensor ``steps``: int64
    of shape ``(*steps.shape, 2)`` on ``steps``' device (nothing is read on the host)."""
    count = steps.to(torch.int64)

    def hashed(key: int) -> Tensor:
        x = (count * _STEP_MULTIPLIER + key * _KEY_MULTIPLIER) & _MASK32
        x = x ^ (x >> 16)
        x = (x * _MIX1) & _MASK32
        x = x ^ (x >> 15)
        x = (x * _MIX2) & _MASK32
        return x ^ (x >> 16)

    multiplier = (hashed(2 * stream + 1) & 0x7FFF) | 1
    return torch.stack([multiplier, hashed(2 * stream) & 0xFFFF], dim=-1)


def hashed_noise(like: Tensor, parameters, start: int = 0) -> Tensor:
    """The 16 noise bits (int32) of elements ``start .. start + like.numel()`` of a tensor, shaped
    like ``like``, for ``parameters`` ``(A, B)``: two ints, or a 2-element integer tensor from
    :func:`noise_parameter_tensor`. Operands stay below 2**31, so nothing overflows int32."""
    index = torch.arange(start, start + like.numel(), device=like.device, dtype=torch.int32)
    return noise_of_indices(index.view(like.shape), parameters)


def noise_of_indices(index: Tensor, parameters) -> Tensor:
    """The 16 noise bits (int32) of the elements whose indices (in their whole tensor) are
    ``index`` (an int32 tensor), for ``parameters`` ``(A, B)`` as :func:`hashed_noise` takes
    them."""
    multiplier, offset = parameters
    if isinstance(multiplier, Tensor):
        multiplier, offset = multiplier.to(torch.int32), offset.to(torch.int32)
    return ((index & 0xFFFF) * multiplier + offset) & 0xFFFF


def round_with_noise(x: Tensor, noise: Tensor) -> Tensor:
    """float32 ``x`` to bfloat16: ``noise`` (int32 in [0, 2**16)) added below the kept half,
    then truncated."""
    bits = x.view(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def stochastic_round_to_bfloat16(x: Tensor, step: int, stream: int, start: int = 0) -> Tensor:
    """Round float32 ``x`` (elements ``start ..`` of a state tensor at step ``step``) to
    bfloat16 with this module's noise: unbiased, and the same bits on every path."""
    return round_with_noise(x, hashed_noise(x, noise_parameters(step, stream), start))
