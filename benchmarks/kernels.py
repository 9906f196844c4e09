"""What the benchmarks compare a fused CPU step with.

- :func:`implementation`: run the enclosed ``fused=True`` CPU steps on ``"kernel"`` (the
  operator's C++ kernel, as ``fused=True`` runs them) or ``"torch"`` (the operator's torch
  implementation, as where no C++ compiler is found);
- :class:`CopyFloor`: the bandwidth floor, ``copy_floor.cpp``, built with the kernel's flags.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from ano_optimizer.fused import native

IMPLEMENTATIONS = ("kernel", "torch")


@contextlib.contextmanager
def implementation(choice: str) -> Iterator[None]:
    """Run the enclosed ``fused=True`` CPU steps on ``choice`` (see :data:`IMPLEMENTATIONS`)."""
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {choice!r}; expected one of {IMPLEMENTATIONS}")
    if choice == "kernel":
        if not native.load().loaded:
            raise RuntimeError(f"the C++ kernel is not built here: {native.status().reason}")
        yield
        return
    unbuilt = native.KernelStatus(False, None, "the torch implementation was chosen")
    shipped = native.load, native.status
    native.load = native.status = lambda: unbuilt
    try:
        yield
    finally:
        native.load, native.status = shipped


@functools.cache
def _copy_floor_op():
    """``ano_bench::copy_floor_``, built (once, cached like the kernel) with the kernel's flags."""
    source = (Path(__file__).parent / "copy_floor.cpp").read_text()
    native.load_library("ano_bench_copy_floor", source, "the benchmarks' copy floor")
    return torch.ops.ano_bench.copy_floor_


class CopyFloor:
    """The bandwidth floor as a benchmark row: ``copy_floor.cpp`` over four flat buffers as
    large as the parameter set (three written), stepped like an optimizer. Timed in the same
    rounds as the optimizers, it sees the same memory conditions."""

    def __init__(self, params, state_dtype: torch.dtype = torch.float32):
        self.numel = sum(p.numel() for p in params)
        self.kernel = _copy_floor_op()
        # Non-zero values: an untouched zero buffer can be the kernel's shared zero page, which
        # reads from cache and would make the floor too fast.
        n = self.numel
        self.buffers = (
            torch.full((n,), 1.0),
            torch.full((n,), 1e-3),
            torch.full((n,), 1.0, dtype=state_dtype),
            torch.full((n,), 1.0, dtype=state_dtype),
        )
        # The kernel's units of work (kernel.cpp): 16 K float elements, 64 K with codes.
        self.unit = 1 << 16 if state_dtype == torch.uint8 else 1 << 14

    def step(self):
        self.kernel(*self.buffers, self.unit)
