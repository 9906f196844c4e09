"""The per-tensor fused kernel: one ``torch.compile``-generated elementwise kernel per tensor.

Compile cost is what makes or breaks this on a real model: a step compiled over a whole model's
list of tensors is a graph per model. Instead ONE kernel is compiled over a flat 1-D tensor
whose length is symbolic, and Python loops over the tensors, so a model of 10 or 10,000 tensors
compiles the same single kernel, and Inductor's on-disk cache makes later processes faster
still. Every value that changes during training (learning rate, step, bias correction, the
``GradScaler`` scale and inf flag) enters as a tensor, so nothing recompiles when it changes;
only the Python boolean ``maximize`` and the storage dtypes select another kernel. A tensor no
compiled kernel can take runs :func:`_ano_math` eagerly.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .. import rounding
from .._torch_internals import mark_dynamic_length
from .batches import _addressable


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
        mark_dynamic_length(flat)
    return flat


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
