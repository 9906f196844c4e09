"""The CPU benchmark's machinery on tiny sets: the floor kernel moves the bytes it claims to,
every row is timed once per round, and ratios pair rounds (benchmarks/fused_step.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from ano_optimizer import Ano
from benchmarks import fused_step
from benchmarks.fused_step import (
    ADAMW,
    FLOORS,
    AnoOnTorchImplementation,
    paired_ratio,
    rows,
    time_rows,
)
from benchmarks.kernels import ArithmeticFloor, CopyFloor
from benchmarks.step_time import make_params

SHAPES = [(300,), (17, 5), (1,)]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_copy_floor_reads_four_buffers_and_writes_three(state_dtype):
    floor = CopyFloor(make_params(SHAPES), state_dtype)
    before = [b.clone() for b in floor.buffers]
    floor.step()
    param, grad, exp_avg, exp_avg_sq = floor.buffers
    assert param.numel() == sum(torch.Size(s).numel() for s in SHAPES)
    torch.testing.assert_close(param, before[0] + before[1])
    assert torch.equal(grad, before[1])
    for after, start in ((exp_avg, before[2]), (exp_avg_sq, before[3])):
        if state_dtype == torch.uint8:  # a code: one added
            assert torch.equal(after, start + 1)
            continue
        expected = (start.float() + before[1]).to(state_dtype)  # bf16: truncated, not rounded
        assert after.dtype == state_dtype
        assert (after.float() - expected.float()).abs().max() <= 2.0**-7


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_the_arithmetic_floor_is_the_kernels_steps_of_its_chunks(state_dtype):
    """One call over as many elements as the parameters: each thread's chunk stepped again
    and again, as an optimizer of its own steps it."""
    threads = torch.get_num_threads()
    params = make_params([(3 * threads * ArithmeticFloor.CHUNK,)])
    floor = ArithmeticFloor(params, state_dtype)
    assert floor.repeats == 3
    assert floor.repeats * len(floor.chunks) * ArithmeticFloor.CHUNK == params[0].numel()
    twins = [torch.nn.Parameter(chunk.detach().clone()) for chunk in floor.chunks]
    options = {} if state_dtype == torch.float32 else {"state_dtype": state_dtype}
    twin_optimizer = Ano(twins, lr=1e-4, fused=True, **options)
    twin_optimizer.load_state_dict(copy.deepcopy(floor.optimizer.state_dict()))
    for twin, chunk in zip(twins, floor.chunks, strict=True):
        twin.grad = chunk.grad.clone()
    floor.step()
    for _ in range(floor.repeats):
        twin_optimizer.step()
    for twin, chunk in zip(twins, floor.chunks, strict=True):
        assert not torch.equal(twin, chunk.grad)
        assert torch.equal(twin, chunk)
    for twin in twins:
        assert twin_optimizer.state[twin]["exp_avg"].dtype == state_dtype


def test_the_torch_implementation_row_steps_as_the_kernel_does():
    """The row for machines without a compiler runs the operator's torch implementation, whose
    steps are the kernel's bit for bit; the kernel is back in place afterwards."""
    params, theirs = make_params(SHAPES), make_params(SHAPES)
    row = AnoOnTorchImplementation(params)
    kernel = Ano(theirs, lr=1e-4, fused=True)
    for _ in range(2):
        row.step()
        kernel.step()
    for a, b in zip(params, theirs, strict=True):
        assert torch.equal(a, b)
    from ano_optimizer.fused import native

    assert native.status().loaded


def test_every_row_steps_once_per_round_on_fresh_tensors_for_each_draw(monkeypatch):
    made = []
    real_make_params = fused_step.make_params

    def counting_make_params(shapes):
        made.append(shapes)
        return real_make_params(shapes)

    monkeypatch.setattr(fused_step, "make_params", counting_make_params)
    table = rows()
    times = time_rows(SHAPES, 5, table, out=lambda _: None, draws=2)
    assert set(times) == set(table) and set(FLOORS.values()) <= set(times) and ADAMW in times
    assert all(len(t) == 5 and all(ms > 0 for ms in t) for t in times.values())
    assert len(made) == 2 * len(table)  # every row built once per draw


def test_paired_ratio_compares_rounds_not_medians():
    # Slow rounds hit both rows alike: paired, the ratio stays 0.5 in two rounds of three; the
    # ratio of the medians (10 / 2) would be 5.
    assert paired_ratio([1.0, 10.0, 10.0], [2.0, 20.0, 2.0]) == 0.5
    assert paired_ratio([2.0, 4.0, 3.0], [1.0, 1.0, 1.0]) == 3.0


def test_step_overhead_times_one_cold_and_one_hot_step_per_round():
    from benchmarks.step_overhead import ROWS, markdown, measure

    class Counting(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            Counting.steps += 1
            return super().step(closure)

    results = measure(3, 2, rows={"counting": lambda ps: Counting(ps, lr=0.1), **ROWS})
    # One warm-up step, then per round a timed cold step, an untimed one and a timed hot one.
    assert Counting.steps == 1 + 3 * 2
    assert set(results) == {"counting", *ROWS}
    assert all(r["hot"] > 0 and r["cold"] > 0 for r in results.values())
    assert "| Ano fused=True |" in markdown(results, 3, 2)
