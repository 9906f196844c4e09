"""Peak memory of a training step on GPT-2 small: the ordinary loop against ``StepInBackward``.

    python -m benchmarks.step_in_backward_memory [--steps 3] [--seq-len 128] [--fused]

Each mode runs in a fresh process (GPT-2 small from ``transformers.GPT2Config()``, 124.4 M
parameters, built without downloads; random token batches). After two warm-up steps have
created the optimizer state, the peak resident memory of the next steps is measured from
``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``) with glibc returning large
frees to the system at once (``MALLOC_MMAP_THRESHOLD_``), so freed gradients do not linger as
resident memory. Reported: the peak above the memory held between steps, for each mode, and
the saving against the size of all gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.step_time import MMAP_ENV, peak_extra_bytes

MODES = ("ordinary", "step_in_backward")


def _worker(mode: str, steps: int, seq_len: int, fused: bool, threads: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ano_optimizer import Ano
    from ano_optimizer.step_in_backward import StepInBackward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    params = [p for p in model.parameters() if p.requires_grad]
    gradient_bytes = sum(p.numel() * p.element_size() for p in params)
    largest_bytes = max(p.numel() * p.element_size() for p in params)
    generator = torch.Generator().manual_seed(1)

    def loss() -> torch.Tensor:
        tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
        return model(tokens, labels=tokens).loss

    if mode == "ordinary":
        optimizer = Ano(params, lr=1e-4, fused=fused)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        _trainer = StepInBackward(params, lr=1e-4, fused=fused)  # its hooks do the updates

        def step() -> None:
            loss().backward()
            assert all(p.grad is None for p in params)

    for _ in range(2):
        step()
    peaks = [peak_extra_bytes(step) for _ in range(steps)]
    return {
        "mode": mode,
        "peak_extra_bytes": max(peaks),
        "gradient_bytes": gradient_bytes,
        "largest_gradient_bytes": largest_bytes,
        "parameters": sum(p.numel() for p in params),
    }


def run_mode(mode: str, steps: int, seq_len: int, fused: bool, threads: int) -> dict:
    code = (
        "import json, sys\n"
        "from benchmarks.step_in_backward_memory import _worker\n"
        f"print(json.dumps(_worker({mode!r}, {steps}, {seq_len}, {fused}, {threads})))\n"
    )
    env = {**os.environ, **MMAP_ENV, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(results: dict, args) -> str:
    ordinary, in_backward = results["ordinary"], results["step_in_backward"]
    mib = 2**20
    saving = ordinary["peak_extra_bytes"] - in_backward["peak_extra_bytes"]
    return "\n".join(
        [
            f"GPT-2 small ({ordinary['parameters'] / 1e6:.1f} M parameters), batch 1 x "
            f"{args.seq_len} tokens, {'fused' if args.fused else 'default'} Ano path, "
            f"peak over {args.steps} steps after 2 warm-up steps:",
            "",
            "| mode | peak above the memory held between steps (MiB) |",
            "|---|---:|",
            f"| ordinary loop | {ordinary['peak_extra_bytes'] / mib:.0f} |",
            f"| StepInBackward | {in_backward['peak_extra_bytes'] / mib:.0f} |",
            "",
            f"Saving: {saving / mib:.0f} MiB, {saving / ordinary['gradient_bytes']:.2f}x the "
            f"{ordinary['gradient_bytes'] / mib:.0f} MiB of all gradients (the largest gradient, "
            f"the tied embedding, is {ordinary['largest_gradient_bytes'] / mib:.0f} MiB).",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fused", action="store_true", help="use Ano(fused=True)")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/step_in_backward_memory.json")
    )
    args = parser.parse_args(argv)
    results = {}
    for mode in MODES:
        print(f"{mode}: building GPT-2 small and stepping ...", flush=True)
        results[mode] = run_mode(mode, args.steps, args.seq_len, args.fused, args.threads)
        print(f"  peak extra: {results[mode]['peak_extra_bytes'] / 2**20:.0f} MiB", flush=True)
    report = markdown(results, args)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    args.output.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
