"""What a step may read and write: the checks every execution path runs on its tensors before
any of them changes.

torch's elementwise kernels trust the tensors they are given: on a tensor whose storage was
freed or shrunk (``t.untyped_storage().resize_(0)``) they read and write unowned memory and
crash the process, and in-place ops on overlapping, inference or negative-bit tensors raise only
once earlier tensors of the step have changed. So before a step touches anything, every
parameter, gradient, moment and step count is checked here, for every group; a step either runs
whole or raises with nothing changed. The fused CPU kernel (``fused/kernel.cpp``) makes the
same checks in C++ for the tensors it takes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._torch_internals import dtensor_class, has_internal_overlap, is_zero_tensor
from .blockwise8 import codes_problem

__all__ = [
    "STATE_DTYPES",
    "check_amp_tensors",
    "check_step_tensors",
    "flattens",
    "storage_holds",
    "written_problem",
]

# The dtypes ``exp_avg`` / ``exp_avg_sq`` may have (for a complex parameter: its own dtype, or
# one of these for state kept as the parameter's real view).
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STEP_DTYPES = (torch.float32, torch.float64)
# Subclasses that override it (FakeTensor, DTensor, wrapper subclasses) serve their data
# through their own dispatch.
_PLAIN = Tensor.__torch_dispatch__
# Traceable wrapper tensors whose dispatch was found to take an in-place update.
_TAKES_IN_PLACE = WeakIdKeyDictionary()


def flattens(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is a contiguous tensor of torch's own dispatch, whose ``view(-1)``
    is its memory in order (paths cut such tensors into chunks). A subclass's views are its
    own: a wrapper's declared strides need not be its data's."""
    return all(type(t).__torch_dispatch__ is _PLAIN and t.is_contiguous() for t in tensors)


def storage_holds(t: Tensor) -> bool:
    """Whether ``t``'s storage is allocated and large enough for every element ``t`` addresses.

    Tensors whose data cannot be reached here (subclasses with their own dispatch, such as
    wrapper subclasses and fake tensors; meta and zero tensors) pass: their dispatch checks
    every access they make.
    """
    if t.numel() == 0 or t.device.type == "meta" or type(t).__torch_dispatch__ is not _PLAIN:
        return True
    try:
        storage = t.untyped_storage()
        nbytes, pointer = storage.nbytes(), storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return True
    if t.is_contiguous():
        extent = t.numel()
    else:
        extent = 1 + sum(
            (size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)
        )
    return pointer != 0 and nbytes >= (t.storage_offset() + extent) * t.element_size()


def written_problem(t: Tensor) -> str | None:
    """Why ``t`` cannot be updated in place, or None."""
    if t.layout != torch.strided or t.is_nested:
        return f"is a {t.layout} tensor; only dense (strided) tensors can be updated"
    if is_zero_tensor(t):
        return "is an immutable zero tensor"
    if t.is_neg() or t.is_conj():
        kind = "negative" if t.is_neg() else "conjugate"
        return (
            f"is a {kind}-bit view; pass a materialized tensor (.resolve_neg() / .resolve_conj())"
        )
    if t.is_inference() and not torch.is_inference_mode_enabled():
        # Also a parameter whose .data was made in inference mode: torch lets the parameter
        # itself change, but not the views of it that the blocked paths update.
        return (
            "is an inference tensor (created under torch.inference_mode(), or given such .data), "
            "which cannot be updated in place outside inference mode; clone it first"
        )
    if not storage_holds(t):
        return _freed(t)
    if has_internal_overlap(t):
        return "has elements that share memory (e.g. made by expand()); clone it first"
    if type(t).__torch_dispatch__ is not _PLAIN and not _is_dtensor(t):
        return _in_place_problem(t)
    return None


def _in_place_problem(t: Tensor) -> str | None:
    """Whether a subclass with its own dispatch (a wrapper) takes an in-place update.

    A traceable wrapper (``__tensor_flatten__``, as torchao's quantized tensors and float8
    weights implement it) shows its inner tensors: they take the checks above, and its dispatch
    is asked once, with an in-place multiply by 1 on a copy, so nothing of ``t`` is written (a
    write could requantize it). Other wrappers hide their data: their dispatch is asked on
    ``t.data`` (the same data, with a version counter of its own, so ``t``'s does not move),
    where a copy would hide what only the data shows (elements that share memory).
    """
    inner = _inner_tensors(t)
    if inner is None:
        return _multiply_problem(lambda: t.data)
    for tensor in inner:
        problem = written_problem(tensor)
        if problem is not None:
            return f"holds an inner tensor that {problem}"
    if t not in _TAKES_IN_PLACE:
        problem = _multiply_problem(lambda: t.detach().clone())
        if problem is not None:
            return problem
        _TAKES_IN_PLACE[t] = True
    return None


def _multiply_problem(target: Callable[[], Tensor]) -> str | None:
    """Why an in-place multiply by 1 of ``target()`` (made inside the check: making it may
    raise too) fails, or None."""
    try:
        with torch.no_grad():
            target().mul_(1)
    except Exception as error:
        return f"cannot be updated in place ({type(error).__name__}: {error})"
    return None


def _inner_tensors(t: Tensor) -> list[Tensor] | None:
    """The tensors a traceable wrapper subclass holds, or None for another tensor."""
    if not hasattr(type(t), "__tensor_flatten__"):
        return None
    try:
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, name) for name in names]
    except Exception:
        return None
    return inner if all(isinstance(x, Tensor) for x in inner) else None


def _is_dtensor(t: Tensor) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def _freed(t: Tensor) -> str:
    return (
        f"has storage of {t.untyped_storage().nbytes()} bytes, too small for its "
        f"{t.numel()} elements (was it freed or resized with untyped_storage().resize_()?)"
    )


def _read_problem(t: Tensor) -> str | None:
    """Why a tensor that is only read (a gradient) cannot be used, or None."""
    if t.layout != torch.strided or t.is_nested:
        return None  # a sparse or nested gradient gets its own message
    if not is_zero_tensor(t) and not storage_holds(t):
        return _freed(t)
    return None


def check_amp_tensors(grad_scale, found_inf, groups: Sequence[dict], owner: str) -> None:
    """``torch.amp.GradScaler``'s ``grad_scale`` and ``found_inf`` on an optimizer, where set:
    each one floating-point number in a tensor that holds a value (a meta one only beside meta
    parameters). Raise ``ValueError`` naming the problem; change nothing."""
    for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
            shown = (
                f"{value.numel()} elements of {value.dtype}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"{owner}: {name} must be a tensor of one floating-point number (as "
                f"torch.amp.GradScaler sets it), got {shown}"
            )
        if value.is_meta and not all(p.is_meta for g in groups for p in g["params"]):
            raise ValueError(
                f"{owner}: {name} is a meta tensor, which holds no value; it must be on the CPU "
                "or on the parameters' device"
            )


def check_step_tensors(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    owner: str,
    where: Callable[[int], str],
    scales: Sequence[tuple[Tensor, Tensor, int] | None] | None = None,
) -> list[Tensor]:
    """Raise ``RuntimeError`` naming the parameter (``where(i)``) and the problem where a tensor
    cannot be stepped; change nothing. Return the gradients, with negative- and conjugate-bit
    views resolved into plain tensors (the paths hand gradients to kernels by address).
    ``scales`` holds each parameter's 8-bit moment scales (``exp_avg_scale``,
    ``exp_avg_sq_scale``, and the noise offset), or None where its moments are not codes."""
    coded = scales is not None and any(s is not None for s in scales)
    if not coded and _usual(params, grads, exp_avgs, exp_avg_sqs, steps):
        return list(grads)
    checked = list(grads)
    for i, (param, grad, exp_avg, exp_avg_sq, step) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)
    ):

        def fail(message: str, i=i) -> None:
            raise RuntimeError(f"{owner}: {where(i)}: {message}")

        problem = written_problem(param)
        if problem is not None:
            fail(f"the parameter {problem}")
        if not isinstance(grad, Tensor):
            fail(f"its gradient is {type(grad).__name__}, not a tensor")
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(
                f"{owner} does not support sparse gradients ({where(i)} has a {grad.layout} "
                "gradient); use a dense embedding or torch.optim.SparseAdam for that parameter"
            )
        for what, ours, theirs in (
            ("shape", tuple(grad.shape), tuple(param.shape)),
            ("dtype", grad.dtype, param.dtype),
            ("device", grad.device, param.device),
        ):
            if ours != theirs:
                fail(
                    f"its gradient has {what} {ours} but the parameter has {what} {theirs}; "
                    "was the parameter changed through .data after its gradient was computed?"
                )
        problem = _read_problem(grad)
        if problem is not None:
            fail(f"its gradient {problem}")
        if grad.is_neg() or grad.is_conj():
            checked[i] = grad.resolve_neg().resolve_conj()
        pair = scales[i] if scales is not None else None
        for k, (role, state) in enumerate((("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))):
            _check_moment(param, state, role, fail, None if pair is None else pair[k])
        _check_step(param, step, fail)
    return checked


_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")


def _usual(params, grads, exp_avgs, exp_avg_sqs, steps) -> bool:
    """Whether every tensor is of the usual kind, which the detailed checks would all accept:
    plain CPU tensors, contiguous, with storage holding them, no special bits, gradients and
    moments of their parameters' shapes and dtypes, one-number float32 steps. Each property is
    read for whole lists at a time (``map`` over torch's methods, no Python call per tensor): a
    fifth of the detailed checks' time on a model's tensors."""
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, *steps]
    if not (
        set(map(type, tensors)) <= _PLAIN_TYPES
        and all(map(Tensor.is_contiguous, tensors))
        and all(map(_IS_CPU, tensors))
        and not any(map(Tensor.is_neg, tensors))
        and not any(map(Tensor.is_inference, tensors))
    ):
        return False
    shapes = list(map(_SHAPE, params))
    dtypes = list(map(_DTYPE, params))
    if not (
        list(map(_SHAPE, grads)) == shapes
        and list(map(_SHAPE, exp_avgs)) == shapes
        and list(map(_SHAPE, exp_avg_sqs)) == shapes
        and list(map(_DTYPE, grads)) == dtypes
        and list(map(_DTYPE, exp_avgs)) == dtypes
        and list(map(_DTYPE, exp_avg_sqs)) == dtypes
        # Real dtypes: no conjugate bits.
        and set(dtypes) <= _USUAL_DTYPES
        and set(map(_DTYPE, steps)) == {torch.float32}
    ):
        return False
    numels = list(map(Tensor.numel, tensors))
    try:  # a zero tensor's storage has no data pointer to read
        storages = list(map(Tensor.untyped_storage, tensors))
        pointers = list(map(_DATA_PTR, storages))
    except RuntimeError:
        return False
    needed = map(
        operator.mul,
        map(operator.add, map(Tensor.storage_offset, tensors), numels),
        map(Tensor.element_size, tensors),
    )
    return (
        all(n == 1 for n in numels[4 * len(params) :])
        and all(map(operator.ge, map(_NBYTES, storages), needed))
        and all(map(operator.or_, pointers, map(operator.not_, numels)))
    )


_USUAL_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
_NBYTES = torch.UntypedStorage.nbytes
_DATA_PTR = torch.UntypedStorage.data_ptr


def _check_moment(param: Tensor, state, role: str, fail, scale=None) -> None:
    if not isinstance(state, Tensor):
        fail(f"state[{role!r}] is {type(state).__name__}, not a tensor")
    if scale is not None:
        _check_codes(param, state, role, scale, fail)
        return
    real_view = param.is_complex() and not state.is_complex()
    expected = (*param.shape, 2) if real_view else tuple(param.shape)
    if tuple(state.shape) != expected:
        fail(
            f"state[{role!r}] has shape {tuple(state.shape)}, but the parameter has shape "
            f"{tuple(param.shape)}; was the parameter resized (e.g. through .data) after its "
            "state was created? Re-create the optimizer, or drop that parameter's state"
        )
    allowed = (param.dtype, *STATE_DTYPES) if param.is_complex() else STATE_DTYPES
    if state.dtype not in allowed:
        fail(f"state[{role!r}] has dtype {state.dtype}; expected one of {list(allowed)}")
    if state.device != param.device:
        fail(f"state[{role!r}] is on {state.device}, the parameter on {param.device}")
    problem = written_problem(state)
    if problem is not None:
        fail(f"state[{role!r}] {problem}")


def _check_codes(param: Tensor, codes: Tensor, role: str, scale, fail) -> None:
    """8-bit moment codes and their block scales (:mod:`.blockwise8`)."""
    problem = codes_problem(codes, scale, param, role)
    if problem is not None:
        fail(problem)
    for what, t in ((f"state[{role!r}]", codes), (f"state['{role}_scale']", scale)):
        if t.device != param.device:
            fail(f"{what} is on {t.device}, the parameter on {param.device}")
        problem = written_problem(t)
        if problem is not None:
            fail(f"{what} {problem}")


def _check_step(param: Tensor, step, fail) -> None:
    if not isinstance(step, Tensor) or step.numel() != 1 or step.dtype not in _STEP_DTYPES:
        shown = (
            f"a {step.dtype} tensor of shape {tuple(step.shape)}"
            if isinstance(step, Tensor)
            else repr(step)
        )
        fail(f"state['step'] must be a float32 or float64 tensor of one element, got {shown}")
    if step.device.type != "cpu" and step.device != param.device:
        fail(f"state['step'] is on {step.device}; expected the CPU or {param.device}")
    problem = written_problem(step)
    if problem is not None:
        fail(f"state['step'] {problem}")
