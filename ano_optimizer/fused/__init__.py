"""The ``fused=True`` step: every tensor of a group updated by one call of the operator
``ano::fused_step_`` (:mod:`.op`), which reads each parameter, gradient and both moments once and
writes the three updated tensors once.

- :mod:`.op`: the operator, declared through ``torch.library``;
- :mod:`.native`: its CPU kernel (``kernel.cpp``), built with ``torch.utils.cpp_extension`` on
  first use;
- :mod:`.torch_step`: its implementation in torch operations, which every other device runs
  (and the CPU where no kernel can be built);
- :func:`kernel_takes`: which tensors the CPU kernel takes.

On the CPU a group is handed to the kernel whole (an optimizer's several groups together, by
one call of ``ano::fused_step_.groups``: :func:`kernel_step_groups`); the kernel checks every
tensor before it changes anything. Where it refuses one, the tensors are checked in Python
(:mod:`..tensor_checks`: a clear error for an invalid one), the ones it takes go to it and the
others to the torch implementation, with one warning that says how many and why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from itertools import chain, repeat

import torch
from torch import Tensor

from .._torch_internals import functionalizes_mutable_lists
from ..tensor_checks import check_step_tensors
from . import native, op
from .torch_step import GROUP_OPTIONS, checked_scales, fused_step_checked_, is_dense

__all__ = [
    "FusedLists",
    "fused_ano",
    "kernel_step",
    "kernel_step_groups",
    "kernel_takes",
    "kernels_accept",
    "real_views",
]

# Tensor types whose memory the kernel may address (their dispatch is torch's own).
_PLAIN_DISPATCH = Tensor.__torch_dispatch__
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def real_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Complex tensors as their real views (a real state tensor of a complex parameter is kept
    as that view already)."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


class FusedLists:
    """A group's tensors as the operator takes them: the five role lists (complex tensors as
    real views) and, for 8-bit moments, each tensor's scales (an empty tensor where its
    moments are floats) and noise offset; the scale lists are empty without codes."""

    __slots__ = (
        "exp_avg_scales",
        "exp_avg_sq_scales",
        "exp_avg_sqs",
        "exp_avgs",
        "grads",
        "noise_offsets",
        "params",
        "state_steps",
    )

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, state_steps, scales=None,
                 has_complex=True):  # fmt: skip
        if has_complex:
            params, grads, exp_avgs, exp_avg_sqs = map(
                real_views, (params, grads, exp_avgs, exp_avg_sqs)
            )
        self.params, self.grads = list(params), list(grads)
        self.exp_avgs, self.exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
        self.state_steps = list(state_steps)
        self.exp_avg_scales: list[Tensor] = []
        self.exp_avg_sq_scales: list[Tensor] = []
        self.noise_offsets: list[int] = []
        if scales is not None and any(s is not None for s in scales):
            compiling = torch.compiler.is_compiling()
            for p, s in zip(self.params, scales, strict=True):
                m_scale, v_scale, offset = s if s is not None else (*_no_scales(p, compiling), 0)
                self.exp_avg_scales.append(m_scale)
                self.exp_avg_sq_scales.append(v_scale)
                self.noise_offsets.append(offset)

    def arguments(self) -> tuple:
        return (
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.state_steps,
            self.exp_avg_scales, self.exp_avg_sq_scales, self.noise_offsets,
        )  # fmt: skip

    def hold_only_tensors(self) -> bool:
        """Whether every entry of the tensor lists is a tensor. Torch's error for a list that
        holds anything else prints the list, and printing a tensor whose storage was freed
        crashes the process: such lists never reach the operator."""
        tensors = chain(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.state_steps,
            self.exp_avg_scales, self.exp_avg_sq_scales,
        )  # fmt: skip
        return all(map(isinstance, tensors, repeat(Tensor)))

    def subset(self, indices: Sequence[int]) -> FusedLists:
        picked = FusedLists.__new__(FusedLists)
        for name in FusedLists.__slots__:
            values = getattr(self, name)
            setattr(picked, name, [values[i] for i in indices] if values else [])
        return picked


def _no_scales(param: Tensor, compiling: bool) -> tuple[Tensor, Tensor]:
    """The empty scales of a tensor whose moments are floats: one pair per device, reused
    (under torch.compile, made in the graph)."""
    if compiling:
        return torch.empty(0, device=param.device), torch.empty(0, device=param.device)
    return _empty_pair(param.device)


@functools.cache
def _empty_pair(device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.empty(0, device=device), torch.empty(0, device=device)


def kernel_takes(lists: FusedLists, i: int) -> str | None:
    """None where the CPU kernel takes tensor ``i`` of ``lists`` as it is, else why not (from
    the tensors' metadata alone, as the kernel's own checks decide; nothing is read)."""
    p, g, m, v, step = (
        lists.params[i], lists.grads[i], lists.exp_avgs[i], lists.exp_avg_sqs[i],
        lists.state_steps[i],
    )  # fmt: skip
    tensors = (p, g, m, v)
    if not all(isinstance(t, Tensor) for t in (*tensors, step)):
        return "a value that is not a tensor"
    if not all(t.device.type == "cpu" for t in (*tensors, step)):
        return "not on the CPU"
    if any(type(t).__torch_dispatch__ is not _PLAIN_DISPATCH for t in (*tensors, step)):
        return "a tensor subclass with its own dispatch"
    if p.dtype != torch.float32 or g.dtype != torch.float32:
        return f"{str(p.dtype).removeprefix('torch.')} parameters"
    if m.dtype != v.dtype or m.dtype not in _STATE_DTYPES:
        return f"{str(m.dtype).removeprefix('torch.')} moments"
    if any(t.layout != torch.strided for t in tensors):
        return "a sparse tensor"
    # (Flags that torch.compile cannot trace; its functionalized graph has no such views.)
    if not torch.compiler.is_compiling() and any(
        t.is_neg() or t.is_conj() or t._is_zerotensor() for t in tensors
    ):
        return "a negative, conjugate or zero tensor"
    if not all(is_dense(t) for t in tensors) or not (
        all(t.is_contiguous() for t in tensors) or all(t.stride() == p.stride() for t in tensors)
    ):
        return "a layout with gaps, or unlike its gradient's or moments'"
    if step.numel() != 1 or step.dtype not in (torch.float32, torch.float64):
        return "a step count of other than one float number"
    if m.dtype == torch.uint8 and (
        not lists.exp_avg_scales or p.dim() == 0 or not p.is_contiguous()
    ):
        return "8-bit codes of a tensor that is not contiguous"
    return None


_WARNED: set = set()


def _warn_torch_path(reasons: dict[str, int], total: int) -> None:
    """Once per process and set of reasons: which tensors ``fused=True`` steps with the
    operator's torch implementation, as ``AdamW(fused=True)`` refuses what it cannot take."""
    key = frozenset(reasons)
    if key in _WARNED:
        return
    _WARNED.add(key)
    counted = ", ".join(f"{n} with {reason}" for reason, n in sorted(reasons.items()))
    warnings.warn(
        f"Ano fused=True: the CPU kernel does not take {sum(reasons.values())} of the "
        f"{total} tensors ({counted}); they are stepped by the operator's torch "
        "implementation, several times slower",
        RuntimeWarning,
        stacklevel=5,
    )


def _call(lists: FusedLists, options: dict) -> None:
    lr = options["lr"]
    step = (
        torch.ops.ano.fused_step_.tensor_lr if isinstance(lr, Tensor) else torch.ops.ano.fused_step_
    )
    step(*lists.arguments(), **options)


def _scalars_on_cpu(*scalars: object) -> bool:
    """Whether every tensor among a step's scalars (``lr``, ``grad_scale``, ``found_inf``) is
    on the CPU. One on another device sends the operator call to that device's
    implementation, the torch one, whose errors after it began to change tensors (out of
    memory, say) are not refusals: such a step is not the kernel's to try."""
    return all(not isinstance(s, Tensor) or s.is_cpu for s in scalars)


def kernel_step(lists: FusedLists, options: dict) -> bool:
    """Step a CPU group with one call of the C++ kernel (:func:`fused_ano`'s keyword options):
    True; or False where the kernel, or torch's dispatcher, refused an argument, which it does
    before anything changes, or where a scalar tensor is off the CPU (the call would not reach
    the kernel)."""
    if not lists.hold_only_tensors() or not _scalars_on_cpu(
        options["lr"], options["grad_scale"], options["found_inf"]
    ):
        return False
    try:
        _call(lists, options)
    except (NotImplementedError, ValueError, RuntimeError):
        return False
    return True


def kernel_step_groups(
    lists: FusedLists,
    group_sizes: Sequence[int],
    options: Sequence[dict],
    grad_scale=None,
    found_inf=None,
) -> bool:
    """Step several CPU groups with one call of the C++ kernel (``ano::fused_step_.groups``):
    group ``g`` is the next ``group_sizes[g]`` tensors of ``lists``, with ``options[g]``, the
    scalar keywords of :func:`fused_ano`. True; or False where the kernel refused an argument,
    which it does before anything changes, where ``grad_scale`` or ``found_inf`` is off the CPU,
    or where a group's learning rate is a tensor other than one floating-point number on the
    CPU (the groups call takes floats; such a tensor is read as ``fused_step_.tensor_lr`` reads
    it)."""
    group_options = {name: [o[name] for o in options] for name in GROUP_OPTIONS}
    group_options["lr"] = [_float_lr(o["lr"]) for o in options]
    if (
        None in group_options["lr"]
        or not lists.hold_only_tensors()
        or not _scalars_on_cpu(grad_scale, found_inf)
    ):
        return False
    try:
        torch.ops.ano.fused_step_.groups(
            *lists.arguments(), group_sizes=list(group_sizes), grad_scale=grad_scale,
            found_inf=found_inf, **group_options,
        )  # fmt: skip
    except (NotImplementedError, ValueError, RuntimeError):
        return False
    return True


def _float_lr(lr: float | Tensor) -> float | None:
    """A learning rate as a float: a tensor one on the CPU holding one floating-point number
    (reading it does not wait for a device), else None."""
    if not isinstance(lr, Tensor):
        return lr
    if (
        lr.device.type != "cpu"
        or lr.numel() != 1
        or not lr.is_floating_point()
        or type(lr).__torch_dispatch__ is not _PLAIN_DISPATCH
    ):
        return None
    return lr.item()


def kernels_accept(lists: FusedLists) -> bool:
    """Whether the CPU kernel takes every tensor of a group as it is (its own checks, through
    ``ano::fused_step_check``; nothing changes): a step over several groups asks this of every
    group before it updates any."""
    if not lists.params:
        return True
    if not lists.params[0].is_cpu or not native.load().loaded:
        return False
    # A tensor the CPU kernel cannot take (sparse, a subclass with its own dispatch, ...) would
    # send the call to the check's torch implementation, which takes any tensor: such a group
    # is not the kernel's.
    if any(kernel_takes(lists, i) is not None for i in range(len(lists.params))):
        return False
    try:
        torch.ops.ano.fused_step_check(*lists.arguments())
    except (NotImplementedError, ValueError, RuntimeError):
        return False
    return True


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
    scales: Sequence[tuple[Tensor, Tensor, int] | None] | None = None,
    has_complex: bool = True,
    checked: bool = False,
    owner: str = "ano",
    where: Callable[[int], str] | None = None,
) -> None:
    """The fused update over lists of tensors, in place (the ``fused=True`` path of
    :func:`ano_optimizer.ano`); ``state_steps`` are incremented, except on a step that
    ``found_inf`` marks as skipped. ``scales``: each tensor's 8-bit moment scales and noise
    offset, or None (:meth:`ano_optimizer.Ano._scales`). ``checked``: the caller has checked
    the tensors (:mod:`..tensor_checks`)."""
    if not params:
        return
    lists = FusedLists(params, grads, exp_avgs, exp_avg_sqs, state_steps, scales, has_complex)
    options = {
        "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
        "logarithmic_schedule": logarithmic_schedule, "maximize": maximize,
        "grad_scale": grad_scale, "found_inf": found_inf,
    }  # fmt: skip
    if torch.compiler.is_compiling():
        _traced(lists, options)
        return
    on_cpu = lists.params[0].is_cpu
    # The usual CPU group: one call, which checks every tensor before it changes any. Where it
    # refuses one, nothing has changed: check in Python, and split the group.
    if on_cpu and native.load().loaded and kernel_step(lists, options):
        return
    if not checked:
        grads = check_step_tensors(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, owner=owner,
            where=where or _tensor_index, scales=scales,
        )  # fmt: skip
        lists.grads = real_views(grads) if has_complex else list(grads)
    if not on_cpu or not native.status().loaded:
        # Other devices (and a CPU without the kernel) run the torch implementation.
        fused_step_checked_(*lists.arguments(), **options)
        return
    reasons = {i: kernel_takes(lists, i) for i in range(len(lists.params))}
    taken = [i for i, reason in reasons.items() if reason is None]
    others = [i for i, reason in reasons.items() if reason is not None]
    counts: dict[str, int] = {}
    for i in others:
        counts[reasons[i]] = counts.get(reasons[i], 0) + 1
    rest = lists.subset(others)
    if others:
        _warn_torch_path(counts, len(lists.params))
    if others and checked:
        # Checked by the caller, not by this call: the torch implementation reads what it is
        # given, so the odd tensors are checked once more (they are few).
        check_step_tensors(
            rest.params, rest.grads, rest.exp_avgs, rest.exp_avg_sqs, rest.state_steps,
            owner=owner, where=lambda k: (where or _tensor_index)(others[k]),
            scales=checked_scales(
                rest.exp_avgs, rest.exp_avg_scales, rest.exp_avg_sq_scales, rest.noise_offsets
            ),
        )  # fmt: skip
    if taken:
        _call(lists.subset(taken), options)
    if others:
        fused_step_checked_(*rest.arguments(), **options)


def _traced(lists: FusedLists, options: dict) -> None:
    """Inside the user's ``torch.compile``: the tensors the CPU kernel takes (known from their
    metadata) as one operator call, the others as the torch implementation, traced. (Before
    torch 2.5 the operator cannot be functionalized: everything is traced.)"""
    if not functionalizes_mutable_lists():
        fused_step_checked_(*lists.arguments(), **options)
        return
    takes = [kernel_takes(lists, i) is None for i in range(len(lists.params))]
    taken = [i for i, takes_it in enumerate(takes) if takes_it]
    others = [i for i, takes_it in enumerate(takes) if not takes_it]
    if taken:
        _call(lists.subset(taken) if others else lists, options)
    if others:
        fused_step_checked_(*lists.subset(others).arguments(), **options)


def _tensor_index(i: int) -> str:
    return f"tensor {i}"


# The operator exists as soon as the package does.
assert op.LIBRARY is not None
