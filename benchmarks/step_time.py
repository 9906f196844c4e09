"""Optimizer step time and peak extra memory on real model shapes (fp32, CPU).

    python -m benchmarks.step_time [--sets resnet50 gpt2-small] [--steps 10] [--threads 2]

Rows: each Ano execution path, torch.optim.AdamW (foreach False/True, fused) and a per-tensor
loop performing the 1.0.0 release's operations. Timing rounds are interleaved across rows so
machine noise hits every row alike; the reported figure is the median over all timed steps.
Peak extra memory is the growth of the process's resident set during one steady-state step
(VmHWM after resetting it, minus VmRSS before), with glibc's mmap threshold pinned so freed
temporaries are returned and the next step's show up again.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

if __name__ == "__main__" and os.environ.get(MMAP_ENV) is None:
    # Must be set before the process starts for glibc to honour it: re-run ourselves.
    os.environ[MMAP_ENV] = "65536"
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.step_time", *sys.argv[1:]])

import torch  # noqa: E402

from ano_optimizer import Ano  # noqa: E402
from benchmarks.release_1_0_0 import Release100Ano  # noqa: E402
from benchmarks.shapes import PARAMETER_SETS  # noqa: E402


def rows() -> dict:
    table = {
        "Ano default (foreach=None)": lambda ps: Ano(ps, lr=1e-4),
        "Ano single-tensor (foreach=False)": lambda ps: Ano(ps, lr=1e-4, foreach=False),
        "Ano foreach=True": lambda ps: Ano(ps, lr=1e-4, foreach=True),
    }
    if "fused" in inspect.signature(Ano).parameters:
        table["Ano fused=True"] = lambda ps: Ano(ps, lr=1e-4, fused=True)
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


def bench_set(name, shapes, steps, rounds, warmup, out=print):
    table = rows()
    optimizers = {}
    for label, make in table.items():
        optimizers[label] = make(make_params(shapes))
        start = time.perf_counter()
        for _ in range(warmup):
            optimizers[label].step()
        out(f"  [{name}] warm-up {label}: {time.perf_counter() - start:.1f} s")
    times = {label: [] for label in table}
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        for label, opt in optimizers.items():
            for _ in range(per_round):
                start = time.perf_counter()
                opt.step()
                times[label].append(time.perf_counter() - start)
        out(f"  [{name}] round {r + 1}/{rounds} done")
    largest = max(torch.Size(s).numel() for s in shapes) * 4
    results = []
    for label, opt in optimizers.items():
        peak = peak_extra_bytes(opt.step)
        results.append(
            {
                "set": name,
                "row": label,
                "median_ms": statistics.median(times[label]) * 1e3,
                "steps_timed": len(times[label]),
                "peak_extra_mb": peak / 2**20,
                "peak_extra_in_largest_params": peak / largest,
            }
        )
        del opt
    optimizers.clear()
    gc.collect()
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes_by_set = {name: PARAMETER_SETS[name]() for name in args.sets}
    results = []
    for name, shapes in shapes_by_set.items():
        print(f"{name}: {len(shapes)} tensors", flush=True)
        results += bench_set(name, shapes, args.steps, args.rounds, args.warmup)
    report = markdown(results, shapes_by_set)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    args.output.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
