"""The group-at-once CPU kernel: ``cpu_kernel.cpp``, the fused update written once over every
tensor of a group, built by Inductor's C++ toolchain (:func:`.._torch_internals.build_cpu_kernel`).

One call for all of a group's tensors replaces a Python call, Dynamo guard check and OpenMP
start-up per tensor. The kernel checks the tensors itself, reading each tensor's TensorImpl
through c10's header, and changes nothing where one does not fit; the caller then takes the
per-tensor path (:mod:`.inductor`).
"""

from __future__ import annotations

import functools
import warnings
from importlib import resources

import torch

from .._torch_internals import build_cpu_kernel, tensor_objects_lead_with_their_impl
from .batches import _CPU_STATE_TYPES, _group_kernel_takes, _real_views

# Elements per unit of work in the group kernel: 64 KiB of each float32 operand; with 8-bit
# moments 64 KiB of each code operand (a unit's fixed costs weigh more against its shorter time
# per element; measured 1-2 % faster per step than 1 << 14 on both benchmark sets).
_CPU_BLOCK = 1 << 14
_CODES_BLOCK = 1 << 16


_CPU_ARGTYPES = [
    "int64_t",  # id of (params, grads, exp_avgs, exp_avg_sqs, steps), a tuple of lists
    "int64_t",  # id of torch.Tensor
    "int64_t",  # id of torch.nn.Parameter
    "int64_t",  # id of a one-item list: set to whether the kernel took the tensors
    "float",  # lr
    "float",  # 1 - beta1
    "float",  # beta2
    "float",  # eps
    "float",  # weight_decay
    "float",  # 1 / grad_scale
    "int64_t",  # 1: skip the step (GradScaler found inf/nan)
    "int64_t",  # block size
    "int64_t",  # maximize
    "int64_t",  # logarithmic_schedule
    "int64_t",  # 1: check only, change nothing
]


def _cpu_group_call(
    state_dtype,
    lists,
    scalars: tuple,
    maximize,
    log,
    check_only: bool = False,
) -> bool:
    """One call of the group kernel for ``state_dtype`` over the five role lists; False,
    with nothing changed, where the kernel cannot be built or does not take every tensor as it
    is (see ``kernel`` in cpu_kernel.cpp). With ``check_only`` it only reports whether it would
    take them."""
    kernel = _cpu_kernel(state_dtype) if state_dtype in _CPU_STATE_TYPES else None
    return _call(kernel, lists, scalars, maximize, log, check_only)


def cpu_codes_call(lists, scalars: tuple, maximize, log, check_only: bool = False) -> bool:
    """:func:`_cpu_group_call` for 8-bit moments (:mod:`..blockwise8`): ``lists`` holds eight
    role lists, params, grads, exp_avgs, exp_avg_sqs (codes), exp_avg_scales,
    exp_avg_sq_scales, steps, and the noise offsets (Python ints: the index of each tensor's
    first element in its whole tensor)."""
    return _call(_cpu_kernel(torch.uint8), lists, scalars, maximize, log, check_only, _CODES_BLOCK)


def _call(
    kernel, lists, scalars: tuple, maximize, log, check_only: bool, block: int = _CPU_BLOCK
) -> bool:
    if kernel is None:
        return False
    # The kernel reads the tensors from these lists itself and reports in `outcome`.
    roles, outcome = tuple(lists), [False]
    kernel(
        id(roles), _TENSOR_TYPES[0], _TENSOR_TYPES[1], id(outcome), *scalars,
        block, int(maximize), int(log), int(check_only),
    )  # fmt: skip
    return outcome[0]


# The two tensor types whose objects the kernel reads directly, and their addresses.
_KERNEL_TYPES = {torch.Tensor, torch.nn.Parameter}
_TENSOR_TYPES = (id(torch.Tensor), id(torch.nn.Parameter))


def _cpu_scalars(lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf) -> tuple:
    """The group kernel's scalar arguments as Python numbers, each rounded to float32
    by the binding exactly as :func:`_ano_math` rounds its float64 hyper-parameter tensor:
    lr, 1 - β1, β2, ε, weight decay, 1 / grad scale, and 1 for a step to skip (inf/nan)."""
    inv_scale = 1.0 / float(grad_scale) if grad_scale is not None else 1.0
    skip = int(found_inf is not None and bool(found_inf))
    return float(lr), 1.0 - beta1, beta2, eps, weight_decay, inv_scale, skip


def _sorted_batches(lists) -> tuple[dict, list[int]]:
    """Tensor by tensor: the batches the kernel takes, by state dtype, each as (indices, the
    five role lists), and the indices it leaves. Complex tensors go in as real views."""
    batches: dict[torch.dtype, tuple[list[int], tuple[list, ...]]] = {}
    left = []
    for i, tensors in enumerate(zip(*lists, strict=True)):
        param, grad, exp_avg, exp_avg_sq, step = tensors
        if param.dtype == torch.complex64 and grad.dtype == torch.complex64:
            param, grad, exp_avg, exp_avg_sq = _real_views((param, grad, exp_avg, exp_avg_sq))
            tensors = (param, grad, exp_avg, exp_avg_sq, step)
        if (
            step.dtype == torch.float32
            # The kernel reads the objects of these two types only (see cpu_kernel.cpp).
            and {*map(type, tensors)} <= _KERNEL_TYPES
            and _group_kernel_takes(param, grad, exp_avg, exp_avg_sq)
        ):
            indices, roles = batches.setdefault(exp_avg.dtype, ([], ([], [], [], [], [])))
            indices.append(i)
            for role, t in zip(roles, tensors, strict=True):
                role.append(t)
        else:
            left.append(i)
    return batches, left


def cpu_kernel_status() -> tuple[bool, str | None]:
    """Whether the group kernel builds (or loads) here, and why not: for ``ano-optimizer env``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = _cpu_kernel(torch.float32) is not None
    reasons = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if built:
        return True, None
    # A kernel that failed earlier in this process is cached as None and does not warn again.
    return False, reasons[0] if reasons else "it failed to build earlier in this process"


@functools.cache
def _cpu_kernel(state_dtype: torch.dtype):
    """Build (or load from Inductor's on-disk cache) the group kernel for one state
    dtype; None, with a warning, where it cannot be built."""
    try:
        if not tensor_objects_lead_with_their_impl():
            raise RuntimeError("this torch's tensor objects do not hold their TensorImpl first")
        source = (resources.files("ano_optimizer.fused") / "cpu_kernel.cpp").read_text()
        if state_dtype == torch.uint8:
            defines = {"STATE_T": "uint8_t", "ANO_CODES": "1"}
        else:
            defines = {"STATE_T": _CPU_STATE_TYPES[state_dtype]}
        return build_cpu_kernel(source, _CPU_ARGTYPES, **defines)
    except Exception as error:  # any build or load failure: the per-tensor kernel still works
        warnings.warn(
            f"Ano fused=True: the CPU group kernel could not be built ({error!r}); "
            "using the per-tensor torch.compile kernel instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
