"""The operator ``ano::fused_step_`` in torch operations: what runs it on every device but the
CPU (one ``torch._foreach_*`` call per operation for a bucket of tensors), on the CPU where its C++
kernel cannot be built, and for the tensors that kernel does not take (float64 or bfloat16
parameters, layouts it cannot walk). The 8-bit eager step (``fused=False`` with
``state_dtype=torch.uint8``) is this function too.

Every operation is the C++ kernel's (``kernel.cpp``), in the same order and in float32 (float64
for float64 parameters), with the same per-tensor scalars: on the CPU the two write the same
bits. The scalars come from the step counts in Python's float arithmetic (libm, as the kernel's
double arithmetic) and are rounded to float32 once; where the step counts live on another device
they are computed there with torch operations, so that nothing is read on the host and a CUDA
graph can capture the step.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import blockwise8, rounding
from ..tensor_checks import check_step_tensors, flattens

__all__ = [
    "GROUP_OPTIONS",
    "check_group_sizes",
    "check_lists",
    "checked_scales",
    "fused_step_",
    "fused_step_checked_",
    "fused_step_groups_",
    "is_dense",
]

# The options that ``ano::fused_step_.groups`` takes as one list entry per group.
GROUP_OPTIONS = (
    "lr", "beta1", "beta2", "eps", "weight_decay", "logarithmic_schedule", "maximize",
)  # fmt: skip

# Elements per piece of a contiguous tensor, and per bucket of pieces stepped by one sequence of
# foreach calls. On the CPU a bucket's temporaries stay within the caches; on a GPU a bucket is
# one launch per operation, so buckets are large (their temporaries stay within a few hundred
# megabytes).
CPU_SIZES = (1 << 17, 1 << 19)
DEVICE_SIZES = (1 << 22, 1 << 24)


def _sizes(device: torch.device) -> tuple[int, int]:
    """Elements per piece and per bucket on ``device``."""
    return CPU_SIZES if device.type == "cpu" else DEVICE_SIZES


def _f32(x: float) -> float:
    """``x`` rounded to float32 (round to nearest), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class StepScalars:
    """One tensor's scalars for this step in its compute dtype (Python floats, or 0-d tensors
    on the tensor's device): the update is ``v + one_minus_beta2 * (sign(g² - v)·g² - v)``,
    ``m + weight * (g - m)`` and ``p * decay - sign(m) * (step_size * |g| / (sqrt(v) +
    eps_c))`` with ``g = grad * inv_scale`` (negated to maximize)."""

    weight: float | Tensor
    one_minus_beta2: float | Tensor
    eps_c: float | Tensor
    step_size: float | Tensor
    decay: float | Tensor
    inv_scale: float | Tensor
    noise: tuple  # (A, B) of exp_avg's and of exp_avg_sq's rounding noise, ints or tensors


def _host_scalars(step: float, wide: bool, hyper: dict) -> StepScalars:
    """The kernel's scalars from a step count read on the host: computed in double, rounded
    to float32 (kept in double where ``wide``, for float64 tensors) as kernel.cpp rounds them."""
    cut = (lambda x: x) if wide else _f32
    correction = cut(math.sqrt(1.0 - hyper["beta2"] ** step))
    if hyper["logarithmic_schedule"]:
        weight = cut(1.0 / math.log(step + 2.0))
    else:
        weight = cut(1.0 - hyper["beta1"])
    lr, eps = cut(hyper["lr"]), cut(hyper["eps"])
    return StepScalars(
        weight=weight,
        one_minus_beta2=cut(1.0 - cut(hyper["beta2"])),
        eps_c=cut(eps * correction),
        step_size=cut(lr * correction),
        decay=cut(1.0 - cut(lr * cut(hyper["weight_decay"]))),
        inv_scale=cut(hyper["inv_scale"]),
        noise=(
            rounding.noise_parameters(step, rounding.EXP_AVG_STREAM),
            rounding.noise_parameters(step, rounding.EXP_AVG_SQ_STREAM),
        ),
    )


def _device_scalars(steps: list[Tensor], compute: torch.dtype, hyper: dict) -> list[StepScalars]:
    """:func:`_host_scalars` for step counts on a device, as 0-d tensors there, with a handful
    of foreach calls for the whole list and no host read."""
    wide = [s.to(torch.float64) for s in steps]
    corrections = torch._foreach_pow(hyper["beta2"], wide)
    torch._foreach_neg_(corrections)
    torch._foreach_add_(corrections, 1.0)
    torch._foreach_sqrt_(corrections)
    corrections = [c.to(compute) for c in corrections]
    device = steps[0].device
    if hyper["logarithmic_schedule"]:
        weights = torch._foreach_add(wide, 2.0)
        torch._foreach_log_(weights)
        torch._foreach_reciprocal_(weights)
        weights = [w.to(compute) for w in weights]
    else:
        # A fill kernel, not a host-to-device copy: a CUDA graph can capture it.
        weight = torch.full((), 1.0 - hyper["beta1"], dtype=compute, device=device)
        weights = [weight] * len(steps)
    lr = hyper["lr"]
    lr = lr.to(device=device, dtype=compute) if isinstance(lr, Tensor) else lr
    # Every scalar in the compute dtype, each operation rounded as the kernel rounds it.
    one = torch.ones((), dtype=compute, device=device)
    lr_t = one * lr
    beta2 = one * hyper["beta2"]
    inv_scale = hyper["inv_scale"]
    inv_scale = inv_scale.to(compute) if isinstance(inv_scale, Tensor) else one * inv_scale
    decay = 1.0 - lr_t * (one * hyper["weight_decay"])
    counts = torch.stack([s.reshape(()) for s in steps])
    m_noise = rounding.noise_parameter_tensor(counts, rounding.EXP_AVG_STREAM)
    v_noise = rounding.noise_parameter_tensor(counts, rounding.EXP_AVG_SQ_STREAM)
    return [
        StepScalars(
            weight=w,
            one_minus_beta2=1.0 - beta2,
            eps_c=(one * hyper["eps"]) * c,
            step_size=lr_t * c,
            decay=decay,
            inv_scale=inv_scale,
            noise=(tuple(m_noise[i].unbind(0)), tuple(v_noise[i].unbind(0))),
        )
        for i, (w, c) in enumerate(zip(weights, corrections, strict=True))
    ]


@dataclass
class _Piece:
    """Elements ``start ..`` of one tensor's flat order, with its four tensors over them."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    start: int
    scalars: StepScalars


def _pieces(
    tensors: tuple[Tensor, Tensor, Tensor, Tensor], scalars: StepScalars
) -> Iterator[_Piece]:
    if tensors[0].numel() == 0:
        return
    size, _ = _sizes(tensors[0].device)
    if not flattens(tensors) or tensors[0].numel() <= size:
        yield _Piece(*tensors, 0, scalars)
        return
    for start in range(0, tensors[0].numel(), size):
        yield _Piece(*(t.view(-1)[start : start + size] for t in tensors), start, scalars)


def _buckets(pieces: list[_Piece]) -> Iterator[list[_Piece]]:
    bucket, total = [], 0
    _, limit = _sizes(pieces[0].param.device) if pieces else (0, 0)
    for piece in pieces:
        if bucket and total + piece.param.numel() > limit:
            yield bucket
            bucket, total = [], 0
        bucket.append(piece)
        total += piece.param.numel()
    if bucket:
        yield bucket


def _per_piece(pieces: Sequence[_Piece], name: str) -> list:
    return [getattr(p.scalars, name) for p in pieces]


def _update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    pieces: Sequence[_Piece],
    maximize: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The update over lists of equal-shaped tensors in the compute dtype: the new parameters,
    moments. kernel.cpp's ``update``, operation for operation."""
    g = torch._foreach_mul(grads, _per_piece(pieces, "inv_scale"))
    if maximize:
        torch._foreach_neg_(g)
    g2 = torch._foreach_mul(g, g)
    d = torch._foreach_sub(g2, exp_avg_sqs)
    torch._foreach_sign_(d)
    torch._foreach_mul_(d, g2)
    torch._foreach_sub_(d, exp_avg_sqs)
    torch._foreach_mul_(d, _per_piece(pieces, "one_minus_beta2"))
    v_new = torch._foreach_add(exp_avg_sqs, d)
    del d, g2
    e = torch._foreach_sub(g, exp_avgs)
    torch._foreach_mul_(e, _per_piece(pieces, "weight"))
    m_new = torch._foreach_add(exp_avgs, e)
    del e
    denominator = _sqrt(v_new)
    torch._foreach_add_(denominator, _per_piece(pieces, "eps_c"))
    ratio = torch._foreach_abs(g)
    del g
    torch._foreach_div_(ratio, denominator)
    del denominator
    torch._foreach_mul_(ratio, _per_piece(pieces, "step_size"))
    direction = torch._foreach_sign(m_new)
    torch._foreach_mul_(direction, ratio)
    del ratio
    p_new = torch._foreach_mul(params, _per_piece(pieces, "decay"))
    torch._foreach_sub_(p_new, direction)
    return p_new, m_new, v_new


def _sqrt(tensors: list[Tensor]) -> list[Tensor]:
    """The correctly rounded square roots (IEEE's, as the kernel's instruction computes them).
    torch's float32 sqrt on the CPU can be an ulp off; a float32's square root taken in
    float64 and rounded to float32 is the correctly rounded one (float64 has more than twice
    float32's bits)."""
    if tensors[0].dtype != torch.float32:
        return torch._foreach_sqrt(tensors)
    wide = torch._foreach_sqrt([t.double() for t in tensors])
    return [t.float() for t in wide]


def _compute_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


def is_dense(t: Tensor) -> bool:
    """Whether the elements of ``t`` fill ``t.numel()`` consecutive places in memory, in some
    order of its dimensions (contiguous, or permuted as channels_last is): what the kernel
    walks."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _store(target: Tensor, value: Tensor, noise, start: int) -> None:
    """``value`` into ``target``: bfloat16 with stochastic rounding, anything else as
    ``copy_`` rounds. The noise follows the elements' order in memory (``start`` the first's
    index), as the kernel walks them: a channels_last tensor rounds as its memory runs."""
    if target.dtype == torch.bfloat16 and value.dtype == torch.float32:
        index = torch.arange(start, start + target.numel(), dtype=torch.int32, device=target.device)
        if target.is_contiguous() or not is_dense(target):
            index = index.view(target.shape)
        else:  # each element's position in memory
            index = index.as_strided(target.shape, target.stride())
        value = rounding.round_with_noise(value, rounding.noise_of_indices(index, noise))
    target.copy_(value)


def _step_float_moments(pieces: list[_Piece], compute: torch.dtype, maximize: bool, skip) -> None:
    for bucket in _buckets(pieces):
        roles = [[getattr(p, name) for p in bucket] for name in _ROLES]
        widened = [[t.to(compute) for t in role] for role in roles]
        p_new, m_new, v_new = _update(*widened, bucket, maximize)
        if skip is not None:  # on a device: keep the old values where GradScaler found inf
            p_new, m_new, v_new = (
                [torch.where(skip, old, new) for old, new in zip(olds, news, strict=True)]
                for olds, news in zip(widened[:1] + widened[2:], (p_new, m_new, v_new), strict=True)
            )
        for piece, p, m, v in zip(bucket, p_new, m_new, v_new, strict=True):
            piece.param.copy_(p)
            _store(piece.exp_avg, m, piece.scalars.noise[0], piece.start)
            _store(piece.exp_avg_sq, v, piece.scalars.noise[1], piece.start)


_ROLES = ("param", "grad", "exp_avg", "exp_avg_sq")
# Elements per part of a tensor with 8-bit moments (whole rows, at least one).
_CODES_PART_NUMEL = 1 << 16


def _step_codes(
    param: Tensor,
    grad: Tensor,
    m_codes: Tensor,
    v_codes: Tensor,
    m_scale: Tensor,
    v_scale: Tensor,
    offset: int,
    scalars: StepScalars,
    maximize: bool,
    skip,
) -> None:
    """One tensor with 8-bit moments, in parts of whole rows: decode, update, encode
    (:mod:`..blockwise8`'s format, the kernel's rounding: exp_avg to nearest, exp_avg_sq with
    the noise of its elements' indices in the whole tensor)."""
    given = (param, m_codes, v_codes, m_scale, v_scale)
    # Blocks follow the elements' logical order; other layouts are stepped as copies.
    work = [t if t.is_contiguous() else t.contiguous() for t in given]
    rows, cols = blockwise8.matrix_shape(work[0].shape)
    p_all, m_all, v_all = (t.view(rows, cols) for t in work[:3])
    m_scales, v_scales = (t.view(rows, -1) for t in work[3:])
    g_all = grad.reshape(rows, cols)
    compute = _compute_dtype(param)
    chunk = max(1, _CODES_PART_NUMEL // max(cols, 1))
    for first in range(0, rows, chunk):
        part = slice(first, first + chunk)
        m = blockwise8.dequantize(m_all[part], m_scales[part], signed=True)
        v = blockwise8.dequantize(v_all[part], v_scales[part], signed=False)
        widened = [t.to(compute) for t in (p_all[part], g_all[part], m, v)]
        piece = _Piece(*widened, 0, scalars)
        (p_new,), (m_new,), (v_new,) = _update(*([t] for t in widened), [piece], maximize)
        m_new_codes, m_new_scale = blockwise8.quantize(m_new.float(), None, signed=True)
        start = (offset + first * cols) % 65536  # the low 16 bits of the index count
        noise = rounding.hashed_noise(v_new, scalars.noise[1], start)
        v_new_codes, v_new_scale = blockwise8.quantize(v_new.float(), noise, signed=False)
        targets = (p_all[part], m_all[part], m_scales[part], v_all[part], v_scales[part])
        results = (p_new, m_new_codes, m_new_scale, v_new_codes, v_new_scale)
        for target, result in zip(targets, results, strict=True):
            # On a device, where GradScaler found inf, every tensor keeps its old value.
            target.copy_(result if skip is None else torch.where(skip, target, result))
    for target, result in zip(given, work, strict=True):
        if result is not target:
            target.copy_(result)


def check_lists(params, grads, exp_avgs, exp_avg_sqs, state_steps, m_scales, v_scales, offsets):
    n = len(params)
    if not len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(state_steps) == n:
        raise ValueError(
            "ano::fused_step_: params, grads, exp_avgs, exp_avg_sqs and state_steps need one "
            f"tensor per parameter, got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)} "
            f"and {len(state_steps)}"
        )
    if (m_scales or v_scales) and not len(m_scales) == len(v_scales) == len(offsets) == n:
        raise ValueError(
            "ano::fused_step_: exp_avg_scales, exp_avg_sq_scales and noise_offsets are empty or "
            f"hold one entry per parameter, got {len(m_scales)}, {len(v_scales)} and "
            f"{len(offsets)} for {n} parameters"
        )


def check_group_sizes(group_sizes, tensors: int, options: dict) -> None:
    """``ano::fused_step_.groups``'s group sizes (each >= 0, adding up to the ``tensors``) and
    option lists (one entry per group)."""
    if any(size < 0 for size in group_sizes) or sum(group_sizes) != tensors:
        raise ValueError(
            f"ano::fused_step_.groups: group_sizes {list(group_sizes)} must be >= 0 and add up "
            f"to the {tensors} tensors"
        )
    lengths = {name: len(options[name]) for name in GROUP_OPTIONS}
    if any(length != len(group_sizes) for length in lengths.values()):
        raise ValueError(
            "ano::fused_step_.groups: every option list needs one entry per group, got "
            f"{len(group_sizes)} group sizes and {lengths}"
        )


def checked_scales(exp_avgs, exp_avg_scales, exp_avg_sq_scales, noise_offsets) -> list | None:
    """The operator's 8-bit lists as :func:`..tensor_checks.check_step_tensors` takes them:
    each tensor's ``(exp_avg_scale, exp_avg_sq_scale, noise_offset)``, None where its moments
    are floats; None without codes."""
    if not exp_avg_scales:
        return None
    return [
        (m_scale, v_scale, offset) if exp_avg.dtype == torch.uint8 else None
        for exp_avg, m_scale, v_scale, offset in zip(
            exp_avgs, exp_avg_scales, exp_avg_sq_scales, noise_offsets, strict=True
        )
    ]


def _checked_grads(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
    noise_offsets, *, owner: str,
) -> list[Tensor]:  # fmt: skip
    """Check an operator call's lists and every tensor in them (nothing changes); return the
    gradients as :func:`..tensor_checks.check_step_tensors` gives them."""
    check_lists(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets,
    )  # fmt: skip
    scales = checked_scales(exp_avgs, exp_avg_scales, exp_avg_sq_scales, noise_offsets)
    return check_step_tensors(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, owner=owner,
        where=lambda i: f"tensor {i}", scales=scales,
    )  # fmt: skip


def fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    noise_offsets: list[int],
    **options,
) -> None:
    """``ano::fused_step_`` (see :mod:`.op`): the Ano/Anolog step of every tensor, in place,
    with ``state_steps`` incremented, except on a step that ``found_inf`` marks (GradScaler
    found inf/nan), which changes nothing. Every tensor is checked first
    (:func:`..tensor_checks.check_step_tensors`): a call that raises changes nothing. Complex
    tensors come as their real views. ``options``: the operator's keyword arguments."""
    grads = _checked_grads(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets, owner="ano::fused_step_",
    )  # fmt: skip
    fused_step_checked_(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets, **options,
    )  # fmt: skip


def fused_step_groups_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    noise_offsets: list[int],
    *,
    group_sizes: list[int],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    **group_options: list,
) -> None:
    """``ano::fused_step_.groups`` (see :mod:`.op`): :func:`fused_step_` of several parameter
    groups, group ``g`` being the next ``group_sizes[g]`` tensors with the options at index
    ``g`` of each list of ``group_options`` (:data:`GROUP_OPTIONS`). Every group is checked
    before any changes."""
    if set(group_options) != set(GROUP_OPTIONS):
        raise TypeError(
            f"ano::fused_step_.groups takes the options {GROUP_OPTIONS}, got {sorted(group_options)}"
        )
    check_group_sizes(group_sizes, len(params), group_options)
    grads = _checked_grads(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets, owner="ano::fused_step_.groups",
    )  # fmt: skip
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    coded = (exp_avg_scales, exp_avg_sq_scales, noise_offsets)
    start = 0
    for g, size in enumerate(group_sizes):
        part = slice(start, start + size)
        start += size
        fused_step_checked_(
            *(x[part] for x in lists), *(x[part] if x else [] for x in coded),
            grad_scale=grad_scale, found_inf=found_inf,
            **{name: values[g] for name, values in group_options.items()},
        )  # fmt: skip


def fused_step_checked_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    noise_offsets: list[int],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    logarithmic_schedule: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`fused_step_` of tensors the caller has checked."""
    if not params:
        return
    # Scalars read on the host (exactly the kernel's), unless that would be a device sync or
    # a graph break under torch.compile: then computed where the step counts are.
    on_host = (
        not torch.compiler.is_compiling()
        and all(s.device.type == "cpu" for s in state_steps)
        and not any(
            isinstance(x, Tensor) and x.device.type != "cpu" for x in (lr, grad_scale, found_inf)
        )
    )
    skip = None
    if found_inf is not None:
        if on_host:
            if float(found_inf) != 0.0:
                return
        else:
            skip = found_inf.to(params[0].device).reshape(()) != 0
    hyper = {
        "lr": float(lr) if on_host else lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "logarithmic_schedule": logarithmic_schedule,
        "inv_scale": 1.0,
    }
    if grad_scale is not None:
        hyper["inv_scale"] = (
            1.0 / float(grad_scale)
            if on_host
            else torch.reciprocal(grad_scale.to(torch.float64).reshape(()))
        )
    if skip is None:
        torch._foreach_add_(state_steps, 1.0)
    else:
        torch._foreach_add_(state_steps, 1.0 - skip.to(state_steps[0].dtype))
    computes = [_compute_dtype(p) for p in params]
    if on_host:
        scalars = [
            _host_scalars(s.item(), c == torch.float64, hyper)
            for s, c in zip(state_steps, computes, strict=True)
        ]
    else:
        scalars = [None] * len(params)
        for compute in set(computes):
            indices = [i for i, c in enumerate(computes) if c == compute]
            for i, s in zip(
                indices,
                _device_scalars([state_steps[i] for i in indices], compute, hyper),
                strict=True,
            ):
                scalars[i] = s
    float_pieces: dict[torch.dtype, list[_Piece]] = {}
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        if exp_avg_scales and exp_avgs[i].dtype == torch.uint8:
            _step_codes(
                *tensors, exp_avg_scales[i], exp_avg_sq_scales[i], noise_offsets[i], scalars[i],
                maximize, skip,
            )  # fmt: skip
            continue
        if computes[i] not in float_pieces:
            float_pieces[computes[i]] = []
        float_pieces[computes[i]].extend(_pieces(tensors, scalars[i]))
    for compute, pieces in float_pieces.items():
        _step_float_moments(pieces, compute, maximize, skip)
