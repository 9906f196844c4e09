"""The ``fused=True`` step: every tensor of a group updated by one kernel pass that reads
``param``, ``grad``, ``exp_avg`` and ``exp_avg_sq`` once and writes the three updated tensors
once (a step is pure memory traffic).

Which kernel runs a tensor is settled here for a whole step before anything changes:

- :mod:`.cpu`: the common CPU case (float32 parameters and gradients, float32 or bfloat16
  state) in one C++ call per group;
- :mod:`.triton`: the GPU counterpart, one launch per group (not the default);
- :mod:`.inductor`: every other tensor, one ``torch.compile`` kernel call each, or the same
  math eagerly where no compiled kernel can take it (a wrapper subclass, a failed build).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._torch_internals import group_by_device_and_dtype
from ..step_scalars import _amp_tensors, _hyper_tensor, _noise_parameters, _step_scalars
from ..tensor_checks import check_step_tensors
from .batches import _addressable, _real_views
from .cpu import _cpu_group_call, _cpu_scalars, _sorted_batches
from .inductor import _ano_math, _eager_ano_math, _flat, _proven_kernel

__all__ = ["cpu_kernel_takes", "fused_ano"]


def _tensor_index(i: int) -> str:
    return f"tensor {i}"


def cpu_kernel_takes(lists, maximize: bool, logarithmic_schedule: bool) -> bool:
    """Whether the CPU group kernel takes the five role lists (params, grads, exp_avgs,
    exp_avg_sqs, steps) of one group whole, as they are; nothing changes. A step over several
    fused groups asks this of every group before it updates any."""
    if not (lists[0] and lists[0][0].is_cpu):
        return False
    scalars = (0.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0)
    return _cpu_group_call(
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
    if not compiling and params[0].is_cpu:
        # The usual CPU group takes one kernel call and nothing else: the kernel checks the
        # tensors itself, and nothing is grouped or built for the hyper-parameters. Each
        # Python or torch call skipped here matters more than its own time suggests: between
        # steps, forward and backward evict the code and the tensors' objects from the
        # caches, and a cold call costs several times a warm one. (Only on the CPU: the
        # scalars are read on the host, a sync for a GPU group.)
        lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
        scalars = _cpu_scalars(lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
        if _cpu_group_call(exp_avgs[0].dtype, lists, scalars, maximize, logarithmic_schedule):
            return
    if not compiling and not checked:
        grads = check_step_tensors(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, owner=owner, where=where
        )
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    # Every route is settled (and every kernel built) for every device's tensors before the
    # first of them changes.
    plans = [
        _plan(device, tensors, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf,
              maximize, logarithmic_schedule, compiling)
        for (device, _), tensors in grouped.items()
    ]  # fmt: skip
    for plan in plans:
        _run(plan, beta1, beta2, logarithmic_schedule, maximize, found_inf, compiling)


def _plan(device, tensors, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf, maximize,
          log, compiling) -> dict:  # fmt: skip
    """The routes of one device's tensors: the CPU group kernel's batches, and for each
    other tensor its compiled kernel (None: the eager math)."""
    d_params, d_grads, d_avgs, d_avg_sqs, d_steps = tensors  # fresh lists, one per role
    plan = {"device": device, "batches": {}, "tensors": None, "kernels": {}}
    left = list(range(len(d_params)))
    if not compiling and device.type == "cpu":
        plan["scalars"] = _cpu_scalars(lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
        batches, left = _sorted_batches((d_params, d_grads, d_avgs, d_avg_sqs, d_steps))
        for state_dtype, (indices, batch) in batches.items():
            if _cpu_group_call(state_dtype, batch, plan["scalars"], maximize, log, True):
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
        if not _cpu_group_call(batch[2][0].dtype, batch, plan["scalars"], maximize, log):
            raise RuntimeError(
                "the CPU group kernel refused tensors it had accepted a moment before "
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
    for i in range(len(d_params)):
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
