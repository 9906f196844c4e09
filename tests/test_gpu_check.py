"""``benchmarks/gpu_check.py`` waits for a GPU that most sessions are not lent: its checks that
need no GPU run here, on CPU, so the script cannot rot before one is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_gpu_check_runs_its_device_independent_checks_on_cpu(tmp_path):
    output = tmp_path / "gpu_check.json"
    run = _gpu_check("--device", "cpu", "--output", str(output))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(output.read_text())
    assert report["device"] == "cpu"
    for name in ("equivalence", "compiled_step", "grad_scaler"):
        assert report[name]["ok"] is True, report[name]
    assert report["equivalence"]["moment_excess"] <= 1
    assert report["compiled_step"]["graphs"] == 1
    assert report["grad_scaler"]["step"] == 1.0
    for name in ("cuda_graph", "group_step_time", "8bit", "bandwidth"):
        assert report[name] == {"skipped": "needs CUDA"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the whole check would run")
def test_gpu_check_without_a_gpu_says_so():
    run = _gpu_check()
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
