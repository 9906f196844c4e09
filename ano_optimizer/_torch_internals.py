"""Every use of torch's private API, in one place, each with a fallback on public API.

torch.optim's optimizers share private helpers (the foreach default, the step's dtype, grouping
by device and dtype, the CUDA-graph capture check); the per-tensor kernel marks lengths dynamic
for Dynamo; the fused CPU kernel is built by Inductor's C++ toolchain and reads tensor
objects directly. None of these is a stable API, so each is reached only through this module:
on a torch outside :data:`TESTED_TORCH`, or where a helper is missing or fails, the fallback
runs instead (for the CPU kernel: it is not built, and ``fused=True`` takes the per-tensor
compiled kernel). ``tests/test_torch_internals.py`` forces every fallback and checks that the
steps stay the same.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "TESTED_TORCH",
    "build_cpu_kernel",
    "capture_health_check",
    "cpu_toolchain",
    "default_foreach",
    "group_by_device_and_dtype",
    "has_internal_overlap",
    "is_zero_tensor",
    "mark_dynamic_length",
    "scalar_dtype",
    "tensor_objects_lead_with_their_impl",
]

# The torch releases (major, minor) these helpers rely on: the oldest this package supports
# (pyproject.toml) to the newest it was tested with. Outside them the public fallbacks run.
TESTED_TORCH = ((2, 4), (2, 14))


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match[1]), int(match[2])) if match else (0, 0)


_KNOWN_TORCH = TESTED_TORCH[0] <= _torch_version() <= TESTED_TORCH[1]

try:
    from torch.optim.optimizer import _default_to_fused_or_foreach, _get_scalar_dtype
except ImportError:  # pragma: no cover - depends on the torch release
    _default_to_fused_or_foreach = _get_scalar_dtype = None

# Devices whose foreach kernels are fused (torch's own list, where it cannot be read).
_FOREACH_DEVICES = ("cuda", "xpu", "mtia")
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


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


def mark_dynamic_length(t: Tensor) -> None:
    """Tell Dynamo that the 1-D ``t``'s length varies, so one compiled graph serves every
    length; without it (a torch without the helper) each new length compiles anew."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_dynamic", None)
    if mark is not None:
        mark(t, 0)


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


def local_shard_offset(t: Tensor) -> int:
    """The index, in the whole tensor's row-major order, of the first element of a DTensor's
    local shard (sharded on dimension 0 or replicated); 0 for a plain tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(t, dtensor.DTensor) or t.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0] * (t.numel() // t.shape[0] if t.shape[0] else 0)


def tensor_objects_lead_with_their_impl() -> bool:
    """Whether a tensor's Python object holds its TensorImpl's address right after the object
    header (torch's THPVariable layout), for both types the CPU kernel reads; the kernel reads
    them there, so it is built only where this holds."""
    if not _KNOWN_TORCH:
        return False
    import ctypes  # only where the kernel is built

    probes = (torch.zeros(1), torch.nn.Parameter(torch.zeros(1)))
    offset = object.__basicsize__
    try:
        return all(ctypes.c_size_t.from_address(id(t) + offset).value == t._cdata for t in probes)
    except AttributeError:  # no _cdata: another object layout
        return False


def cpu_toolchain() -> dict[str, str | None]:
    """The C++ compiler and the cache directory :func:`build_cpu_kernel` uses (None where this
    torch does not say), for ``ano-optimizer env``."""
    found: dict[str, str | None] = {"compiler": None, "cache_dir": None}
    if not _KNOWN_TORCH:
        return found
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        found["compiler"] = str(get_cpp_compiler())
    except Exception:  # a missing compiler is reported by the build itself
        pass
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        found["cache_dir"] = str(cache_dir())
    except Exception:  # the cache directory is only informative
        pass
    return found


def build_cpu_kernel(source: str, argtypes: list[str], **defines: str):
    """Build (or load from Inductor's on-disk cache) the C++ function ``kernel`` in ``source``,
    with ``#define``s prepended, as a Python callable taking tensors for pointer arguments.

    Inductor's C++ toolchain does the work: the compiler, flags, OpenMP runtime and cache that
    ``torch.compile`` uses on CPU. ``benchmarks/fused_step.py`` builds its bandwidth-floor
    kernel the same way, so the floor and the optimizer share one compiler setting. Raises
    ``RuntimeError`` where this torch's loader is not the one it was written for.
    """
    if not _KNOWN_TORCH:
        raise RuntimeError(
            f"torch {torch.__version__} is outside the releases whose C++ loader the CPU "
            f"kernel was built with ({TESTED_TORCH[0]} to {TESTED_TORCH[1]})"
        )
    from torch._inductor import config
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    header = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    torch_lib = str(Path(torch.__file__).parent / "lib")
    # The kernels include only c10's headers, which the precompiled one would not cover.
    with config.patch(cpp_cache_precompile_headers=False):
        return CppPythonBindingsCodeCache.load_pybinding(
            argtypes,
            header + source,
            "cpu",
            needs_vec_isa=False,
            extra_flags=(
                # Inductor vectorises by hand and turns GCC's vectoriser off; these loops rely
                # on it. Without errno, sqrt vectorises; no result changes.
                "-ftree-loop-vectorize",
                "-fno-math-errno",
                # c10's out-of-line functions (error paths, copy-on-write materialization):
                # Inductor links its Python bindings against no torch library.
                f"-L{torch_lib}",
                "-lc10",
                f"-Wl,-rpath,{torch_lib}",
            ),
        )
