"""The hand-written Triton kernel (``ano_optimizer/fused/triton.py``) on CPU through Triton's
interpreter (``TRITON_INTERPRET=1``), against the compiled per-tensor kernel.

The interpreter is chosen when the kernel is defined, so the comparison runs in a fresh process
with the variable set; it reports the largest differences as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from ano_optimizer import step_scalars
    from ano_optimizer.fused.triton import BLOCK, triton_group_step
    from benchmarks.kernels import cpu_kernel
    from ano_optimizer.optimizer import ano

    HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    SHAPES = [(5,), (33, 7), (1,), (3, BLOCK + 5), (BLOCK,), (0,)]

    def run(use_triton, state_dtype, log, maximize, amp):
        torch.manual_seed(1)
        params = [torch.randn(s) for s in SHAPES]
        avgs = [torch.zeros(s, dtype=state_dtype) for s in SHAPES]
        avg_sqs = [torch.zeros(s, dtype=state_dtype) for s in SHAPES]
        steps = [torch.tensor(0.0) for _ in SHAPES]
        for k in range(5):
            grads = [torch.randn(s) for s in SHAPES]
            found_inf = torch.tensor(float(amp and k == 2))
            scale = torch.tensor(4.0 if amp else 1.0)
            if not use_triton:
                with cpu_kernel("per_tensor"):
                    ano(params, grads, avgs, avg_sqs, steps, fused=True,
                        logarithmic_schedule=log, maximize=maximize,
                        grad_scale=scale, found_inf=found_inf, **HYPER)
                continue
            # What benchmarks.kernels.AnoOnTriton does on a GPU.
            hyper = step_scalars._hyper_tensor(HYPER["lr"], HYPER["beta1"], HYPER["beta2"],
                                        HYPER["eps"], HYPER["weight_decay"], torch.device("cpu"))
            skip, inv_scale = step_scalars._amp_tensors(scale, found_inf, torch.device("cpu"))
            torch._foreach_add_(steps, 1.0 - skip)
            noise = step_scalars._noise_parameters(steps, avgs, avg_sqs, torch.device("cpu"))
            weights, corrections = step_scalars._step_scalars(
                steps, HYPER["beta1"], HYPER["beta2"], log, torch.float32, torch.device("cpu"))
            left = triton_group_step(params, grads, avgs, avg_sqs, weights, corrections,
                                       hyper, skip, inv_scale, noise, maximize)
            assert left == [], left
        return params, avgs, avg_sqs, steps

    report = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        for log, maximize, amp in ((False, False, False), (True, True, False), (False, False, True)):
            ours, compiled = run(True, state_dtype, log, maximize, amp), run(False, state_dtype, log, maximize, amp)
            name = f"{state_dtype}-log{log}-max{maximize}-amp{amp}"
            report[name] = {
                "steps": [[s.item() for s in ours[3]], [s.item() for s in compiled[3]]],
                "max_param_diff": max((a - b).abs().max().item() for a, b in zip(ours[0], compiled[0]) if a.numel()),
                "max_moment_diff": max((a.float() - b.float()).abs().max().item()
                                       for x, y in zip(ours[1:3], compiled[1:3]) for a, b in zip(x, y) if a.numel()),
                "v_equal": all(torch.equal(a, b) for a, b in zip(ours[2], compiled[2])),
                "moved": any(not torch.equal(a, torch.zeros_like(a)) for a in ours[1] if a.numel()),
            }
    print(json.dumps(report))
    """
)


def test_triton_kernel_matches_the_compiled_kernel_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report) == 6
    for name, r in report.items():
        ours, compiled = r["steps"]
        assert ours == compiled == [4.0 if "ampTrue" in name else 5.0] * 6, name
        assert r["moved"], name
        # The same float32 operations in the same order, IEEE division and square root, the
        # same rounding noise: on CPU (the interpreter runs them in NumPy float32) the bits agree.
        # A GPU build may contract multiply-adds; benchmarks/gpu_check.py compares it there.
        assert r["v_equal"], name
        assert r["max_moment_diff"] == 0.0, (name, r)
        assert r["max_param_diff"] == 0.0, (name, r)
