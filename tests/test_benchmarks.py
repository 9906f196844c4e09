"""The CPU benchmark's machinery on tiny sets: the floor kernel moves the bytes it claims to,
every row is timed once per round, and ratios pair rounds (benchmarks/fused_step.py)."""

from __future__ import annotations

import pytest
import torch

from ano_optimizer import Ano
from benchmarks import fused_step
from benchmarks.fused_step import FLOOR, AnoOnKernel, CopyFloor, paired_ratio, rows, time_rows
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


def test_same_tensors_copy_adds_the_gradient_to_every_tensor_of_fused_ano():
    params = make_params(SHAPES)
    start = [p.detach().clone() for p in params]
    floor = AnoOnKernel(params, kernel="copy_floor")
    floor.step()
    for p, p0 in zip(params, start, strict=True):
        state = floor.optimizer.state[p]
        torch.testing.assert_close(p.detach(), p0 + p.grad)
        assert torch.equal(state["exp_avg"], p.grad) and torch.equal(state["exp_avg_sq"], p.grad)
        assert state["step"].item() == 1.0
    # The real kernel is back in place afterwards: a fused step is Ano's step again.
    fused_params, eager_params = make_params(SHAPES), make_params(SHAPES)
    Ano(fused_params, lr=1e-2, fused=True).step()
    Ano(eager_params, lr=1e-2).step()
    for a, b in zip(fused_params, eager_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_every_row_steps_once_per_round_on_fresh_tensors_for_each_draw(monkeypatch):
    made = []
    real_make_params = fused_step.make_params

    def counting_make_params(shapes):
        made.append(shapes)
        return real_make_params(shapes)

    monkeypatch.setattr(fused_step, "make_params", counting_make_params)
    table = {label: make for label, make in rows().items() if "foreach" not in label}
    times = time_rows(SHAPES, 5, table, out=lambda _: None, draws=2)
    assert set(times) == set(table) and FLOOR in times
    assert all(len(t) == 5 and all(ms > 0 for ms in t) for t in times.values())
    assert len(made) == 2 * len(table)  # every row built once per draw


def test_paired_ratio_compares_rounds_not_medians():
    # Slow rounds hit both rows alike: paired, the ratio stays 0.5 in two rounds of three; the
    # ratio of the medians (10 / 2) would be 5.
    assert paired_ratio([1.0, 10.0, 10.0], [2.0, 20.0, 2.0]) == 0.5
    assert paired_ratio([2.0, 4.0, 3.0], [1.0, 1.0, 1.0]) == 3.0


def test_fast_rounds_are_those_whose_floor_moved_at_least_the_threshold():
    # 25 M parameters move 700 MB per step: 10 ms is 70 GB/s, 5 ms 140 GB/s, 20 ms 35 GB/s.
    assert fused_step.fast_rounds([10.0, 5.0, 20.0, 7.0], 25_000_000, 75.0) == [1, 3]
    assert fused_step.fast_rounds([10.0, 5.0], 25_000_000, 200.0) == []


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


@pytest.mark.slow
def test_the_torch_library_front_end_steps_as_the_shipped_kernel():
    """benchmarks/custom_op.py's torch.library operator compiles the shipped kernel's source with
    another front end: the same bits, the same refusals. The build (about half a minute) goes
    to torch's extension cache, which rebuilds it only when the source changes."""
    from benchmarks import custom_op

    step = custom_op.build("torch.library op")
    custom_op.check_same_results(step)  # raises where a bit differs
    refused = [torch.randn(6, 4).t()]  # not laid out as the kernel walks memory
    lists = [refused, [torch.randn(4, 6)], [torch.zeros(4, 6)], [torch.zeros(4, 6)]]
    lists.append([torch.tensor(0.0)])
    assert step(*lists, 1e-3, 0.1, 0.99, 1e-8, 0.0, 1.0, 0, 16384, 0, 0, 0) is False
    assert lists[4][0].item() == 0.0  # refused: nothing changed
