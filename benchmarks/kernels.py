"""Which kernel a ``fused=True`` CPU step runs, for the benchmarks and tests that compare them.

``fused=True`` takes the C++ kernel (:mod:`ano_optimizer.fused.cpu`) for every CPU group it can,
and the per-tensor compiled kernel (:mod:`ano_optimizer.fused.inductor`) where that kernel is
not built. :func:`cpu_kernel` swaps what the C++ kernel's module builds, so the optimizer's own
dispatch runs each choice:

- ``"group"``: the shipped kernel, as ``fused=True`` runs it;
- ``"per_tensor"``: no C++ kernel, as where it cannot be built: every tensor takes the
  compiled per-tensor kernel that GPUs and the other dtypes use;
- ``"portable"``: the shipped kernel built without its AVX-512 loop;
- ``"copy_floor"``: the shipped kernel with its element loop replaced by one add per value,
  the bandwidth floor of a step over the very same tensors, call and threads.

:class:`AnoOnTriton` steps an optimizer's GPU groups with the hand-written Triton kernel
(:mod:`ano_optimizer.fused.triton`), which ``fused=True`` does not use until it is measured
faster than the per-tensor kernel (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from importlib import resources

import torch

from ano_optimizer import Ano, step_scalars
from ano_optimizer._torch_internals import build_cpu_kernel, tensor_objects_lead_with_their_impl
from ano_optimizer.fused import cpu

CHOICES = ("group", "per_tensor", "portable", "copy_floor")

# The element loop of cpu_kernel.cpp's update_floats, from its template line to its closing
# brace.
_UPDATE_BLOCK = re.compile(
    r"^template <bool kMaximize, bool kScaled, bool kDecayed, typename State>\n"
    r"void update_floats\(\n.*?^\}\n",
    re.MULTILINE | re.DOTALL,
)
_COPY_BLOCK = """template <bool kMaximize, bool kScaled, bool kDecayed, typename State>
void update_floats(
    float* __restrict__ param,
    const float* __restrict__ grad,
    State* __restrict__ exp_avg,
    State* __restrict__ exp_avg_sq,
    int64_t begin,
    int64_t end,
    float, float, float, float, float, float, float, Noise, Noise) {
    for (int64_t i = begin; i < end; ++i) {
        const float g = grad[i];
        param[i] = param[i] + g;
        store(exp_avg, i, load(exp_avg, i) + g, 0u);
        store(exp_avg_sq, i, load(exp_avg_sq, i) + g, 0u);
    }
}
"""


def _shipped_source() -> str:
    return (resources.files("ano_optimizer.fused") / "cpu_kernel.cpp").read_text()


@functools.cache
def _variant(state_dtype: torch.dtype, choice: str):
    if not tensor_objects_lead_with_their_impl():
        return None
    source = _shipped_source()
    if state_dtype == torch.uint8:
        if choice != "portable":
            return None
        defines = {"STATE_T": "uint8_t", "ANO_CODES": "1", "ANO_NO_INTRINSICS": "1"}
        return build_cpu_kernel(source, cpu._CPU_ARGTYPES, **defines)
    if state_dtype not in cpu._CPU_STATE_TYPES:
        return None
    if choice == "copy_floor":
        source, replaced = _UPDATE_BLOCK.subn(lambda _: _COPY_BLOCK, source)
        if replaced != 1:
            raise RuntimeError("cpu_kernel.cpp's update_floats was not found to replace")
    # Both variants run the portable loop alone (the copy floor replaces that loop).
    defines = {"STATE_T": cpu._CPU_STATE_TYPES[state_dtype], "ANO_NO_INTRINSICS": "1"}
    return build_cpu_kernel(source, cpu._CPU_ARGTYPES, **defines)


@contextlib.contextmanager
def cpu_kernel(choice: str) -> Iterator[None]:
    """Run the enclosed ``fused=True`` CPU steps on ``choice`` (see :data:`CHOICES`)."""
    if choice not in CHOICES:
        raise ValueError(f"unknown CPU kernel {choice!r}; expected one of {CHOICES}")
    if choice == "group":
        yield
        return
    shipped = cpu._cpu_kernel
    cpu._cpu_kernel = (
        (lambda state_dtype: None)
        if choice == "per_tensor"
        else functools.partial(_variant, choice=choice)
    )
    try:
        yield
    finally:
        cpu._cpu_kernel = shipped


class AnoOnTriton:
    """``Ano(..., fused=True)`` whose float32 GPU tensors are stepped by the Triton kernel, one
    launch per group and state dtype, and the rest by the per-tensor kernel, as ``fused=True``
    would dispatch them if the Triton kernel were its default. Groups without AMP only."""

    def __init__(self, params, **options):
        self.optimizer = Ano(params, fused=True, **options)

    def step(self) -> None:
        from ano_optimizer.fused.triton import triton_group_step

        optimizer = self.optimizer
        for group in optimizer.param_groups:
            params, grads, avgs, avg_sqs, steps = [], [], [], [], []
            optimizer._init_group(group, params, grads, avgs, avg_sqs, steps)
            if not params:
                continue
            device = params[0].device
            beta1, beta2 = group["betas"]
            hyper = step_scalars._hyper_tensor(
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], device
            )
            skip, inv_scale = step_scalars._amp_tensors(None, None, device)
            torch._foreach_add_(steps, 1.0)
            noise = step_scalars._noise_parameters(steps, avgs, avg_sqs, device)
            weights, corrections = step_scalars._step_scalars(
                steps, beta1, beta2, group["logarithmic_schedule"], torch.float32, device
            )
            left = triton_group_step(
                params, grads, avgs, avg_sqs, weights, corrections, hyper, skip, inv_scale,
                noise, group["maximize"],
            )  # fmt: skip
            if left:
                raise RuntimeError(f"the Triton kernel left tensors {left} (not float32?)")
