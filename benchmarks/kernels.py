"""What the benchmarks compare a fused CPU step with.

- :func:`implementation`: run the enclosed ``fused=True`` CPU steps on ``"kernel"`` (the
  operator's C++ kernel, as ``fused=True`` runs them) or ``"torch"`` (the operator's torch
  implementation, as where no C++ compiler is found);
- :class:`CopyFloor`: the bandwidth floor, ``copy_floor.cpp``, built with the kernel's flags;
- :class:`ArithmeticFloor`: the arithmetic floor, the kernel's own work over as many elements
  with every operand in cache.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from ano_optimizer import Ano
from ano_optimizer.fused import FusedLists, native

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


class ArithmeticFloor:
    """The arithmetic floor as a benchmark row: one call of the operator's C++ kernel over as
    many elements as the parameter set (to within one chunk per thread), every operand in
    cache: one small parameter per thread (:data:`CHUNK` elements; 512 KB of float32 operands,
    which a core's L2 holds) listed again and again, so that the kernel's equal shares give
    each thread its own. What the step costs with memory out of the picture; a step cannot be
    faster than this or than its bandwidth floor."""

    CHUNK = 1 << 15
    _SHAPE = (16, 2048)  # rows long enough for 8-bit codes, one unit of work each

    def __init__(
        self, params, state_dtype: torch.dtype = torch.float32, threads: int | None = None
    ):
        threads = threads or torch.get_num_threads()
        self.numel = sum(p.numel() for p in params)
        chunks = torch.nn.ParameterList(torch.randn(self._SHAPE) for _ in range(threads))
        options = {} if state_dtype == torch.float32 else {"state_dtype": state_dtype}
        optimizer = Ano(chunks, lr=1e-4, fused=True, **options)
        for chunk in chunks:
            chunk.grad = torch.randn_like(chunk)
        optimizer.step()  # makes the state
        self.repeats = max(1, round(self.numel / (threads * self.CHUNK)))
        params = [chunk for chunk in chunks for _ in range(self.repeats)]
        states = [optimizer.state[p] for p in params]
        scales = None
        if "exp_avg_scale" in states[0]:
            scales = [(s["exp_avg_scale"], s["exp_avg_sq_scale"], 0) for s in states]
        lists = FusedLists(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states], scales,
        )  # fmt: skip
        self.arguments = lists.arguments()
        self.options = {
            name: optimizer.defaults[name]
            for name in ("lr", "eps", "weight_decay", "logarithmic_schedule", "maximize")
        }
        self.options["beta1"], self.options["beta2"] = optimizer.defaults["betas"]
        self.chunks, self.optimizer = chunks, optimizer  # what the lists hold

    @torch.no_grad()
    def step(self):
        torch.ops.ano.fused_step_(*self.arguments, **self.options)
