"""Blockwise 8-bit moments (``state_dtype=torch.uint8``): the format, its eager step, and the
GPU's compiled one (the CPU's fused step is ``fused/cpu_kernel.cpp`` built with ``ANO_CODES``,
one call for a group's tensors with codes and its small tensors with float32 moments).

A moment is kept as one-byte codes, one per element, and one float32 scale (the block's
largest magnitude) per block of :data:`BLOCK` consecutive elements of a row, as in
bitsandbytes and torchao: 2 + 8/256 bytes per parameter for both moments instead of 8. A row
is the first dimension (:func:`matrix_shape`): blocks never cross one, so a tensor sharded on
dimension 0 (FSDP2) shards its scales alike. Tensors of one dimension, fewer than
:data:`MIN_NUMEL` elements (biases, norms) or rows shorter than :data:`MIN_COLS` keep float32
moments.

A code is a small floating-point number cut from the float32 bits of ``x / scale`` (in
[-1, 1]): 31 binades below 1, so a block's small elements keep their size relative to its
largest one (a linear map would round everything under ``scale / 254`` to zero, and Ano's step
is ``sign(m)``: those coordinates would stop moving).

- ``exp_avg`` (signed): sign, 5 exponent bits, 2 mantissa bits (4-7 bits kept per binade:
  12.5-25 % apart);
- ``exp_avg_sq`` (never negative): 5 exponent bits, 3 mantissa bits (6-12 % apart).

Code 0 is exactly 0; below ``2**-30 · scale`` the codes are subnormal, down to ``2**-32``
(signed) and ``2**-33`` (unsigned) times the scale. Cutting bits makes quantizing a few
integer operations per element; a table of 256 levels (bitsandbytes' and torchao's dynamic
map) needs a binary search per element.

``exp_avg_sq`` is written with stochastic rounding (:mod:`.rounding`'s hashed noise): Ano's
second moment moves by ``(1 - β2) · g²`` per step, often less than a code's spacing, and
rounding to nearest absorbs those moves and leaves ``v`` too high (``benchmarks/state_8bit.py``
measures both; docs/performance.md has the figures). ``exp_avg`` rounds to nearest, which
measured closer to float32 state than stochastic rounding (only its sign enters the update).
The noise is decided by the step count and the element's index in the whole tensor (a shard
passes its offset), so every path writes the same codes, a resumed run continues bit for bit
and a sharded run rounds as an unsharded one. Conversions on load (float state into an 8-bit
optimizer) round to nearest.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import torch
from torch import Tensor

from . import rounding
from .fused import cpu_kernel_takes
from .fused.batches import _real_views
from .fused.cpu import _cpu_scalars, cpu_codes_call
from .fused.inductor import _ano_math
from .step_scalars import _amp_tensors, _hyper_tensor, _no_noise, _step_scalars

__all__ = [
    "BLOCK",
    "MIN_COLS",
    "MIN_NUMEL",
    "blockwise8_ano",
    "blockwise8_step",
    "cpu_group_step",
    "cpu_kernels_take",
    "cpu_roles",
    "dequantize",
    "float_state_dtype",
    "matrix_shape",
    "on_shards",
    "quantize",
    "quantized_moments",
    "scale_shape",
    "split_coded",
    "takes_codes",
]

BLOCK = 256
MIN_NUMEL = 4096
MIN_COLS = 16
# A code's bits, shifted into a float32 (sign bit to bit 31, the others to the top of the
# exponent field: the code is a tiny float, its exponent field 0 a subnormal), times 2**96, is
# its value relative to the block's scale, up to 1.75 (signed) and 1.875 (unsigned).
_SIGNED_SHIFT, _UNSIGNED_SHIFT = 21, 20
_RESCALE = 2.0**96
_UNSCALE = 2.0**-96
# Block scales up to this quantize with 2**-96 folded into the inverse (see quantize).
_FOLD_LIMIT = 2.0**30
# Rounding to nearest: half of the discarded bits' range, as 16-bit noise.
_NEAREST = 1 << 15


def matrix_shape(shape) -> tuple[int, int]:
    """The rows and columns blocks are laid out in: ``shape[0]`` rows of all the other
    dimensions (a tensor's blocks never cross a row, so that a tensor sharded on its first
    dimension shards its scales alike)."""
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else 0)


def scale_shape(shape) -> tuple[int, int]:
    """The shape of the scales of codes of ``shape``: one per row and block of the row."""
    rows, cols = matrix_shape(shape)
    return rows, -(-cols // BLOCK)


def takes_codes(param: Tensor) -> bool:
    """Whether ``param``'s moments are 8-bit codes in a ``torch.uint8`` group: tensors of two
    or more dimensions, at least :data:`MIN_NUMEL` values and rows of at least
    :data:`MIN_COLS` (a row's scales cost ``8 / cols`` bytes per value: with shorter rows the
    codes would save little or cost more than float32)."""
    if param.dim() < 2 or _real_numel(param) < MIN_NUMEL:
        return False
    _, cols = matrix_shape(param.shape)
    return cols * (2 if param.is_complex() else 1) >= MIN_COLS


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
    tensors ``exp_avg``, ``exp_avg_sq`` (codes) and ``exp_avg_scale``, ``exp_avg_sq_scale``.
    For a DTensor parameter they are DTensors placed like it (sharded on dimension 0 or
    replicated)."""
    like = torch.view_as_real(param) if param.is_complex() else param
    dtensor = _dtensor_module(param)
    if dtensor is not None:
        return _sharded_moments(param, dtensor)
    scales = scale_shape(like.shape)
    return {
        "exp_avg": torch.zeros(like.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_sq": torch.zeros(like.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_scale": torch.zeros(scales, dtype=torch.float32, device=param.device),
        "exp_avg_sq_scale": torch.zeros(scales, dtype=torch.float32, device=param.device),
    }


def _dtensor_module(t: Tensor):
    module = sys.modules.get("torch.distributed.tensor")
    return module if module is not None and isinstance(t, module.DTensor) else None


def _sharded_moments(param: Tensor, dtensor) -> dict[str, Tensor]:
    placements = param.placements
    if param.is_complex() or not all(
        p.is_replicate() or (p.is_shard() and p.dim == 0) for p in placements
    ):
        raise ValueError(
            "Ano: state_dtype=torch.uint8 takes DTensor parameters sharded on their first "
            f"dimension or replicated (as FSDP2 shards them), got a {param.dtype} parameter "
            f"placed {tuple(placements)}; use state_dtype=torch.bfloat16 for it"
        )
    local = param.to_local()
    rows, blocks = scale_shape(param.shape)
    moments = {}
    for key, shape, dtype, global_shape in (
        ("exp_avg", local.shape, torch.uint8, param.shape),
        ("exp_avg_sq", local.shape, torch.uint8, param.shape),
        ("exp_avg_scale", (local.shape[0], blocks), torch.float32, (rows, blocks)),
        ("exp_avg_sq_scale", (local.shape[0], blocks), torch.float32, (rows, blocks)),
    ):
        moments[key] = dtensor.DTensor.from_local(
            torch.zeros(shape, dtype=dtype, device=local.device), param.device_mesh,
            placements, run_check=False, shape=torch.Size(global_shape),
            stride=torch.empty(global_shape, device="meta").stride(),
        )  # fmt: skip
    return moments


def on_shards(function, *tensors, **options):
    """``function`` (:func:`dequantize` or :func:`quantize`) of plain tensors, or of DTensors'
    local shards, its results placed back like the first: rows never share a block, so the
    shards of a tensor sharded on dimension 0 are quantized as they are."""
    first = tensors[0]
    dtensor = _dtensor_module(first)
    if dtensor is None:
        return function(*tensors, **options)
    local = [t.to_local() if isinstance(t, dtensor.DTensor) else t for t in tensors]
    results = function(*local, **options)
    rows = first.shape[0]

    def placed(result: Tensor) -> Tensor:
        shape = (rows, *result.shape[1:])
        return dtensor.DTensor.from_local(
            result, first.device_mesh, first.placements, run_check=False,
            shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride(),
        )  # fmt: skip

    return tuple(map(placed, results)) if isinstance(results, tuple) else placed(results)


def _per_element(scale: Tensor, cols: int) -> Tensor:
    """Each element's block scale, for ``scale`` of shape (rows, blocks): (rows, cols)."""
    return scale.repeat_interleave(BLOCK, dim=1)[:, :cols]


def dequantize(codes: Tensor, scale: Tensor, *, signed: bool) -> Tensor:
    """The float32 values of ``codes`` under their blocks' ``scale`` (see :func:`scale_shape`),
    shaped like ``codes``."""
    rows, cols = matrix_shape(codes.shape)
    c = codes.reshape(rows, cols).to(torch.int32)
    bits = ((c & 0x80) << 24) | ((c & 0x7F) << _SIGNED_SHIFT) if signed else c << _UNSIGNED_SHIFT
    values = bits.view(torch.float32) * _RESCALE * _per_element(scale.reshape(rows, -1), cols)
    return values.view(codes.shape)


def block_absmax(x: Tensor) -> Tensor:
    """Each block's largest magnitude (NaN where the block holds one), of shape
    :func:`scale_shape`."""
    rows, cols = matrix_shape(x.shape)
    pad = (-cols) % BLOCK
    flat = x.reshape(rows, cols).abs()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    return flat.view(rows, -1, BLOCK).amax(2)


def quantize(x: Tensor, noise: Tensor | None, *, signed: bool) -> tuple[Tensor, Tensor]:
    """Codes (uint8, shaped like ``x``) and block scales (float32, :func:`scale_shape`) of
    float32 ``x``, rounded with ``noise`` (int32 in [0, 2**16), like ``x``: stochastic) or to
    nearest (None)."""
    rows, cols = matrix_shape(x.shape)
    scale = block_absmax(x)
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)
    # x * (inverse * 2**-96): one rounding, and one multiply per value in the kernels; where
    # inverse * 2**-96 would lose bits (a scale above 2**30), (x * inverse) * 2**-96.
    folded = scale <= _FOLD_LIMIT
    by = torch.where(folded, inverse * _UNSCALE, inverse)
    unit = x.reshape(rows, cols) * _per_element(by, cols)
    unit = torch.where(_per_element(folded, cols), unit, unit * _UNSCALE)
    bits = unit.view(torch.int32)
    # NaN counts as infinity, so that adding the rounding bits cannot overflow.
    magnitude = (bits & 0x7FFFFFFF).clamp_max(0x7F800000)
    noise = _NEAREST if noise is None else noise.reshape(rows, cols)
    if signed:
        cut = ((magnitude + (noise << (_SIGNED_SHIFT - 16))) >> _SIGNED_SHIFT).clamp_max(127)
        codes = cut | ((bits >> 24) & 0x80)
    else:
        codes = ((magnitude + (noise << (_UNSIGNED_SHIFT - 16))) >> _UNSIGNED_SHIFT).clamp_max(255)
    return codes.to(torch.uint8).view(x.shape), scale


# Elements per chunk of the eager step (whole rows, at least one), whose float32 temporaries
# stay small.
_EAGER_NUMEL = 1 << 16


def split_coded(lists, scales) -> tuple[tuple | None, tuple]:
    """The five role lists of a group split by ``scales`` (one per tensor: its two moment
    scales and noise offset, or None): the eight role lists of the tensors with 8-bit moments
    (params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, noise
    offsets; None if there are none), and the five of the others."""
    if scales is None or all(s is None for s in scales):
        return None, tuple(lists)
    coded = [i for i, s in enumerate(scales) if s is not None]
    rest = [i for i, s in enumerate(scales) if s is None]
    params, grads, exp_avgs, exp_avg_sqs, steps = ([t[i] for i in coded] for t in lists)
    m_scales, v_scales, offsets = ([scales[i][k] for i in coded] for k in (0, 1, 2))
    return (
        (params, grads, exp_avgs, exp_avg_sqs, m_scales, v_scales, steps, offsets),
        tuple([t[i] for i in rest] for t in lists),
    )


def cpu_roles(lists, scales, has_complex: bool) -> tuple:
    """The eight role lists of the 8-bit CPU kernel for a whole ``torch.uint8`` group, its
    tensors with codes and the small ones with float32 moments together (``scales`` as
    :func:`split_coded` takes it): params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales and
    exp_avg_sq_scales (None without codes), steps, noise offsets. Complex tensors as real
    views."""
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    if has_complex:
        params, grads, exp_avgs, exp_avg_sqs = map(
            _real_views, (params, grads, exp_avgs, exp_avg_sqs)
        )
    m_scales, v_scales, offsets = zip(*(s or _NO_SCALES for s in scales), strict=True)
    return params, grads, exp_avgs, exp_avg_sqs, m_scales, v_scales, steps, offsets


_NO_SCALES = (None, None, 0)


def cpu_kernels_take(
    lists, scales, maximize: bool, logarithmic_schedule: bool, has_complex: bool = True
) -> bool:
    """Whether the CPU group kernel takes a group's tensors whole (a ``torch.uint8`` group's
    in one call of the 8-bit kernel, codes and float32 moments together); nothing changes."""
    if scales is None:
        return cpu_kernel_takes(lists, maximize, logarithmic_schedule)
    if not (lists[0] and lists[0][0].is_cpu):
        return False
    roles = cpu_roles(lists, scales, has_complex)
    return cpu_codes_call(roles, _CHECK_SCALARS, maximize, logarithmic_schedule, check_only=True)


_CHECK_SCALARS = (0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0)


def cpu_group_step(
    lists, scales, has_complex: bool, *, grad_scale=None, found_inf=None, **scalars
) -> bool:
    """The fused step of a whole ``torch.uint8`` group of checked CPU tensors (the five role
    lists, ``scales`` as :func:`split_coded` takes it) in one call of the 8-bit kernel: False,
    with nothing changed, where the kernel does not take them all (or they are not on the CPU,
    or the step is being traced)."""
    if not (lists[0] and lists[0][0].is_cpu) or torch.compiler.is_compiling():
        return False
    return _codes_kernel_step(cpu_roles(lists, scales, has_complex), grad_scale, found_inf, scalars)


def _codes_kernel_step(roles, grad_scale, found_inf, scalars: dict) -> bool:
    """One call of the 8-bit CPU kernel over its eight role lists with the step's
    hyper-parameters (``scalars`` as the step functions take them); False, with nothing
    changed, where it does not take them all."""
    kernel_scalars = _cpu_scalars(
        scalars["lr"], scalars["beta1"], scalars["beta2"], scalars["eps"],
        scalars["weight_decay"], grad_scale, found_inf,
    )  # fmt: skip
    return cpu_codes_call(
        roles, kernel_scalars, scalars["maximize"], scalars["logarithmic_schedule"]
    )


def blockwise8_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    state_steps: list[Tensor],
    noise_offsets: list[int],
    *,
    fused: bool,
    **scalars,
) -> None:
    """The step of checked tensors with 8-bit moments: on the CPU with ``fused=True`` one
    call of the C++ group kernel where it takes them all, else :func:`blockwise8_ano`.
    ``noise_offsets``: the index of each tensor's first element in its whole tensor (a shard's
    rows round as the unsharded tensor's)."""
    if fused and params and params[0].is_cpu and not torch.compiler.is_compiling():
        lists = (
            _real_views(params), _real_views(grads), exp_avgs, exp_avg_sqs, exp_avg_scales,
            exp_avg_sq_scales,
        )  # fmt: skip
        roles = (*lists, state_steps, noise_offsets)
        if _codes_kernel_step(roles, scalars.get("grad_scale"), scalars.get("found_inf"), scalars):
            return
    kernel = None
    if fused and params and not params[0].is_cpu and not torch.compiler.is_compiling():
        kernel = proven_codes_kernel(scalars["maximize"], params[0].device)
    blockwise8_ano(
        params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps,
        noise_offsets, kernel=kernel, **scalars,
    )  # fmt: skip


def blockwise8_ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    state_steps: list[Tensor],
    noise_offsets: list[int] | None = None,
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
    kernel=None,
) -> None:
    """The eager step of (checked) tensors with 8-bit moments, in place; ``kernel``
    (:func:`proven_codes_kernel`) steps each plain contiguous tensor whole instead.

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
        given = (param, m_codes, v_codes, exp_avg_scales[i], exp_avg_sq_scales[i])
        v_noise = rounding.noise_parameter_tensor(state_steps[i].reshape(()), _V_STREAM)
        offset = noise_offsets[i] if noise_offsets else 0
        if kernel is not None and all(t.is_contiguous() for t in (*given, grad)):
            rows, cols = matrix_shape(param.shape)
            start = torch.full((), offset % 65536, dtype=torch.int32, device=device)
            kernel(
                param.view(rows, cols), grad.view(rows, cols), m_codes.view(rows, cols),
                v_codes.view(rows, cols), exp_avg_scales[i], exp_avg_sq_scales[i], weights[i],
                corrections[i], hyper, skip, inv_scale, v_noise.to(device), start,
            )  # fmt: skip
            continue
        # Blocks follow the elements' logical order; other layouts are stepped as copies.
        work = [t if t.is_contiguous() else t.contiguous() for t in given]
        rows, cols = matrix_shape(work[0].shape)
        p, m_all, v_all = (t.view(rows, cols) for t in work[:3])
        m_scale, v_scale = (t.view(rows, -1) for t in work[3:])
        g = grad.reshape(rows, cols)
        chunk = max(1, _EAGER_NUMEL // max(cols, 1))
        for first in range(0, rows, chunk):
            part = slice(first, first + chunk)
            m = dequantize(m_all[part], m_scale[part], signed=True)
            v = dequantize(v_all[part], v_scale[part], signed=False)
            _ano_math(
                p[part], g[part], m, v, weights[i], corrections[i], hyper, skip, inv_scale,
                no_noise, maximize=maximize,
            )  # fmt: skip
            codes, scale = quantize(m, None, signed=True)
            m_all[part].copy_(codes)
            m_scale[part].copy_(scale)
            start = offset + first * cols
            noise = rounding.hashed_noise(v, v_noise, start % 65536)  # the low 16 bits count
            codes, scale = quantize(v, noise, signed=False)
            v_all[part].copy_(codes)
            v_scale[part].copy_(scale)
        for target, result in zip(given, work, strict=True):
            if result is not target:
                target.copy_(result)


_V_STREAM = rounding.EXP_AVG_SQ_STREAM


def codes_update(
    param, grad, m_codes, v_codes, m_scale, v_scale, weight, correction, hyper, skip,
    inv_scale, v_noise, start, *, maximize: bool,
) -> None:  # fmt: skip
    """One tensor's 8-bit step as :func:`blockwise8_ano` computes it, in place, written for
    ``torch.compile``: (rows, cols) views of contiguous tensors, the noise parameters and the
    noise offset ``start`` (mod 2**16) as tensors, so that nothing recompiles from step to
    step. The GPU's fused kernel (:func:`compiled_codes_update`)."""
    rows, cols = param.shape
    m = dequantize(m_codes, m_scale, signed=True)
    v = dequantize(v_codes, v_scale, signed=False)
    no_noise = torch.zeros(4, dtype=torch.int64, device=param.device)
    _ano_math(
        param, grad, m, v, weight, correction, hyper, skip, inv_scale, no_noise,
        maximize=maximize,
    )  # fmt: skip
    codes, scale = quantize(m, None, signed=True)
    m_codes.copy_(codes)
    m_scale.copy_(scale)
    multiplier, offset = v_noise.to(torch.int32).unbind(0)
    index = torch.arange(rows * cols, device=param.device, dtype=torch.int32) + start
    noise = (((index & 0xFFFF) * multiplier + offset) & 0xFFFF).view(rows, cols)
    codes, scale = quantize(v, noise, signed=False)
    v_codes.copy_(codes)
    v_scale.copy_(scale)


@functools.cache
def compiled_codes_update(maximize: bool):
    """:func:`codes_update` compiled once per ``maximize``, with dynamic shapes."""
    return torch.compile(
        functools.partial(codes_update, maximize=maximize), dynamic=True, fullgraph=True
    )


@functools.cache
def proven_codes_kernel(maximize: bool, device: torch.device):
    """:func:`compiled_codes_update` run first on tiny tensors on ``device``, where compiling
    happens: a failure (no Triton, an Inductor error) surfaces here, before a step changes
    anything. None, with one warning, where it fails; those steps run the eager math."""
    try:
        kernel = compiled_codes_update(maximize)
        floats = [torch.zeros(2, 300, device=device) for _ in range(2)]
        codes = [torch.zeros(2, 300, dtype=torch.uint8, device=device) for _ in range(2)]
        scales = [torch.zeros(2, 2, device=device) for _ in range(2)]
        scalars = [torch.full((), v, device=device) for v in (0.1, 1.0, 0.0, 1.0)]
        hyper = torch.zeros(5, dtype=torch.float64, device=device)
        noise = torch.ones(2, dtype=torch.int64, device=device)
        start = torch.zeros((), dtype=torch.int32, device=device)
        weight, correction, skip, inv_scale = scalars
        kernel(*floats, *codes, *scales, weight, correction, hyper, skip, inv_scale, noise, start)
        return kernel
    except Exception as error:  # any compile or run failure: the eager math still works
        warnings.warn(
            f"Ano fused=True: torch.compile could not build the 8-bit kernel on {device} "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0][:300]}); 8-bit "
            "tensors there are stepped with the same math run eagerly (slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
