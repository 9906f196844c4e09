"""The fair protocol: one learning-rate grid per optimizer, the rate chosen on validation with
the tuning seeds, the figure reported on test with other seeds.

For each task, condition and optimizer (a *cell*):

1. every rate of the grid (the same relative grid for every optimizer, centred on its
   recommended rate) trains once per tuning seed and is scored on validation;
2. the rate with the best mean validation score is chosen (a tie goes to the smaller rate), and
   flagged when it lies at an edge of the grid;
3. the chosen rate trains once per test seed; those runs are scored on test, and their mean and
   standard deviation are the cell's result.

Test runs never take part in the choice: :func:`choose` reads tuning runs only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

# Seven rates spanning 1000x, evenly spaced in log scale: recommended * 10^(k/2), k = -3..3.
# Short runs under noise favour rates well above the recommended ones; a narrower grid chose
# its top rate for most sign-based cells.
DEFAULT_GRID = (0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6)


def lr_grid(center: float, factors: Sequence[float]) -> list[float]:
    """The rates of a cell: ``center`` times each factor, to 6 significant digits."""
    return [float(f"{center * factor:.6g}") for factor in factors]


def run_key(run: dict) -> tuple:
    """What identifies a run across an interrupted study and its resumption."""
    return (run["task"], run["condition"], run["optimizer"], run["phase"], run["lr"], run["seed"])


def cell_key(run: dict) -> tuple:
    return (run["task"], run["condition"], run["optimizer"])


def _score(run: dict, field: str) -> float:
    value = run.get(field)
    return -math.inf if value is None else float(value)


def validation_curve(
    runs: Iterable[dict], grid: Sequence[float], tuning_seeds: Sequence[int]
) -> list[list[float]] | None:
    """``[[lr, mean validation score], ...]`` over the tuning seeds, or None until every tuning
    run of the cell is done. A diverged run scores -inf (shown as None)."""
    scores: dict[tuple, float] = {}
    for run in runs:
        if run["phase"] == "tuning":
            scores[(run["lr"], run["seed"])] = _score(run, "validation")
    if any((lr, seed) not in scores for lr in grid for seed in tuning_seeds):
        return None
    return [[lr, statistics.fmean(scores[(lr, seed)] for seed in tuning_seeds)] for lr in grid]


def choose(curve: Sequence[Sequence[float]]) -> tuple[float, bool]:
    """The chosen rate (best mean validation; the smaller on a tie) and whether it is at an
    edge of the grid."""
    best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))
    return curve[best][0], best in (0, len(curve) - 1)


def tuning_runs(task: str, condition: str, value, optimizer: str, grid, seeds) -> list[dict]:
    return [
        {"task": task, "condition": condition, "value": value, "optimizer": optimizer,
         "phase": "tuning", "lr": lr, "seed": seed}
        for lr in grid
        for seed in seeds
    ]  # fmt: skip


def test_runs(task: str, condition: str, value, optimizer: str, lr: float, seeds) -> list[dict]:
    return [
        {"task": task, "condition": condition, "value": value, "optimizer": optimizer,
         "phase": "test", "lr": lr, "seed": seed}
        for seed in seeds
    ]  # fmt: skip


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def cell_result(
    runs: Sequence[dict], grid: Sequence[float], tuning_seeds, test_seeds
) -> dict | None:
    """The cell's entry of results.json, or None while its tuning runs are incomplete."""
    curve = validation_curve(runs, grid, tuning_seeds)
    if curve is None:
        return None
    chosen, at_edge = choose(curve)
    tests = [r for r in runs if r["phase"] == "test" and r["lr"] == chosen]
    scores = _finite([r["test"] for r in tests])
    done = {r["seed"] for r in tests}
    return {
        "lr_grid": list(grid),
        "chosen_lr": chosen,
        "chosen_at_edge": at_edge,
        "validation": [[lr, None if math.isinf(v) else v] for lr, v in curve],
        "tuning_seeds": list(tuning_seeds),
        "test_seeds": list(test_seeds),
        "test_scores": [r["test"] for r in sorted(tests, key=lambda r: r["seed"])],
        "test_mean": statistics.fmean(scores) if scores else None,
        "test_std": statistics.stdev(scores) if len(scores) > 1 else (0.0 if scores else None),
        "test_diverged": sum(r["test"] is None for r in tests),
        "complete": done >= set(test_seeds),
    }
