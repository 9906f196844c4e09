"""Fuzz: random mixes of odd tensors through every execution path, in subprocesses.

``fuzz_worker.py`` runs the cases and announces each before running it; should a case crash
the process, this test records it and starts a new worker after it, so one crash cannot hide
the cases after it. For every case: no path crashes; every path gives the same outcome (all
step, or all raise; 8-bit paths may refuse a float tensor put in place of their codes); a
raising step names Ano, is a ValueError/RuntimeError/TypeError and changed nothing; and
stepping paths agree on the values (float32 state paths with the single-tensor path, bfloat16
state paths with the eager bfloat16 one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
CASES = 480
SEED = 20261201
CLEAR_ERRORS = {"ValueError", "RuntimeError", "TypeError"}


def _run_all(first: int, count: int) -> tuple[list[dict], list[dict]]:
    """Every case's results, and the cases that crashed their worker."""
    results, crashed = [], []
    while count > 0:
        out = subprocess.run(
            [sys.executable, str(WORKER), str(first), str(count), str(SEED)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        begun = None
        done = 0
        for line in out.stdout.splitlines():
            if line.startswith("BEGIN "):
                begun = json.loads(line[6:])
            elif line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                begun = None
                done += 1
        if out.returncode == 0 and done == count:
            break
        if begun is None:
            raise AssertionError(f"the worker failed outside a case:\n{out.stderr[-3000:]}")
        crashed.append({"case": begun, "returncode": out.returncode, "stderr": out.stderr[-500:]})
        first, count = begun["index"] + 1, count - done - 1
    return results, crashed


@pytest.fixture(scope="module")
def fuzz():
    return _run_all(0, CASES)


@pytest.mark.slow
def test_no_odd_tensor_crashes_any_path(fuzz):
    _, crashed = fuzz
    assert crashed == []


@pytest.mark.slow
def test_every_path_steps_or_refuses_alike_and_a_refusal_changes_nothing(fuzz):
    results, _ = fuzz
    outcomes = {"ok": 0, "error": 0}
    for record in results:
        spec, runs = record["case"], record["results"]
        if any(run["outcome"] == "setup refused" for run in runs):
            continue  # torch itself refused to build this odd input
        # 8-bit paths keep codes beside their scales: a moment replaced by a float tensor is
        # theirs to refuse where float-state paths step with it (all of them, alike).
        refused_codes = [
            run for run in runs
            if "8bit" in run["path"] and run["outcome"] == "error"
            and "must be 8-bit codes" in run["message"]
        ]  # fmt: skip
        if refused_codes:
            assert len(refused_codes) == sum("8bit" in run["path"] for run in runs), (spec, runs)
            assert all(run["changed"] == [] for run in refused_codes), (spec, refused_codes)
            runs = [run for run in runs if "8bit" not in run["path"]]
        kinds = {run["path"]: run["outcome"] for run in runs}
        assert len(set(kinds.values())) == 1, (spec, kinds, runs)
        outcomes[runs[0]["outcome"]] += 1
        for run in runs:
            if run["outcome"] == "error":
                assert run["type"] in CLEAR_ERRORS and "Ano" in run["message"], (spec, run)
                assert run["changed"] == [], (spec, run)
        if runs[0]["outcome"] == "ok":
            by_path = {run["path"]: run["params"] for run in runs}
            for path, values in by_path.items():
                narrow = next((k for k in ("bf16", "8bit") if k in path), None)
                reference = by_path[f"{narrow}-state" if narrow else "single"]
                atol = 2e-2 if narrow else 1e-4
                for ours, theirs in zip(values, reference, strict=True):
                    if ours is None:
                        continue
                    ours, theirs = np.asarray(ours), np.asarray(theirs)
                    off = ~np.isclose(ours, theirs, rtol=1e-3, atol=atol, equal_nan=True)
                    assert off.mean() <= 0.05, (spec, path, int(off.sum()))
    # The mix reaches both outcomes often: the fuzz is not all refusals.
    assert outcomes["ok"] >= 40 and outcomes["error"] >= 100, outcomes


@pytest.mark.slow
@pytest.mark.parametrize(
    "odd",
    [
        [[1, "step freed"], [2, "step python int"]],
        [[0, "exp_avg freed"], [1, "lr meta"], [2, "step python int"]],
    ],
    ids=["freed-step-beside-an-int-step", "freed-moment-beside-an-int-step"],
)
def test_a_value_that_is_not_a_tensor_beside_a_freed_tensor_is_refused_on_every_path(odd):
    """Torch's error for an operator list holding a value that is not a tensor prints the list,
    and printing a tensor whose storage was freed crashed the process: every path refuses the
    step instead (in a subprocess, which a crash would end)."""
    spec = {"index": 0, "shapes": [[4, 3], [2, 3, 2, 2], [2, 3, 2, 2]], "odd": odd}
    code = (
        f"import json, sys; sys.path.insert(0, {str(WORKER.parent)!r}); import fuzz_worker as w; "
        f"print(json.dumps([w.run({spec!r}, path) for path in w.PATHS]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(out.stdout.splitlines()[-1])
    assert len(runs) == 12
    for run in runs:
        assert run["outcome"] == "error" and run["type"] in CLEAR_ERRORS, run
        assert "Ano" in run["message"] and run["changed"] == [], run


@pytest.mark.parametrize(
    "spec",
    [
        {
            "index": 34, "shapes": [[17], [64, 65], [17]],
            "odd": [[1, "exp_avg_sq transposed"], [1, "exp_avg_sq wrapper"]],
        },
        {
            "index": 37, "shapes": [[64, 65], [5], [4, 3]],
            "odd": [[2, "exp_avg wrapper"], [1, "grad subclass"]],
        },
    ],
    ids=["wrapper-strides-not-its-data-s", "torch-function-subclass-beside-a-wrapper"],
)  # fmt: skip
def test_cases_other_seeds_found_step_alike_on_every_path(spec):
    """Cases the fuzz found with other seeds, run in process: a wrapper declaring contiguous
    strides over transposed data (paths that cut plain contiguous tensors into flattened
    chunks step it whole), and a gradient of a subclass with torch's default
    ``__torch_function__`` beside a wrapper (whose in-place foreach results that default failed
    to convert, after the update). Every path steps, with the single-tensor path's values."""
    sys.path.insert(0, str(WORKER.parent))
    import fuzz_worker

    runs = {path: fuzz_worker.run(spec, path) for path in fuzz_worker.PATHS}
    assert {run["outcome"] for run in runs.values()} == {"ok"}, runs
    for path, run in runs.items():
        if "8bit" in path or "bf16" in path:
            continue
        for ours, theirs in zip(run["params"], runs["single"]["params"], strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=path)
