"""Fused Ano against AdamW(fused=True) and the memory-bandwidth floor (fp32 params, CPU).

    python -m benchmarks.fused_step [--sets resnet50 gpt2-small] [--rounds 30] [--threads 2]
                                    [--plot docs/assets/fused_step_time.png]

For each parameter set: the first fused step in a fresh process with an empty Inductor cache
(cold) and with the cache of that first process (warm); then, in one process, fused Ano with
float32 and with bfloat16 state, the default Ano path, ``AdamW(fused=True)`` and the bandwidth
floor, each stepped once per round with the rounds interleaved across rows. The floor is the
time of ``copy_floor.cpp``, which reads four and writes three flat buffers of the same total
size with one add per value (the bytes a fused step must move: 28 per parameter with float32
state, 20 with bfloat16), built and blocked like the fused kernel. The table gives each row's
median time, and its ratios to ``AdamW(fused=True)`` and to the floor as medians over rounds
of the ratio within a round, over all rounds and over the rounds whose floor ran at
``--fast-gb-s`` or more (this machine's memory runs faster in spells). ``--plot`` draws step
time against parameter count for the Ano and AdamW paths and the floor.
"""

from __future__ import annotations

import argparse
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
from ano_optimizer._torch_internals import build_cpu_kernel
from ano_optimizer.fused import cpu
from benchmarks.kernels import cpu_kernel
from benchmarks.shapes import PARAMETER_SETS, gpt2_small_shapes
from benchmarks.step_time import make_params


class AnoOnKernel:
    """Fused Ano whose CPU steps run on a chosen kernel (:func:`benchmarks.kernels.cpu_kernel`):
    the per-tensor torch.compile kernel, for comparison with the group one that
    ``fused=True`` uses; and "copy_floor", the group kernel with one add per value
    instead of the update, so that the "Ano fused=True" row's extra time over it is the cost of
    Ano's arithmetic, and its own extra time over the flat floor the cost of a step over many
    tensors."""

    def __init__(self, params, *, kernel: str, **options):
        self.optimizer = Ano(params, lr=1e-4, fused=True, **options)
        self.kernel = kernel

    def step(self):
        with cpu_kernel(self.kernel):
            self.optimizer.step()


FLOOR = "bandwidth floor (copy, float32 state)"
FLOOR_BF16 = "bandwidth floor (copy, bf16 state)"
SAME_TENSORS_FLOOR = "copy in the fused kernel, same tensors (float32 state)"


def rows() -> dict:
    return {
        "Ano fused=True": lambda ps: Ano(ps, lr=1e-4, fused=True),
        "Ano fused=True, per-tensor compiled kernel": lambda ps: AnoOnKernel(
            ps, kernel="per_tensor"
        ),
        "Ano fused=True, bf16 state": lambda ps: Ano(
            ps, lr=1e-4, fused=True, state_dtype=torch.bfloat16
        ),
        "Ano default (foreach=None)": lambda ps: Ano(ps, lr=1e-4),
        "Ano foreach=True": lambda ps: Ano(ps, lr=1e-4, foreach=True),
        "AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        SAME_TENSORS_FLOOR: lambda ps: AnoOnKernel(ps, kernel="copy_floor"),
        FLOOR: CopyFloor,
        FLOOR_BF16: lambda ps: CopyFloor(ps, torch.bfloat16),
    }


class CopyFloor:
    """The bandwidth floor as a benchmark row: ``copy_floor.cpp`` over four flat buffers as
    large as the parameter set (three written), stepped like an optimizer. Timed in the same
    rounds as the optimizers, it sees the same memory conditions; on this machine those change
    from minute to minute by tens of percent."""

    def __init__(self, params, state_dtype: torch.dtype = torch.float32):
        self.numel = sum(p.numel() for p in params)
        state_type = {**cpu._CPU_STATE_TYPES, torch.uint8: "uint8_t"}[state_dtype]
        self.kernel = build_cpu_kernel(
            (Path(__file__).parent / "copy_floor.cpp").read_text(),
            ["float*", "const float*", f"{state_type}*", f"{state_type}*", "int64_t", "int64_t"],
            STATE_T=state_type,
        )
        # Non-zero values: an untouched zero buffer can be the kernel's shared zero page, which
        # reads from cache and would make the floor too fast.
        n = self.numel
        # Cut into the units of work of the kernel it is the floor of.
        self.block = cpu._CODES_BLOCK if state_dtype == torch.uint8 else cpu._CPU_BLOCK
        self.buffers = (
            torch.full((n,), 1.0),
            torch.full((n,), 1e-3),
            torch.full((n,), 1.0, dtype=state_dtype),
            torch.full((n,), 1.0, dtype=state_dtype),
        )

    def step(self):
        self.kernel(*self.buffers, self.numel, self.block)


def _printed_number(code: str, env: dict | None = None) -> float:
    """Run ``code`` in a fresh interpreter; return the number it prints last."""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


_FIRST_STEP = """
import time, torch
torch.set_num_threads({threads})
from ano_optimizer import Ano
from benchmarks.shapes import PARAMETER_SETS
from benchmarks.step_time import make_params
opt = Ano(make_params(PARAMETER_SETS[{name!r}]()), lr=1e-4, fused=True)
start = time.perf_counter()
opt.step()
print(time.perf_counter() - start)
"""


def first_step_seconds(name: str, threads: int, cache_dir: str) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    return _printed_number(_FIRST_STEP.format(name=name, threads=threads), env)


def time_rows(
    shapes, rounds: int, table: dict, out=print, tag="", draws: int = 3
) -> dict[str, list[float]]:
    """Step every row once per round, rows interleaved, for ``rounds`` rounds; return each
    row's step times in ms, in round order.

    One step per row per round keeps the rows of a round within a few hundred milliseconds of
    each other: this machine's memory bandwidth changes by up to 50 % from one minute to the
    next, and paired ratios cancel that. Every row also gets fresh tensors ``draws`` times
    (evenly over the rounds): where an allocation lands moved one row's time by up to 10 %
    against an identical row's in the same rounds.
    """
    times: dict[str, list[float]] = {label: [] for label in table}
    parts = max(1, min(draws, rounds))
    draw_rounds = [rounds // parts + (i < rounds % parts) for i in range(parts)]
    done = 0
    for draw, count in enumerate(draw_rounds):
        optimizers = {label: make(make_params(shapes)) for label, make in table.items()}
        for label, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(2):
                opt.step()
            if draw == 0:
                out(f"  {tag} warm-up {label}: {time.perf_counter() - start:.1f} s")
        for _ in range(count):
            for label, opt in optimizers.items():
                start = time.perf_counter()
                opt.step()
                times[label].append((time.perf_counter() - start) * 1e3)
            done += 1
            if done % max(1, rounds // 5) == 0 or done == rounds:
                out(f"  {tag} timing round {done}/{rounds}")
        del optimizers  # free this draw's tensors before the next one allocates its own
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator / denominator, both timed in the same round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def floor_gb_s(numel: int, ms: float, bytes_per_parameter: int = 28) -> float:
    """The bandwidth of a floor step over ``numel`` parameters that took ``ms`` milliseconds:
    28 bytes each with float32 state, 16 with 8-bit codes."""
    return bytes_per_parameter * numel / ms / 1e6


def fast_rounds(floor_ms: list[float], numel: int, gb_s: float) -> list[int]:
    """The rounds whose flat floor moved at least ``gb_s`` GB/s. This machine's memory runs at
    50 to 60 GB/s most of the time and at 80 to 98 GB/s in spells; arithmetic that hides under
    the memory traffic at the usual speed can show in those."""
    return [i for i, ms in enumerate(floor_ms) if floor_gb_s(numel, ms) >= gb_s]


def bench_set(name: str, rounds: int, threads: int, fast_gb_s: float = 75.0) -> dict:
    shapes = PARAMETER_SETS[name]()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"{name}: {len(shapes)} tensors, {numel / 1e6:.1f} M parameters", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        cold = first_step_seconds(name, threads, cache)
        print(f"  first fused step, empty Inductor cache: {cold:.1f} s", flush=True)
        warm = first_step_seconds(name, threads, cache)
        print(f"  first fused step, cache of that run: {warm:.1f} s", flush=True)
    times = time_rows(shapes, rounds, rows(), tag=f"[{name}]")
    floor32, floor16 = times.pop(FLOOR), times.pop(FLOOR_BF16)
    adamw = times["AdamW fused=True"]
    medians = {label: statistics.median(t) for label, t in times.items()}
    print(
        f"  bandwidth floor: {statistics.median(floor32):.1f} ms "
        f"(bf16 state: {statistics.median(floor16):.1f} ms)",
        flush=True,
    )
    fast = fast_rounds(floor32, numel, fast_gb_s)
    return {
        "set": name,
        "tensors": len(shapes),
        "parameters": numel,
        "rounds": rounds,
        "first_step_cold_s": cold,
        "first_step_warm_cache_s": warm,
        "median_ms": medians,
        "times_ms": {**times, FLOOR: floor32, FLOOR_BF16: floor16},
        "x_adamw_fused": {label: paired_ratio(t, adamw) for label, t in times.items()},
        "fast_gb_s": fast_gb_s,
        "fast_rounds": len(fast),
        "x_adamw_fused_fast": {
            label: paired_ratio([t[i] for i in fast], [adamw[i] for i in fast]) if fast else None
            for label, t in times.items()
        },
        "floor_fraction": {
            label: paired_ratio(floor16 if "bf16" in label else floor32, t)
            for label, t in times.items()
        },
        "floor_ms_fp32_state": statistics.median(floor32),
        "floor_ms_bf16_state": statistics.median(floor16),
        "floor_gb_s": floor_gb_s(numel, statistics.median(floor32)),
    }


def markdown(results: list[dict], threads: int) -> str:
    lines = []
    for res in results:
        med = res["median_ms"]
        lines += [
            f"**{res['set']}**: {res['tensors']} tensors, {res['parameters'] / 1e6:.1f} M "
            f"parameters, {threads} threads. First fused step: {res['first_step_cold_s']:.1f} s "
            f"with an empty Inductor cache, {res['first_step_warm_cache_s']:.1f} s with a warm "
            f"one. Bandwidth floor (4-read/3-write C++ copy, copy_floor.cpp): "
            f"{res['floor_ms_fp32_state']:.1f} ms ({res['floor_gb_s']:.1f} GB/s), "
            f"{res['floor_ms_bf16_state']:.1f} ms with bf16 state. {res['rounds']} rounds; the "
            "ratios are medians over rounds of the ratio within a round; the last column takes "
            f"only the {res['fast_rounds']} rounds whose floor ran at {res['fast_gb_s']:.0f} GB/s "
            "or more.",
            "",
            f"| row | median ms/step | × AdamW fused | % of bandwidth floor "
            f"| × AdamW fused, rounds ≥ {res['fast_gb_s']:.0f} GB/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, ms in med.items():
            fast = res["x_adamw_fused_fast"][label]
            lines.append(
                f"| {label} | {ms:.1f} | {res['x_adamw_fused'][label]:.2f} "
                f"| {100 * res['floor_fraction'][label]:.0f} % "
                f"| {'–' if fast is None else f'{fast:.2f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, rounds: int, threads: int) -> list[dict]:
    """Step time against parameter count on GPT-2-like sets of growing width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {k: v for k, v in rows().items() if "bf16" not in k}
    points = []
    for width in (128, 256, 512, 768):
        shapes = gpt2_small_shapes(width=width)
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(f"plot: width {width}, {numel / 1e6:.0f} M parameters", flush=True)
        times = time_rows(shapes, rounds, table, out=lambda _: None)
        medians = {label: statistics.median(t) for label, t in times.items()}
        points.append({"parameters": numel, "median_ms": medians})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in table:
        style = (
            "-o"
            if label.startswith("Ano")
            else (":" if label in (FLOOR, SAME_TENSORS_FLOOR) else "--s")
        )
        ax.plot(
            [p["parameters"] / 1e6 for p in points],
            [p["median_ms"][label] for p in points],
            style,
            label=label,
        )
    ax.set_xlabel("parameters (millions, GPT-2-like tensors)")
    ax.set_ylabel("optimizer step (ms, median)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"Optimizer step time on CPU, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sets", nargs="+", default=list(PARAMETER_SETS), choices=list(PARAMETER_SETS)
    )
    parser.add_argument(
        "--rounds", type=int, default=30, help="interleaved rounds, one timed step per row each"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="write the step-time plot here")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/fused_step.json"))
    parser.add_argument(
        "--fast-gb-s",
        type=float,
        default=75.0,
        help="also give the ratios over the rounds whose floor ran at least this fast",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [bench_set(name, args.rounds, args.threads, args.fast_gb_s) for name in args.sets]
    report = markdown(results, args.threads)
    print(report)
    points = plot(args.plot, max(4, args.rounds // 3), args.threads) if args.plot else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"torch": torch.__version__, "results": results, "plot": points}, indent=2)
    )
    args.output.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
