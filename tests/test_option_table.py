"""Every option combination the constructor accepts works on every path: one declarative table
of options x dtypes x layouts x paths, each cell run for a few steps and held against the float64
oracle (``reference.py``), or refused with a clear error before anything changed.

Tolerances follow the narrowest dtype in the cell: float64 parameters with float64 state match
the oracle to 1e-9; float32 cells may differ by a whole step only where ``sign(m)`` flips on a
momentum within rounding of 0 (a budget of 2 % of the coordinates, all others to 1e-5); cells
with bfloat16 parameters or state are measured by their error relative to the update itself.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from reference import ano_reference

from ano_optimizer import Ano

LR = 1e-2
STEPS = 4
OPTIONS = {
    "default": {},
    "weight-decay": {"weight_decay": 0.1},
    "maximize": {"maximize": True, "weight_decay": 0.05},
    "anolog": {"logarithmic_schedule": True},
    "tensor-lr": {"lr": torch.tensor(LR)},
    "tensor-lr-[1]": {"lr": torch.tensor([LR])},
    "tensor-lr-[1,1]": {"lr": torch.tensor([[LR]])},
    "capturable": {"capturable": True, "weight_decay": 0.1},
    "capturable-tensor-lr-[1,1]": {"capturable": True, "lr": torch.tensor([[LR]])},
    "bf16-state": {"state_dtype": torch.bfloat16},
    "fp32-state": {"state_dtype": torch.float32},
    "fp64-state": {"state_dtype": torch.float64},
    # Refused at construction, whatever the cell:
    "tensor-lr-[2]": {"lr": torch.tensor([LR, LR])},
    "tensor-lr-meta": {"lr": torch.tensor(LR, device="meta")},
    "int8-state": {"state_dtype": torch.int8},
}
REFUSED = {
    "tensor-lr-[2]": "Tensor lr must be 1-element",
    "tensor-lr-meta": "a tensor lr must hold a value",
    "int8-state": "invalid state_dtype=torch.int8",
}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
}
LAYOUTS = ("contiguous", "transposed", "gaps", "channels-last")
PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "default": {},
    "fused": {"fused": True},
}


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (a 2-D or 4-D tensor) with the given memory layout, same shape and values."""
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "gaps":
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "channels-last":
        return values.contiguous(memory_format=torch.channels_last)
    return values.contiguous()


def _shapes(layout: str) -> list[tuple[int, ...]]:
    return [(2, 3, 2, 2) if layout == "channels-last" else (6, 5), (7,)]


def _problem(seed: int, layout: str, dtype: torch.dtype):
    """Starting values and gradients as float64 NumPy arrays (complex ones as real views)."""
    rng = np.random.default_rng(seed)
    real_shapes = [(*s, 2) if dtype.is_complex else s for s in _shapes(layout)]
    param0 = [rng.standard_normal(s) for s in real_shapes]
    grads = [rng.standard_normal((STEPS, *s)) for s in real_shapes]
    for g in grads:
        g[rng.random(g.shape) < 0.05] = 0.0  # exact zeros: sign(0) = 0
    return param0, grads


def _as_tensor(values: np.ndarray, dtype: torch.dtype, layout: str, like=None) -> torch.Tensor:
    t = torch.from_numpy(values.copy())
    t = torch.view_as_complex(t).to(dtype) if dtype.is_complex else t.to(dtype)
    if t.dim() < 2:
        return t.clone()
    if like is not None:  # a gradient laid out as AccumulateGrad lays it out for `like`
        return torch.empty_like(like).copy_(t)
    return _laid_out(t, layout)


def _real(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.double().numpy()


def _check(name: str, ours: np.ndarray, expected: np.ndarray, start, dtypes) -> None:
    if torch.bfloat16 in dtypes:
        scale = np.abs(expected - start).mean() if start is not None else np.abs(expected).mean()
        error = np.abs(ours - expected).mean() / max(scale, 1e-12)
        # Rounding a bfloat16 parameter each step costs up to half an ulp (0.004 near 1) against
        # updates of 0.01: a missing update would score 1, one of the wrong sign 2.
        assert error < (0.5 if start is not None else 0.05), f"{name}: relative error {error:.3g}"
    elif torch.float32 in dtypes:
        off = np.abs(ours - expected) > 1e-5 * (1 + np.abs(expected))
        assert off.mean() <= 0.02, f"{name}: {off.sum()} of {off.size} coordinates differ"
    else:
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("option", OPTIONS, ids=list(OPTIONS))
def test_cell(option, dtype, layout, path):
    torch_dtype = DTYPES[dtype]
    kwargs = {"lr": LR, **OPTIONS[option], **PATHS[path]}
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    param0, grads = _problem(zlib.crc32(f"{option}/{dtype}/{layout}".encode()), layout, torch_dtype)
    params = [torch.nn.Parameter(_as_tensor(p0, torch_dtype, layout)) for p0 in param0]
    assert layout == "contiguous" or not params[0].is_contiguous()
    if option in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[option]):
            Ano(params, **kwargs)
        return
    optimizer = Ano(params, **kwargs)
    for k in range(STEPS):
        for p, g in zip(params, grads, strict=True):
            p.grad = _as_tensor(g[k], torch_dtype, layout, like=p)
        optimizer.step()

    state_dtype = kwargs.get("state_dtype")
    real_dtype = torch.float32 if torch_dtype.is_complex else torch_dtype
    dtypes = {real_dtype, state_dtype or real_dtype}
    hyper = {
        "lr": float(kwargs["lr"]),  # a float32 tensor lr is 0.0099999998
        "betas": (0.92, 0.99),
        "eps": 1e-8,
        "weight_decay": kwargs.get("weight_decay", 0.0),
        "logarithmic_schedule": kwargs.get("logarithmic_schedule", False),
        "maximize": kwargs.get("maximize", False),
    }
    for i, (p, p0, g) in enumerate(zip(params, param0, grads, strict=True)):
        trajectory, m, v, k = ano_reference(p0, g, [True] * STEPS, **hyper)
        state = optimizer.state[p]
        assert int(state["step"]) == k == STEPS
        assert p.dtype == torch_dtype and p.stride() == params[i].stride()
        if state_dtype is not None:
            assert state["exp_avg"].dtype == state_dtype
        _check(f"param {i}", _real(p), trajectory[-1], p0, dtypes)
        _check(f"exp_avg {i}", _real(state["exp_avg"]), m, None, dtypes)
        _check(f"exp_avg_sq {i}", _real(state["exp_avg_sq"]), v, None, dtypes)
