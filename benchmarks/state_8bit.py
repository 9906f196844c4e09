"""8-bit Ano (``state_dtype=torch.uint8``): saved-state bytes and fused CPU step time.

    python -m benchmarks.state_8bit [--sets resnet50 gpt2-small] [--rounds 15] [--threads 2]
                                    [--json results.json]

For each parameter set (fp32 parameters of the real model's shapes): the bytes of
``torch.save(optimizer.state_dict())`` after one step for Ano with float32, bfloat16 and 8-bit
state and for ``AdamW`` and torchao's ``AdamW8bit`` (where torchao imports), with their ratio
to float32-state Ano; then, in one process, fused Ano with float32 and 8-bit state and
``AdamW(fused=True)``, each stepped once per round with the rounds interleaved, as median time
and median per-round ratio to ``AdamW(fused=True)``, with the bandwidth floors of both kinds of
state in the same rounds (``copy_floor.cpp``: the same bytes read and written, no arithmetic)
and the 8-bit step's ratio to its own. The quantizer row times quantizing 1 M
float32 values the way each format does on the CPU: this project's bit-cut
(:func:`ano_optimizer.blockwise8.quantize`) and torchao's dynamic-map binary search. Last, the formats' error against float32 state on a
synthetic gradient sequence (:func:`format_errors`): this project's choice of rounding, the
alternatives, bfloat16, and torchao's dynamic map.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import time

import torch

from ano_optimizer import Ano, blockwise8, rounding
from benchmarks.fused_step import floor_gb_s, paired_ratio
from benchmarks.kernels import CopyFloor
from benchmarks.shapes import PARAMETER_SETS
from benchmarks.step_time import make_params


def _torchao_adamw8bit():
    try:
        from torchao.optim import AdamW8bit
    except Exception:  # not installed, or not for this torch
        return None
    return AdamW8bit


def state_bytes(optimizer) -> int:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return len(buffer.getvalue())


def saved_sizes(shapes) -> dict[str, int]:
    rows = {
        "Ano, float32 state": lambda ps: Ano(ps),
        "Ano, bfloat16 state": lambda ps: Ano(ps, state_dtype=torch.bfloat16),
        "Ano, 8-bit state": lambda ps: Ano(ps, state_dtype=torch.uint8, fused=True),
        "AdamW": lambda ps: torch.optim.AdamW(ps, fused=True),
    }
    adamw8bit = _torchao_adamw8bit()
    if adamw8bit is not None:
        rows["torchao AdamW8bit"] = adamw8bit
    sizes = {}
    for label, make in rows.items():
        optimizer = make(make_params(shapes))
        if label == "torchao AdamW8bit":
            # Its state is created on the first step, which torch.compiles: the size is the
            # same without stepping once the state exists, so it is created without stepping.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": optimizer._new_buffer(p, True),
                        "exp_avg_sq": optimizer._new_buffer(p, False),
                    }
        else:
            optimizer.step()
        sizes[label] = state_bytes(optimizer)
        del optimizer
    return sizes


FLOOR_8BIT = "bandwidth floor (copy, 8-bit codes)"
FLOOR_FP32 = "bandwidth floor (copy, float32 state)"


def step_times(shapes, rounds: int) -> dict[str, list[float]]:
    rows = {
        "Ano fused, float32 state": lambda ps: Ano(ps, lr=1e-4, fused=True),
        "Ano fused, 8-bit state": lambda ps: Ano(ps, lr=1e-4, fused=True, state_dtype=torch.uint8),
        "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    optimizers = {label: make(make_params(shapes)) for label, make in rows.items()}
    # The memory traffic of each step with no arithmetic: 28 bytes per parameter as AdamW's
    # and float32-state Ano's, 16 as 8-bit state's (the floors need only the sizes).
    sizes = [torch.empty(s, device="meta") for s in shapes]
    optimizers[FLOOR_FP32] = CopyFloor(sizes)
    optimizers[FLOOR_8BIT] = CopyFloor(sizes, torch.uint8)
    for optimizer in optimizers.values():
        optimizer.step()
        optimizer.step()
    times: dict[str, list[float]] = {label: [] for label in optimizers}
    for _ in range(rounds):
        for label, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[label].append(time.perf_counter() - start)
    return times


def quantizer_times(rounds: int = 9) -> dict[str, float]:
    x = torch.randn(4096, 256).abs()  # 1 M values in rows of one block
    times = {}

    def median(fn) -> float:
        fn()
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    times["bit-cut (this project, eager torch)"] = median(
        lambda: blockwise8.quantize(x, None, signed=False)
    )
    try:
        from torchao.optim.quant_utils import (
            create_dynamic_map,
            quantize_8bit_with_qmap,
            scale_tensor,
        )
    except Exception:
        return times
    qmap = torch.tensor(create_dynamic_map(False))

    def torchao_quantize():
        unit, _ = scale_tensor(x, 256)
        quantize_8bit_with_qmap(unit, qmap)

    times["dynamic map (torchao, eager torch)"] = median(torchao_quantize)
    return times


def _round_trip(kind: str, signed: bool, x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` stored and read back in one of the compared formats."""
    stream = rounding.EXP_AVG_STREAM if signed else rounding.EXP_AVG_SQ_STREAM
    if kind == "bfloat16":
        return rounding.stochastic_round_to_bfloat16(x, step, stream).float()
    if kind == "dynamic map":
        from torchao.optim.quant_utils import (
            create_dynamic_map,
            quantize_8bit_with_qmap,
            scale_tensor,
        )

        qmap = torch.tensor(create_dynamic_map(signed))
        unit, scale = scale_tensor(x.reshape(-1), blockwise8.BLOCK)
        codes = quantize_8bit_with_qmap(unit, qmap)
        return (qmap[codes.long()].view(-1, blockwise8.BLOCK) * scale.view(-1, 1)).view(x.shape)
    stochastic = kind == "stochastic" or (kind == "shipped" and not signed)
    noise = (
        rounding.hashed_noise(x, rounding.noise_parameters(step, stream)) if stochastic else None
    )
    return blockwise8.dequantize(*blockwise8.quantize(x, noise, signed=signed), signed=signed)


def format_errors(steps: int = 1000, beta2s=(0.99, 0.999)) -> dict[str, dict[str, float]]:
    """How far each format's update strays from float32 state's on one synthetic gradient
    sequence (64 rows of 256 values whose scales span about 8 decades, a slowly varying
    magnitude, the same gradients for every format): the relative error of the update over
    the last quarter of the steps, and the final ``exp_avg_sq`` over float32 state's (mean)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(64, 256, generator=gen) * 1.5)
    kinds = {
        "this project (exp_avg nearest, exp_avg_sq stochastic)": "shipped",
        "both rounded to nearest": "nearest",
        "both rounded stochastically": "stochastic",
        "bfloat16, stochastic": "bfloat16",
    }
    if _torchao_adamw8bit() is not None:
        kinds["torchao's dynamic map, nearest"] = "dynamic map"
    results: dict[str, dict[str, float]] = {}
    for beta2 in beta2s:

        def run(kind: str | None, beta2: float = beta2):
            m, v = torch.zeros(64, 256), torch.zeros(64, 256)
            noise_gen = torch.Generator().manual_seed(1)
            updates = []
            for k in range(1, steps + 1):
                g = (0.3 + torch.randn(64, 256, generator=noise_gen)) * scales
                g = g * (1 + 0.5 * math.sin(k / 100))
                v = v + (1 - beta2) * (torch.sign(g * g - v) * g * g - v)
                m = m + 0.08 * (g - m)
                c = (1 - beta2**k) ** 0.5
                if k > steps * 3 // 4:
                    updates.append(torch.sign(m) * g.abs() * c / (v.sqrt() + 1e-8 * c))
                if kind is not None:
                    m, v = _round_trip(kind, True, m, k), _round_trip(kind, False, v, k)
            return torch.stack(updates), v

        reference, v_reference = run(None)
        for label, kind in kinds.items():
            updates, v = run(kind)
            results.setdefault(label, {})[f"update error, beta2={beta2}"] = float(
                (updates - reference).norm() / reference.norm()
            )
            results[label][f"v / float32 v, beta2={beta2}"] = float((v / v_reference).mean())
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(PARAMETER_SETS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"threads": args.threads, "rounds": args.rounds, "sets": {}}
    for name in args.sets:
        shapes = PARAMETER_SETS[name]()
        count = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n{name}: {len(shapes)} tensors, {count / 1e6:.1f} M parameters", flush=True)
        sizes = saved_sizes(shapes)
        base = sizes["Ano, float32 state"]
        print(f"  {'saved state':38s} {'MB':>8s} {'vs fp32-state Ano':>18s}")
        for label, size in sizes.items():
            print(f"  {label:38s} {size / 1e6:8.1f} {size / base:18.3f}")
        times = step_times(shapes, args.rounds)
        adamw = times["AdamW(fused=True)"]
        print(
            f"  {'step (median of ' + str(args.rounds) + ' rounds)':38s} {'ms':>8s} {'vs AdamW fused':>18s}"
        )
        rows = {}
        for label, samples in times.items():
            ratio = paired_ratio(samples, adamw)
            rows[label] = {"median_ms": statistics.median(samples) * 1e3, "ratio_to_adamw": ratio}
            print(f"  {label:38s} {rows[label]['median_ms']:8.1f} {ratio:18.3f}", flush=True)
        over_floor = paired_ratio(times["Ano fused, 8-bit state"], times[FLOOR_8BIT])
        gb_s = floor_gb_s(count, statistics.median(times[FLOOR_8BIT]) * 1e3, 16)
        print(f"  8-bit step / its floor: {over_floor:.3f} (the floor moved {gb_s:.1f} GB/s)")
        report["sets"][name] = {
            "parameters": count,
            "saved_bytes": sizes,
            "saved_ratio_to_fp32_ano": {k: v / base for k, v in sizes.items()},
            "step": rows,
            "8bit_step_over_its_floor": over_floor,
            "floor_8bit_gb_s": gb_s,
        }
    quantizers = quantizer_times()
    print("\n  quantizing 1 M float32 values (median)")
    for label, seconds in quantizers.items():
        print(f"  {label:38s} {seconds * 1e3:8.2f} ms")
    report["quantize_1m_ms"] = {k: v * 1e3 for k, v in quantizers.items()}
    errors = format_errors()
    columns = list(next(iter(errors.values())))
    print("\n  | format | " + " | ".join(columns) + " |")
    print("  |---|" + "---:|" * len(columns))
    for label, row in errors.items():
        print(f"  | {label} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    report["format_errors"] = errors
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
