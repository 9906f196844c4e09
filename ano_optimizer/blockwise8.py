"""Blockwise 8-bit moments (``state_dtype=torch.uint8``): the format, and its eager step.

A moment of ``n`` elements is kept as ``n`` one-byte codes and one float32 scale per block of
:data:`BLOCK` consecutive elements (the block's largest magnitude), as in bitsandbytes and
torchao: 2 + 8/256 bytes per parameter for both moments instead of 8. Tensors of fewer than
:data:`MIN_NUMEL` elements (biases, norms) keep float32 moments: their scales would cost more
than they save.

A code is a small floating-point number cut from the float32 bits of ``x / scale`` (in
[-1, 1]): 31 binades below 1, so a block's small elements keep their size relative to its
largest one (a linear map would round everything under ``scale / 254`` to zero, and Ano's step
is ``sign(m)``: those coordinates would stop moving).

- ``exp_avg`` (signed): sign, 5 exponent bits, 2 mantissa bits (4-7 bits kept per binade:
  12.5-25 % apart);
- ``exp_avg_sq`` (never negative): 5 exponent bits, 3 mantissa bits (6-12 % apart).

Code 0 is exactly 0; below ``2**-30 · scale`` the codes are subnormal, down to ``2**-32``
(signed) and ``2**-33`` (unsigned) times the scale. Cutting bits makes quantizing a few
integer operations per element, which keeps the fused kernel near memory speed; a table of
256 levels (bitsandbytes' and torchao's dynamic map) needs a binary search per element.

``exp_avg_sq`` is written with stochastic rounding (:mod:`.rounding`'s hashed noise): Ano's
second moment moves by ``(1 - β2) · g²`` per step, often less than a code's spacing, and
rounding to nearest absorbs those moves (measured: +6 % bias in ``v`` at ``β2 = 0.999``, +0.3 %
with stochastic rounding). ``exp_avg`` rounds to nearest, which measured closer to float32
state than stochastic rounding there (only its sign enters the update). The noise is decided
by the step count, so every path writes the same codes and a resumed run continues bit for
bit. Conversions on load (float32 state into an 8-bit optimizer) round to nearest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import rounding
from .fused.cpu import _cpu_scalars, cpu_codes_call
from .fused.inductor import _ano_math
from .step_scalars import _amp_tensors, _hyper_tensor, _no_noise, _step_scalars

__all__ = [
    "BLOCK",
    "MIN_NUMEL",
    "blockwise8_ano",
    "blockwise8_step",
    "dequantize",
    "float_state_dtype",
    "num_blocks",
    "quantize",
    "quantized_moments",
    "takes_codes",
]

BLOCK = 256
MIN_NUMEL = 4096
# A code's bits, shifted into a float32 (sign bit to bit 31, the others to the top of the
# exponent field: the code is a tiny float, its exponent field 0 a subnormal), times 2**96, is
# its value relative to the block's scale, up to 1.75 (signed) and 1.875 (unsigned).
_SIGNED_SHIFT, _UNSIGNED_SHIFT = 21, 20
_RESCALE = 2.0**96
_UNSCALE = 2.0**-96
# Rounding to nearest: half of the discarded bits' range, as 16-bit noise.
_NEAREST = 1 << 15


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def takes_codes(param: Tensor) -> bool:
    """Whether ``param``'s moments are 8-bit codes in a ``torch.uint8`` group."""
    return _real_numel(param) >= MIN_NUMEL


def float_state_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of float moments in a group of ``state_dtype``: a ``torch.uint8`` group keeps
    a small tensor's moments in float32 (float64 for a float64 parameter; None: the
    parameter's own dtype)."""
    if state_dtype is not torch.uint8:
        return state_dtype
    real = torch.view_as_real(param) if param.is_complex() else param
    wide = torch.promote_types(real.dtype, torch.float32)
    return None if not param.is_complex() and wide == param.dtype else wide


def _real_numel(param: Tensor) -> int:
    return param.numel() * (2 if param.is_complex() else 1)


def quantized_moments(param: Tensor) -> dict[str, Tensor]:
    """Zero 8-bit moments for ``param`` (a complex one as its real view): the four state
    tensors ``exp_avg``, ``exp_avg_sq`` (codes) and ``exp_avg_scale``, ``exp_avg_sq_scale``."""
    like = torch.view_as_real(param) if param.is_complex() else param
    blocks = num_blocks(like.numel())
    return {
        "exp_avg": torch.zeros(like.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_sq": torch.zeros(like.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_scale": torch.zeros(blocks, dtype=torch.float32, device=param.device),
        "exp_avg_sq_scale": torch.zeros(blocks, dtype=torch.float32, device=param.device),
    }


def _per_element(scale: Tensor, numel: int) -> Tensor:
    return scale.repeat_interleave(BLOCK)[:numel]


def dequantize(codes: Tensor, scale: Tensor, *, signed: bool) -> Tensor:
    """The float32 values of ``codes`` (flat, a whole number of blocks from a block's start)
    under their blocks' ``scale``."""
    c = codes.reshape(-1).to(torch.int32)
    bits = ((c & 0x80) << 24) | ((c & 0x7F) << _SIGNED_SHIFT) if signed else c << _UNSIGNED_SHIFT
    return bits.view(torch.float32) * _RESCALE * _per_element(scale, c.numel())


def block_absmax(x: Tensor) -> Tensor:
    """Each block's largest magnitude (NaN where the block holds one)."""
    pad = (-x.numel()) % BLOCK
    flat = x.reshape(-1).abs()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK).amax(1)


def quantize(x: Tensor, noise: Tensor | None, *, signed: bool) -> tuple[Tensor, Tensor]:
    """Codes (uint8, shaped like ``x``) and block scales (float32) of float32 ``x``, rounded
    with ``noise`` (int32 in [0, 2**16), like ``x``: stochastic) or to nearest (None)."""
    scale = block_absmax(x)
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)
    unit = x.reshape(-1) * _per_element(inverse, x.numel()) * _UNSCALE
    bits = unit.view(torch.int32)
    # NaN counts as infinity, so that adding the rounding bits cannot overflow.
    magnitude = (bits & 0x7FFFFFFF).clamp_max(0x7F800000)
    noise = _NEAREST if noise is None else noise.reshape(-1)
    if signed:
        cut = ((magnitude + (noise << (_SIGNED_SHIFT - 16))) >> _SIGNED_SHIFT).clamp_max(127)
        codes = cut | ((bits >> 24) & 0x80)
    else:
        codes = ((magnitude + (noise << (_UNSIGNED_SHIFT - 16))) >> _UNSIGNED_SHIFT).clamp_max(255)
    return codes.to(torch.uint8).view(x.shape), scale


# Elements per block of the eager step: a whole number of scale blocks, whose float32
# temporaries stay small.
_EAGER_NUMEL = 1 << 16


def blockwise8_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    state_steps: list[Tensor],
    *,
    fused: bool,
    **scalars,
) -> None:
    """The step of checked tensors with 8-bit moments: on the CPU with ``fused=True`` one
    call of the C++ group kernel where it takes them all, else :func:`blockwise8_ano`."""
    if fused and params and params[0].is_cpu and not torch.compiler.is_compiling():
        real = [torch.view_as_real(t) if t.is_complex() else t for t in params]
        real_grads = [torch.view_as_real(t) if t.is_complex() else t for t in grads]
        lists = (real, real_grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales)
        kernel_scalars = _cpu_scalars(
            scalars["lr"], scalars["beta1"], scalars["beta2"], scalars["eps"],
            scalars["weight_decay"], scalars.get("grad_scale"), scalars.get("found_inf"),
        )  # fmt: skip
        if cpu_codes_call(
            (*lists, state_steps), kernel_scalars, scalars["maximize"],
            scalars["logarithmic_schedule"],
        ):  # fmt: skip
            return
    blockwise8_ano(
        params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps,
        **scalars,
    )  # fmt: skip


def blockwise8_ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    logarithmic_schedule: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """The eager step of (checked) tensors with 8-bit moments, in place.

    Per block of the tensor: the moments are dequantized to float32, updated with the fused
    kernels' arithmetic (:func:`.fused.inductor._ano_math`, so that this path and the fused
    one write the same bits), and quantized again; the parameter is updated from the float32
    moments. ``grad_scale`` and ``found_inf`` act as in the fused path (a step with
    ``found_inf`` set changes nothing)."""
    if not params:
        return
    if found_inf is not None and bool(found_inf.item()):
        return
    device = params[0].device
    torch._foreach_add_(state_steps, 1.0)
    weights, corrections = _step_scalars(
        state_steps, beta1, beta2, logarithmic_schedule, torch.float32, device
    )
    hyper = _hyper_tensor(lr, beta1, beta2, eps, weight_decay, device)
    skip, inv_scale = _amp_tensors(grad_scale, None, device)
    no_noise = _no_noise(device)
    for i, (param, grad, m_codes, v_codes) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    ):
        if param.is_complex():
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
        # Blocks follow the elements' logical order; other layouts are stepped as copies.
        given = (param, m_codes, v_codes, exp_avg_scales[i], exp_avg_sq_scales[i])
        work = [t if t.is_contiguous() else t.contiguous() for t in given]
        p, m_flat, v_flat, m_scale, v_scale = (t.view(-1) for t in work)
        g = grad.reshape(-1)
        v_noise = rounding.noise_parameter_tensor(state_steps[i].reshape(()), _V_STREAM)
        for start in range(0, p.numel(), _EAGER_NUMEL):
            end = min(start + _EAGER_NUMEL, p.numel())
            scales = slice(start // BLOCK, num_blocks(end))
            m = dequantize(m_flat[start:end], m_scale[scales], signed=True)
            v = dequantize(v_flat[start:end], v_scale[scales], signed=False)
            _ano_math(
                p[start:end], g[start:end], m, v, weights[i], corrections[i], hyper, skip,
                inv_scale, no_noise, maximize=maximize,
            )  # fmt: skip
            codes, scale = quantize(m, None, signed=True)
            m_flat[start:end].copy_(codes)
            m_scale[scales].copy_(scale)
            codes, scale = quantize(v, rounding.hashed_noise(v, v_noise, start), signed=False)
            v_flat[start:end].copy_(codes)
            v_scale[scales].copy_(scale)
        for target, result in zip(given, work, strict=True):
            if result is not target:
                target.copy_(result)


_V_STREAM = rounding.EXP_AVG_SQ_STREAM
