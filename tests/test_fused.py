"""The fused path (the operator ``ano::fused_step_``) against the single-tensor path and the
float64 oracle, its C++ kernel against its torch implementation bit for bit, the kernel's checks,
GradScaler, torch.compile of a whole step, and the kernel's build cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import ano_reference
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_map

from ano_optimizer import Ano, Anolog, blockwise8
from ano_optimizer._torch_internals import functionalizes_mutable_lists
from ano_optimizer.fused import FusedLists, kernel_step, kernel_step_groups, native, torch_step
from ano_optimizer.optimizer import ano
from benchmarks.kernels import implementation

# Shapes of a small network: vectors, a matrix, a conv kernel with size-1 dims, and a
# 1-element tensor (which gets Dynamo's one extra static graph).
SHAPES = [(5,), (33, 7), (4, 3, 1, 3), (1,), (300,)]
# Without the 1-element tensor: each extra variant below then compiles one kernel, not two.
SHAPES_NO_SCALAR = [s for s in SHAPES if s != (1,)]
STEPS = 12


def _tensors(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        for _ in range(STEPS)
    ]
    return params, grads


def _run(params, grads, *, fused, steps=STEPS, state_dtype=None, **hyper):
    params = [p.clone() for p in params]
    exp_avgs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    exp_avg_sqs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    state_steps = [torch.tensor(0.0) for _ in params]
    for k in range(steps):
        ano(
            params,
            grads[k],
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            fused=fused,
            foreach=False,
            **hyper,
        )
    return params, exp_avgs, exp_avg_sqs, state_steps


@pytest.fixture(params=["kernel", "torch"])
def cpu_kernel(request):
    """Run a test with each implementation of the operator on the CPU: its C++ kernel, and its
    torch implementation (which GPUs, the other dtypes and a machine without a compiler run)."""
    with implementation(request.param), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the torch path's one-time notice
        yield request.param


HYPER = {
    "lr": 1e-2,
    "beta1": 0.9,
    "beta2": 0.99,
    "eps": 1e-8,
    "weight_decay": 0.05,
    "logarithmic_schedule": False,
    "maximize": False,
}


@pytest.mark.parametrize(
    "variant",
    [{}, {"logarithmic_schedule": True, "maximize": True}],
    ids=["ano", "anolog-maximize"],
)
def test_float32_matches_single_tensor_path_within_sign_flip_budget(variant, cpu_kernel):
    """Both paths compute in float32 but round differently (~1 ulp). The moments must agree to
    float32 precision. A parameter coordinate can differ by a whole step when its momentum is
    within rounding of 0 and sign(m) flips; budget: at most 1 % of coordinates, and all others
    equal to 1e-5."""
    hyper = {**HYPER, **variant}
    shapes = SHAPES if not variant else SHAPES_NO_SCALAR
    params, grads = _tensors(torch.float32, shapes=shapes)
    fused = _run(params, grads, fused=True, **hyper)
    eager = _run(params, grads, fused=False, **hyper)
    for f_state, e_state in zip(fused[1:3], eager[1:3], strict=True):
        for f, e in zip(f_state, e_state, strict=True):
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
    assert [s.item() for s in fused[3]] == [s.item() for s in eager[3]] == [STEPS] * len(shapes)
    total = sum(p.numel() for p in params)
    off = sum(int(((f - e).abs() > 1e-5).sum()) for f, e in zip(fused[0], eager[0], strict=True))
    assert off <= 0.01 * total, f"{off} of {total} coordinates differ"
    assert any(not torch.equal(f, p) for f, p in zip(fused[0], params, strict=True))


def test_float64_matches_the_oracle_tightly():
    params, grads = _tensors(torch.float64, shapes=SHAPES_NO_SCALAR)
    hyper = {**HYPER, "logarithmic_schedule": True}
    fused_params, exp_avgs, exp_avg_sqs, _ = _run(params, grads, fused=True, **hyper)
    for i, p0 in enumerate(params):
        trajectory, m, v, k = ano_reference(
            p0.numpy(),
            [g[i].numpy() for g in grads],
            [True] * STEPS,
            lr=hyper["lr"],
            betas=(hyper["beta1"], hyper["beta2"]),
            eps=hyper["eps"],
            weight_decay=hyper["weight_decay"],
            logarithmic_schedule=True,
        )
        np.testing.assert_allclose(fused_params[i].numpy(), trajectory[-1], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(exp_avgs[i].numpy(), m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(exp_avg_sqs[i].numpy(), v, rtol=1e-12, atol=1e-14)
        assert k == STEPS


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Distance from |x| to the next bfloat16 up (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return torch.pow(2.0, exponent - 7)


def test_bfloat16_parameters_are_float32_math_rounded_once():
    """Each step of the fused kernel on bf16 tensors equals the float64 update of the same bf16
    inputs, rounded once: the parameter to nearest (<= 1/2 ulp), the moments stochastically
    (<= 1 ulp). The eager path rounds after every operation instead."""
    params, grads = _tensors(torch.bfloat16, shapes=[(64, 33)])
    p = params[0].clone()
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    for k in range(STEPS):
        before = [t.double() for t in (p, m, v)]
        g = grads[k][0]
        ano([p], [g], [m], [v], [step], fused=True, **HYPER)
        trajectory, m_ref, v_ref, _ = _one_step_reference(*before, g.double(), k + 1)
        # float32 cancellation error in m: where |m| is below it, sign(m) is not determined.
        m_noise = 1e-6 * (before[1].abs() + g.double().abs())
        settled = m_ref.abs() > m_noise
        p_error = (p.double() - trajectory).abs()
        # Plus float32 error on the operands: p and the update can cancel.
        p_noise = 1e-6 * (before[0].abs() + (trajectory - before[0]).abs())
        assert p_error.le(0.5 * _bf16_ulp(trajectory) + p_noise)[settled].all()
        assert settled.float().mean() > 0.99
        assert (m.double() - m_ref).abs().le(_bf16_ulp(m_ref) + m_noise).all()
        assert (v.double() - v_ref).abs().le(_bf16_ulp(v_ref) + 1e-30).all()
    assert step.item() == STEPS


def _one_step_reference(p, m, v, g, k):
    beta1, beta2, lr, eps, wd = (HYPER[n] for n in ("beta1", "beta2", "lr", "eps", "weight_decay"))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * torch.sign(g * g - v) * g * g
    v_hat = v / (1 - beta2**k)
    p = p * (1 - lr * wd) - lr * g.abs() * torch.sign(m) / (v_hat.sqrt() + eps)
    return p, m, v, k


def test_optimizer_class_fused_trains_like_the_unfused_one():
    def train(**options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        optimizer = Anolog(model.parameters(), lr=1e-2, weight_decay=0.01, **options)
        data = torch.randn(64, 6), torch.randn(64, 1)
        for _ in range(STEPS):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(data[0]), data[1]).backward()
            optimizer.step()
        return model, optimizer

    fused_model, fused_opt = train(fused=True)
    eager_model, _ = train(fused=False)
    for f, e in zip(fused_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(f, e, rtol=0, atol=1e-5)
    assert fused_opt.param_groups[0]["fused"] is True
    assert fused_opt._step_supports_amp_scaling


def test_resume_from_state_dict_is_bit_for_bit():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        return model, Ano(model.parameters(), lr=1e-2, fused=True)

    data = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(8)]

    def train(model, optimizer, batches):
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

    straight_model, straight_opt = make()
    train(straight_model, straight_opt, data)
    first_model, first_opt = make()
    train(first_model, first_opt, data[:4])
    resumed_model, resumed_opt = make()
    resumed_model.load_state_dict(first_model.state_dict())
    resumed_opt.load_state_dict(first_opt.state_dict())
    train(resumed_model, resumed_opt, data[4:])
    for a, b in zip(straight_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_opt.state[resumed_model.weight]["step"].item() == 8


def test_grad_scaler_unscales_in_the_kernel_and_skips_inf_steps(cpu_kernel):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    optimizer = Ano(model.parameters(), lr=1e-2, fused=True)
    ref_optimizer = Ano(reference.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(3):
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_optimizer.step()
    # Power-of-two scales unscale exactly: the same trajectory as without a scaler.
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)

    before = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    weight = model.weight.detach().clone()
    optimizer.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    model.weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight, weight)
    for key, value in optimizer.state[model.weight].items():
        assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == scale / 2


def test_compiled_step_matches_eager_fused_in_one_graph():
    """``optimizer.step`` under ``torch.compile(fullgraph=True)``: the operator is traced
    through (``register_fake``) with no graph break, nothing recompiles as the tensor learning
    rate changes, and the results are the eager fused step's, bit for bit (the compiled graph
    calls the same kernel)."""
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return model, Ano(model.parameters(), lr=torch.tensor(1e-2), weight_decay=0.01, fused=True)

    data = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(4)]
    eager_model, eager_opt = make()
    compiled_model, compiled_opt = make()
    compiled_step = torch.compile(compiled_opt.step, fullgraph=True)
    counters.clear()
    for k, (x, y) in enumerate(data):
        for model, step in ((eager_model, eager_opt.step), (compiled_model, compiled_step)):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
        for opt in (eager_opt, compiled_opt):
            opt.param_groups[0]["lr"].fill_(1e-2 * 0.5 ** (k + 1))
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert compiled_opt.state[compiled_model[0].weight]["step"].item() == len(data)
    assert counters["stats"]["unique_graphs"] == 1
    # The graph calls the kernel (torch >= 2.5; before, it traces the torch implementation).


def test_compiled_training_step_matches_eager_fused():
    """A whole training step (forward, backward, step) under torch.compile, with torch's own
    graph breaks around backward and zero_grad: the same results as eager, to the rounding of
    the compiled forward and backward."""

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        return model, Ano(model.parameters(), lr=torch.tensor(1e-2), fused=True)

    data = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(4)]

    def train_step(model, optimizer, x, y):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    eager_model, eager_opt = make()
    compiled_model, compiled_opt = make()
    compiled_step = torch.compile(train_step)
    for x, y in data:
        train_step(eager_model, eager_opt, x, y)
        compiled_step(compiled_model, compiled_opt, x, y)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert compiled_opt.state[compiled_model.weight]["step"].item() == len(data)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fused": "yes"}, "fused must be None, True or False"),
        ({"fused": True, "foreach": True}, "fused=True and foreach=True are exclusive"),
        ({"state_dtype": torch.int8}, "invalid state_dtype=torch.int8"),
    ],
)
def test_invalid_fused_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Ano([torch.nn.Parameter(torch.zeros(2))], **options)


def test_grad_scale_without_fused_is_an_error():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="only supported with fused=True"):
        ano([p], [p], [p], [p], [torch.tensor(0.0)], grad_scale=torch.tensor(2.0), **HYPER)


def _coded_group(shapes, dtype=torch.float32):
    """A uint8 group's tensors: 8-bit moments where blockwise8 keeps codes, float32 ones
    elsewhere (the kernel takes both in one call)."""
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    exp_avgs, exp_avg_sqs, m_scales, v_scales = [], [], [], []
    for p in params:
        if blockwise8.takes_codes(p):
            moments = blockwise8.quantized_moments(p)
            exp_avgs.append(moments["exp_avg"])
            exp_avg_sqs.append(moments["exp_avg_sq"])
            m_scales.append(moments["exp_avg_scale"])
            v_scales.append(moments["exp_avg_sq_scale"])
        else:
            exp_avgs.append(torch.zeros_like(p))
            exp_avg_sqs.append(torch.zeros_like(p))
            m_scales.append(None)
            v_scales.append(None)
    return params, exp_avgs, exp_avg_sqs, m_scales, v_scales


def _implementation_runs(shapes, state_dtype, complex_params=False, **options):
    """The same steps on each implementation: (kernel results, torch-implementation results),
    each params, exp_avgs, exp_avg_sqs, steps (and for 8-bit state the scales)."""
    results = []
    for choice in ("kernel", "torch"):
        torch.manual_seed(1)
        dtype = torch.complex64 if complex_params else torch.float32
        scales = {}
        if state_dtype == torch.uint8:
            params, exp_avgs, exp_avg_sqs, m_scales, v_scales = _coded_group(shapes, dtype)
            scales = {"exp_avg_scales": m_scales, "exp_avg_sq_scales": v_scales}
        else:
            params = [torch.randn(s, dtype=dtype) for s in shapes]
            exp_avgs = [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
            exp_avg_sqs = [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        for k in range(6):
            grads = [torch.randn(s, dtype=dtype) * 10.0 ** (k - 3) for s in shapes]
            amp = {}
            if options.get("amp"):
                amp = {"grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(float(k == 3))}
            hyper = {**HYPER, **{k: v for k, v in options.items() if k != "amp"}}
            with implementation(choice):
                ano(params, grads, exp_avgs, exp_avg_sqs, steps, fused=True, **scales, **hyper,
                    **amp)  # fmt: skip
        results.append(
            (params, exp_avgs, exp_avg_sqs, steps, *[s for s in scales.get("exp_avg_scales", [])
                                                       if s is not None],
             *[s for s in scales.get("exp_avg_sq_scales", []) if s is not None])
        )  # fmt: skip
    return results


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}[t.element_size()]
    )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, where NaNs count as equal whatever their payload (a vector instruction and
    a scalar one may give different NaNs)."""
    nan = (a.isnan() & b.isnan()) if a.is_floating_point() or a.is_complex() else None
    if nan is not None and nan.any():
        a, b = a.clone(), b.clone()
        a[nan] = 0
        b[nan] = 0
    return torch.equal(_bits(a), _bits(b))


_EACH_STATE_DTYPE = pytest.mark.parametrize(
    "state_dtype", [None, torch.bfloat16, torch.uint8], ids=["fp32-state", "bf16-state", "8bit"]
)
_EACH_OPTION = pytest.mark.parametrize(
    "options",
    [
        {},
        {"logarithmic_schedule": True, "maximize": True},
        {"amp": True},
        {"weight_decay": 0.0, "maximize": True},
    ],
    ids=["ano", "anolog-maximize", "grad-scaler", "no-decay-maximize"],
)


@_EACH_STATE_DTYPE
@_EACH_OPTION
def test_the_kernel_and_the_torch_implementation_write_the_same_bits(state_dtype, options):
    """kernel.cpp runs torch_step.py's float32 operations in the same order, without fused
    multiply-adds, with the same per-tensor scalars (double arithmetic rounded once) and the
    same rounding noise: every tensor comes out the same, bit for bit, for float32, bfloat16
    and 8-bit state, with GradScaler (a skipped step), maximize and Anolog. Sizes straddle the
    kernel's units of work and leave partial vectors; gradients span six decades."""
    shapes = [(5,), (33, 7), (1,), (300,), (3, 16384 + 5), (16384,), (17,), (70, 300), (5, 1000)]
    kernel, torch_impl = _implementation_runs(shapes, state_dtype, **options)
    assert [s.item() for s in kernel[3]] == [5.0 if options.get("amp") else 6.0] * len(shapes)
    for a_list, b_list in zip(kernel, torch_impl, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            assert _same_bits(a, b)
    if state_dtype == torch.uint8:
        assert any(m.dtype == torch.uint8 for m in kernel[1])


def test_complex_tensors_go_to_the_kernel_as_real_views_and_odd_ones_to_the_torch_path():
    complex_runs = _implementation_runs([(7,), (4, 5)], None, complex_params=True)
    for ours, theirs in zip(*complex_runs, strict=True):  # params, moments, steps
        for a, b in zip(ours, theirs, strict=True):
            assert _same_bits(a, b)
    # A parameter with gaps between its elements and a float64 one go to the torch
    # implementation, the other to the kernel, with one warning that says which and why.
    params = [torch.randn(6, 8)[:, ::2], torch.randn(9), torch.randn(5, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(0.0) for _ in params]
    before = [p.clone() for p in params]
    with pytest.warns(RuntimeWarning, match=r"does not take 2 of the 3 tensors \(1 with "):
        ano(params, grads, *states, steps, fused=True, **HYPER)
    for p, b, g in zip(params, before, grads, strict=True):
        # First step: m = (1 - b1) g, v = (1 - b2) g^2 and the update is -lr * sign(g) (+ decay).
        expected = b * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * torch.sign(g)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    assert [s.item() for s in steps] == [1.0, 1.0, 1.0]


def test_the_kernel_bumps_autograd_versions():
    """It writes through raw pointers; autograd must still see the in-place change, as after
    an in-place op."""
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    optimizer = Ano([p], lr=1e-2, fused=True)
    optimizer.step()
    versions = (p._version, *(optimizer.state[p][k]._version for k in ("exp_avg", "exp_avg_sq")))
    optimizer.step()
    after = (p._version, *(optimizer.state[p][k]._version for k in ("exp_avg", "exp_avg_sq")))
    assert all(a > b for a, b in zip(after, versions, strict=True))


# The operator's keyword arguments for HYPER with these changes.
_OP_OPTIONS = {
    "lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1,
    "logarithmic_schedule": False, "maximize": False,
}  # fmt: skip
_OP_HYPER = {**HYPER, "beta2": 0.99, "weight_decay": 0.1}


def _op(lists, scales=((), (), ())):
    """The operator on five role lists (and the 8-bit lists), as fused=True calls it, on its
    C++ kernel (loaded first: the torch implementation serves the CPU until then)."""
    assert native.load().loaded
    torch.ops.ano.fused_step_(*lists, *(list(x) for x in scales), **_OP_OPTIONS)


def _role_lists(n=3, size=6):
    """A usual group for the kernel: params, grads, exp_avgs, exp_avg_sqs, steps."""
    gen = torch.Generator().manual_seed(5)
    return [
        [torch.randn(size, generator=gen) for _ in range(n)],
        [torch.randn(size, generator=gen) for _ in range(n)],
        [torch.randn(size, generator=gen) for _ in range(n)],
        [torch.rand(size, generator=gen) for _ in range(n)],
        [torch.tensor(3.0) for _ in range(n)],
    ]


def _inference_tensor(t):
    with torch.inference_mode():
        return t.clone()


def _freed(t):
    t = t.clone()
    t.untyped_storage().resize_(0)
    return t


class _PlainSubclass(torch.Tensor):
    pass


# One tensor the kernel must not take as it is: (role index, replacement of tensor 1).
_REFUSED = {
    "float64 parameter": (0, lambda t: t.double()),
    "bfloat16 gradient": (1, lambda t: t.bfloat16()),
    "bfloat16 exp_avg_sq beside a float32 exp_avg": (3, lambda t: t.bfloat16()),
    "int64 step": (4, lambda t: t.long()),
    "gradient with gaps between its elements": (1, lambda t: torch.stack([t, t], 1)[:, 0]),
    "gradient whose elements overlap": (1, lambda t: t[:1].expand(t.numel())),
    "exp_avg laid out unlike its parameter": (2, lambda t: t.reshape(3, 2).t()),
    "sparse gradient": (1, lambda t: t.to_sparse()),
    "negative view as exp_avg": (2, lambda t: torch._neg_view(t)),
    "inference-mode parameter": (0, _inference_tensor),
    "exp_avg of another length": (2, lambda t: torch.cat([t, t])),
    "meta-device step among CPU tensors": (4, lambda t: t.to("meta")),
    "parameter whose storage was freed": (0, _freed),
    "exp_avg_sq whose storage was freed": (3, _freed),
    "step of two numbers": (4, lambda t: torch.stack([t, t])),
    "step of no number": (4, lambda t: t.reshape(1)[:0]),
}


@pytest.mark.parametrize("case", _REFUSED, ids=list(_REFUSED))
def test_the_kernel_refuses_a_tensor_it_cannot_take_before_any_change(case):
    """kernel.cpp checks every tensor (devices, layouts, dtypes, sizes, strides, storage
    extents) before it changes any: one odd tensor among usual ones raises NotImplementedError
    (a tensor it has no loop for) or ValueError (an invalid one), and every tensor keeps its
    values and autograd version. The Python dispatch then checks and splits the group. (A
    negative view among the tensors it writes is refused by torch's dispatcher already; one
    among those it reads is materialized by it.)"""
    role, replace = _REFUSED[case]
    lists = _role_lists()
    lists[role][1] = replace(lists[role][1])
    tensors = [t for role_list in lists for t in role_list]
    readable = [
        t
        for t in tensors
        if t.is_sparse
        or (t.device.type != "meta" and (t.untyped_storage().nbytes() or not t.numel()))
    ]
    values = [_dense(t).clone() for t in readable]
    versions = [t._version for t in tensors if not t.is_inference()]
    with pytest.raises((NotImplementedError, ValueError, RuntimeError)) as raised:
        _op(lists)
    if "negative" not in case:  # refused by torch's dispatcher before the kernel
        # Named by the kernel's checks, or (a sparse gradient, which the dispatcher sends to
        # the torch implementation) by the Python checks.
        assert re.search(
            r"ano::fused_step_(: \w+\[1\]|.*tensor 1|: every tensor must be on one device)",
            str(raised.value),
        )
    assert all(torch.equal(_dense(a), b) for a, b in zip(readable, values, strict=True))
    assert [t._version for t in tensors if not t.is_inference()] == versions


def _dense(t):
    return t.to_dense() if t.is_sparse else t


@pytest.mark.parametrize(
    "change",
    ["transposed scales", "scales of one block too few", "float64 scales", "no scales"],
)
def test_the_kernel_checks_the_shape_of_8bit_scales(change):
    """Scales of the right size and the wrong shape would be read in the wrong order: the
    kernel wants exactly (rows, blocks), contiguous float32, before anything changes."""
    params, exp_avgs, exp_avg_sqs, m_scales, v_scales = _coded_group([(300, 64)])
    m_scale = m_scales[0]
    assert m_scale.shape == (300, 1)
    m_scale = {
        "transposed scales": m_scale.reshape(1, 300),
        "scales of one block too few": m_scale[:299],
        "float64 scales": m_scale.double(),
        "no scales": torch.empty(0),
    }[change]
    before = [t.clone() for t in (params[0], exp_avgs[0], exp_avg_sqs[0], m_scale, v_scales[0])]
    lists = [params, [torch.randn(300, 64)], exp_avgs, exp_avg_sqs, [torch.tensor(0.0)]]
    with pytest.raises(ValueError, match=r"exp_avg_scales\[0\]|exp_avg_scales\[0\] must"):
        _op(lists, ([m_scale], v_scales, [0]))
    after = (params[0], exp_avgs[0], exp_avg_sqs[0], m_scale, v_scales[0])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def _stepped_like_the_torch_implementation(make_group):
    """One step of make_group()'s five role lists on the kernel, which must take them,
    against the same step of another make_group() on the torch implementation: the same
    bits."""
    lists, theirs = make_group(), make_group()
    _op(lists)
    torch_step.fused_step_(*theirs, [], [], [], **_OP_OPTIONS)
    for ours, other in zip(lists, theirs, strict=True):
        for a, b in zip(ours, other, strict=True):
            assert _same_bits(a, b)
    return lists


def test_the_kernel_takes_the_usual_group_and_steps_it_like_the_torch_implementation():
    lists = _stepped_like_the_torch_implementation(_role_lists)
    assert [s.item() for s in lists[4]] == [4.0] * 3


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernel_takes_channels_last_tensors_as_they_are(state_dtype):
    """The kernel walks memory, so a channels_last weight whose gradient and state share its
    layout (as AccumulateGrad and zeros_like make them) is elementwise the same as a
    contiguous one; it steps such groups itself (bfloat16 noise following memory order, as
    the torch implementation's) and leaves them channels_last."""

    def group():
        gen = torch.Generator().manual_seed(7)
        lists = []
        for role in range(4):
            conv = torch.randn(8, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
            vector = torch.randn(9, generator=gen)
            pair = [conv.abs(), vector.abs()] if role == 3 else [conv, vector]
            lists.append([t.to(state_dtype) for t in pair] if role >= 2 else pair)
        return [*lists, [torch.tensor(3.0), torch.tensor(3.0)]]

    assert not group()[0][0].is_contiguous()
    lists = _stepped_like_the_torch_implementation(group)
    assert lists[0][0].is_contiguous(memory_format=torch.channels_last)


def test_the_kernel_lets_other_python_threads_run_while_it_updates():
    """The operator runs without the GIL, as every torch op called from Python: a thread that
    wakes every 0.2 ms wakes while the kernel runs (many milliseconds over 16 M elements). The
    first 2 ms and the last 1 ms are left out: around the call the interpreter hands the
    waiting thread the GIL for up to a switch interval (0.5 ms here)."""
    n = 1 << 24
    lists = [[torch.randn(n)], [torch.randn(n)], [torch.zeros(n)], [torch.zeros(n)]]
    lists.append([torch.tensor(0.0)])
    _op(lists)
    wakes, stop = [], threading.Event()

    def waker():
        while not stop.is_set():
            time.sleep(0.0002)
            wakes.append(time.perf_counter())

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=waker)
    thread.start()
    try:
        inside = 0
        for _ in range(5):
            time.sleep(0.005)
            start = time.perf_counter()
            _op(lists)
            end = time.perf_counter()
            inside += sum(start + 0.002 < t < end - 0.001 for t in wakes)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch_interval)
    assert inside > 0
    assert lists[4][0].item() == 6.0


def test_the_kernel_writes_a_copy_on_write_tensor_without_touching_its_twin():
    """A lazily cloned tensor shares its storage until written: the kernel materialises its
    own copy first, as an in-place op does, and the tensor it was cloned from keeps its
    values."""
    lists = _role_lists()
    original = lists[0][1]
    before = original.clone()
    lists[0][1] = torch._lazy_clone(original)
    _op(lists)
    assert torch.equal(original, before)
    assert not torch.equal(lists[0][1], before)


def test_the_operator_is_declared_through_torch_library_with_a_cpu_kernel():
    """The step is ``torch.ops.ano.fused_step_``: its schema declares what it mutates, a
    fake implementation serves torch.compile, and the C++ kernel is registered for the CPU
    (loaded here: this machine has a compiler), with the torch implementation for every other
    device."""
    assert native.load().loaded
    schema = str(torch.ops.ano.fused_step_.default._schema)
    assert schema.startswith("ano::fused_step_(Tensor(a!)[] params, Tensor[] grads,")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("ano::fused_step_", "CPU")
    assert has("ano::fused_step_", "CompositeExplicitAutograd")
    assert has("ano::fused_step_.tensor_lr", "CPU")


def _opcheck_cases():
    gen = torch.Generator().manual_seed(2)

    def floats(dtype):
        shapes = [(7,), (33, 5)]
        params = [torch.randn(s, generator=gen) for s in shapes]
        return (
            params, [torch.randn(s, generator=gen) for s in shapes],
            [torch.zeros(s, dtype=dtype) for s in shapes],
            [torch.zeros(s, dtype=dtype) for s in shapes],
            [torch.tensor(0.0) for _ in shapes], [], [], [],
        )  # fmt: skip

    params, exp_avgs, exp_avg_sqs, m_scales, v_scales = _coded_group([(40, 300), (9,)])
    empty = torch.empty(0)
    coded = (
        params, [torch.randn_like(p) for p in params], exp_avgs, exp_avg_sqs,
        [torch.tensor(0.0) for _ in params], [m if m is not None else empty for m in m_scales],
        [v if v is not None else empty.clone() for v in v_scales], [0, 0],
    )  # fmt: skip
    return {"float32": floats(torch.float32), "bfloat16": floats(torch.bfloat16), "8bit": coded}


def _group_options(*groups: dict) -> dict:
    """``fused_step_.groups``'s option lists: one entry per group, each group's options over
    :data:`_OP_OPTIONS`."""
    return {name: [{**_OP_OPTIONS, **g}[name] for g in groups] for name in _OP_OPTIONS}


@pytest.mark.parametrize("state", ["float32", "bfloat16", "8bit"])
@pytest.mark.parametrize("overload", ["default", "tensor_lr", "groups"])
def test_opcheck(state, overload):
    """torch.library.opcheck: the schema matches what the operator mutates, the fake
    implementation matches the real one's metadata, and it runs under functionalization
    (AOTAutograd), as torch.compile calls it."""
    args = _opcheck_cases()[state]
    options = {**_OP_OPTIONS, "grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)}
    if overload == "tensor_lr":
        options["lr"] = torch.tensor(options["lr"])
    if overload == "groups":
        amp = {"grad_scale": options["grad_scale"], "found_inf": options["found_inf"]}
        groups = _group_options({}, {"lr": 3e-3, "weight_decay": 0.0, "maximize": True})
        options = {"group_sizes": [1, 1], **groups, **amp}
    op = getattr(torch.ops.ano.fused_step_, overload)
    tests = None
    if not functionalizes_mutable_lists():
        # torch 2.4 cannot functionalize an operator that mutates tensor lists: compiled steps
        # trace the torch implementation there instead (fused/__init__.py), and opcheck's
        # AOTAutograd test does not apply.
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, options, **({"test_utils": tests} if tests else {}))


def _split_groups(params, lr=float):
    """A decay / no-decay split, as Hugging Face's Trainer and timm make, with other options in
    the second group too; ``lr=torch.tensor``: tensor learning rates."""
    return [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05, "lr": lr(1e-2)},
        {
            "params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0, "lr": lr(3e-3),
            "betas": (0.8, 0.95), "eps": 1e-6, "maximize": True,
        },
    ]  # fmt: skip


class _OpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """The operators a region calls, by name (torch's profiler marks and the first step's
    state creation included)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@_EACH_STATE_DTYPE
@pytest.mark.parametrize(
    "amp, lr",
    [(False, float), (True, float), (False, torch.tensor)],
    ids=["plain", "grad-scaler", "tensor-lr"],
)
def test_several_groups_step_in_one_kernel_call_as_each_group_alone(state_dtype, amp, lr):
    """Fused CPU groups are stepped by one call of ``ano::fused_step_.groups`` (one check pass,
    one parallel pass), each tensor with its own group's options (a tensor learning rate read
    as ``fused_step_.tensor_lr`` reads it): the same bits as each group stepped by an optimizer
    of its own."""
    shapes = [(64, 300), (300,), (33, 7), (5,), (70, 300), (1,)]
    gen = torch.Generator().manual_seed(4)
    start = [torch.randn(s, generator=gen) for s in shapes]
    together = [torch.nn.Parameter(p.clone()) for p in start]
    alone = [torch.nn.Parameter(p.clone()) for p in start]
    one = Ano(_split_groups(together, lr), fused=True, state_dtype=state_dtype)
    each = [Ano([g], fused=True, state_dtype=state_dtype) for g in _split_groups(alone, lr)]
    for k in range(5):
        grads = [torch.randn(s, generator=gen) * 10.0 ** (k - 2) for s in shapes]
        for p, q, g in zip(together, alone, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if amp:
            for optimizer in (one, *each):
                optimizer.grad_scale = torch.tensor(4.0)
                optimizer.found_inf = torch.tensor(float(k == 2))
        with _OpCalls() as calls:
            one.step()
        assert [name for name in calls.names if name.startswith("ano.")] == [
            "ano.fused_step_.groups"
        ]
        for optimizer in each:
            optimizer.step()
    for p, q in zip(together, alone, strict=True):
        assert _same_bits(p.detach(), q.detach())
        kept = next(o for o in each if q in o.state).state[q]
        assert one.state[p].keys() == kept.keys()
        for key, value in one.state[p].items():
            assert _same_bits(value, kept[key]), key
    assert one.state[together[0]]["step"].item() == (4.0 if amp else 5.0)
    if state_dtype == torch.uint8:
        assert one.state[together[0]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("state", ["float32", "bfloat16", "8bit"])
def test_the_groups_call_and_its_torch_implementation_write_the_same_bits(state):
    """``fused_step_.groups`` on its C++ kernel and on its torch implementation: the same bits,
    each group with its own options (weight decay, learning rate, maximize, Anolog)."""
    results = []
    for run in ("kernel", "torch"):
        torch.manual_seed(0)  # the same values on each run
        args = _opcheck_cases()[state]
        groups = _group_options({}, {"lr": 3e-3, "weight_decay": 0.0, "maximize": True,
                                     "logarithmic_schedule": True})  # fmt: skip
        options = {"group_sizes": [1, 1], **groups, "grad_scale": torch.tensor(2.0)}
        for _ in range(3):
            if run == "kernel":
                torch.ops.ano.fused_step_.groups(*args, **options)
            else:
                torch_step.fused_step_groups_(*args, **options)
        results.append(args)
    kernel, torch_impl = results
    for a_list, b_list in zip(kernel[:7], torch_impl[:7], strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            assert _same_bits(a, b)
    assert [s.item() for s in kernel[4]] == [3.0, 3.0]


@pytest.mark.parametrize("run", ["kernel", "torch"])
@pytest.mark.parametrize(
    ("sizes", "options", "message"),
    [
        ([1, 2], {}, r"group_sizes \[1, 2\] must be >= 0 and add up to the 2 tensors"),
        ([3, -1], {}, r"group_sizes \[3, -1\] must be >= 0 and add up to the 2 tensors"),
        ([1, 1], {"lr": [1e-2]}, "every option list needs one entry per group"),
    ],
    ids=["too-many", "negative", "short-option-list"],
)
def test_the_groups_call_refuses_groups_that_do_not_fit_the_lists(run, sizes, options, message):
    args = _opcheck_cases()["float32"]
    before = [[t.clone() for t in tensors] for tensors in args[:5]]
    call = torch.ops.ano.fused_step_.groups if run == "kernel" else torch_step.fused_step_groups_
    with pytest.raises(ValueError, match=message):
        call(*args, group_sizes=sizes, **{**_group_options({}, {}), **options})
    for tensors, kept in zip(args[:5], before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(tensors, kept, strict=True))


@pytest.mark.parametrize(
    "overload, name",
    [
        *((overload, name) for overload in ("default", "tensor_lr", "groups")
          for name in ("grad_scale", "found_inf")),
        ("tensor_lr", "lr"),
    ],
)  # fmt: skip
def test_a_meta_scalar_beside_tensors_with_values_is_refused(overload, name):
    """A meta tensor among the operator's scalars makes torch's dispatcher run the meta
    implementation, which changes nothing: it refuses the call instead of returning as if it
    had stepped."""
    args = _opcheck_cases()["float32"]
    before = [[t.clone() for t in tensors] for tensors in args[:5]]
    options = {**_OP_OPTIONS, "grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)}
    if overload == "tensor_lr":
        options["lr"] = torch.tensor(options["lr"])
    options[name] = torch.tensor(0.0 if name == "found_inf" else 1e-2, device="meta")
    if overload == "groups":
        amp = {"grad_scale": options["grad_scale"], "found_inf": options["found_inf"]}
        options = {"group_sizes": [1, 1], **_group_options({}, {}), **amp}
    with pytest.raises(ValueError, match=f"{name} is a meta tensor beside tensors on cpu"):
        getattr(torch.ops.ano.fused_step_, overload)(*args, **options)
    for tensors, kept in zip(args[:5], before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(tensors, kept, strict=True))


@pytest.mark.parametrize("name", ["grad_scale", "found_inf", "lr"])
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "groups"])
def test_the_kernel_route_leaves_a_step_with_a_scalar_off_the_cpu_to_the_careful_one(
    cpu_kernel, name, groups
):
    """A scalar tensor on another device sends the operator call to that device's (torch)
    implementation, whose errors once it has changed tensors are not refusals: the kernel
    route declines such a step before calling any operator, and the careful route, which
    tells errors apart, takes it."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen) for s in [(8, 4), (5,)]]
    lists = FusedLists(
        params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params],
    )  # fmt: skip
    before = [[t.clone() for t in tensors] for tensors in lists.arguments()[:5]]
    options = {**_OP_OPTIONS, "grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)}
    options[name] = torch.tensor(0.0 if name == "found_inf" else 1e-2, device="meta")
    with _OpCalls() as calls:
        if groups:
            scalars = {k: options.pop(k) for k in ("grad_scale", "found_inf")}
            stepped = kernel_step_groups(lists, [1, 1], [options, options], **scalars)
        else:
            stepped = kernel_step(lists, options)
    assert not stepped
    assert not [n for n in calls.names if n.startswith("ano.")]
    for tensors, kept in zip(lists.arguments()[:5], before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(tensors, kept, strict=True))


def test_a_parameter_resized_after_its_state_was_created_is_refused_before_any_change(
    cpu_kernel,
):
    """A group kernel takes every length from the parameter, so a parameter grown
    through ``.data`` would have it write past its old state (this crashed the process)."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (6, 10, 4)]
    optimizer = Ano(params, lr=1e-2, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    params[1].data = torch.randn(1 << 16)
    params[1].grad = torch.randn(1 << 16)
    before = [t.clone() for t in _every_tensor(optimizer)]
    with pytest.raises(
        RuntimeError,
        match=r"parameter 1 of parameter group 0 \(shape \(65536,\)\): state\['exp_avg'\] has "
        r"shape \(10,\), but the parameter has shape \(65536,\); was the parameter resized",
    ) as raised:
        optimizer.step()
    after = _every_tensor(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # Refused before the update: no note that tensors may have changed (on Python 3.10 such a
    # note replaces the error).
    assert not getattr(raised.value, "__notes__", None)


def test_a_step_count_of_other_than_one_number_is_refused():
    p, g, m, v = torch.randn(4), torch.randn(4), torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"tensor 0: state\['step'\] must be .* one element"):
        ano([p], [g], [m], [v], [torch.zeros(0)], fused=True, **HYPER)


class _WrapperTensor(torch.Tensor):
    """A wrapper tensor subclass with no storage of its own, as torchao's float8 weights are:
    every op runs on the inner tensor."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, device=inner.device
        )

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.inner if isinstance(t, _WrapperTensor) else t

        def wrap(t):
            plain = isinstance(t, torch.Tensor) and not isinstance(t, _WrapperTensor)
            return _WrapperTensor(t) if plain else t

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def test_a_wrapper_subclass_parameter_steps_like_the_single_tensor_path(cpu_kernel):
    """A tensor without storage of its own took the group kernel to a null address and
    crashed the process; it now runs the same math eagerly, beside plain parameters."""
    torch.manual_seed(0)
    values = [torch.randn(8), torch.randn(5)]
    grads = [[torch.randn(8), torch.randn(5)] for _ in range(3)]
    results = {}
    for fused_flag in (False, True):
        params = [
            torch.nn.Parameter(_WrapperTensor(values[0].clone())),
            torch.nn.Parameter(values[1].clone()),
        ]
        optimizer = Ano(params, lr=1e-2, weight_decay=0.1, fused=fused_flag)
        for step_grads in grads:
            params[0].grad = _WrapperTensor(step_grads[0].clone())
            params[1].grad = step_grads[1].clone()
            optimizer.step()
        results[fused_flag] = [params[0].inner, params[1].detach()]
    for fused_value, single_value in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(fused_value, single_value, rtol=1e-6, atol=1e-7)


def _every_tensor(optimizer) -> list[torch.Tensor]:
    return [
        t
        for group in optimizer.param_groups
        for p in group["params"]
        for t in (p, *optimizer.state[p].values())
    ]


_BUILD_SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    import torch
    from ano_optimizer.optimizer import ano
    from ano_optimizer.fused import native
    p, g = torch.randn(10), torch.randn(10)
    m, v, k = torch.zeros(10), torch.zeros(10), torch.tensor(0.0)
    ano([p], [g], [m], [v], [k], fused=True, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.0, logarithmic_schedule=False, maximize=False)
    assert k.item() == 1.0
    print("loaded", native.status().loaded)
    """
)

# A library as small as can be, built and cached the way the kernel is (native.load_library):
# the kernel's own build takes tens of seconds, this one a few.
_LIBRARY_SCRIPT = textwrap.dedent(
    """
    import torch
    from ano_optimizer.fused import native
    source = 'extern "C" int ano_test_library() { return 1; }\\n'
    print(native.load_library("ano_test_library", source, "a test library"))
    """
)


def _build_run(cache, script=_BUILD_SCRIPT, **env):
    run = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return run


@pytest.mark.slow
def test_a_library_is_built_once_saying_so_and_loaded_by_later_processes(tmp_path):
    """With an empty cache the first process builds (one line on stderr says so); a second
    process loads that build without building, and without a line. (The kernel's own first
    build is timed by benchmarks/fused_step.py.)"""
    first = _build_run(tmp_path, _LIBRARY_SCRIPT)
    building = [line for line in first.stderr.splitlines() if "building a test library" in line]
    assert len(building) == 1, first.stderr
    libraries = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.so")}
    assert len(libraries) == 1 and str(next(iter(libraries))) in first.stdout
    second = _build_run(tmp_path, _LIBRARY_SCRIPT)
    assert "building" not in second.stderr
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.so")} == libraries


@pytest.mark.slow
def test_without_a_compiler_a_warning_names_the_torch_implementation(tmp_path):
    """No C++ compiler (CXX names none): one warning says why and which path runs instead, and
    the step runs on it."""
    run = _build_run(tmp_path, CXX="/nonexistent/c++")
    assert "loaded False" in run.stdout
    assert run.stderr.count("the C++ CPU kernel could not be built") == 1, run.stderr
    assert "ano_optimizer.fused.torch_step" in run.stderr


def _cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` among this CPU's flags (False where it has none)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and flag in cpuinfo.read_text().split()


@pytest.mark.skipif(not _cpu_has("avx2"), reason="an x86 CPU with AVX2")
def test_the_reported_instruction_set_leaves_out_what_the_build_flags_turn_off(monkeypatch):
    """``ANO_OPTIMIZER_KERNEL_CFLAGS=-mno-avx512f`` builds what an AVX2 machine runs; the
    benchmarks' header must then not say AVX-512."""
    monkeypatch.setenv(native.EXTRA_CFLAGS_ENV, "")
    assert native.cpu_vector_isa().startswith(("AVX-512", "AVX2"))
    monkeypatch.setenv(native.EXTRA_CFLAGS_ENV, "-mno-avx512f")
    assert native.cpu_vector_isa().startswith("AVX2")
    monkeypatch.setenv(native.EXTRA_CFLAGS_ENV, "-mno-avx512f -mno-avx2")
    assert native.cpu_vector_isa() == "SSE (no AVX2)"


@pytest.mark.slow
def test_the_kernel_source_compiles_for_arm64(tmp_path):
    """ARM (Graviton, Apple silicon under Linux) at least compiles: the kernel built with
    Debian's aarch64 cross compiler (installed by scripts/test.sh) and the build's own flags,
    against this torch's headers."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    assert compiler, "install g++-aarch64-linux-gnu (scripts/test.sh does)"
    from torch.utils.cpp_extension import include_paths

    source = tmp_path / "kernel.cpp"
    source.write_text(native.kernel_source())
    # The build's flags for another machine (not $ANO_OPTIMIZER_KERNEL_CFLAGS, which are for
    # this one), unoptimized: what is checked is that it compiles.
    flags = [f for f in native.BUILD_FLAGS if f not in ("-march=native", "-O3")]
    run = subprocess.run(
        [compiler, "-std=c++20", "-fPIC", *flags, "-march=armv8-a",
         *(f"-I{p}" for p in include_paths()), "-c", str(source), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    header = (tmp_path / "k.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_every_path_treats_zero_and_non_finite_values_alike(state_dtype):
    """Exact zeros, signed zeros, infinities and NaNs in gradients and moments, as after an
    overflow without GradScaler: the kernel and the torch implementation give the same bits
    (NaN for NaN), and the single-tensor path NaN in the same places and the same finite
    values. sign(0) and
    sign(NaN) are 0 as in torch.sign, so a NaN gradient makes the parameter NaN on every path
    rather than leaving it alone on one of them."""
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, 1e-45])
    gen = torch.Generator().manual_seed(3)
    n = 16384 + 300

    def special(size):
        x = torch.randn(size, generator=gen)
        pick = torch.rand(size, generator=gen) < 0.15
        x[pick] = specials[torch.randint(len(specials), (int(pick.sum()),), generator=gen)]
        return x

    grads = [special(n) for _ in range(4)]
    start_m, start_v = special(n), special(n).abs()
    start_v[::9] = grads[0][::9] ** 2  # g^2 == v exactly: sign(g^2 - v) = 0
    runs = {}
    for path in ("kernel", "torch", "single_tensor"):
        param = torch.randn(n, generator=torch.Generator().manual_seed(4))
        exp_avg, exp_avg_sq = (
            t.to(state_dtype or torch.float32, copy=True) for t in (start_m, start_v)
        )
        step = torch.tensor(0.0)
        for grad in grads:
            with implementation("torch" if path == "torch" else "kernel"):
                ano(
                    [param], [grad], [exp_avg], [exp_avg_sq], [step],
                    fused=path != "single_tensor", foreach=False, **HYPER,
                )  # fmt: skip
        runs[path] = (param, exp_avg.float(), exp_avg_sq.float())
    assert runs["kernel"][0].isnan().any() and runs["kernel"][0].isfinite().any()
    for ours, theirs in zip(runs["kernel"], runs["torch"], strict=True):
        assert _same_bits(ours, theirs)
    for path in ("torch", "single_tensor"):
        for ours, theirs in zip(runs["kernel"], runs[path], strict=True):
            assert torch.equal(ours.isnan(), theirs.isnan()), path
            if state_dtype is not None and path == "single_tensor":
                # Eager bf16 state draws its own rounding noise: after four steps the moments
                # are a few bf16 ulps of their O(1) inputs apart, which is large next to a
                # momentum that has cancelled to near 0.
                torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=2.0**-5, atol=2.0**-5)
            else:
                torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_8bit_blocks_of_huge_zero_and_non_finite_values_write_the_same_bits():
    """8-bit state through whole and partial blocks whose scales are zero, huge (at least 2**32,
    where a code is decoded with two multiplies, and above 2**30, where it is encoded with two)
    or not finite (a moment that overflowed): the kernel and the torch implementation give the
    same codes, scales and parameters, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30])
    shapes = [(6, 1024 + 40), (16, 300)]
    row_factors = torch.tensor([1.0, 0.0, 1e15, 1e-20, 1e21, 1.0])
    grads = []
    for step in range(4):
        step_grads = []
        for shape in shapes:
            g = torch.randn(shape, generator=gen) * row_factors.repeat(3)[: shape[0], None]
            if step == 2:  # one step with scattered zeros and non-finite values
                pick = torch.rand(shape, generator=gen) < 0.01
                g[pick] = specials[torch.randint(len(specials), (int(pick.sum()),), generator=gen)]
            step_grads.append(g)
        grads.append(step_grads)
    runs = []
    for choice in ("kernel", "torch"):
        torch.manual_seed(1)  # the same parameters for both
        params, exp_avgs, exp_avg_sqs, m_scales, v_scales = _coded_group(shapes, torch.float32)
        assert all(m.dtype == torch.uint8 for m in exp_avgs)
        steps = [torch.tensor(0.0) for _ in shapes]
        for step_grads in grads:
            with implementation(choice):
                ano(params, step_grads, exp_avgs, exp_avg_sqs, steps, fused=True,
                    exp_avg_scales=m_scales, exp_avg_sq_scales=v_scales, **HYPER)  # fmt: skip
        runs.append([*params, *exp_avgs, *exp_avg_sqs, *m_scales, *v_scales])
    scales = torch.cat([s.flatten() for s in runs[0][-4:]])
    assert (scales >= 2.0**32).any() and (scales == 0).any() and (~scales.isfinite()).any()
    for ours, theirs in zip(*runs, strict=True):
        assert _same_bits(ours, theirs)


@pytest.mark.slow
@pytest.mark.skipif(
    not _cpu_has("avx512f"),
    reason="an x86 CPU with AVX-512 (an AVX2 machine's own build runs the tests above)",
)
def test_the_avx2_build_writes_the_same_bits():
    """What an AVX2 machine builds (``-mno-avx512f``: whole 8-bit blocks in AVX2 intrinsics,
    kernel.cpp) against the torch implementation: this file's and test_blockwise8.py's
    bit-for-bit comparisons, in a process that builds and loads that kernel."""
    env = {**os.environ, native.EXTRA_CFLAGS_ENV: "-mno-avx512f"}
    tests = Path(__file__).parent
    isa = "from ano_optimizer.fused import native; print(native.cpu_vector_isa())"
    built_for = subprocess.run(
        [sys.executable, "-c", isa], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert built_for.startswith("AVX2"), built_for
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(tests / "test_fused.py"), str(tests / "test_blockwise8.py"),
         "-k", "(same_bits or fold_limit) and not avx2_build"],
        env=env, cwd=tests.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 12, run.stdout[-2000:]
