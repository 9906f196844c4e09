"""The fused path against the single-tensor path and the float64 oracle, its two CPU kernels
against each other, recompilation counts, GradScaler, torch.compile of a whole step, and the
cross-process caches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from reference import ano_reference
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_map

from ano_optimizer import Ano, Anolog, _torch_internals
from ano_optimizer.fused import cpu
from ano_optimizer.optimizer import ano
from benchmarks.kernels import cpu_kernel as kernel_choice

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


@pytest.fixture(params=["group", "per_tensor"])
def cpu_kernel(request):
    """Run a test with each CPU kernel: cpu_kernel.cpp over all tensors, or the torch.compile
    kernel per tensor (which GPUs and the other dtypes use)."""
    with kernel_choice(request.param):
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


@pytest.fixture
def per_tensor_kernel():
    with kernel_choice("per_tensor"):  # the torch.compile'd kernel
        yield


@pytest.mark.usefixtures("per_tensor_kernel")
def test_no_recompilation_for_new_shapes_lr_or_step():
    params, grads = _tensors(torch.float32)
    _run(params, grads, fused=True, steps=2, **HYPER)  # warm: the main and the 1-element graph
    graphs = counters["stats"]["unique_graphs"]
    frames = dict(counters["frames"])
    other_shapes = [(17,), (2, 2, 2, 2), (1000,), (1,), (6, 1)]
    params2, grads2 = _tensors(torch.float32, seed=3, shapes=other_shapes)
    for k, lr in enumerate([1e-3, 2e-3, torch.tensor(5e-4)]):
        hyper = {**HYPER, "lr": lr, "weight_decay": 0.01 * k, "beta2": 0.95 + 0.01 * k}
        _run(params2, grads2, fused=True, steps=3, **hyper)
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["frames"]) == frames


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


def test_compiled_training_step_matches_eager_fused():
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


_CACHE_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch._dynamo.utils import counters
    from benchmarks.kernels import cpu_kernel
    from ano_optimizer.optimizer import ano
    p, g = torch.randn(10), torch.randn(10)
    m, v, k = torch.zeros(10), torch.zeros(10), torch.tensor(0.0)
    with cpu_kernel("per_tensor"):
        ano([p], [g], [m], [v], [k], fused=True, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
            weight_decay=0.0, logarithmic_schedule=False, maximize=False)
    print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
    """
)


def test_inductor_cache_is_reused_by_a_second_process():
    """Inductor's FX graph cache (on disk, on by default) serves the kernel to a new process:
    after one process has compiled it, the next one compiles nothing."""

    def run():
        out = subprocess.run(
            [sys.executable, "-c", _CACHE_SCRIPT],
            env=dict(os.environ),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return [int(n) for n in out.stdout.split()[-2:]]

    exec(_CACHE_SCRIPT, {})  # this process compiles the kernel (or finds it cached)
    hits, misses = run()
    assert (hits, misses) == (1, 0)


def _kernel_runs(shapes, state_dtype, complex_params=False, **options):
    """The same steps with each CPU kernel: (group-kernel results, per-tensor results), each a
    list of params, exp_avgs, exp_avg_sqs and steps."""
    results = []
    for kernel in ("group", "per_tensor"):
        torch.manual_seed(1)
        dtype = torch.complex64 if complex_params else torch.float32
        params = [torch.randn(s, dtype=dtype) for s in shapes]
        exp_avgs = [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
        exp_avg_sqs = [torch.zeros_like(p, dtype=state_dtype or p.dtype) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        for k in range(6):
            grads = [torch.randn(s, dtype=dtype) for s in shapes]
            amp = {}
            if options.get("amp"):
                amp = {"grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(float(k == 3))}
            hyper = {**HYPER, **{k: v for k, v in options.items() if k != "amp"}}
            with kernel_choice(kernel):
                ano(params, grads, exp_avgs, exp_avg_sqs, steps, fused=True, **hyper, **amp)
        results.append((params, exp_avgs, exp_avg_sqs, steps))
    return results


_EACH_STATE_DTYPE = pytest.mark.parametrize(
    "state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"]
)
# Each of the group kernel's template flags (maximize, a gradient scale, a decay) both ways.
_EACH_KERNEL_FLAG = pytest.mark.parametrize(
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
@_EACH_KERNEL_FLAG
def test_cpu_group_kernel_matches_the_compiled_one(state_dtype, options):
    """cpu_kernel.cpp repeats _ano_math's float32 element operations in the same order, without
    fused multiply-adds, with the same stochastic-rounding noise. Only its per-tensor scalars
    (sqrt(1 - beta2^k), Anolog's 1/ln(k+2)) come from libm instead of torch's foreach kernels
    and may differ in the last bit. So: exp_avg_sq (which uses no scalar) and, for Ano, exp_avg
    are the same bits, and parameters agree to float32 rounding. Sizes straddle the kernel's
    16384-element blocks; one tensor has a single element."""
    shapes = [(5,), (33, 7), (1,), (300,), (3, 16384 + 5), (16384,)]
    (params, avgs, avg_sqs, steps), (params2, avgs2, avg_sqs2, steps2) = _kernel_runs(
        shapes, state_dtype, **options
    )
    assert (
        [s.item() for s in steps]
        == [s.item() for s in steps2]
        == [5.0 if options.get("amp") else 6.0] * len(shapes)
    )
    for a, b in zip(avg_sqs, avg_sqs2, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(avgs, avgs2, strict=True):
        if options.get("logarithmic_schedule"):
            # An ulp apart in float32 math; stored in bfloat16, that can round to neighbours.
            rtol = 1e-5 if state_dtype is None else 2.0**-7
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=1e-6)
        else:
            assert torch.equal(a, b)
    for a, b in zip(params, params2, strict=True):
        # Anolog's momentum may differ by an ulp and flip sign(m) where it is ~0: a few coords.
        differ = ~torch.isclose(a, b, rtol=1e-6, atol=1e-7)
        assert int(differ.sum()) <= (0.01 * a.numel() if options.get("logarithmic_schedule") else 0)


@_EACH_STATE_DTYPE
@_EACH_KERNEL_FLAG
def test_the_kernels_avx512_loop_gives_the_portable_loops_bits(state_dtype, options):
    """The kernel's element loop exists as AVX-512 intrinsics (used where the build has them, as
    here) and as portable C++; every tensor comes out the same, bit for bit, with each template
    flag both ways and lengths that leave a tail of fewer than 16 elements."""
    shapes = [(5,), (33, 7), (1,), (300,), (3, 16384 + 5), (16384,), (17,)]
    ours, _ = _kernel_runs(shapes, state_dtype, **options)
    with kernel_choice("portable"):
        portable, _ = _kernel_runs(shapes, state_dtype, **options)
    for a_list, b_list in zip(ours, portable, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            assert torch.equal(
                a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32),
            )


def test_cpu_group_kernel_handles_complex_and_leaves_the_rest_to_the_compiled_one():
    complex_runs = _kernel_runs([(7,), (4, 5)], None, complex_params=True)
    for ours, compiled in zip(*complex_runs, strict=True):  # params, moments, steps
        for a, b in zip(ours, compiled, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # A non-contiguous parameter and a float64 one go to the per-tensor kernel, in one call.
    params = [torch.randn(6, 4).t(), torch.randn(9), torch.randn(5, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(0.0) for _ in params]
    before = [p.clone() for p in params]
    ano(params, grads, *states, steps, fused=True, **HYPER)
    for p, b, g in zip(params, before, grads, strict=True):
        # First step: m = (1 - b1) g, v = (1 - b2) g^2 and the update is -lr * sign(g) (+ decay).
        expected = b * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * torch.sign(g)
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    assert [s.item() for s in steps] == [1.0, 1.0, 1.0]


def test_cpu_group_kernel_bumps_autograd_versions():
    """It writes through raw pointers; autograd must still see the in-place change."""
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    optimizer = Ano([p], lr=1e-2, fused=True)
    optimizer.step()
    versions = (p._version, *(optimizer.state[p][k]._version for k in ("exp_avg", "exp_avg_sq")))
    optimizer.step()
    after = (p._version, *(optimizer.state[p][k]._version for k in ("exp_avg", "exp_avg_sq")))
    assert all(a > b for a, b in zip(after, versions, strict=True))


# The group kernel's scalars (lr, 1 - beta1, beta2, eps, weight decay, 1 / grad scale,
# skip) for HYPER with these changes, which the compiled kernel gets as keywords.
_KERNEL_SCALARS = (1e-2, 0.1, 0.99, 1e-8, 0.1, 1.0, 0)
_KERNEL_HYPER = {**HYPER, "beta2": 0.99, "weight_decay": 0.1}


def _role_lists(n=3, size=6):
    """A usual group for the group kernel: params, grads, exp_avgs, exp_avg_sqs, steps."""
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


class _PlainSubclass(torch.Tensor):
    pass


# One tensor the kernel must not take as it is: (role index, replacement of tensor 1).
_REFUSED = {
    "float64 parameter": (0, lambda t: t.double()),
    "bfloat16 gradient": (1, lambda t: t.bfloat16()),
    "bfloat16 exp_avg_sq under the float32 kernel": (3, lambda t: t.bfloat16()),
    "float64 step": (4, lambda t: t.double()),
    "gradient with gaps between its elements": (1, lambda t: torch.stack([t, t], 1)[:, 0]),
    "gradient whose elements overlap": (1, lambda t: t[:1].expand(t.numel())),
    "exp_avg laid out unlike its parameter": (2, lambda t: t.reshape(3, 2).t()),
    "meta-device exp_avg": (2, lambda t: t.to("meta")),
    "sparse gradient": (1, lambda t: t.to_sparse()),
    "negative view as gradient": (1, lambda t: torch._neg_view(t)),
    "subclass parameter": (0, lambda t: t.as_subclass(_PlainSubclass)),
    "wrapper-subclass gradient": (1, lambda t: _WrapperTensor(t)),
    "inference-mode parameter": (0, _inference_tensor),
    "exp_avg of another length": (2, lambda t: torch.cat([t, t])),
    "step of two numbers": (4, lambda t: torch.stack([t, t])),
    "step of no number": (4, lambda t: t.reshape(1)[:0]),
}


@pytest.mark.parametrize("case", _REFUSED, ids=list(_REFUSED))
def test_cpu_group_kernel_refuses_a_tensor_it_cannot_take_before_any_change(case):
    """cpu_kernel.cpp checks every tensor itself, then changes nothing where one fails, and
    the Python dispatch takes the checks and other paths. One odd tensor among usual ones."""
    role, replace = _REFUSED[case]
    lists = _role_lists()
    lists[role][1] = replace(lists[role][1])
    tensors = [t for role_list in lists for t in role_list]
    kept = [t for t in tensors if t.device.type != "meta"]
    values = [_dense(t).clone() for t in kept]
    versions = [t._version for t in tensors if not t.is_inference()]
    taken = cpu._cpu_group_call(torch.float32, lists, _KERNEL_SCALARS, 0, False, False)
    assert taken is False
    assert all(torch.equal(_dense(a), b) for a, b in zip(kept, values, strict=True))
    assert [t._version for t in tensors if not t.is_inference()] == versions


def _dense(t):
    return t.to_dense() if t.is_sparse else t


def _stepped_like_the_compiled_kernel(make_group):
    """One step of make_group()'s five role lists on the group kernel, which must take
    them, checked against the same step of another make_group() on the compiled kernel."""
    lists, compiled = make_group(), make_group()
    assert cpu._cpu_group_call(torch.float32, lists, _KERNEL_SCALARS, 0, False, False) is True
    with kernel_choice("per_tensor"):
        ano(*compiled, fused=True, **_KERNEL_HYPER)
    for ours, theirs in zip(lists, compiled, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return lists


def test_cpu_group_kernel_takes_the_usual_group_and_steps_it_like_the_compiled_one():
    lists = _stepped_like_the_compiled_kernel(_role_lists)
    assert [s.item() for s in lists[4]] == [4.0] * 3


def test_cpu_group_kernel_takes_channels_last_tensors_and_steps_them_like_the_compiled_one():
    """The kernel walks memory, so a channels_last weight whose gradient and state share its
    layout (as AccumulateGrad and zeros_like make them) is elementwise the same as a
    contiguous one; it steps such groups itself and leaves them channels_last."""

    def group():
        gen = torch.Generator().manual_seed(7)
        lists = []
        for role in range(4):
            conv = torch.randn(8, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
            vector = torch.randn(9, generator=gen)
            # exp_avg_sq (role 3) is never negative.
            lists.append([conv.abs(), vector.abs()] if role == 3 else [conv, vector])
        return [*lists, [torch.tensor(3.0), torch.tensor(3.0)]]

    assert not group()[0][0].is_contiguous()
    lists = _stepped_like_the_compiled_kernel(group)
    assert lists[0][0].is_contiguous(memory_format=torch.channels_last)


def test_cpu_group_kernel_lets_other_python_threads_run_while_it_updates():
    """The update runs without the GIL, as a torch op does: a thread that wakes every 0.2 ms
    wakes while the kernel runs (~9 ms over 16 M elements here). With the GIL held it did not
    wake once in such a call. The first 2 ms and the last 1 ms are left out: around the call
    the interpreter hands the waiting thread the GIL for up to a switch interval (0.5 ms
    here)."""
    n = 1 << 24
    lists = [[torch.randn(n)], [torch.randn(n)], [torch.zeros(n)], [torch.zeros(n)]]
    lists.append([torch.tensor(0.0)])
    assert cpu._cpu_group_call(torch.float32, lists, _KERNEL_SCALARS, 0, False, False)
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
            cpu._cpu_group_call(torch.float32, lists, _KERNEL_SCALARS, 0, False, False)
            end = time.perf_counter()
            inside += sum(start + 0.002 < t < end - 0.001 for t in wakes)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch_interval)
    assert inside > 0
    assert lists[4][0].item() == 6.0


def test_cpu_group_kernel_writes_a_copy_on_write_tensor_without_touching_its_twin():
    """A lazily cloned tensor shares its storage until written: the kernel materialises its
    own copy first, as an in-place op does, and the tensor it was cloned from keeps its
    values."""
    lists = _role_lists()
    original = lists[0][1]
    before = original.clone()
    lists[0][1] = torch._lazy_clone(original)
    assert cpu._cpu_group_call(torch.float32, lists, _KERNEL_SCALARS, 0, False, False)
    assert torch.equal(original, before)
    assert not torch.equal(lists[0][1], before)


def test_the_kernel_reads_tensor_objects_laid_out_as_it_expects():
    """The kernel reads a tensor's TensorImpl from its Python object; _torch_internals.py checks
    that layout against ``Tensor._cdata`` before it is built. This torch has that layout, so the
    group kernel is in use here, not silently replaced by the per-tensor one."""
    assert _torch_internals.tensor_objects_lead_with_their_impl()
    assert cpu._cpu_kernel(torch.float32) is not None


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
    ):
        optimizer.step()
    after = _every_tensor(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


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


_CPU_CACHE_SCRIPT = textwrap.dedent(
    """
    import torch
    from ano_optimizer.optimizer import ano
    p, g = torch.randn(10), torch.randn(10)
    m, v, k = torch.zeros(10), torch.zeros(10), torch.tensor(0.0)
    ano([p], [g], [m], [v], [k], fused=True, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.0, logarithmic_schedule=False, maximize=False)
    assert k.item() == 1.0
    """
)


def test_cpu_group_kernel_is_built_once_and_reused_by_later_processes(tmp_path):
    """The kernel is built into Inductor's cache directory; a second process loads that build
    and writes nothing new there."""

    def run():
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
        out = subprocess.run(
            [sys.executable, "-c", _CPU_CACHE_SCRIPT], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert "could not be built" not in out.stderr
        return {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*.so")}

    first = run()
    assert first, "no kernel library in the cache directory"
    assert run() == first


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_every_path_treats_zero_and_non_finite_values_alike(state_dtype):
    """Exact zeros, signed zeros, infinities and NaNs in gradients and moments, as after an
    overflow without GradScaler: the group kernel, the compiled kernel and the
    single-tensor path give NaN in the same places, and the same finite values. sign(0) and
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
    for path in ("group", "per_tensor", "single_tensor"):
        torch.manual_seed(5)  # the same stochastic-rounding seeds
        param = torch.randn(n, generator=torch.Generator().manual_seed(4))
        exp_avg, exp_avg_sq = (
            t.to(state_dtype or torch.float32, copy=True) for t in (start_m, start_v)
        )
        step = torch.tensor(0.0)
        for grad in grads:
            with kernel_choice("per_tensor" if path == "per_tensor" else "group"):
                ano(
                    [param], [grad], [exp_avg], [exp_avg_sq], [step],
                    fused=path != "single_tensor", foreach=False, **HYPER,
                )  # fmt: skip
        runs[path] = (param, exp_avg.float(), exp_avg_sq.float())
    assert runs["group"][0].isnan().any() and runs["group"][0].isfinite().any()
    for path in ("per_tensor", "single_tensor"):
        for ours, theirs in zip(runs["group"], runs[path], strict=True):
            assert torch.equal(ours.isnan(), theirs.isnan()), path
            if state_dtype is not None and path == "single_tensor":
                # Eager bf16 state draws its own rounding noise: after four steps the moments
                # are a few bf16 ulps of their O(1) inputs apart, which is large next to a
                # momentum that has cancelled to near 0.
                torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=2.0**-5, atol=2.0**-5)
            else:
                torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-5, atol=1e-6)
