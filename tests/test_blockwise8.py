"""8-bit moments (``state_dtype=torch.uint8``): the format's round trips and error bounds, the
eager and fused paths against each other, exact resume, conversions between state kinds, the
checks, and the ``ano8bit`` / ``anolog8bit`` names through timm and Hugging Face."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from ano_optimizer import Ano, Anolog, blockwise8, create_optimizer, rounding
from ano_optimizer import fused as fused_module
from benchmarks.kernels import implementation

U8 = torch.uint8


def heterogeneous(n: int, seed: int = 0, signed: bool = True) -> torch.Tensor:
    """Values spanning ~8 decades, within and across blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    return x if signed else x.abs()


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_round_to_nearest_error_is_half_a_code_spacing(signed):
    x = heterogeneous(40 * 300, signed=signed).view(40, 300)  # rows of 2 blocks: 256 and 44
    codes, scale = blockwise8.quantize(x, None, signed=signed)
    assert codes.dtype == U8 and codes.shape == x.shape
    assert scale.shape == blockwise8.scale_shape(x.shape) == (40, 2)
    back = blockwise8.dequantize(codes, scale, signed=signed)
    per_element = scale.repeat_interleave(256, dim=1)[:, :300]
    normal = x.abs() >= per_element * 2.0**-30  # below: subnormal codes, absolute error
    relative = ((back - x).abs() / x.abs())[normal]
    # 2 (signed) or 3 (unsigned) mantissa bits: half a spacing is 2**-3 or 2**-4.
    assert relative.max() <= (2.0**-3 if signed else 2.0**-4) * (1 + 1e-6)
    assert ((back - x).abs()[~normal] <= per_element[~normal] * 2.0**-32).all()
    assert torch.equal(torch.sign(back[normal]), torch.sign(x[normal]))
    # Each block's largest magnitude is its scale, and comes back exactly; blocks stay in rows.
    assert torch.equal(scale[:, 0], x[:, :256].abs().amax(1))
    assert torch.equal(scale[:, 1], x[:, 256:].abs().amax(1))
    assert torch.equal(back.abs().amax(1), x.abs().amax(1))


def test_stochastic_rounding_is_unbiased_and_bounded():
    x = heterogeneous(4096, signed=False).view(16, 256)
    _, scale = blockwise8.quantize(x, None, signed=False)
    total = torch.zeros_like(x)
    draws = 256
    for step in range(draws):
        noise = rounding.hashed_noise(x, rounding.noise_parameters(step, 2))
        c, s = blockwise8.quantize(x, noise, signed=False)
        back = blockwise8.dequantize(c, s, signed=False)
        normal = x >= s * 2.0**-30
        assert (((back - x).abs() / x)[normal] <= 2.0**-3).all()  # one spacing at most
        total += back
    mean = total / draws
    normal = x >= scale * 2.0**-30
    bias = ((mean - x) / x)[normal]
    assert bias.abs().median() < 0.004
    assert bias.mean().abs() < 0.001


def test_every_code_decodes_to_a_finite_value_in_order():
    codes = torch.arange(256, dtype=U8).view(1, 256)
    scale = torch.ones(1, 1)
    signed = blockwise8.dequantize(codes, scale, signed=True).view(-1)
    unsigned = blockwise8.dequantize(codes, scale, signed=False).view(-1)
    assert torch.isfinite(signed).all() and torch.isfinite(unsigned).all()
    assert signed[0] == 0 and unsigned[0] == 0
    assert (signed[1:128].diff() > 0).all() and torch.equal(signed[128:], -signed[:128])
    assert (unsigned.diff() > 0).all()
    assert signed[124] == 1.0 and unsigned[248] == 1.0  # a block's largest value
    assert signed[1] == 2.0**-32 and unsigned[1] == 2.0**-33


def _signed_codes_of_units(unit: torch.Tensor) -> torch.Tensor:
    """The bit cut of exp_avg's codes, rounding to nearest: int32 codes of float32 units."""
    bits = unit.view(torch.int32)
    return (((bits & 0x7FFFFFFF) + (1 << 20)) >> 21).clamp_max(127) | ((bits >> 24) & 0x80)


def _units_once_and_twice(x: torch.Tensor, scale: torch.Tensor):
    """Float64 references for float32 ``x`` in rows of one block each with float32 ``scale``
    (rows, 1): x * (1 / scale * 2**-96) rounded once (the product is exact in float64), and
    (x * (1 / scale)) * 2**-96 rounded twice."""
    inverse = (1.0 / scale).double()
    once = (x.double() * (inverse * 2.0**-96)).float()
    twice = ((x.double() * inverse).float().double() * 2.0**-96).float()
    return once, twice


def _double_rounding_values(scale: float, count: int, gen) -> torch.Tensor:
    """``count`` float32 values whose units under ``scale`` are subnormal and just below a
    code's rounding boundary, where rounding once and rounding twice give different codes."""
    inverse = float(torch.tensor(1.0 / scale, dtype=torch.float32))
    # Subnormal units in steps of 2**-149: codes 0 .. 3 round up from k * 2**21 + 2**20. The
    # largest odd step below that, plus a bit less than a half, rounds once to that step and
    # twice (through float32 x * inverse, 3 bits finer) to the tie, then to the even step above.
    k = torch.randint(0, 4, (16 * count,), generator=gen, dtype=torch.float64)
    steps = (
        k * 2**21
        + 2**20
        - 1
        + 0.5
        - torch.rand(16 * count, generator=gen, dtype=torch.float64) / 16
    )
    x = (steps * 2.0**-53 / inverse).float()
    sign = torch.randint(0, 2, x.shape, generator=gen) * 2 - 1
    x = x * sign
    once, twice = _units_once_and_twice(x[None], torch.tensor([[scale]]))
    differ = _signed_codes_of_units(once) != _signed_codes_of_units(twice)
    assert differ.sum() >= count
    return x[differ[0]][:count]


def _just_above_the_fold_limit() -> float:
    """A scale just above 2**30 whose 1 / scale * 2**-96, a subnormal, rounds down by more
    than 2**-24: folding there would move the chosen values' units below their ties."""
    for i in range(1, 256):
        scale = 2.0**30 * (1 + i / 256)
        inverse = float(torch.tensor(1.0 / scale, dtype=torch.float32))
        folded = float(torch.tensor(inverse * 2.0**-96, dtype=torch.float32))
        if folded < inverse * 2.0**-96 * (1 - 2.0**-24):
            return scale
    raise AssertionError("no such scale")


@pytest.mark.parametrize("path", ["quantize", "eager", "fused", "torch"])
def test_units_round_once_up_to_the_fold_limit_and_twice_above_it(path):
    """The unit cut into a code, against float64 references: x * (1 / scale * 2**-96),
    rounded once, in blocks whose scale is at most 2**30; (x * (1 / scale)) * 2**-96, rounded
    twice, above (where 1 / scale * 2**-96 would lose bits). The values are chosen where the
    two give different codes. Through quantize, and through each path's first step with
    beta1 = 0, whose exp_avg is the gradient."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([3.0, _just_above_the_fold_limit()] * 8)[:, None]  # folded, not, ...
    x = torch.stack([_double_rounding_values(float(s), 256, gen) for s in scales[:, 0]])
    x[:, 0] = scales[:, 0]  # each block's largest
    if path == "quantize":
        codes, scale = blockwise8.quantize(x, None, signed=True)
    else:
        p = torch.nn.Parameter(torch.zeros_like(x))
        p.grad = x.clone()
        optimizer = Ano([p], betas=(0.0, 0.99), state_dtype=U8, fused=path != "eager")
        with implementation("torch" if path == "torch" else "kernel"):
            optimizer.step()
        codes, scale = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_scale"]
    assert torch.equal(scale, scales)
    once, twice = _units_once_and_twice(x, scales)
    folded = scales <= 2.0**30
    expected = torch.where(folded, _signed_codes_of_units(once), _signed_codes_of_units(twice))
    assert torch.equal(codes.int(), expected)


def test_zeros_and_non_finite_values_quantize_without_error():
    codes, scale = blockwise8.quantize(torch.zeros(2, 300), None, signed=True)
    assert not codes.any() and not scale.any()
    x = torch.randn(2, 256)
    x[0, 3], x[1, 100] = float("nan"), float("inf")
    for signed in (True, False):
        codes, scale = blockwise8.quantize(x if signed else x.abs(), None, signed=signed)
        back = blockwise8.dequantize(codes, scale, signed=signed)
        assert torch.isnan(back[0]).all()  # a NaN takes its block with it
        assert not torch.isfinite(back[1]).all()


# ------------------------------------------------------------------------- the optimizer


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 70, bias=False)
    )
    return model, torch.randn(128, 64), torch.randint(0, 70, (128,))


def train(model, optimizer, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_large_tensors_get_codes_and_small_ones_float32():
    model, x, y = model_and_data()
    optimizer = Ano(model.parameters(), lr=1e-2, state_dtype=U8)
    train(model, optimizer, x, y, 2)
    weight, bias = optimizer.state[model[0].weight], optimizer.state[model[0].bias]
    assert weight["exp_avg"].dtype == weight["exp_avg_sq"].dtype == U8
    assert weight["exp_avg_scale"].shape == (300, 1)  # a row of 64 is one block
    assert bias["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in bias


def state_bytes(optimizer) -> int:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return len(buffer.getvalue())


def test_saved_state_is_about_a_quarter_and_loads_with_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    full, small = Ano(model.parameters()), Ano(model.parameters(), state_dtype=U8)
    full.step()
    small.step()
    assert state_bytes(small) < 0.28 * state_bytes(full)
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["state"][0]["exp_avg"].dtype == U8


@pytest.mark.parametrize(
    "options",
    [{}, {"maximize": True, "weight_decay": 0.1}, {"logarithmic_schedule": True}],
    ids=["ano", "maximize-decay", "anolog"],
)
def test_eager_and_fused_paths_write_the_same_state(options):
    """The same gradients (independent of the parameters) through the eager 8-bit path
    (``fused=False``), the fused C++ kernel and the fused path on the operator's torch
    implementation: every tensor is equal bit for bit at every step. The gradients
    span ~8 decades within a block (subnormal codes), and one tensor's are large enough for
    exp_avg_sq's scales to pass 2**32, where the kernel decodes with two multiplies instead of
    one; rows of 64, 300, 576 and 1000 values leave every kind of partial block."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 64), (70, 300), (64, 64, 3, 3), (5, 1000)]
    sizes = [1.0, 1e5, 1.0, 1e-3]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [
        [size * (k + 1) * heterogeneous(torch.Size(s).numel(), seed=10 * k + i).view(s)
         for i, (s, size) in enumerate(zip(shapes, sizes, strict=True))]
        for k in range(5)
    ]  # fmt: skip
    for step_grads in grads:  # a few values ~1e-10 of their block's: subnormal codes
        for g in step_grads:
            g.view(-1)[::97] *= 1e-10
    runs = {}
    for name, choice, fused in (
        ("eager", "kernel", False),
        ("fused", "kernel", True),
        ("torch", "torch", True),
    ):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = Ano(params, lr=1e-2, state_dtype=U8, fused=fused, **options)
        trace = []
        with implementation(choice):
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.clone()
                optimizer.step()
                trace.append(
                    [
                        {k: v.clone() for k, v in optimizer.state[p].items()}
                        | {"param": p.detach().clone()}
                        for p in params
                    ]
                )
        runs[name] = trace
    for other in ("fused", "torch"):
        for mine, theirs in zip(runs["eager"], runs[other], strict=True):
            for a, b in zip(mine, theirs, strict=True):
                for key in a:
                    assert torch.equal(a[key], b[key]), (other, key)
    last = runs["eager"][-1]
    assert last[1]["exp_avg_sq_scale"].max() >= 2.0**32  # the two-multiply decode ran
    for key, subnormal in (("exp_avg", 4), ("exp_avg_sq", 8)):  # codes of exponent 0
        codes = [state[key].int() & (0x7F if key == "exp_avg" else 0xFF) for state in last]
        assert any(((c > 0) & (c < subnormal)).any() for c in codes), key


def test_a_group_steps_codes_and_small_float32_moments_in_one_kernel_call(monkeypatch):
    """A torch.uint8 group's tensors with codes and its small tensors with float32 moments go
    to the kernel together, one operator call per step; the small tensors come out bit for bit
    as a float32-state group's fused step leaves them, the codes as a group of codes alone."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(300, 64), (300,), (70, 300), (70,), (4, 8)]  # codes, float32, codes, ...
    coded = [True, False, True, False, False]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    calls = []  # the steps' operator calls
    real = fused_module._call

    def spy(lists, options):
        calls.append(lists)
        return real(lists, options)

    monkeypatch.setattr(fused_module, "_call", spy)

    def run(state_dtype, keep):
        params = [torch.nn.Parameter(t.clone()) for t, k in zip(start, keep, strict=True) if k]
        optimizer = Ano(params, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, fused=True)
        for step_grads in grads:
            kept = [g for g, k in zip(step_grads, keep, strict=True) if k]
            for p, g in zip(params, kept, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return [optimizer.state[p] | {"param": p.detach()} for p in params]

    together = run(U8, [True] * len(shapes))
    assert len(calls) == 3 and all(len(lists.params) == len(shapes) for lists in calls)
    assert [scale.numel() > 0 for scale in calls[-1].exp_avg_scales] == coded
    float32 = run(None, [not c for c in coded])
    codes = run(U8, coded)
    for mine, theirs in zip(
        [s for s, c in zip(together, coded, strict=True) if not c], float32, strict=True
    ):
        assert mine["exp_avg"].dtype == torch.float32
        for key in ("param", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(mine[key], theirs[key]), key
    for mine, theirs in zip(
        [s for s, c in zip(together, coded, strict=True) if c], codes, strict=True
    ):
        assert mine["exp_avg"].dtype == U8
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key


def test_eager_and_fused_kernels_agree_on_extreme_blocks():
    """Blocks at the edges of the format, through two steps, eager against the fused C++
    kernel and the fused path's torch implementation: all zeros and negative zeros, subnormal
    magnitudes (an infinite inverse), scales just below and above the 2**30 fold limit and far
    above it, and blocks holding NaN, +inf or -inf. Every tensor equal bit for bit (NaN where
    NaN)."""
    # Each row's largest gradient, its first; after two steps (the second gradient twice the
    # first) the first block's exp_avg scale is 0.2336 times that.
    kinds = [0.0, -0.0, 1e-40, 1e7, 2.0**30 * 3, 2.0**30 * 5, 1.0, 1.0, 1.0]
    rows = []
    for size in kinds:
        g = heterogeneous(600, seed=len(rows))
        g = g / g.abs().max() * size if size else torch.full((600,), size)
        g[1::7] *= 1e-10  # subnormal units, where rounding once or twice differs
        g[0] = size
        rows.append(g)
    grad = torch.stack(rows)
    grad[6, 17], grad[7, 580], grad[8, 300] = float("nan"), float("inf"), float("-inf")
    runs = {}
    for name, choice, fused in (
        ("eager", "kernel", False),
        ("fused", "kernel", True),
        ("torch", "torch", True),
    ):
        p = torch.nn.Parameter(torch.randn(grad.shape, generator=torch.Generator().manual_seed(0)))
        optimizer = Ano([p], lr=1e-2, state_dtype=U8, fused=fused)
        with implementation(choice):
            for k in range(2):
                p.grad = grad * (k + 1)
                optimizer.step()
        runs[name] = optimizer.state[p] | {"param": p.detach().clone()}
    eager = runs["eager"]
    for other in ("fused", "torch"):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(eager[key], runs[other][key]), (other, key)
        for key in ("exp_avg_scale", "exp_avg_sq_scale", "param"):
            torch.testing.assert_close(eager[key], runs[other][key], rtol=0, atol=0, equal_nan=True)
    m_scale, v_scale = eager["exp_avg_scale"][:, 0], eager["exp_avg_sq_scale"][:, 0]
    assert 0 < m_scale[2] < 2.0**-128  # its inverse is infinite
    assert m_scale[3] <= 2.0**30 < v_scale[3]  # exp_avg folded, exp_avg_sq not
    assert m_scale[4] <= 2.0**30 < m_scale[5]
    assert not torch.isfinite(eager["exp_avg_scale"][6:]).all(1).any()  # NaN, inf, -inf rows


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_resume_from_a_checkpoint_is_bit_exact(fused):
    model, x, y = model_and_data()
    start = copy.deepcopy(model)
    optimizer = Anolog(model.parameters(), lr=1e-2, state_dtype=U8, fused=fused)
    train(model, optimizer, x, y, 6)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, x, y, 6)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    start.load_state_dict(checkpoint["model"])
    resumed = Anolog(start.parameters(), lr=1e-2, state_dtype=U8, fused=fused)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(start, resumed, x, y, 6)
    for a, b in zip(model.parameters(), start.parameters(), strict=True):
        assert torch.equal(a, b)
        for key, value in optimizer.state[a].items():
            assert torch.equal(value, resumed.state[b][key])


def test_an_8bit_state_dict_loads_dequantized_into_float32_state_and_back():
    model, x, y = model_and_data()
    eight = Ano(model.parameters(), lr=1e-2, state_dtype=U8)
    train(model, eight, x, y, 4)
    full = Ano(model.parameters(), lr=1e-2)
    full.load_state_dict(eight.state_dict())
    assert full.param_groups[0]["state_dtype"] is None
    weight = model[0].weight
    codes = eight.state[weight]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        expected = blockwise8.dequantize(codes[key], codes[f"{key}_scale"], signed=signed)
        assert full.state[weight][key].dtype == torch.float32
        assert torch.equal(full.state[weight][key], expected.view(weight.shape))
        assert f"{key}_scale" not in full.state[weight]
    # Float32 state into an 8-bit optimizer: quantized to nearest on load.
    again = Ano(model.parameters(), lr=1e-2, state_dtype=U8)
    again.load_state_dict(full.state_dict())
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
        assert torch.equal(again.state[weight][key], codes[key])  # a round trip is exact
    # bfloat16 state into 8-bit, and a small tensor stays float32.
    half = Ano(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    train(model, half, x, y, 2)
    from_half = Ano(model.parameters(), lr=1e-2, state_dtype=U8)
    from_half.load_state_dict(half.state_dict())
    assert from_half.state[weight]["exp_avg"].dtype == U8
    assert from_half.state[model[0].bias]["exp_avg"].dtype == torch.float32
    train(model, from_half, x, y, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.__setitem__("exp_avg_scale", -s["exp_avg_scale"] - 1),
            "NaN, infinite or negative",
        ),
        (
            lambda s: s.__setitem__("exp_avg_sq_scale", s["exp_avg_sq_scale"][:-1]),
            r"shape \(300, 1\)",
        ),
        (lambda s: s.__setitem__("exp_avg", s["exp_avg"].float()), "must be 8-bit codes"),
        (lambda s: s.pop("exp_avg_sq_scale"), "must be a float32 tensor"),
    ],
    ids=["negative-scale", "short-scale", "float-codes", "no-scale"],
)
def test_a_bad_8bit_state_dict_is_refused_and_changes_nothing(change, message):
    model, x, y = model_and_data()
    optimizer = Ano(model.parameters(), lr=1e-2, state_dtype=U8)
    train(model, optimizer, x, y, 2)
    saved = optimizer.state_dict()
    bad = copy.deepcopy(saved)
    change(bad["state"][0])
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    for key, value in before["state"][0].items():
        assert torch.equal(value, after["state"][0][key])
    train(model, optimizer, x, y, 1)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_a_step_with_bad_scales_raises_and_changes_nothing(fused):
    model, x, y = model_and_data()
    optimizer = Ano(model.parameters(), lr=1e-2, state_dtype=U8, fused=fused)
    train(model, optimizer, x, y, 1)
    weight = model[0].weight
    optimizer.state[weight]["exp_avg_scale"] = torch.zeros(3)
    before = {
        p: (p.detach().clone(), {k: v.clone() for k, v in s.items()})
        for p, s in optimizer.state.items()
    }
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(
        RuntimeError, match=r"exp_avg_scale'\] must be a float32 tensor of shape \(300, 1\)"
    ):
        optimizer.step()
    for p, (value, state) in before.items():
        assert torch.equal(p, value)
        for key, t in state.items():
            assert torch.equal(optimizer.state[p][key], t)


def test_a_skipped_amp_step_changes_nothing_on_both_fused_routes():
    """GradScaler hands a fused optimizer its scale and inf flag: an inf step is skipped by the
    C++ kernel and by the torch implementation a kernel-less build takes."""
    for choice in ("kernel", "torch"):
        model, x, y = model_and_data()
        optimizer = Ano(model.parameters(), lr=1e-2, state_dtype=U8, fused=True)
        train(model, optimizer, x, y, 1)
        before = copy.deepcopy(optimizer.state_dict())
        weights = [p.detach().clone() for p in model.parameters()]
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(8.0), torch.tensor(1.0)
        with implementation(choice):
            optimizer.step()
        for p, w in zip(model.parameters(), weights, strict=True):
            assert torch.equal(p, w)
        for key, value in before["state"][0].items():
            assert torch.equal(optimizer.state_dict()["state"][0][key], value)


def test_unscaling_in_the_kernel_matches_unscaled_gradients():
    gen = torch.Generator().manual_seed(0)
    start, grad = torch.randn(64, 128, generator=gen), torch.randn(64, 128, generator=gen)
    results = []
    for scale in (None, 1024.0):
        p = torch.nn.Parameter(start.clone())
        optimizer = Ano([p], lr=1e-2, state_dtype=U8, fused=True)
        p.grad = grad * (scale or 1.0)
        if scale:
            optimizer.grad_scale, optimizer.found_inf = torch.tensor(scale), torch.tensor(0.0)
        optimizer.step()
        results.append((p.detach().clone(), optimizer.state[p]["exp_avg_sq"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "dtype", [torch.complex64, torch.bfloat16, torch.float64], ids=["complex64", "bf16", "f64"]
)
def test_other_parameter_dtypes_step_on_8bit_state_like_float32_state(dtype):
    torch.manual_seed(0)
    start = torch.randn(64, 80, dtype=dtype)
    grads = [torch.randn(64, 80, dtype=dtype) for _ in range(8)]
    finals = []
    for state_dtype, fused in ((None, False), (U8, False), (U8, True)):
        p = torch.nn.Parameter(start.clone())
        optimizer = Ano([p], lr=1e-3, state_dtype=state_dtype, fused=fused)
        for g in grads:
            p.grad = g.clone()
            optimizer.step()
        finals.append(p.detach())
        if state_dtype is U8:
            assert optimizer.state[p]["exp_avg"].dtype == U8
    moved = (finals[0] - start).abs().mean()
    for final in finals[1:]:
        # 8-bit moments give a close but not equal path: within a tenth of the distance moved.
        assert (final - finals[0]).abs().mean() < 0.1 * moved


def test_8bit_state_trains_as_well_as_float32_state():
    losses = {}
    for state_dtype in (None, U8):
        model, x, y = model_and_data()
        optimizer = Ano(model.parameters(), lr=3e-3, state_dtype=state_dtype, fused=True)
        train(model, optimizer, x, y, 80)
        losses[state_dtype] = torch.nn.functional.cross_entropy(model(x), y).item()
    assert losses[U8] < 0.2 * 4.25  # from ln(70) = 4.25
    assert abs(losses[U8] - losses[None]) < 0.25 * losses[None] + 0.05


# ------------------------------------------------------------------------------ by name


def test_the_names_create_8bit_optimizers_with_weight_decay_groups():
    model, x, y = model_and_data()
    optimizer = create_optimizer(model, "anolog8bit", lr=1e-2, weight_decay=0.1)
    assert isinstance(optimizer, Anolog)
    assert {g["state_dtype"] for g in optimizer.param_groups} == {U8}
    train(model, optimizer, x, y, 1)
    assert optimizer.state[model[0].weight]["exp_avg"].dtype == U8


def test_timm_takes_ano8bit_and_lookahead_ano8bit():
    timm_optim = pytest.importorskip("timm.optim")
    from ano_optimizer.integrations import timm as timm_integration

    timm_integration.register()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128))
    optimizer = timm_optim.create_optimizer_v2(model, "ano8bit", lr=1e-3, weight_decay=0.05)
    assert isinstance(optimizer, Ano)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]
    assert {g["state_dtype"] for g in optimizer.param_groups} == {U8}
    wrapped = timm_optim.create_optimizer_v2(model, "lookahead_ano8bit", lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    wrapped.step()
    assert wrapped._base_optimizer.state[model[0].weight]["exp_avg"].dtype == U8


def test_hugging_face_trainer_trains_with_optim_ano8bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ano_optimizer.integrations import transformers as hf

    hf.register()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=1, n_head=2)
    )
    ids = torch.randint(0, 64, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), optim="ano8bit", learning_rate=3e-3, max_steps=6,
        per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True,
        save_strategy="no", seed=0, weight_decay=0.1,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, Ano)
    coded = [p for p, s in optimizer.state.items() if s["exp_avg"].dtype == U8]
    assert model.transformer.wte.weight in coded
    assert all(p.numel() >= blockwise8.MIN_NUMEL for p in coded)


def test_the_torch_implementation_traces_whole_and_computes_the_eager_step():
    """On a GPU, ``fused=True`` runs the operator's torch implementation, which
    ``torch.compile`` traces into the user's graph (``benchmarks/gpu_check.py`` checks it on
    CUDA). Here the 8-bit step of tensors the CPU kernel does not take (bfloat16 parameters)
    is compiled whole (fullgraph, AOTAutograd) and must write the eager step's state and
    parameters exactly."""
    gen = torch.Generator().manual_seed(4)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        params = [
            torch.nn.Parameter(
                torch.randn(s, generator=torch.Generator().manual_seed(5)).bfloat16()
            )
            for s in ((300, 64), (70, 300))
        ]
        optimizer = Ano(params, lr=1e-2, weight_decay=0.1, state_dtype=U8, maximize=True,
                        fused=True)  # fmt: skip
        step = (
            torch.compile(optimizer.step, backend="aot_eager", fullgraph=True)
            if compiled
            else optimizer.step
        )
        gen.manual_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the torch path's notice
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).bfloat16()
                step()
        runs.append([{"param": p.detach()} | optimizer.state[p] for p in params])
    for eager, traced in zip(*runs, strict=True):
        assert eager["exp_avg"].dtype == U8
        for key in eager:
            assert torch.equal(eager[key], traced[key]), key


def test_only_tensors_whose_codes_save_memory_get_them():
    """Codes need 2+ dimensions, 4096+ values and rows of 16+ (a row's scales cost 8 / cols
    bytes per value): a (4096, 1) tensor keeps float32 moments, a (256, 16) one gets codes."""
    kinds = {}
    for shape in ((4096, 1), (512, 8), (256, 16), (8192,), (64, 63), (16, 16, 4, 4)):
        p = torch.nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        optimizer = Ano([p], state_dtype=U8)
        optimizer.step()
        kinds[shape] = optimizer.state[p]["exp_avg"].dtype
    assert kinds == {
        (4096, 1): torch.float32, (512, 8): torch.float32, (256, 16): U8,
        (8192,): torch.float32, (64, 63): torch.float32, (16, 16, 4, 4): U8,
    }  # fmt: skip


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_the_functional_api_steps_8bit_moments_like_the_class(fused):
    from ano_optimizer import ano

    model, x, y = model_and_data()
    optimizer = Ano(model.parameters(), lr=1e-2, state_dtype=U8, fused=fused)
    train(model, optimizer, x, y, 1)
    copies = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    params = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()

    states = [copies[p] for p in model.parameters()]
    ano(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["step"] for s in states], fused=fused, beta1=0.92, beta2=0.99, lr=1e-2,
        weight_decay=0.0, eps=1e-8, logarithmic_schedule=False, maximize=False,
        exp_avg_scales=[s.get("exp_avg_scale") for s in states],
        exp_avg_sq_scales=[s.get("exp_avg_sq_scale") for s in states],
    )  # fmt: skip
    for p, mine, state in zip(model.parameters(), params, states, strict=True):
        assert torch.equal(mine, p.detach())
        for key, value in optimizer.state[p].items():
            assert torch.equal(state[key], value), key
    with pytest.raises(RuntimeError, match="exp_avg_scale'\\] must be a float32 tensor"):
        ano(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], fused=fused, beta1=0.92, beta2=0.99, lr=1e-2,
            weight_decay=0.0, eps=1e-8, logarithmic_schedule=False, maximize=False,
            exp_avg_scales=[torch.zeros(2) if s.get("exp_avg_scale") is not None else None
                            for s in states],
            exp_avg_sq_scales=[s.get("exp_avg_sq_scale") for s in states],
        )  # fmt: skip
