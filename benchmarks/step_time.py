"""Optimizer step time and peak extra memory on real model shapes (fp32, CPU).

    python -m benchmarks.step_time [--sets resnet50 gpt2-small] [--steps 10] [--threads 2]

Rows: each Ano execution path, torch.optim.AdamW (foreach False/True, fused) and a per-tensor
loop performing the 1.0.0 release's operations. Every row is timed in fresh processes, one per
row and round, with the rounds interleaved across rows so machine noise hits every row alike;
the reported figure is the median over all timed steps. A fresh process allocates the
parameters first, as a training script does: in one shared process a row's speed depended on
where its tensors landed (on the ResNet-50 set, AdamW foreach=False took 38 ms when its
parameters were allocated after the other rows' and 51 ms when allocated first).
Peak extra memory is the growth of the process's resident set during one steady-state step
(VmHWM after resetting it, minus VmRSS before). It is measured in a separate process with glibc's
mmap threshold pinned, so freed temporaries are returned to the system and the next step's show
up again; timing runs with the allocator's normal settings, which would otherwise penalise the
rows that allocate.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ano_optimizer import Ano
from benchmarks.release_1_0_0 import Release100Ano
from benchmarks.shapes import PARAMETER_SETS

# glibc reads it at process start only, hence the separate memory process.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rows() -> dict:
    table = {
        "Ano default (foreach=None)": lambda ps: Ano(ps, lr=1e-4),
        "Ano single-tensor (foreach=False)": lambda ps: Ano(ps, lr=1e-4, foreach=False),
        "Ano foreach=True": lambda ps: Ano(ps, lr=1e-4, foreach=True),
    }
    if "fused" in inspect.signature(Ano).parameters:
        table["Ano fused=True"] = lambda ps: Ano(ps, lr=1e-4, fused=True)
        table["Ano fused=True, bf16 state"] = lambda ps: Ano(
            ps, lr=1e-4, fused=True, state_dtype=torch.bfloat16
        )
    table |= {
        "AdamW foreach=False": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),
        "AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "1.0.0 release loop": lambda ps: Release100Ano(ps, lr=1e-4),
    }
    return table


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(step) -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen)
        params.append(p)
    return params


def measure_memory(shapes) -> dict[str, int]:
    """Peak extra bytes of one steady-state step per row (run with MMAP_ENV set)."""
    peaks = {}
    for label, make in rows().items():
        optimizer = make(make_params(shapes))
        optimizer.step()  # creates the state
        peaks[label] = peak_extra_bytes(optimizer.step)
        del optimizer
        gc.collect()
    return peaks


def time_row(shapes, label, steps, warmup) -> list[float]:
    optimizer = rows()[label](make_params(shapes))
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def _run_worker(arguments: list[str], env: dict | None = None):
    """Run this module with ``arguments`` in a fresh process; return the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        command = [sys.executable, "-m", "benchmarks.step_time", *arguments, "--output", str(out)]
        subprocess.run(command, check=True, env={**os.environ, **(env or {})})
        return json.loads(out.read_text())


def bench_set(name, shapes, steps, rounds, warmup, threads, out=print):
    table = rows()
    times = {label: [] for label in table}
    per_round = max(1, steps // rounds)
    common = ["--sets", name, "--threads", str(threads)]
    for r in range(rounds):
        for label in table:
            times[label] += _run_worker(
                [*common, "--time-row", label, "--steps", str(per_round), "--warmup", str(warmup)]
            )
        out(f"  [{name}] round {r + 1}/{rounds} done", flush=True)
    out(f"  [{name}] measuring peak memory in a separate process", flush=True)
    peaks = _run_worker([*common, "--memory-only"], env=MMAP_ENV)[name]
    largest = max(torch.Size(s).numel() for s in shapes) * 4
    results = [
        {
            "set": name,
            "row": label,
            "median_ms": statistics.median(times[label]) * 1e3,
            "steps_timed": len(times[label]),
            "peak_extra_mb": peaks[label] / 2**20,
            "peak_extra_in_largest_params": peaks[label] / largest,
        }
        for label in table
    ]
    ref = {r["row"]: r["median_ms"] for r in results}
    for r in results:
        r["vs_adamw_foreach_false"] = r["median_ms"] / ref["AdamW foreach=False"]
        r["vs_adamw_foreach_true"] = r["median_ms"] / ref["AdamW foreach=True"]
        r["vs_adamw_fused"] = r["median_ms"] / ref["AdamW fused=True"]
    return results


def markdown(results, shapes_by_set) -> str:
    lines = []
    for name, shapes in shapes_by_set.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        lines += [
            f"**{name}**: {len(shapes)} tensors, {n / 1e6:.1f} M parameters, fp32, "
            f"{torch.get_num_threads()} threads",
            "",
            "| row | median ms/step | × AdamW foreach=False | × AdamW foreach=True | × AdamW fused | peak extra MB (× largest param) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in results if r["set"] == name):
            lines.append(
                f"| {r['row']} | {r['median_ms']:.1f} | {r['vs_adamw_foreach_false']:.2f} | "
                f"{r['vs_adamw_foreach_true']:.2f} | {r['vs_adamw_fused']:.2f} | "
                f"{r['peak_extra_mb']:.1f} ({r['peak_extra_in_largest_params']:.2f}) |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sets", nargs="+", default=list(PARAMETER_SETS), choices=list(PARAMETER_SETS)
    )
    parser.add_argument("--steps", type=int, default=12, help="timed steps per row (>= 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/step_time.json"))
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time-row", metavar="ROW", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes_by_set = {name: PARAMETER_SETS[name]() for name in args.sets}
    if args.time_row:
        (shapes,) = shapes_by_set.values()
        times = time_row(shapes, args.time_row, args.steps, args.warmup)
        args.output.write_text(json.dumps(times))
        return 0
    if args.memory_only:
        peaks = {name: measure_memory(shapes) for name, shapes in shapes_by_set.items()}
        args.output.write_text(json.dumps(peaks))
        return 0
    results = []
    for name, shapes in shapes_by_set.items():
        print(f"{name}: {len(shapes)} tensors", flush=True)
        results += bench_set(name, shapes, args.steps, args.rounds, args.warmup, args.threads)
    report = markdown(results, shapes_by_set)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    args.output.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
