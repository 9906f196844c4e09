"""Fused Ano against AdamW(fused=True) and the memory-bandwidth floor (fp32 params, CPU).

    python -m benchmarks.fused_step [--sets resnet50 gpt2-small] [--rounds 30] [--threads 2]
                                    [--plot docs/assets/fused_step_time.png]

For each parameter set: the first fused step in a fresh process with an empty kernel cache
(the one-time build of the C++ kernel included), with the cache that process left, and
``AdamW(fused=True)``'s, each timed after the process has imported ``torch._dynamo`` (which
constructing any torch optimizer does, and which is timed on its own); then, in one process,
fused Ano with float32, bfloat16 and 8-bit state, in two parameter groups (decay / no decay,
as Hugging Face's Trainer and timm make them; AdamW too), fused Ano on the operator's torch
implementation (what runs where no C++ compiler is found), Ano's default path,
``AdamW(fused=True)`` and the bandwidth floors, each stepped once per round with the rounds
interleaved across rows. A floor
is the time of ``copy_floor.cpp``, which reads four and writes three flat buffers of the same
total size with one add per value (the bytes a fused step must move: 28 per parameter with
float32 state, 20 with bfloat16, 16 with 8-bit codes), built with the kernel's flags and cut
into its units of work; an arithmetic floor is the kernel's own work over as many elements with
every operand in cache (:class:`benchmarks.kernels.ArithmeticFloor`). A step is no faster than
either floor. The table gives each row's median time and its ratio to ``AdamW(fused=True)``
and to its floors, as medians over rounds of the ratio within a round;
the header names the CPU and the vector instructions the kernel was built for. ``--plot``
draws step time against parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ano_optimizer import Ano
from ano_optimizer.fused import native
from benchmarks.kernels import ArithmeticFloor, CopyFloor, implementation
from benchmarks.shapes import PARAMETER_SETS, gpt2_small_shapes
from benchmarks.step_time import make_params


class AnoOnTorchImplementation:
    """Fused Ano whose CPU steps run the operator's torch implementation, as where the C++
    kernel cannot be built."""

    def __init__(self, params, **options):
        self.optimizer = Ano(params, lr=1e-4, fused=True, **options)

    def step(self):
        with implementation("torch"):
            self.optimizer.step()


FLOORS = {
    torch.float32: "bandwidth floor, float32 state (28 bytes per parameter)",
    torch.bfloat16: "bandwidth floor, bfloat16 state (20 bytes per parameter)",
    torch.uint8: "bandwidth floor, 8-bit state (16 bytes per parameter)",
}
ARITHMETIC_FLOORS = {
    torch.float32: "arithmetic floor, float32 state (the kernel, operands in cache)",
    torch.bfloat16: "arithmetic floor, bfloat16 state",
    torch.uint8: "arithmetic floor, 8-bit state",
}
ADAMW = "AdamW fused=True"
# Each Ano row's state dtype, for its floor.
_STATE = {
    "Ano fused=True": torch.float32,
    "Ano fused=True, 2 groups (decay / no decay)": torch.float32,
    "Ano fused=True, bfloat16 state": torch.bfloat16,
    "Ano fused=True, 8-bit state": torch.uint8,
    "Ano fused=True, torch implementation": torch.float32,
}


def decay_groups(params: list) -> list[dict]:
    """The two parameter groups Hugging Face's Trainer and timm make: weight decay for matrices
    and kernels, none for biases and norms."""
    return [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]


def rows() -> dict:
    return {
        "Ano fused=True": lambda ps: Ano(ps, lr=1e-4, fused=True),
        "Ano fused=True, 2 groups (decay / no decay)": lambda ps: Ano(
            decay_groups(ps), lr=1e-4, fused=True
        ),
        "Ano fused=True, bfloat16 state": lambda ps: Ano(
            ps, lr=1e-4, fused=True, state_dtype=torch.bfloat16
        ),
        "Ano fused=True, 8-bit state": lambda ps: Ano(
            ps, lr=1e-4, fused=True, state_dtype=torch.uint8
        ),
        "Ano fused=True, torch implementation": AnoOnTorchImplementation,
        "Ano default (foreach=None)": lambda ps: Ano(ps, lr=1e-4),
        ADAMW: lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "AdamW fused=True, 2 groups (decay / no decay)": lambda ps: torch.optim.AdamW(
            decay_groups(ps), lr=1e-4, fused=True
        ),
        **{
            label: (lambda d: lambda ps: CopyFloor(ps, d))(dtype) for dtype, label in FLOORS.items()
        },
        **{
            label: (lambda d: lambda ps: ArithmeticFloor(ps, d))(dtype)
            for dtype, label in ARITHMETIC_FLOORS.items()
        },
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_FIRST_STEP = """
import time, torch
torch.set_num_threads({threads})
from benchmarks.shapes import PARAMETER_SETS
from benchmarks.step_time import make_params
params = make_params(PARAMETER_SETS[{name!r}]())
start = time.perf_counter()
import torch._dynamo
imported = time.perf_counter()
{construct}
opt.step()
print(imported - start, time.perf_counter() - imported)
"""


ANO_FIRST_STEP = "from ano_optimizer import Ano\nopt = Ano(params, lr=1e-4, fused=True)"
ADAMW_FIRST_STEP = "opt = torch.optim.AdamW(params, lr=1e-4, fused=True)"


@dataclass(frozen=True)
class FirstStep:
    """A fresh process's first step: ``torch_import_s``, its import of ``torch._dynamo``, which
    constructing any torch optimizer does (``torch.optim.Optimizer.add_param_group`` is
    wrapped by it) unless the program has imported it already (building a model with timm or
    torchvision does); ``step_s``, the rest: import, construction (which builds or loads the
    kernel) and the first step."""

    torch_import_s: float
    step_s: float


def first_step_seconds(
    name: str, threads: int, cache_dir: str, construct=ANO_FIRST_STEP
) -> FirstStep:
    """The first fused step in a fresh process whose kernel cache is ``cache_dir``.
    ``construct=ADAMW_FIRST_STEP``: the same for ``AdamW(fused=True)``, whose first step pays
    what any torch optimizer's does (the state's first touch, torch's own lazy imports)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": cache_dir}
    code = _FIRST_STEP.format(name=name, threads=threads, construct=construct)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    torch_import, step = (float(x) for x in out.stdout.split()[-2:])
    return FirstStep(torch_import, step)


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
    28 bytes each with float32 state, 20 with bfloat16, 16 with 8-bit codes."""
    return bytes_per_parameter * numel / ms / 1e6


def bench_set(name: str, rounds: int, threads: int) -> dict:
    shapes = PARAMETER_SETS[name]()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"{name}: {len(shapes)} tensors, {numel / 1e6:.1f} M parameters", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        cold = first_step_seconds(name, threads, cache)
        print(f"  first fused step, empty kernel cache (build included): {cold.step_s:.1f} s")
        warm = first_step_seconds(name, threads, cache)
        print(f"  first fused step, kernel cached: {warm.step_s:.1f} s", flush=True)
        adamw_first = first_step_seconds(name, threads, cache, ADAMW_FIRST_STEP)
        print(f"  first step of AdamW(fused=True): {adamw_first.step_s:.1f} s", flush=True)
        print(f"  torch's import of torch._dynamo before them: {warm.torch_import_s:.1f} s")
    times = time_rows(shapes, rounds, rows(), tag=f"[{name}]")
    adamw = times[ADAMW]
    return {
        "set": name,
        "tensors": len(shapes),
        "parameters": numel,
        "rounds": rounds,
        "first_step_cold_s": cold.step_s,
        "first_step_warm_cache_s": warm.step_s,
        "first_step_adamw_fused_s": adamw_first.step_s,
        "torch_dynamo_import_s": warm.torch_import_s,
        "median_ms": {label: statistics.median(t) for label, t in times.items()},
        "times_ms": times,
        "x_adamw_fused": {label: paired_ratio(t, adamw) for label, t in times.items()},
        "x_floor": {
            label: paired_ratio(times[label], times[FLOORS[dtype]])
            for label, dtype in _STATE.items()
        },
        "x_arithmetic_floor": {
            label: paired_ratio(times[label], times[ARITHMETIC_FLOORS[dtype]])
            for label, dtype in _STATE.items()
        },
        "floor_gb_s": {
            FLOORS[d]: floor_gb_s(numel, statistics.median(times[FLOORS[d]]), b)
            for d, b in ((torch.float32, 28), (torch.bfloat16, 20), (torch.uint8, 16))
        },
    }


def _dynamo_import_words(seconds: float) -> str:
    if seconds < 0.05:
        return "already imported by building the model's parameter shapes"
    return f"{seconds:.1f} s"


def markdown(results: list[dict], threads: int, machine: dict) -> str:
    lines = [
        f"CPU: {machine['cpu']}, kernel built for {machine['isa']}; torch {machine['torch']}; "
        f"{threads} threads.",
        "",
    ]
    for res in results:
        lines += [
            f"**{res['set']}**: {res['tensors']} tensors, {res['parameters'] / 1e6:.1f} M "
            f"parameters. First fused step: {res['first_step_cold_s']:.1f} s with an empty "
            f"kernel cache (the build), {res['first_step_warm_cache_s']:.1f} s with it cached "
            f"(AdamW fused: {res['first_step_adamw_fused_s']:.1f} s), each after the "
            "import of torch._dynamo that constructing any torch optimizer does first "
            f"({_dynamo_import_words(res['torch_dynamo_import_s'])}). "
            f"{res['rounds']} rounds; ratios are medians over rounds of the ratio within a round.",
            "",
            "| row | median ms/step | × AdamW fused | × its bandwidth floor "
            "| × its arithmetic floor |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, ms in res["median_ms"].items():
            floors = (res["x_floor"].get(label), res["x_arithmetic_floor"].get(label))
            shown = " | ".join("" if x is None else f"{x:.2f}" for x in floors)
            lines.append(f"| {label} | {ms:.1f} | {res['x_adamw_fused'][label]:.2f} | {shown} |")
        lines.append("")
    return "\n".join(lines)


def plot(path: Path, rounds: int, threads: int) -> list[dict]:
    """Step time against parameter count on GPT-2-like sets of growing width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {k: v for k, v in rows().items() if "bfloat16" not in k and "2 groups" not in k}
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
        style = "-o" if label.startswith("Ano") else (":" if "floor" in label else "--s")
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
    ax.set_title(f"Optimizer step time on CPU ({cpu_model()}), {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = {
        "cpu": cpu_model(),
        "isa": native.cpu_vector_isa(),
        "torch": torch.__version__,
        "extra_cflags": os.environ.get(native.EXTRA_CFLAGS_ENV, ""),
    }
    if machine["extra_cflags"]:
        machine["isa"] += f" (built with {machine['extra_cflags']})"
    results = [bench_set(name, args.rounds, args.threads) for name in args.sets]
    report = markdown(results, args.threads, machine)
    print(report)
    points = plot(args.plot, max(4, args.rounds // 3), args.threads) if args.plot else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"machine": machine, "results": results, "plot": points}, indent=2)
    )
    args.output.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
