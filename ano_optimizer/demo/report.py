"""What a study run leaves: the summary per optimizer and sigma, its table, the result files
and the plot."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path


def summarize(runs: list[dict], optimizers: list[str], sigmas: list[float]) -> list[dict]:
    rows = []
    for name in optimizers:
        for sigma in sigmas:
            values = [
                r["best_test_accuracy"]
                for r in runs
                if r["optimizer"] == name and r["sigma"] == sigma
            ]
            rows.append(
                {
                    "optimizer": name,
                    "sigma": sigma,
                    "lr": next(r["lr"] for r in runs if r["optimizer"] == name),
                    "best_test_accuracy_mean": statistics.fmean(values),
                    "best_test_accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n_seeds": len(values),
                    "values": values,
                }
            )
    return rows


def format_table(summary: list[dict], optimizers: list[str], sigmas: list[float]) -> str:
    """Best test accuracy (%) as mean ± std over seeds: one row per optimizer."""
    cells = {(r["optimizer"], r["sigma"]): r for r in summary}
    header = ["optimizer (lr)"] + [f"sigma={s:g}" for s in sigmas]
    lines = [header]
    for name in optimizers:
        lr = cells[(name, sigmas[0])]["lr"]
        row = [f"{name} ({lr:g})"]
        for sigma in sigmas:
            cell = cells[(name, sigma)]
            row.append(
                f"{cell['best_test_accuracy_mean']:.2f} ± {cell['best_test_accuracy_std']:.2f}"
            )
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_results(output: Path, config: dict, runs: list[dict], summary: list[dict]) -> None:
    with (output / "results.json").open("w") as handle:
        json.dump({"config": config, "summary": summary, "runs": runs}, handle, indent=1)
    with (output / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "optimizer",
                "sigma",
                "lr",
                "best_test_accuracy_mean",
                "best_test_accuracy_std",
                "n_seeds",
            ]
        )
        for r in summary:
            writer.writerow(
                [
                    r["optimizer"],
                    r["sigma"],
                    r["lr"],
                    f"{r['best_test_accuracy_mean']:.4f}",
                    f"{r['best_test_accuracy_std']:.4f}",
                    r["n_seeds"],
                ]
            )
    with (output / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "optimizer",
                "sigma",
                "seed",
                "lr",
                "epoch",
                "train_loss",
                "test_loss",
                "test_accuracy",
            ]
        )
        for r in runs:
            for epoch, h in enumerate(r["history"], start=1):
                writer.writerow(
                    [r["optimizer"], r["sigma"], r["seed"], r["lr"], epoch]
                    + [f"{h[k]:.6g}" for k in ("train_loss", "test_loss", "test_accuracy")]
                )


def plot_results(path: Path, runs: list[dict], summary: list[dict], optimizers, sigmas, title):
    """Accuracy against sigma (left, two rows tall), and a grid of mean training-loss curves,
    one panel per sigma (right)."""
    from matplotlib.figure import Figure

    rows = 2 if len(sigmas) > 1 else 1
    columns = math.ceil(len(sigmas) / rows)
    layout = [
        ["accuracy"] * 2 + [str(r * columns + c) for c in range(columns)] for r in range(rows)
    ]
    layout = [
        [cell if cell == "accuracy" or int(cell) < len(sigmas) else "." for cell in row]
        for row in layout
    ]
    figure = Figure(figsize=(6 + 3.4 * columns, 3.3 * rows + 0.4), layout="constrained")
    axes = figure.subplot_mosaic(layout, empty_sentinel=".")
    colors = {name: f"C{i}" for i, name in enumerate(optimizers)}
    accuracy = axes["accuracy"]
    for name in optimizers:
        cells = [r for r in summary if r["optimizer"] == name]
        accuracy.errorbar(
            [r["sigma"] for r in cells],
            [r["best_test_accuracy_mean"] for r in cells],
            yerr=[r["best_test_accuracy_std"] for r in cells],
            marker="o",
            capsize=3,
            color=colors[name],
            label=name,
        )
    accuracy.set(xlabel="gradient noise σ", ylabel="best test accuracy (%)", title=title)
    accuracy.legend()
    accuracy.grid(alpha=0.3)
    for index, sigma in enumerate(sigmas):
        ax = axes[str(index)]
        for name in optimizers:
            curves = [
                [h["train_loss"] for h in r["history"]]
                for r in runs
                if r["optimizer"] == name and r["sigma"] == sigma
            ]
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
            ax.plot(range(1, length + 1), mean, color=colors[name], label=name)
        ax.set(title=f"training loss, σ = {sigma:g}", yscale="log")
        if index >= len(sigmas) - columns:
            ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
