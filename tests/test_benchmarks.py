"""The CPU benchmark's machinery on tiny sets: the floor kernel moves the bytes it claims to,
every row is timed once per round, and ratios pair rounds (benchmarks/fused_step.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.fused_step import FLOOR, CopyFloor, paired_ratio, rows, time_rows
from benchmarks.step_time import make_params

SHAPES = [(300,), (17, 5), (1,)]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_copy_floor_reads_four_buffers_and_writes_three(state_dtype):
    floor = CopyFloor(make_params(SHAPES), state_dtype)
    before = [b.clone() for b in floor.buffers]
    floor.step()
    param, grad, exp_avg, exp_avg_sq = floor.buffers
    assert param.numel() == sum(torch.Size(s).numel() for s in SHAPES)
    torch.testing.assert_close(param, before[0] + before[1])
    assert torch.equal(grad, before[1])
    for after, start in ((exp_avg, before[2]), (exp_avg_sq, before[3])):
        expected = (start.float() + before[1]).to(state_dtype)  # bf16: truncated, not rounded
        assert after.dtype == state_dtype
        assert (after.float() - expected.float()).abs().max() <= 2.0**-7


def test_every_row_steps_once_per_round():
    table = {label: make for label, make in rows().items() if "foreach" not in label}
    times = time_rows(SHAPES, 3, table, out=lambda _: None)
    assert set(times) == set(table) and FLOOR in times
    assert all(len(t) == 3 and all(ms > 0 for ms in t) for t in times.values())


def test_paired_ratio_compares_rounds_not_medians():
    # Slow rounds hit both rows alike: paired, the ratio stays 0.5 in two rounds of three; the
    # ratio of the medians (10 / 2) would be 5.
    assert paired_ratio([1.0, 10.0, 10.0], [2.0, 20.0, 2.0]) == 0.5
    assert paired_ratio([2.0, 4.0, 3.0], [1.0, 1.0, 1.0]) == 3.0
