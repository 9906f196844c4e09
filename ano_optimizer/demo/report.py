"""What a study leaves in its folder: results.json (settings, per-cell results, every run),
results.csv (one row per cell), runs.csv (one row per run) and one PNG per task (for the sac
task: sac_curves.csv and one PNG per environment, beside the paper's logs), and the tables it
prints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import protocol, sac


def collect(settings: dict, runs: list[dict], plan: list[dict]) -> dict:
    """results.json: ``{"settings", "tasks": {TASK: {"metric", "conditions": {COND:
    {"optimizers": {NAME: cell result}}}}}, "runs"}``; cells still tuning are left out."""
    by_cell: dict[tuple, list[dict]] = {}
    for run in runs:
        by_cell.setdefault(protocol.cell_key(run), []).append(run)
    tasks: dict = {}
    for cell in plan:
        entry = protocol.cell_result(
            by_cell.get(protocol.cell_key(cell), []), cell["grid"], settings["tuning_seeds"],
            settings["test_seeds"],
        )  # fmt: skip
        task = tasks.setdefault(
            cell["task"], {"metric": settings["tasks"][cell["task"]]["metric"], "conditions": {}}
        )
        optimizers = task["conditions"].setdefault(cell["condition"], {"optimizers": {}})
        if entry is not None:
            optimizers["optimizers"][cell["optimizer"]] = entry
    return {"settings": settings, "tasks": tasks, "runs": runs}


def _cells(results: dict):
    for task, spec in results["tasks"].items():
        for condition, entry in spec["conditions"].items():
            for name, cell in entry["optimizers"].items():
                yield task, condition, name, cell


def _write_csv(results: dict, folder: Path) -> None:
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "condition", "optimizer", "chosen_lr", "chosen_at_edge",
                         "test_mean", "test_std", "n_test_seeds", "complete"])  # fmt: skip
        for task, condition, name, cell in _cells(results):
            writer.writerow([
                task, condition, name, cell["chosen_lr"], cell["chosen_at_edge"],
                "" if cell["test_mean"] is None else f"{cell['test_mean']:.4f}",
                "" if cell["test_std"] is None else f"{cell['test_std']:.4f}",
                len([s for s in cell["test_scores"] if s is not None]), cell["complete"],
            ])  # fmt: skip
    with (folder / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["task", "condition", "optimizer", "phase", "lr", "seed", "validation", "test",
                   "epoch", "diverged", "seconds"]  # fmt: skip
        writer.writerow(columns)
        for run in results["runs"]:
            writer.writerow(["" if run.get(c) is None else run.get(c) for c in columns])


def _fmt(cell: dict | None, digits: int) -> str:
    if cell is None or cell["test_mean"] is None:
        return "-"
    edge = "*" if cell["chosen_at_edge"] else ""
    partial = "" if cell["complete"] else " (partial)"
    return (
        f"{cell['test_mean']:.{digits}f} ± {cell['test_std']:.{digits}f} "
        f"@{cell['chosen_lr']:.2g}{edge}{partial}"
    )


def format_tables(results: dict) -> str:
    """One table per task: rows are optimizers, columns conditions; each cell is the test
    mean ± std over the test seeds at the chosen rate (``*``: chosen at an edge of the grid)."""
    blocks = []
    names = list(results["settings"]["optimizers"])
    for task, spec in results["tasks"].items():
        conditions = list(spec["conditions"])
        digits = 1 if task == "rl" else 2
        lines = [["optimizer", *conditions]]
        for name in names:
            row = [name]
            for condition in conditions:
                row.append(_fmt(spec["conditions"][condition]["optimizers"].get(name), digits))
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(line, widths, strict=True)))
                for line in lines]  # fmt: skip
        text.insert(1, "  ".join("-" * w for w in widths))
        seeds = ",".join(map(str, results["settings"]["test_seeds"]))
        blocks.append(
            f"{task}: {spec['metric']}, mean ± std over test seeds {seeds} @ chosen rate "
            "(* at an edge of the grid)\n" + "\n".join(text)
        )
    if results.get("sac"):
        blocks.append(sac.format_results(results["sac"], results["settings"]))
    return "\n\n".join(blocks)


def plot_task(path: Path, task: str, spec: dict, names: list[str]) -> None:
    """First panel: the test score against the condition, with error bars (standard deviation
    over the test seeds). Then one panel per condition: the mean validation score against the
    learning rate, the chosen rate circled."""
    from matplotlib.figure import Figure

    conditions = list(spec["conditions"])
    figure = Figure(figsize=(4.6 * (1 + len(conditions)), 4.0), layout="constrained")
    axes = figure.subplots(1, 1 + len(conditions), squeeze=False)[0]
    score = axes[0]
    for index, name in enumerate(names):
        color = f"C{index}"
        points = [
            (i, spec["conditions"][c]["optimizers"].get(name)) for i, c in enumerate(conditions)
        ]
        points = [(i, c) for i, c in points if c is not None and c["test_mean"] is not None]
        if points:
            score.errorbar(
                # side by side, so error bars of one condition do not hide each other
                [i + 0.08 * (index - (len(names) - 1) / 2) for i, _ in points],
                [c["test_mean"] for _, c in points],
                yerr=[c["test_std"] for _, c in points], marker="o", capsize=3, color=color,
                label=name,
            )  # fmt: skip
        for axis, condition in zip(axes[1:], conditions, strict=True):
            cell = spec["conditions"][condition]["optimizers"].get(name)
            if cell is None:
                continue
            curve = [(lr, v) for lr, v in cell["validation"] if v is not None]
            axis.plot(*zip(*curve, strict=True), marker=".", color=color, label=name)
            chosen = dict(curve).get(cell["chosen_lr"])
            if chosen is not None:
                axis.plot([cell["chosen_lr"]], [chosen], "o", color=color, markersize=9,
                          fillstyle="none")  # fmt: skip
    score.set_xticks(range(len(conditions)), conditions)
    score.set(title=f"{task}: test score at the chosen rate (mean ± std)", ylabel="test score")
    score.grid(alpha=0.3)
    score.legend(fontsize="small")
    for axis, condition in zip(axes[1:], conditions, strict=True):
        axis.set(xscale="log", xlabel="learning rate", title=f"validation, {condition}")
        axis.grid(alpha=0.3)
    axes[1].set_ylabel("mean validation score (tuning seeds)")
    figure.savefig(path, dpi=90)


def write_outputs(folder: Path, settings: dict, runs: list[dict], plan: list[dict]) -> dict:
    results = collect(settings, runs, plan)
    paper = sac.collect(settings, runs)
    if paper is not None:
        results["sac"] = paper
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    _write_csv(results, folder)
    for task, spec in results["tasks"].items():
        plot_task(folder / f"{task}.png", task, spec, list(settings["optimizers"]))
    if paper is not None:
        sac.write_curves_csv(folder / "sac_curves.csv", paper, settings["sac"]["steps"])
        sac.plot(folder, paper, settings["sac"]["steps"])
    return results
