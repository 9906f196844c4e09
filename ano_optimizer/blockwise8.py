"""Blockwise 8-bit moments (``state_dtype=torch.uint8``): the format. The step of tensors with
codes is the operator ``ano::fused_step_`` (:mod:`.fused`): its CPU kernel, or its torch
implementation (:mod:`.fused.torch_step`) on other devices and without ``fused=True``.

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

import math

import torch
from torch import Tensor

from ._torch_internals import dtensor_class

__all__ = [
    "BLOCK",
    "MIN_COLS",
    "MIN_NUMEL",
    "block_absmax",
    "codes_problem",
    "dequantize",
    "float_state_dtype",
    "matrix_shape",
    "on_shards",
    "quantize",
    "quantized_moments",
    "scale_shape",
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


def codes_problem(codes, scale, param: Tensor, role: str) -> str | None:
    """Why ``codes`` and ``scale`` are not the 8-bit state ``role`` of ``param`` in this
    format (uint8 codes of the parameter's shape, a trailing 2 for complex ones; float32 scales
    of :func:`scale_shape`), or None."""
    expected = (*param.shape, 2) if param.is_complex() else tuple(param.shape)
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.shape != expected:
        shown = (
            f"a {codes.dtype} tensor of shape {tuple(codes.shape)}"
            if isinstance(codes, Tensor)
            else type(codes).__name__
        )
        return (
            f"state[{role!r}] must be 8-bit codes (torch.uint8 of shape {expected}) beside "
            f"state['{role}_scale'], got {shown}"
        )
    blocks = scale_shape(expected)
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.shape != blocks:
        shown = (
            f"a {scale.dtype} tensor of shape {tuple(scale.shape)}"
            if isinstance(scale, Tensor)
            else type(scale).__name__
        )
        return (
            f"state['{role}_scale'] must be a float32 tensor of shape {blocks} beside its "
            f"8-bit codes, got {shown}"
        )
    return None


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
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(param, dtensor):
        return _sharded_moments(param, dtensor)
    scales = scale_shape(like.shape)
    return {
        "exp_avg": torch.zeros(like.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_sq": torch.zeros(like.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_scale": torch.zeros(scales, dtype=torch.float32, device=param.device),
        "exp_avg_sq_scale": torch.zeros(scales, dtype=torch.float32, device=param.device),
    }


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
        moments[key] = dtensor.from_local(
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
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(first, dtensor):
        return function(*tensors, **options)
    local = [t.to_local() if isinstance(t, dtensor) else t for t in tensors]
    results = function(*local, **options)
    rows = first.shape[0]

    def placed(result: Tensor) -> Tensor:
        shape = (rows, *result.shape[1:])
        return dtensor.from_local(
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
