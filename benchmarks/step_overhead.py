"""The fixed cost of a fused optimizer step: the whole ``step()`` on one-element tensors, where
the kernel has nothing to move and what is left is the Python and the calls around it.

    python -m benchmarks.step_overhead [--tensors 161] [--rounds 60] [--threads 2]

Two conditions: hot (step after step, every object in cache) and cold (a pass over a 256 MB
buffer before each step evicts the caches, as forward and backward do in training). Rows are
interleaved within each round; the figure is the median over rounds, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ano_optimizer import Ano


def _two_groups(ps):
    """The decay / no-decay split that create_optimizer and the frameworks build."""
    half = len(ps) // 2
    return [{"params": ps[:half], "weight_decay": 0.05}, {"params": ps[half:], "weight_decay": 0}]


ROWS = {
    "Ano fused=True": lambda ps: Ano(ps, lr=1e-4, fused=True),
    "Ano fused=True, bf16 state": lambda ps: Ano(
        ps, lr=1e-4, fused=True, state_dtype=torch.bfloat16
    ),
    "AdamW fused=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    "Ano fused=True, 2 groups": lambda ps: Ano(_two_groups(ps), lr=1e-4, fused=True),
    "AdamW fused=True, 2 groups": lambda ps: torch.optim.AdamW(
        _two_groups(ps), lr=1e-4, fused=True
    ),
    "Ano default (foreach=None)": lambda ps: Ano(ps, lr=1e-4),
    "AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
}


def measure(tensors: int, rounds: int, rows=None) -> dict[str, dict[str, float]]:
    """Median microseconds per ``step()``, hot and cold, for each row."""
    rows = rows or ROWS
    optimizers = {}
    for label, make in rows.items():
        params = [torch.zeros(1, requires_grad=True) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[label] = make(params)
        optimizers[label].step()  # state, and the kernel build
    flush = torch.empty(64 << 20)  # 256 MB: more than the caches hold
    times: dict[str, dict[str, list[int]]] = {label: {"hot": [], "cold": []} for label in rows}
    for _ in range(rounds):
        for label, optimizer in optimizers.items():
            flush.add_(1.0)
            start = time.perf_counter_ns()
            optimizer.step()
            times[label]["cold"].append(time.perf_counter_ns() - start)
            optimizer.step()  # objects back in cache
            start = time.perf_counter_ns()
            optimizer.step()
            times[label]["hot"].append(time.perf_counter_ns() - start)
    return {
        label: {kind: statistics.median(ns) / 1e3 for kind, ns in by_kind.items()}
        for label, by_kind in times.items()
    }


def markdown(results: dict[str, dict[str, float]], tensors: int, rounds: int) -> str:
    lines = [
        f"Whole `step()` on {tensors} one-element tensors, median of {rounds} rounds, µs.",
        "",
        "| row | hot | cold (after a cache flush) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {r['hot']:.0f} | {r['cold']:.0f} |" for label, r in results.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=161, help="161: ResNet-50's count")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(markdown(measure(args.tensors, args.rounds), args.tensors, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
