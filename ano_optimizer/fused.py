"""The fused Ano/Anolog step: one ``torch.compile``-generated elementwise kernel per tensor.

A step is pure memory traffic, so the fast form reads ``param``, ``grad``, ``exp_avg`` and
``exp_avg_sq`` once and writes the three updated tensors once. Inductor generates that kernel
(C++/OpenMP on CPU, Triton on GPU) from :func:`_ano_math`.

Compile cost is what makes or breaks this on a real model: compiling a step over a whole
model's list of tensors produces a graph per model and took ~70 s for ResNet-50 here. Instead
ONE kernel is compiled over a flat 1-D tensor whose length is symbolic, and Python loops over
the tensors, so a model of 10 or 10,000 tensors compiles the same single kernel in a few
seconds, and Inductor's on-disk cache makes later processes faster still. Every value that
changes during training (learning rate, step, bias correction, the ``GradScaler`` scale and
inf flag) enters as a tensor, so nothing recompiles when it changes; only the Python booleans
``logarithmic_schedule``, ``maximize`` and the storage dtypes select another kernel.

On CPU, the common case (float32 parameters and gradients, float32 or bfloat16 state) goes
further: ``fused_cpu.cpp`` holds the same arithmetic written once over all tensors of a group,
and Inductor's C++ toolchain builds it (the compiler, flags, OpenMP runtime and on-disk cache
that ``torch.compile`` uses on CPU). A call per tensor costs ~45 us of Python, Dynamo guards and
OpenMP start-up, which was a third of the step on ResNet-50's 161 tensors; one call for all of
them costs ~0.1 ms, and the build takes ~3 s instead of a graph compile. The kernel checks the
tensors itself, reading each tensor's TensorImpl through c10's header, and changes nothing where
one does not fit. Every other case (GPU, other dtypes, tensors with gaps between their elements
or laid out unlike their parameter, a failed build) takes the per-tensor compiled kernel, and a
tensor with no storage of its own (a wrapper subclass) the same math eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from . import rounding
from .tensor_checks import check_step_tensors

__all__ = ["cpu_kernel_takes", "fused_ano", "unscale_or_skip"]


def unscale_or_skip(grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None):
    """For a group that is not fused under ``torch.amp.GradScaler``: return True when the step
    must be skipped (inf/nan found), else divide the gradients by the scale, in place."""
    if found_inf is not None and bool(found_inf.item()):
        return True
    if grad_scale is not None:
        torch._foreach_mul_(grads, torch.reciprocal(grad_scale.double()).item())
    return False


def _ano_math(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    momentum_weight: Tensor,
    bias_correction2_sqrt: Tensor,
    hyper: Tensor,
    found_inf: Tensor,
    inv_scale: Tensor,
    noise: Tensor,
    *,
    maximize: bool,
    start: int = 0,
) -> None:
    """The Ano update on equal-shaped tensors, in place; math in float32 (float64 for float64).

    ``momentum_weight`` (``1 - β1_k``) and ``bias_correction2_sqrt`` (``sqrt(1 - β2^k)``) are
    this tensor's 0-d values for this step, computed for all tensors at once by
    :func:`_step_scalars`: computed in here, Inductor would re-evaluate the scalar ``pow`` in
    every iteration of the vector loop, which made the kernel 2-3x slower than memory.
    ``found_inf`` (0 or 1) and ``inv_scale`` come from ``torch.amp.GradScaler``: a step with
    ``found_inf = 1`` leaves every tensor as it was. ``noise`` holds the tensor's rounding noise
    parameters ``(A, B)`` for ``exp_avg``, then for ``exp_avg_sq``, this step
    (:mod:`ano_optimizer.rounding`), and ``start`` the index of the first element given, where a
    tensor is stepped in blocks.
    """
    compute = torch.float64 if param.dtype == torch.float64 else torch.float32
    hyper = hyper.to(compute)
    lr, _, beta2, eps, weight_decay = hyper.unbind(0)
    momentum_weight = momentum_weight.to(compute)
    bias_correction2_sqrt = bias_correction2_sqrt.to(compute)

    g = grad.to(compute) * inv_scale.to(compute)
    if maximize:
        g = -g
    m = exp_avg.to(compute)
    v = exp_avg_sq.to(compute)
    p = param.to(compute)

    g2 = g * g
    v_new = v + (1.0 - beta2) * (torch.sign(g2 - v) * g2 - v)
    m_new = m + momentum_weight * (g - m)
    # |g| / (sqrt(v̂) + ε) with v̂ = v / c²: written as c·|g| / (sqrt(v) + ε·c), as the eager path.
    ratio = torch.abs(g) / (torch.sqrt(v_new) + eps * bias_correction2_sqrt)
    p_new = p * (1.0 - lr * weight_decay) - (lr * bias_correction2_sqrt) * ratio * torch.sign(m_new)

    skip = found_inf.to(compute) > 0
    param.copy_(torch.where(skip, p, p_new))
    exp_avg.copy_(_store(torch.where(skip, m, m_new), exp_avg.dtype, noise[:2], start))
    exp_avg_sq.copy_(_store(torch.where(skip, v, v_new), exp_avg_sq.dtype, noise[2:], start))


def _store(x: Tensor, dtype: torch.dtype, parameters: Tensor, start: int) -> Tensor:
    if dtype == torch.bfloat16 and x.dtype == torch.float32:
        return rounding.round_with_noise(x, rounding.hashed_noise(x, parameters, start))
    return x.to(dtype)


@functools.cache
def _kernel(
    maximize: bool,
    device_type: str,
    dtypes: tuple[torch.dtype, ...],
    single_element: bool,
):
    """The compiled kernel for one combination of the Python booleans, device type, storage
    dtypes and "1 element or more", holding exactly one graph.

    Dynamo keeps its graphs per code object and gives up after ``recompile_limit`` (8) of them;
    each combination gets a code object of its own, so variants never count against each
    other and a mixed-precision model cannot exhaust the limit.
    """

    def kernel(
        param, grad, exp_avg, exp_avg_sq, weight, correction, hyper, found_inf, scale, noise
    ):
        _ano_math(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            weight,
            correction,
            hyper,
            found_inf,
            scale,
            noise,
            maximize=maximize,
        )

    name = "_".join(
        [
            "ano_fused",
            *(["maximize"] if maximize else []),
            device_type,
            *(str(d).removeprefix("torch.") for d in dtypes),
            *(["numel1"] if single_element else []),
        ]
    )
    code = kernel.__code__.replace(co_name=name)
    unique = types.FunctionType(code, kernel.__globals__, name, None, kernel.__closure__)
    unique.__qualname__ = name
    return torch.compile(unique, fullgraph=True)


_KernelKey = tuple[bool, str, tuple[torch.dtype, ...], bool]


@functools.cache
def _proven_kernel(key: _KernelKey, device: torch.device) -> Callable | None:
    """The compiled kernel for ``key``, first run on tiny tensors of its dtypes on ``device``:
    compiling happens on that first call, so a failure (no C++ compiler, an Inductor error)
    surfaces here, before a step has changed anything. None, with one warning, where it fails;
    the tensors of that kind then run the same math eagerly."""
    _, _, dtypes, single_element = key
    n = 1 if single_element else 2
    try:
        tensors = [_flat(torch.zeros(n, dtype=d, device=device), n > 1) for d in dtypes]
        # Distinct tensors, as a step passes: Dynamo would guard on arguments that alias.
        weight, correction, skip, inv_scale = (
            torch.full((), v, device=device) for v in (0.0, 1.0, 0.0, 1.0)
        )
        hyper = torch.zeros(5, dtype=torch.float64, device=device)
        noise = torch.zeros(4, dtype=torch.int64, device=device)
        kernel = _kernel(*key)
        kernel(*tensors, weight, correction, hyper, skip, inv_scale, noise)
        return kernel
    except Exception as error:  # any compile or run failure: the eager math still works
        if (device, dtypes) in _WARNED:
            return None
        _WARNED.add((device, dtypes))
        warnings.warn(
            f"Ano fused=True: torch.compile could not build the fused kernel for "
            f"{[str(d).removeprefix('torch.') for d in dtypes]} tensors on {device} "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0][:300]}); those "
            "tensors are stepped with the same math run eagerly (slower)",
            RuntimeWarning,
            stacklevel=6,
        )
        return None


# (device, dtypes) whose kernel failed to build: one warning for both of its variants.
_WARNED: set = set()


def _flat(t: Tensor, mark_dynamic: bool) -> Tensor:
    """A 1-D alias of contiguous ``t`` that is not a view: Dynamo guards on a view's base
    shape, which would recompile the kernel for every new base shape."""
    flat = t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
    if mark_dynamic and t.numel() > 1:
        # A symbolic length: one graph serves every tensor. Dynamo specialises lengths 0 and 1
        # anyway, so 1-element tensors (rare) share a second, static graph.
        torch._dynamo.mark_dynamic(flat, 0)
    return flat


def _addressable(tensors) -> bool:
    """Whether a flat alias of each tensor's storage can be handed to a compiled kernel: plain
    tensors (and subclasses that leave ``__torch_dispatch__`` alone, such as ``nn.Parameter``)
    with data of their own. Wrapper subclasses (torchao's float8 weights, DTensor pieces
    under FSDP2), zero tensors and meta tensors have none: they run the eager math."""
    return all(
        type(t).__torch_dispatch__ is _PLAIN_DISPATCH
        and not t._is_zerotensor()
        and t.device.type != "meta"
        for t in tensors
    )


_PLAIN_DISPATCH = Tensor.__torch_dispatch__
# Elements per block where a tensor runs the eager math: its float32 temporaries stay small.
_EAGER_BLOCK = 1 << 16


def _eager_ano_math(args, weight, correction, hyper, skip, inv_scale, noise, maximize) -> None:
    """:func:`_ano_math` run eagerly, in blocks where the tensors allow it."""
    if not (_addressable(args) and all(t.is_contiguous() for t in args)):
        _ano_math(*args, weight, correction, hyper, skip, inv_scale, noise, maximize=maximize)
        return
    blocks = zip(*(t.view(-1).split(_EAGER_BLOCK) for t in args), strict=True)
    for index, block in enumerate(blocks):
        _ano_math(
            *block, weight, correction, hyper, skip, inv_scale, noise,
            maximize=maximize, start=index * _EAGER_BLOCK,
        )  # fmt: skip


def _tensor_index(i: int) -> str:
    return f"tensor {i}"


def cpu_kernel_takes(lists, maximize: bool, logarithmic_schedule: bool) -> bool:
    """Whether the multi-tensor CPU kernel takes the five role lists (params, grads, exp_avgs,
    exp_avg_sqs, steps) of one group whole, as they are; nothing changes. A step over several
    fused groups asks this of every group before it updates any."""
    if not (lists[0] and lists[0][0].is_cpu and _CPU_KERNEL in _CPU_MULTI_TENSOR):
        return False
    scalars = (0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0)
    return _cpu_multi_tensor_call(
        lists[2][0].dtype, lists, scalars, maximize, logarithmic_schedule, check_only=True
    )


def fused_ano(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
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
    checked: bool = False,
    owner: str = "ano",
    where: Callable[[int], str] = _tensor_index,
) -> None:
    """Run the fused update over lists of tensors, in place (the ``fused=True`` path of
    :func:`ano_optimizer.ano`). ``state_steps`` are incremented here, except on a step that
    ``found_inf`` marks as skipped.

    Every tensor is checked before any changes (:mod:`ano_optimizer.tensor_checks`; ``checked``
    says the caller has done so); a tensor that no kernel can take as it is runs the same
    math eagerly."""
    if not params:
        return
    compiling = torch.compiler.is_compiling()
    if not compiling and params[0].is_cpu and _CPU_KERNEL in _CPU_MULTI_TENSOR:
        # The usual CPU group takes one kernel call and nothing else: the kernel checks the
        # tensors itself, and nothing is grouped or built for the hyper-parameters. Each
        # Python or torch call skipped here matters more than its own time suggests: between
        # steps, forward and backward evict the code and the tensors' objects from the
        # caches, and a cold call costs several times a warm one. (Only on the CPU: the
        # scalars are read on the host, a sync for a GPU group.)
        lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
        scalars = _cpu_scalars(lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
        if _cpu_multi_tensor_call(
            exp_avgs[0].dtype, lists, scalars, maximize, logarithmic_schedule
        ):
            return
    if not compiling and not checked:
        grads = check_step_tensors(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, owner=owner, where=where
        )
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps]  # type: ignore[list-item]
    )
    # Every route is settled (and every kernel built) for every device's tensors before the
    # first of them changes.
    plans = [
        _plan(device, tensors, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf,
              maximize, logarithmic_schedule, compiling)
        for (device, _), (tensors, _) in grouped.items()
    ]  # fmt: skip
    for plan in plans:
        _run(plan, beta1, beta2, logarithmic_schedule, maximize, found_inf, compiling)


def _plan(device, tensors, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf, maximize,
          log, compiling) -> dict:  # fmt: skip
    """The routes of one device's tensors: the multi-tensor CPU kernel's batches, and for each
    other tensor its compiled kernel (None: the eager math)."""
    d_params, d_grads, d_avgs, d_avg_sqs, d_steps = (list(t) for t in tensors)
    plan = {"device": device, "batches": {}, "tensors": None, "kernels": {}}
    left = list(range(len(d_params)))
    if not compiling and device.type == "cpu" and _CPU_KERNEL in _CPU_MULTI_TENSOR:
        plan["scalars"] = _cpu_scalars(lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
        batches, left = _sorted_batches((d_params, d_grads, d_avgs, d_avg_sqs, d_steps))
        for state_dtype, (indices, batch) in batches.items():
            if _cpu_multi_tensor_call(state_dtype, batch, plan["scalars"], maximize, log, True):
                plan["batches"][state_dtype] = batch
            else:
                left += indices
        left.sort()
    plan["tensors"] = [
        [t[i] for i in left] for t in (d_params, d_grads, d_avgs, d_avg_sqs, d_steps)
    ]
    if plan["tensors"][0]:
        plan["hyper"] = _hyper_tensor(lr, beta1, beta2, eps, weight_decay, device)
        plan["amp"] = _amp_tensors(grad_scale, found_inf, device)
    if not compiling:
        for i, args in enumerate(zip(*plan["tensors"][:4], strict=True)):
            args = _real_views(args)
            if args[0].numel() and _addressable(args):
                key = (maximize, device.type, tuple(t.dtype for t in args), args[0].numel() == 1)
                plan["kernels"][i] = _proven_kernel(key, device)
    return plan


def _run(plan, beta1, beta2, log, maximize, found_inf, compiling) -> None:
    device = plan["device"]
    for batch in plan["batches"].values():
        if not _cpu_multi_tensor_call(batch[2][0].dtype, batch, plan["scalars"], maximize, log):
            raise RuntimeError(
                "the multi-tensor CPU kernel refused tensors it had accepted a moment before "
                "(did another thread change them during the step?)"
            )
    d_params, d_grads, d_avgs, d_avg_sqs, d_steps = plan["tensors"]
    if not d_params:
        return
    hyper, (skip, inv_scale) = plan["hyper"], plan["amp"]
    # One increment for the whole list; a skipped step (found_inf = 1) adds 0.
    increment = 1.0 - skip.to(d_steps[0].device) if found_inf is not None else 1.0
    torch._foreach_add_(d_steps, increment)
    wide = d_params[0].dtype in (torch.float64, torch.complex128)
    weights, corrections = _step_scalars(
        d_steps, beta1, beta2, log, torch.float64 if wide else torch.float32, device
    )
    noise = _noise_parameters(d_steps, d_avgs, d_avg_sqs, device)
    per_tensor = range(len(d_params))
    if (
        not compiling
        and device.type == "cuda"
        and _GPU_KERNEL == "triton_multi_tensor"
        # Its table of addresses is copied from the host each step: not capturable.
        and not torch.cuda.is_current_stream_capturing()
    ):
        from .fused_triton import triton_multi_tensor

        per_tensor = triton_multi_tensor(
            d_params, d_grads, d_avgs, d_avg_sqs, weights, corrections,
            hyper, skip, inv_scale, noise, maximize,
        )  # fmt: skip
    for i in per_tensor:
        args = _real_views((d_params[i], d_grads[i], d_avgs[i], d_avg_sqs[i]))
        scalars = (weights[i], corrections[i], hyper, skip, inv_scale, noise[i])
        if compiling:
            # Inside the user's own torch.compile the update is traced and fused with it.
            _ano_math(*args, *scalars, maximize=maximize)
            continue
        if args[0].numel() == 0:
            continue
        kernel = plan["kernels"].get(i)
        if kernel is None:
            _eager_ano_math(args, *scalars, maximize)
            continue
        param, _, exp_avg, exp_avg_sq = args
        contiguous = all(t.is_contiguous() for t in args)
        # Only the first call of a kernel needs its length marked symbolic (the proving call
        # did); later calls match the symbolic graph's guards anyway.
        flat = [_flat(t if contiguous else t.contiguous(), False) for t in args]
        kernel(*flat, *scalars)
        if not contiguous:
            for target, result in zip(
                (param, exp_avg, exp_avg_sq), flat[:1] + flat[2:], strict=True
            ):
                target.copy_(result.view_as(target))


def _real_views(tensors):
    """Complex tensors as their real views (a real state tensor of a complex parameter is kept
    as that view already)."""
    return tuple(torch.view_as_real(t) if t.is_complex() else t for t in tensors)


# Which CPU kernel runs the common case: "multi_tensor" (fused_cpu.cpp, one call per group) or
# "per_tensor" (the torch.compile kernel above, one call per tensor). Tests run both.
# "copy_floor" is fused_cpu.cpp built with COPY_FLOOR, for benchmarks/fused_step.py: the same
# call over the same tensors with one add per value instead of the update.
_CPU_KERNEL = "multi_tensor"
_CPU_MULTI_TENSOR = ("multi_tensor", "copy_floor")
# Which GPU kernel runs float32 tensors: "per_tensor" (the torch.compile kernel above) or
# "triton_multi_tensor" (fused_triton.py, one launch per group). The second is unmeasured on a
# GPU so far, hence not the default; benchmarks/gpu_check.py times both.
_GPU_KERNEL = "per_tensor"
# Elements per unit of work in the multi-tensor kernel: 64 KiB of each float32 operand.
_CPU_BLOCK = 1 << 14
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
_CPU_STATE_TYPES = {torch.float32: "float", torch.bfloat16: "uint16_t"}


def _cpu_multi_tensor_call(
    state_dtype, lists, scalars: tuple, maximize, log, check_only: bool = False
) -> bool:
    """One call of the multi-tensor kernel for ``state_dtype`` over the five role lists; False,
    with nothing changed, where the kernel cannot be built or does not take every tensor as it
    is (see ``kernel`` in fused_cpu.cpp). With ``check_only`` it only reports whether it would
    take them."""
    kernel = _selected_cpu_kernel(state_dtype) if state_dtype in _CPU_STATE_TYPES else None
    if kernel is None:
        return False
    # The kernel reads the tensors from these lists itself and reports in `outcome`.
    roles, outcome = tuple(lists), [False]
    kernel(
        id(roles), _TENSOR_TYPES[0], _TENSOR_TYPES[1], id(outcome), *scalars,
        _CPU_BLOCK, int(maximize), int(log), int(check_only),
    )  # fmt: skip
    return outcome[0]


# The two tensor types whose objects the kernel reads directly, and their addresses.
_KERNEL_TYPES = {torch.Tensor, torch.nn.Parameter}
_TENSOR_TYPES = (id(torch.Tensor), id(torch.nn.Parameter))


def _selected_cpu_kernel(state_dtype: torch.dtype):
    return _cpu_kernel(state_dtype, copy_floor=_CPU_KERNEL == "copy_floor")


def _cpu_scalars(lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf) -> tuple:
    """The multi-tensor kernel's scalar arguments as Python numbers, each rounded to float32
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
            # The kernel reads the objects of these two types only (see fused_cpu.cpp).
            and {*map(type, tensors)} <= _KERNEL_TYPES
            and _multi_tensor_takes(param, grad, exp_avg, exp_avg_sq)
        ):
            indices, roles = batches.setdefault(exp_avg.dtype, ([], ([], [], [], [], [])))
            indices.append(i)
            for role, t in zip(roles, tensors, strict=True):
                role.append(t)
        else:
            left.append(i)
    return batches, left


def _multi_tensor_takes(param, grad, exp_avg, exp_avg_sq) -> bool:
    """Whether a multi-tensor kernel (this file's CPU kernel, fused_triton's GPU one) updates
    these tensors: float32 parameter and gradient, both moments float32 or both bfloat16, all
    contiguous, each with storage of its own."""
    return (
        param.dtype == grad.dtype == torch.float32
        and exp_avg.dtype == exp_avg_sq.dtype
        and exp_avg.dtype in _CPU_STATE_TYPES
        and all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))
        and _addressable((param, grad, exp_avg, exp_avg_sq))
    )


@functools.lru_cache(maxsize=64)
def _block_table(
    numels: tuple[int, ...], block: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The work list of a multi-tensor kernel (this file's CPU kernel, fused_triton's GPU one)
    for these tensor sizes: the sizes, and for each block of ``block`` elements its tensor and
    its first element. Cached: the sizes rarely change from step to step."""
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = (sizes + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    block_begin = (torch.arange(int(counts.sum())) - first_block[block_tensor]) * block
    return sizes.to(device), block_tensor.to(device), block_begin.to(device)


@contextlib.contextmanager
def _kernels(cpu: str | None = None, gpu: str | None = None):
    """Run the enclosed steps on the given CPU kernel (``_CPU_KERNEL``) and/or GPU kernel
    (``_GPU_KERNEL``), then restore the previous choice. For tests and benchmarks that compare
    the kernels."""
    global _CPU_KERNEL, _GPU_KERNEL
    previous = _CPU_KERNEL, _GPU_KERNEL
    _CPU_KERNEL, _GPU_KERNEL = cpu or _CPU_KERNEL, gpu or _GPU_KERNEL
    try:
        yield
    finally:
        _CPU_KERNEL, _GPU_KERNEL = previous


def _build_cpu_kernel(source: str, argtypes: list[str], **defines: str):
    """Build (or load from Inductor's on-disk cache) the C++ function ``kernel`` in ``source``,
    with ``#define``s prepended, as a Python callable taking tensors for pointer arguments.

    Inductor's C++ toolchain does the work: the compiler, flags, OpenMP runtime and cache that
    ``torch.compile`` uses on CPU. ``benchmarks/fused_step.py`` builds its bandwidth-floor
    kernel the same way, so the floor and the optimizer share one compiler setting.
    """
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


@functools.cache
def _cpu_kernel(state_dtype: torch.dtype, copy_floor: bool = False, intrinsics: bool = True):
    """Build (or load from Inductor's on-disk cache) the multi-tensor kernel for one state dtype
    (with ``copy_floor``, its bandwidth-floor build; without ``intrinsics``, its portable loop
    alone, for tests); None, with a warning, where it cannot be built."""
    try:
        if not _tensor_objects_lead_with_their_impl():
            raise RuntimeError("this torch's tensor objects do not hold their TensorImpl first")
        source = (resources.files("ano_optimizer") / "fused_cpu.cpp").read_text()
        defines = {"STATE_T": _CPU_STATE_TYPES[state_dtype]}
        if copy_floor:
            defines["COPY_FLOOR"] = "1"
        if not intrinsics:
            defines["ANO_NO_INTRINSICS"] = "1"
        return _build_cpu_kernel(source, _CPU_ARGTYPES, **defines)
    except Exception as error:  # any build or load failure: the per-tensor kernel still works
        warnings.warn(
            f"Ano fused=True: the multi-tensor CPU kernel could not be built ({error!r}); "
            "using the per-tensor torch.compile kernel instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _tensor_objects_lead_with_their_impl() -> bool:
    """Whether a tensor's Python object holds its TensorImpl's address right after the object
    header, as the kernel reads it (torch's THPVariable layout), for both types it reads."""
    import ctypes  # only where the kernel is built

    probes = (torch.zeros(1), torch.nn.Parameter(torch.zeros(1)))
    offset = object.__basicsize__
    return all(ctypes.c_size_t.from_address(id(t) + offset).value == t._cdata for t in probes)


def _step_scalars(steps, beta1, beta2, logarithmic_schedule, dtype, device):
    """Per tensor: ``1 - β1_k`` and ``sqrt(1 - β2^k)`` as 0-d tensors, with a handful of
    ``torch._foreach_*`` calls for the whole list (no per-tensor Python, no host sync)."""
    steps = (
        [s.to(device=device, dtype=torch.float64) for s in steps]
        if (dtype == torch.float64 or steps[0].device != device)
        else steps
    )
    corrections = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(corrections)
    torch._foreach_add_(corrections, 1.0)
    torch._foreach_sqrt_(corrections)
    if logarithmic_schedule:
        weights = torch._foreach_add(steps, 2.0)
        torch._foreach_log_(weights)
        torch._foreach_reciprocal_(weights)
    else:
        weights = [torch.full((), 1.0 - beta1, dtype=steps[0].dtype, device=device)] * len(steps)
    return weights, corrections


def _hyper_tensor(lr, beta1, beta2, eps, weight_decay, device) -> Tensor:
    if isinstance(lr, Tensor) and not torch.compiler.is_compiling():
        lr = lr.to(device=device, dtype=torch.float64)
        return torch.cat(
            [lr.reshape(1), _float64_vector((beta1, beta2, eps, weight_decay), device)]
        )
    return _float64_vector((lr, beta1, beta2, eps, weight_decay), device)


def _float64_vector(values: tuple, device: torch.device) -> Tensor:
    """``values`` as a float64 tensor on ``device``. Off the CPU it is filled by kernels that
    carry the values as arguments: a host-to-device copy cannot be captured in a CUDA graph."""
    if torch.compiler.is_compiling() or device.type == "cpu":
        return torch.tensor(values, dtype=torch.float64, device=device)
    vector = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, value in enumerate(values):
        vector[i].fill_(value)
    return vector


def _noise_parameters(steps, exp_avgs, exp_avg_sqs, device) -> list[Tensor]:
    """Per tensor: its two moments' rounding noise parameters for this step (``A``, ``B`` for
    exp_avg, then for exp_avg_sq) as a 4-element int64 tensor on ``device``, from the (already
    incremented) step counts with a handful of kernels for the whole list and no host read.
    Zeros where no state is bfloat16 (no rounding)."""
    if torch.bfloat16 not in {t.dtype for t in (*exp_avgs, *exp_avg_sqs)}:
        return [_no_noise(device)] * len(steps)
    counts = torch.stack([s.reshape(()).to(device) for s in steps])
    table = torch.cat(
        [
            rounding.noise_parameter_tensor(counts, rounding.EXP_AVG_STREAM),
            rounding.noise_parameter_tensor(counts, rounding.EXP_AVG_SQ_STREAM),
        ],
        dim=1,
    )
    return list(table.unbind(0))


def _no_noise(device: torch.device) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.zeros(4, device=device, dtype=torch.int64)
    return _cached_no_noise(device)


@functools.cache
def _cached_no_noise(device: torch.device) -> Tensor:
    return torch.zeros(4, device=device, dtype=torch.int64)


@functools.cache
def _no_amp(device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.zeros((), device=device), torch.ones((), device=device)


def _amp_tensors(grad_scale, found_inf, device) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():
        # Traced constants; the cached pair would be traced through anyway.
        no_skip, one = torch.zeros((), device=device), torch.ones((), device=device)
    else:
        no_skip, one = _no_amp(device)
    skip = found_inf.to(device=device, dtype=torch.float32) if found_inf is not None else no_skip
    inv_scale = (
        torch.reciprocal(grad_scale.to(device=device, dtype=torch.float64)).float()
        if grad_scale is not None
        else one
    )
    return skip, inv_scale
