"""Low-memory optimizer state: ``exp_avg`` and ``exp_avg_sq`` kept in a narrower dtype.

``Ano(..., state_dtype=torch.bfloat16)`` halves the optimizer's memory. The update itself runs
in float32: each block of state is widened, updated exactly as in the float32 path, and written
back with stochastic rounding (:mod:`ano_optimizer.rounding`), so the rounding error averages out
instead of accumulating. With round-to-nearest, ``exp_avg_sq`` at ``β2 = 0.999`` loses 0.1 % per
step when gradients shrink, less than half a bfloat16 ulp, so every decrease would be rounded
away and ``v`` would stay stuck tens of percent too high.

The ``fused=True`` kernel handles the narrow state itself; :func:`mixed_precision_ano` is the
eager path for ``fused=False``. A complex parameter's state in a real ``state_dtype`` is kept as
its real view (shape ``(*param.shape, 2)``): there is no complex bfloat16.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import rounding

__all__ = ["keep_state_dtype_on_load", "mixed_precision_ano"]

# Blocks small enough that the float32 scratch stays in cache and costs no memory to speak of.
_BLOCK_NUMEL = 1 << 16


def _narrow_store(source: Tensor, target: Tensor, step, stream: int, start: int) -> None:
    if target.dtype == torch.bfloat16 and source.dtype == torch.float32:
        parameters = (
            rounding.noise_parameter_tensor(step, stream)
            if isinstance(step, Tensor)
            else rounding.noise_parameters(step, stream)
        )
        noise = rounding.hashed_noise(source, parameters, start)
        target.copy_(rounding.round_with_noise(source, noise))
    else:
        target.copy_(source)


def mixed_precision_ano(
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
    capturable: bool = False,
) -> None:
    """The eager Ano update for state stored in another dtype than the parameter, and for
    bfloat16/float16 parameters with ``capturable``.

    Per block of at most ``_BLOCK_NUMEL`` elements (per tensor where the tensors are not all
    contiguous): widen the parameter, gradient and moments to the widest of their dtypes (at
    least float32), run the single-tensor path's update on them, and write the results back
    (stochastic rounding into bfloat16).
    """
    from .optimizer import _ano_update_, _stepped_tensors  # a cycle: optimizer imports us

    stepped = _stepped_tensors(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable=capturable, beta1=beta1,
        beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        logarithmic_schedule=logarithmic_schedule,
    )  # fmt: skip
    for param, grad, exp_avg, exp_avg_sq, scalars, step in stepped:
        compute = torch.float32
        for t in (param, exp_avg, exp_avg_sq):
            compute = torch.promote_types(compute, t.dtype)
        tensors = (param, grad, exp_avg, exp_avg_sq)
        if all(t.is_contiguous() for t in tensors):
            blocks = zip(*(t.view(-1).split(_BLOCK_NUMEL) for t in tensors), strict=True)
        else:
            blocks = iter([tensors])  # as laid out; noise follows the elements' logical order
        for index, (p, g, m, v) in enumerate(blocks):
            p32, g32 = p.to(compute), g.to(compute)
            m32, v32 = m.to(compute), v.to(compute)
            if maximize:
                g32 = g32.neg()
            a, b = torch.empty_like(p32), torch.empty_like(p32)
            _ano_update_(p32, g32, m32, v32, a, b, **scalars)
            p.copy_(p32)
            start = index * _BLOCK_NUMEL
            _narrow_store(m32, m, step, rounding.EXP_AVG_STREAM, start)
            _narrow_store(v32, v, step, rounding.EXP_AVG_SQ_STREAM, start)


def keep_state_dtype_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep ``exp_avg``/``exp_avg_sq`` in each group's
    ``state_dtype``.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
    parameter's dtype: bfloat16 state would come back as float32 (twice the memory), and float32
    state of a bfloat16 parameter would lose its precision. A pre-hook keeps the saved tensors, a
    post-hook puts them back from those originals in the group's ``state_dtype``.
    """
    optimizer.register_load_state_dict_pre_hook(_remember_saved_state)
    optimizer.register_load_state_dict_post_hook(_restore_state_dtype)


def _remember_saved_state(optimizer, state_dict):
    optimizer._ano_saved_state = state_dict
    return None


def _restore_state_dtype(optimizer) -> None:
    saved = optimizer.__dict__.pop("_ano_saved_state", None)
    if saved is None:
        return
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for saved_id, param in zip(saved_group["params"], group["params"], strict=True):
            entry = saved["state"].get(saved_id)
            if entry is None or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry and isinstance(entry[key], Tensor):
                    state[key] = moment_for(param, entry[key], group.get("state_dtype"))


def moment_for(param: Tensor, saved: Tensor, state_dtype: torch.dtype | None) -> Tensor:
    """A saved moment as ``param``'s state in ``state_dtype`` (None: the parameter's dtype), on
    the parameter's device, as a copy; a complex parameter's real-view state becomes complex
    again, and the reverse."""
    if param.is_complex() and state_dtype is None:
        if not saved.is_complex():
            real = saved.to(device=param.device, dtype=torch.view_as_real(param).dtype)
            return torch.view_as_complex(real.contiguous()).clone()
        return saved.to(device=param.device, dtype=param.dtype, copy=True)
    if param.is_complex() and saved.is_complex():
        saved = torch.view_as_real(saved)
    return saved.to(device=param.device, dtype=state_dtype or param.dtype, copy=True)
