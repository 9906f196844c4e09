"""The single-tensor (reference) and foreach execution paths against each other.

Both paths run the same elementwise operations in the same order, so they are expected to agree
bit for bit. ``sign`` turns a one-ulp difference into a full-size step, so the float32 and
bfloat16 comparisons allow a small stated budget of mismatching elements (``MISMATCH_BUDGET``)
rather than a tolerance; float64 must agree to 1e-12 everywhere.
"""

from __future__ import annotations

import pytest
import torch
from optimizer_cases import CASES

from ano_optimizer import Ano, Anolog

MISMATCH_BUDGET = 1e-3  # fraction of elements allowed to differ beyond the dtype tolerance
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _model_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (33,), (8, 3, 5, 5), (8,), (3000,), (1,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _run(cls, kwargs, dtype, foreach, steps=12, groups=False):
    params = [torch.nn.Parameter(p) for p in _model_params(dtype)]
    if groups:
        spec = [
            {"params": params[:2]},
            {"params": params[2:4], "lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.95)},
            {"params": params[4:], "logarithmic_schedule": True, "eps": 1e-6},
        ]
    else:
        spec = params
    optimizer = cls(spec, **kwargs, foreach=foreach)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            # Parameter i misses its gradient every (i+2)-th step; exact zeros in some entries.
            grad[torch.rand(p.shape, generator=gen) < 0.05] = 0
            p.grad = None if step % (i + 2) == 1 else grad
        optimizer.step()
    return params, optimizer


def _compare(a_params, a_opt, b_params, b_opt, dtype):
    tol = TOLERANCE[dtype]
    for pa, pb in zip(a_params, b_params, strict=True):
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert int(sa["step"]) == int(sb["step"])
        for name, x, y in [
            ("param", pa, pb),
            ("exp_avg", sa["exp_avg"], sb["exp_avg"]),
            ("exp_avg_sq", sa["exp_avg_sq"], sb["exp_avg_sq"]),
        ]:
            assert x.dtype == y.dtype == dtype
            diff = (x.double() - y.double()).abs() > tol * (1 + y.double().abs())
            budget = 0 if dtype == torch.float64 else MISMATCH_BUDGET * x.numel()
            assert int(diff.sum()) <= budget, f"{name}: {int(diff.sum())} of {x.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_single_tensor_and_foreach_agree(case, dtype):
    single = _run(case.cls, case.kwargs, dtype, foreach=False)
    multi = _run(case.cls, case.kwargs, dtype, foreach=True)
    _compare(*single, *multi, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_paths_agree_with_several_groups(dtype):
    single = _run(Ano, {"lr": 1e-3}, dtype, foreach=False, groups=True)
    multi = _run(Ano, {"lr": 1e-3}, dtype, foreach=True, groups=True)
    _compare(*single, *multi, dtype)


def test_paths_are_bitwise_equal_in_float32():
    """Stronger than the budget: today the two paths are identical operation for operation."""
    single = _run(Anolog, {"lr": 1e-3, "weight_decay": 0.1}, torch.float32, foreach=False)
    multi = _run(Anolog, {"lr": 1e-3, "weight_decay": 0.1}, torch.float32, foreach=True)
    for pa, pb in zip(single[0], multi[0], strict=True):
        assert torch.equal(pa, pb)


def test_default_path_on_cpu_splits_small_and_large_tensors(monkeypatch):
    """CPU default: tensors below one block go through foreach, larger ones are blocked."""
    from ano_optimizer import optimizer as module

    used = []
    for name in ("_single_tensor_ano", "_multi_tensor_ano"):
        monkeypatch.setattr(
            module, name, lambda p, *a, _n=name, **k: used.append((_n, [t.numel() for t in p]))
        )
    small = torch.nn.Parameter(torch.ones(3))
    large = torch.nn.Parameter(torch.ones(module._CHUNK_NUMEL + 1))
    for p in (small, large):
        p.grad = torch.ones_like(p)
    Ano([small, large]).step()
    assert sorted(used) == [("_multi_tensor_ano", [3]), ("_single_tensor_ano", [large.numel()])]
    used.clear()
    Ano([small, large], foreach=True).step()
    Ano([small, large], foreach=False).step()
    assert used == [
        ("_multi_tensor_ano", [3, large.numel()]),
        ("_single_tensor_ano", [3, large.numel()]),
    ]


def test_cpu_default_equals_the_single_tensor_reference():
    shapes = [(300_000,), (17,), (64, 3, 3, 3), (64,)]
    runs = []
    for foreach in (None, False):
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(1)))
            for s in shapes
        ]
        optimizer = Anolog(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_complex_parameters_follow_their_real_view():
    """Complex parameters are optimized as (real, imag) pairs, as torch.optim.Adam does."""
    z = torch.randn(6, 4, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    results = []
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(1)
        pc = torch.nn.Parameter(z.clone())
        pr = torch.nn.Parameter(torch.view_as_real(z).clone())
        oc = Ano([pc], lr=1e-2, weight_decay=0.1, foreach=foreach)
        orr = Ano([pr], lr=1e-2, weight_decay=0.1, foreach=foreach)
        for _ in range(10):
            g = torch.randn(6, 4, dtype=torch.complex128, generator=gen)
            pc.grad, pr.grad = g, torch.view_as_real(g).clone()
            oc.step()
            orr.step()
        torch.testing.assert_close(torch.view_as_real(pc.detach()), pr.detach(), rtol=0, atol=1e-14)
        results.append(pc.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-14)
