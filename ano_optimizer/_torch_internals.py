"""Every use of torch's private API, in one place, each with a fallback on public API.

torch.optim's optimizers share private helpers (the foreach default, the step's dtype, grouping
by device and dtype, the CUDA-graph capture check), and two tensor properties have no public
name (an efficient zero tensor, internal overlap). None of these is a stable API, so each is
reached only through this module: on a torch outside :data:`TESTED_TORCH`, or where a helper is
missing or fails, the fallback runs instead. ``tests/test_torch_internals.py`` forces every
fallback and checks that the steps stay the same. (The fused step's operator and its CPU kernel
use torch's supported extension API only: ``torch.library`` and ``torch.utils.cpp_extension``.)
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterable
from itertools import chain

import torch
from torch import Tensor

__all__ = [
    "TESTED_TORCH",
    "capture_health_check",
    "default_foreach",
    "dtensor_class",
    "foreach_lerp_",
    "functionalizes_mutable_lists",
    "group_by_device_and_dtype",
    "has_internal_overlap",
    "is_zero_tensor",
    "lerp_",
    "local_shard_offset",
    "scalar_dtype",
    "torch_function_subclasses_off",
]

# The torch releases (major, minor) these helpers rely on: the oldest this package supports
# (pyproject.toml) to the newest it was tested with. Outside them the public fallbacks run.
TESTED_TORCH = ((2, 4), (2, 15))


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match[1]), int(match[2])) if match else (0, 0)


# Read once: a traced function cannot call re.
_TORCH = _torch_version()
_KNOWN_TORCH = TESTED_TORCH[0] <= _TORCH <= TESTED_TORCH[1]

try:
    from torch.optim.optimizer import _default_to_fused_or_foreach, _get_scalar_dtype
except ImportError:  # pragma: no cover - depends on the torch release
    _default_to_fused_or_foreach = _get_scalar_dtype = None

# Devices whose foreach kernels are fused (torch's own list, where it cannot be read).
_FOREACH_DEVICES = ("cuda", "xpu", "mtia")
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def functionalizes_mutable_lists() -> bool:
    """Whether torch.compile can trace a custom operator that mutates tensor lists
    (``Tensor(a!)[]``) through functionalization: torch 2.5 and later."""
    return _TORCH >= (2, 5)


def lerp_(tensor: Tensor, end: Tensor, weight) -> Tensor:
    """``tensor.lerp_(end, weight)`` where ``weight`` may be a 0-d tensor of another floating
    dtype (capturable steps compute their scalars in float64 on the device): cast to
    ``tensor``'s dtype first, as torch 2.4 requires and later releases do inside the kernel."""
    if isinstance(weight, Tensor) and weight.dtype != tensor.dtype:
        weight = weight.to(tensor.dtype)
    return tensor.lerp_(end, weight)


def foreach_lerp_(tensors: list[Tensor], ends: list[Tensor], weights: list) -> None:
    """``torch._foreach_lerp_`` with one weight (a number or a 0-d tensor) per tensor
    (torch >= 2.5); a loop of :func:`lerp_` (the same kernel per tensor) before that."""
    if _TORCH >= (2, 5):
        torch._foreach_lerp_(tensors, ends, weights)
        return
    for tensor, end, weight in zip(tensors, ends, weights, strict=True):
        lerp_(tensor, end, weight)


def default_foreach(params: list[Tensor]) -> bool:
    """Whether torch.optim would default to the foreach path for ``params``."""
    if _KNOWN_TORCH and _default_to_fused_or_foreach is not None:
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    if torch.jit.is_scripting():
        return False
    return all(
        p is None or (type(p) in _PLAIN_TYPES and p.device.type in _FOREACH_DEVICES) for p in params
    )


def capture_health_check(optimizer: torch.optim.Optimizer) -> None:
    """torch.optim's check that a step being captured into a CUDA graph is ``capturable``, which
    raises a clear error where it is not; nothing where this torch lacks it."""
    check = getattr(optimizer, "_accelerator_graph_capture_health_check", None)
    # Older torch names it _cuda_graph_capture_health_check (now a deprecated alias).
    check = check or getattr(optimizer, "_cuda_graph_capture_health_check", None)
    if check is not None:
        check()


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives a step count: float64 under a float64 default, else float32."""
    if _KNOWN_TORCH and _get_scalar_dtype is not None:
        return _get_scalar_dtype()
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def group_by_device_and_dtype(lists: list[list[Tensor]]) -> dict:
    """``{(device, dtype): the lists of that group's tensors}``, grouped by the first list's
    tensors, in order, as ``torch.optim.Optimizer._group_tensors_by_device_and_dtype``."""
    if _KNOWN_TORCH:
        grouper = getattr(torch.optim.Optimizer, "_group_tensors_by_device_and_dtype", None)
        if grouper is not None:
            grouped = grouper(lists)  # type: ignore[arg-type]
            return {key: [list(t) for t in tensors] for key, (tensors, _) in grouped.items()}
    grouped = {}
    for i, first in enumerate(lists[0]):
        members = grouped.setdefault((first.device, first.dtype), [[] for _ in lists])
        for member, values in zip(members, lists, strict=True):
            member.append(values[i])
    return grouped


def is_zero_tensor(t: Tensor) -> bool:
    """Whether ``t`` is an efficient zero tensor (``torch._efficientzerotensor``): it has no
    data, only a shape."""
    probe = getattr(t, "_is_zerotensor", None)
    return bool(probe()) if probe is not None else False


def has_internal_overlap(t: Tensor) -> bool:
    """Whether some elements of ``t`` share memory (an ``expand``-ed view), so an in-place
    update would write them twice."""
    if t.is_contiguous():
        return False
    probe = getattr(torch, "_debug_has_internal_overlap", None) if _KNOWN_TORCH else None
    if probe is not None:
        return probe(t) == 1  # 0: no overlap, 1: overlap, 2: too complex to tell
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True))


def dtensor_class() -> type | None:
    """DTensor's class once a DTensor can exist (its module was imported), else None, without
    importing torch.distributed. Its home is torch.distributed.tensor from torch 2.5 on; torch
    2.4 has that module without it, and the class in torch.distributed._tensor."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        found = getattr(sys.modules.get(name), "DTensor", None)
        if found is not None:
            return found
    return None


def local_shard_offset(t: Tensor) -> int:
    """The index, in the whole tensor's row-major order, of the first element of a DTensor's
    local shard (sharded on dimension 0 or replicated); 0 for a plain tensor."""
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(t, dtensor) or t.dim() == 0:
        return 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch 2.4
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0] * (t.numel() // t.shape[0] if t.shape[0] else 0)


def torch_function_subclasses_off(
    tensor_lists: Iterable[Iterable[Tensor]],
) -> contextlib.AbstractContextManager:
    """A context for an update over ``tensor_lists``: where they hold tensor subclasses whose
    ``__torch_function__`` is torch's default (which runs each op and converts its results to
    the subclass) and none with one of its own, with that handling off
    (``torch._C.DisableTorchFunctionSubclass``); else nothing. The ops run the same; only the
    conversion goes, and it fails after an in-place foreach op whose lists also hold a wrapper
    subclass, the tensors already changed. (Under torch.compile, and outside the torch releases
    known here, nothing.)"""
    if torch.compiler.is_compiling() or not _KNOWN_TORCH or _DISABLE_SUBCLASSES is None:
        return contextlib.nullcontext()
    handlers = {
        getattr(kind.__torch_function__, "__func__", kind.__torch_function__)
        for kind in set(map(type, chain.from_iterable(tensor_lists)))
        if kind not in _PLAIN_TYPES and issubclass(kind, Tensor)
    } - {_DISABLED_TORCH_FUNCTION}
    if handlers != {_DEFAULT_TORCH_FUNCTION}:
        return contextlib.nullcontext()
    return _DISABLE_SUBCLASSES()


_DEFAULT_TORCH_FUNCTION = Tensor.__torch_function__.__func__
_DISABLED_TORCH_FUNCTION = getattr(torch._C, "_disabled_torch_function_impl", None)
_DISABLE_SUBCLASSES = getattr(torch._C, "DisableTorchFunctionSubclass", None)
