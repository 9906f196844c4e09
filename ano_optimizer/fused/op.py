"""The operator ``ano::fused_step_``: the fused Ano/Anolog step of a parameter group, declared
through ``torch.library`` so that torch checks its arguments, ``torch.compile`` traces it
(:func:`torch.library.register_fake`) and every device has an implementation:

- CPU: ``kernel.cpp``, built on first use (:mod:`.native`); it registers itself for the CPU;
- every other device, and the CPU while no kernel is built: :func:`.torch_step.fused_step_`,
  registered as the ``CompositeExplicitAutograd`` kernel.

``torch.ops.ano.fused_step_`` takes float ``lr``; ``torch.ops.ano.fused_step_.tensor_lr`` a
one-element tensor; ``torch.ops.ano.fused_step_.groups`` several parameter groups in one call:
group ``g`` is the next ``group_sizes[g]`` tensors of the lists, with the options at index ``g``
of each option list. ``torch.ops.ano.fused_step_check`` raises what the step would raise about
its tensors and changes nothing (a step over several groups the operator cannot take in one call
checks every group first).

The lists hold one entry per parameter (complex tensors as their real views): parameters,
gradients, both moments and the step counts (incremented by the step). For 8-bit moments
(``torch.uint8`` codes, :mod:`..blockwise8`), ``exp_avg_scales`` and ``exp_avg_sq_scales``
hold each tensor's block scales (an empty tensor where a tensor's moments are floats) and
``noise_offsets`` the index of each tensor's first element in its whole tensor (a shard's);
without codes the three lists are empty.
"""

from __future__ import annotations

import torch

from .torch_step import check_group_sizes, check_lists, fused_step_, fused_step_groups_

__all__ = ["LIBRARY", "fused_step_check"]

_TENSORS = (
    "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] state_steps, Tensor(e!)[] exp_avg_scales, Tensor(f!)[] exp_avg_sq_scales, "
    "int[] noise_offsets"
)
_OPTIONS = (
    "float beta1, float beta2, float eps, float weight_decay, bool logarithmic_schedule, "
    "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None"
)
_GROUP_OPTIONS = (
    "int[] group_sizes, float[] lr, float[] beta1, float[] beta2, float[] eps, "
    "float[] weight_decay, bool[] logarithmic_schedule, bool[] maximize, "
    "Tensor? grad_scale=None, Tensor? found_inf=None"
)
_CHECKED = (
    "Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
    "Tensor[] state_steps, Tensor[] exp_avg_scales, Tensor[] exp_avg_sq_scales, int[] noise_offsets"
)

LIBRARY = torch.library.Library("ano", "DEF")
LIBRARY.define(f"fused_step_({_TENSORS}, *, float lr, {_OPTIONS}) -> ()")
LIBRARY.define(f"fused_step_.tensor_lr({_TENSORS}, *, Tensor lr, {_OPTIONS}) -> ()")
LIBRARY.define(f"fused_step_.groups({_TENSORS}, *, {_GROUP_OPTIONS}) -> ()")
LIBRARY.define(f"fused_step_check({_CHECKED}) -> ()")


def fused_step_check(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
    noise_offsets,
) -> None:  # fmt: skip
    """``ano::fused_step_check`` off the CPU kernel, and the fake implementations' checks: the
    lists' lengths, and that the tensors are all on one device (the dispatcher sends a call
    with a meta tensor among CPU ones to the fake implementation: it must not turn a step into
    nothing). The torch implementation takes any other tensors."""
    check_lists(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets,
    )  # fmt: skip
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales)
    devices = {t.device for tensors in lists for t in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"ano::fused_step_: every tensor must be on one device, got {sorted(map(str, devices))}"
        )


def _check_scalar_devices(params, **scalars) -> None:
    """A meta scalar tensor (lr, grad_scale, found_inf) beside tensors that hold values sends
    the call here, to the meta implementation, which would change nothing: refused."""
    if not params or params[0].is_meta:
        return
    for name, value in scalars.items():
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise ValueError(
                f"ano::fused_step_: {name} is a meta tensor beside tensors on "
                f"{params[0].device}; it must hold a value (on the CPU or their device)"
            )


def _fake_step(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
    noise_offsets, *, lr, beta1, beta2, eps, weight_decay, logarithmic_schedule, maximize,
    grad_scale=None, found_inf=None,
) -> None:  # fmt: skip
    """Under ``torch.compile`` (and on meta tensors): the step returns nothing and writes its
    tensors in place."""
    fused_step_check(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets,
    )  # fmt: skip
    _check_scalar_devices(params, lr=lr, grad_scale=grad_scale, found_inf=found_inf)


def _fake_groups_step(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
    noise_offsets, *, group_sizes, grad_scale=None, found_inf=None, **group_options,
) -> None:  # fmt: skip
    """``fused_step_.groups`` under ``torch.compile`` (and on meta tensors)."""
    fused_step_check(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales,
        noise_offsets,
    )  # fmt: skip
    check_group_sizes(group_sizes, len(params), group_options)
    _check_scalar_devices(params, grad_scale=grad_scale, found_inf=found_inf)


for _name in ("fused_step_", "fused_step_.tensor_lr"):
    LIBRARY.impl(_name, fused_step_, "CompositeExplicitAutograd")
    torch.library.register_fake(f"ano::{_name}", _fake_step, lib=LIBRARY)
LIBRARY.impl("fused_step_.groups", fused_step_groups_, "CompositeExplicitAutograd")
torch.library.register_fake("ano::fused_step_.groups", _fake_groups_step, lib=LIBRARY)
LIBRARY.impl("fused_step_check", fused_step_check, "CompositeExplicitAutograd")
torch.library.register_fake("ano::fused_step_check", fused_step_check, lib=LIBRARY)
