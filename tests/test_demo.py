"""``ano-optimizer demo``: the fair study (learning rates tuned on validation, reported on test
with other seeds) on three tasks, its output, interruption and resumption, and CIFAR-10 input."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
import signal
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ano_optimizer.cli import build_parser, main
from ano_optimizer.demo import data as demo_data
from ano_optimizer.demo import protocol, study, tasks

ROOT = Path(__file__).resolve().parent.parent


def demo(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ano_optimizer.cli", "demo", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _read_json(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run of the real command: every task, every default optimizer."""
    output = tmp_path_factory.mktemp("quick") / "results"
    scratch = tmp_path_factory.mktemp("tmpdir")
    result = demo("--quick", "--output", str(output), env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    # SB3's default logger would leave a folder per model in the temporary directory.
    assert [p.name for p in scratch.iterdir() if p.name.startswith("SB3-")] == []
    return output, result.stdout


def _cells(results: dict):
    for task, spec in results["tasks"].items():
        for condition, entry in spec["conditions"].items():
            for name, cell in entry["optimizers"].items():
                yield task, condition, name, cell


@pytest.mark.slow
def test_quick_run_covers_every_task_in_the_documented_shape(quick_run):
    output, stdout = quick_run
    results = _read_json(output)
    assert set(results) == {"settings", "tasks", "runs"}
    settings = results["settings"]
    names = list(settings["optimizers"])
    assert names[:4] == ["ano", "anolog", "adam", "adamw"]
    assert list(results["tasks"]) == ["noise", "labels", "rl"]
    assert list(results["tasks"]["noise"]["conditions"]) == ["sigma=0", "sigma=0.2"]
    assert list(results["tasks"]["labels"]["conditions"]) == ["labels=0%", "labels=40%"]
    assert list(results["tasks"]["rl"]["conditions"]) == ["CartPole-v1"]
    for spec in results["tasks"].values():
        assert isinstance(spec["metric"], str) and spec["metric"]
        for entry in spec["conditions"].values():
            assert list(entry["optimizers"]) == names
    n_cells = 0
    for _task, _condition, name, cell in _cells(results):
        n_cells += 1
        grid = cell["lr_grid"]
        assert len(grid) == 7 and grid == sorted(grid)
        assert grid[-1] / grid[0] == pytest.approx(1000, rel=1e-3)  # the same relative grid
        assert grid[3] == pytest.approx(settings["optimizers"][name]["recommended_lr"]
                                        * (3 if _task == "rl" else 30))  # fmt: skip
        assert [lr for lr, _ in cell["validation"]] == grid
        assert cell["chosen_lr"] in grid
        assert cell["chosen_at_edge"] == (cell["chosen_lr"] in (grid[0], grid[-1]))
        assert (cell["tuning_seeds"], cell["test_seeds"]) == ([0], [1])
        assert cell["complete"] and math.isfinite(cell["test_mean"])
        assert cell["test_std"] == 0.0  # one test seed
    assert len(results["runs"]) == n_cells * (7 * 1 + 1)
    # Every optimizer learns digits without noise: chance is 10%.
    for name in names:
        assert (
            results["tasks"]["noise"]["conditions"]["sigma=0"]["optimizers"][name]["test_mean"] > 50
        ), name
    for name, cell in results["tasks"]["rl"]["conditions"]["CartPole-v1"]["optimizers"].items():
        assert 8 <= cell["test_mean"] <= 500, name  # a CartPole return
    # The printed tables show the same numbers.
    for task, condition, name, cell in _cells(results):
        digits = 1 if task == "rl" else 2
        row = next(
            line for line in stdout.split(f"\n{task}:")[1].splitlines() if line.startswith(name)
        )
        assert f"{cell['test_mean']:.{digits}f} ± " in row, (task, condition, name)


@pytest.mark.slow
def test_the_rate_is_chosen_on_validation_and_reported_on_other_seeds(quick_run):
    """Recomputed from the runs: each cell's rate is the best mean validation score of its
    tuning runs; its figure is the mean test score of the test seeds at that rate only."""
    output, _ = quick_run
    results = _read_json(output)
    runs = results["runs"]
    for task, condition, name, cell in _cells(results):
        mine = [r for r in runs if (r["task"], r["condition"], r["optimizer"]) ==
                (task, condition, name)]  # fmt: skip
        tuning = [r for r in mine if r["phase"] == "tuning"]
        test = [r for r in mine if r["phase"] == "test"]
        assert all(r["test"] is None for r in tuning)  # a tuning run never sees test data
        assert {r["seed"] for r in tuning} == set(cell["tuning_seeds"])
        assert {r["seed"] for r in test} == set(cell["test_seeds"])
        means = {
            lr: statistics.fmean(r["validation"] for r in tuning if r["lr"] == lr)
            for lr in cell["lr_grid"]
        }
        best = max(means.values())
        assert cell["chosen_lr"] == min(lr for lr, v in means.items() if v == best)
        assert {r["lr"] for r in test} == {cell["chosen_lr"]}
        assert cell["test_mean"] == pytest.approx(statistics.fmean(r["test"] for r in test))


@pytest.mark.slow
def test_quick_run_writes_csv_and_a_plot_per_task(quick_run):
    output, _ = quick_run
    results = _read_json(output)
    with (output / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    cells = list(_cells(results))
    assert len(rows) == len(cells)
    for row, (task, condition, name, cell) in zip(rows, cells, strict=True):
        assert (row["task"], row["condition"], row["optimizer"]) == (task, condition, name)
        assert float(row["chosen_lr"]) == cell["chosen_lr"]
        assert float(row["test_mean"]) == pytest.approx(cell["test_mean"], abs=1e-4)
    with (output / "runs.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(results["runs"])
    assert len((output / "runs.jsonl").read_text().splitlines()) == len(results["runs"])
    for task in results["tasks"]:
        width, height = _png_size(output / f"{task}.png")
        assert width > 600 and height > 200


# ------------------------------------------------------------------------------- the protocol


def _run(lr, seed, phase, validation=None, test=None):
    return {"task": "noise", "condition": "sigma=0", "value": 0.0, "optimizer": "ano",
            "phase": phase, "lr": lr, "seed": seed, "validation": validation, "test": test}  # fmt: skip


def test_protocol_ignores_test_runs_when_choosing():
    grid, tuning, testing = [1e-3, 1e-2, 1e-1], [0, 1], [2, 3]
    runs = [
        _run(1e-3, 0, "tuning", 50), _run(1e-3, 1, "tuning", 52),
        _run(1e-2, 0, "tuning", 80), _run(1e-2, 1, "tuning", 78),
        _run(1e-1, 0, "tuning", 70), _run(1e-1, 1, "tuning", 88),  # mean 79 too: a tie
    ]  # fmt: skip
    assert protocol.cell_result(runs[:-1], grid, tuning, testing) is None  # tuning incomplete
    # Test runs at another rate, with a higher validation score than any: they change nothing.
    noise = [_run(1e-1, 2, "test", 99.9, 99.0), _run(1e-3, 3, "test", 99.9, 98.0)]
    chosen = [_run(1e-2, 2, "test", 81, 77.0), _run(1e-2, 3, "test", 79, 79.0)]
    cell = protocol.cell_result(runs + noise + chosen, grid, tuning, testing)
    assert cell["chosen_lr"] == 1e-2  # the tie goes to the smaller rate
    assert cell["chosen_at_edge"] is False
    assert cell["validation"] == [[1e-3, 51.0], [1e-2, 79.0], [1e-1, 79.0]]
    assert (cell["test_mean"], cell["test_std"]) == (78.0, statistics.stdev([77.0, 79.0]))
    assert cell["complete"] is True
    assert protocol.cell_result(runs + chosen[:1], grid, tuning, testing)["complete"] is False

    edge = [dict(r, validation=100.0 if r["lr"] == 1e-3 else 1.0) for r in runs]
    assert protocol.cell_result(edge, grid, tuning, testing)["chosen_at_edge"] is True
    diverged = [dict(r, validation=None) if r["lr"] == 1e-1 else r for r in runs]
    cell = protocol.cell_result(diverged, grid, tuning, testing)
    assert cell["chosen_lr"] == 1e-2 and cell["validation"][2] == [1e-1, None]


def test_tuning_and_test_seeds_must_differ(tmp_path, capsys):
    args = ["demo", "--tuning-seeds", "0,1", "--test-seeds", "1,2", "--output", str(tmp_path)]
    assert main(args) == 2
    assert "--tuning-seeds and --test-seeds share [1]" in capsys.readouterr().err


# ------------------------------------------------------------------- interruption, resumption

SMALL = ["--tasks", "noise", "--optimizers", "ano,adam", "--sigmas", "0,0.1", "--epochs", "3",
         "--tuning-seeds", "0,1", "--test-seeds", "2,3", "--lr-grid", "0.1,1,10",
         "--workers", "2"]  # fmt: skip
SMALL_RUNS = 4 * (3 * 2 + 2)  # cells x (rates x tuning seeds + test seeds)


def _without_timing(results: dict) -> dict:
    return results["tasks"]


def _default_sigint() -> None:
    """Ctrl-C's default action in the child: a pytest-xdist worker ignores SIGINT, and an
    ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _study_with_finished_runs(output: Path, runs: int) -> subprocess.Popen:
    """A SMALL study started in a subprocess, once ``runs`` of its runs have finished."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ano_optimizer.cli", "demo", *SMALL, "--output", str(output)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    log = output / "runs.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= runs:
            break
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_ctrl_c_keeps_every_finished_run_and_resume_completes_the_same_study(tmp_path):
    output = tmp_path / "study"
    process = _study_with_finished_runs(output, 4)
    log = output / "runs.jsonl"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    saved = log.read_text().splitlines()
    assert 4 <= len(saved) < SMALL_RUNS, "interrupted too late to test anything"
    assert f"{len(saved)} runs saved in {output}" in stderr
    assert f"ano-optimizer demo --resume --output {output}" in stderr
    assert _read_json(output)["runs"] == [json.loads(line) for line in saved]

    resumed = demo("--resume", "--output", str(output))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(saved)} runs already done" in resumed.stdout
    lines = log.read_text().splitlines()
    assert lines[: len(saved)] == saved  # kept, not rerun
    keys = [protocol.run_key(json.loads(line)) for line in lines]
    assert len(keys) == len(set(keys)) == SMALL_RUNS

    # The same study uninterrupted, started from Python by a caller that has run autograd and
    # changed torch's default dtype: workers start from a clean server process, not a fork of
    # the caller, so a notebook gets the command line's results.
    code = f"""
import sys, torch
x = torch.ones(3, requires_grad=True)
(x * 2).sum().backward()
torch.set_default_dtype(torch.float64)
from ano_optimizer.cli import main
sys.exit(main(["demo", *{SMALL!r}, "--output", {str(tmp_path / "whole")!r}]))
"""
    whole = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert _without_timing(_read_json(output)) == _without_timing(_read_json(tmp_path / "whole"))


def _descendants(pid: int) -> set[int]:
    """The processes started by ``pid``, their children and so on (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    found, frontier = set(), {pid}
    while frontier:
        frontier = set().union(*(parents.get(p, set()) for p in frontier)) - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_keeps_every_finished_run_and_leaves_no_process_behind(tmp_path):
    """SIGTERM (kill, batch schedulers, container runtimes) stops a study as Ctrl-C does: what
    finished is written (runs.jsonl and results.json), the exit code is 143, and no worker
    is left running."""
    output = tmp_path / "study"
    process = _study_with_finished_runs(output, 2)
    log = output / "runs.jsonl"
    workers = _descendants(process.pid)
    assert len(workers) >= 2, "the study had no worker processes"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    saved = log.read_text().splitlines()
    assert 2 <= len(saved) < SMALL_RUNS, "interrupted too late to test anything"
    assert f"{len(saved)} runs saved in {output}" in stderr
    assert _read_json(output)["runs"] == [json.loads(line) for line in saved]
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]


TINY = ["--tasks", "noise", "--optimizers", "ano", "--sigmas", "0", "--epochs", "1",
        "--tuning-seeds", "0", "--test-seeds", "1", "--workers", "2"]  # fmt: skip


def test_resume_takes_its_settings_from_the_folder(tmp_path, capsys):
    assert main(["demo", "--resume", "--output", str(tmp_path / "none")]) == 2
    assert "--resume: no study to resume in" in capsys.readouterr().err
    assert main(["demo", "--resume", "--epochs", "3", "--output", str(tmp_path)]) == 2
    assert "--resume takes every setting from" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- the tasks


def _saved_study(folder: Path, *flags: str) -> dict:
    """settings.json as ``ano-optimizer demo FLAGS`` writes it, before any run."""
    args = build_parser("demo").parse_args(["demo", *flags, "--output", str(folder)])
    settings = json.loads(json.dumps(study.build_settings(args)))
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(settings))
    return settings


def _run_line(**changes) -> str:
    run = {"task": "noise", "condition": "sigma=0", "optimizer": "ano", "phase": "tuning",
           "lr": 0.01, "seed": 0, "validation": 0.5, "test": None, "diverged": False}  # fmt: skip
    return json.dumps({**run, **changes})


@pytest.mark.parametrize(
    ("settings_change", "runs", "message"),
    [
        (lambda s: "not json", None, r"settings.json cannot be read \(Expecting value"),
        (lambda s: json.dumps([1, 2]), None, r"settings.json is not a study's settings \("),
        (lambda s: {k: v for k, v in s.items() if k != "epochs"}, None, r"\(no 'epochs'\)"),
        (lambda s: {**s, "epochs": -1}, None, r"argument --epochs: must be an integer >= 1"),
        (lambda s: {**s, "epochs": "3"}, None, r"its 'epochs' is '3' where its flags give 3"),
        (lambda s: {**s, "optimizers": {"nosuch": {}}}, None, r"unknown optimizer 'nosuch'"),
        (lambda s: {**s, "extra": 1}, None, r"its 'extra' is 1 where its flags give None"),
        (lambda s: {**s, "batch_size": 7}, None, r"its 'batch_size' is 7 where"),
        (None, [_run_line(), "{cut", _run_line(seed=1)], r"runs.jsonl, line 2: not JSON"),
        (None, ["[1, 2]"], r"runs.jsonl, line 1: not a run \(a run has task, condition"),
        (None, [_run_line(optimizer="lion")], r"line 1: a run of another study \(noise"),
        (None, [_run_line(phase="final")], r"line 1: not a run"),
    ],
)  # fmt: skip
def test_a_malformed_study_folder_is_refused_with_the_file_named(
    tmp_path, capsys, settings_change, runs, message
):
    folder = tmp_path / "study"
    settings = _saved_study(folder, *TINY)
    if settings_change is not None:
        changed = settings_change(settings)
        text = changed if isinstance(changed, str) else json.dumps(changed)
        (folder / "settings.json").write_text(text)
    if runs is not None:
        (folder / "runs.jsonl").write_text("\n".join(runs) + "\n")
    assert main(["demo", "--resume", "--output", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ano-optimizer demo: error: "), error
    assert re.search(message, error), error
    assert str(folder) in error


def test_label_noise_replaces_the_given_fraction_with_other_classes():
    data = demo_data.load_digits()
    noisy = data.with_label_noise(0.4, seed=0)
    changed = noisy.y_train != data.y_train
    assert changed.float().mean().item() == pytest.approx(0.4, abs=0.05)
    assert torch.equal(noisy.y_test, data.y_test)  # test labels stay clean
    assert (noisy.y_val != data.y_val).float().mean().item() == pytest.approx(0.4, abs=0.08)
    assert torch.equal(noisy.y_train, data.with_label_noise(0.4, seed=0).y_train)
    assert not torch.equal(noisy.y_train, data.with_label_noise(0.4, seed=1).y_train)
    assert data.with_label_noise(0.0, seed=0) is data


def test_digits_splits_are_disjoint_and_fixed():
    data = demo_data.load_digits()
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (1077, 360, 360)
    rows = [{tuple(x.flatten().tolist()) for x in part}
            for part in (data.x_train, data.x_val, data.x_test)]  # fmt: skip
    assert not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert torch.equal(data.y_test, demo_data.load_digits().y_test)


def test_runs_are_reproducible_and_seeds_matter():
    data = demo_data.load_digits()
    choice = study.resolve_optimizer("ano")
    first = tasks.train_supervised(data, choice, 1e-3, seed=5, epochs=2, batch_size=64, sigma=0.1)
    again = tasks.train_supervised(data, choice, 1e-3, seed=5, epochs=2, batch_size=64, sigma=0.1)
    other = tasks.train_supervised(data, choice, 1e-3, seed=6, epochs=2, batch_size=64, sigma=0.1)
    assert first == again and first["history"] != other["history"]
    assert first["test"] is None
    tested = tasks.train_supervised(data, choice, 1e-3, 5, 2, 64, sigma=0.1, test=True)
    best = max(range(2), key=lambda i: tested["history"][i]["validation"])
    assert tested["test"] == tested["history"][best]["test"]  # the epoch validation picked


def test_gradient_noise_has_the_requested_distribution():
    generator = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.zeros(400, 500))
    big.grad = torch.full_like(big, 0.5)
    untouched = torch.nn.Parameter(torch.zeros(3))  # no gradient: stays without one
    tasks.add_gradient_noise([big, untouched], 0.2, generator)
    noise = big.grad - 0.5
    assert noise.mean().abs().item() < 0.002
    assert noise.std().item() == pytest.approx(0.2, rel=0.01)
    assert untouched.grad is None


@pytest.mark.slow
def test_rl_with_continuous_actions_trains_sac_and_scores_on_its_own_episodes():
    choice = study.resolve_optimizer("anolog")
    validation = tasks.train_rl("Pendulum-v1", choice, 3e-4, seed=0, steps=300, episodes=1)
    test = tasks.train_rl("Pendulum-v1", choice, 3e-4, seed=0, steps=300, episodes=1, test=True)
    assert validation["algorithm"] == test["algorithm"] == "SAC"
    assert validation["test"] is None and test["validation"] is None
    assert -2000 < validation["validation"] < 0 and -2000 < test["test"] < 0
    assert validation["validation"] != test["test"]  # other episodes, other start states


# ------------------------------------------------------------------------------- bad input


def test_unknown_optimizer_task_or_environment_fails_before_training(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["demo", "--optimizers", "ano,adamx", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'adamx'" in err and "adamw" in err
    assert main(["demo", "--tasks", "rl", "--rl-env", "NoSuchEnv-v9", "--output", str(output)]) == 2
    assert "--rl-env 'NoSuchEnv-v9' cannot be made" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--tasks", "noise,vision", "--output", str(output)])
    assert exit_info.value.code == 2
    assert "unknown task 'vision'" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--sigmas", "0,-0.1", "sigma must be a finite number in [0, inf], got '-0.1'"),
        ("--sigmas", "nan", "got 'nan'"),
        ("--label-noise", "0.95", "a label-noise fraction must be a finite number in [0, 0.9]"),
        ("--lr-grid", "1", "expected at least two factors > 0"),
        ("--test-seeds", "a", "seeds must be integers"),
    ],
)
def test_bad_values_are_usage_errors(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, value, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_unusable_device_fail_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--output", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "not writable" in err and str(blocker) in err
    assert main(["demo", "--device", "tpu9", "--output", str(tmp_path / "out")]) == 2
    assert "--device 'tpu9' is not usable here" in capsys.readouterr().err


@pytest.mark.slow
def test_any_registry_name_runs_including_a_plugin_spec(tmp_path):
    """A spec registered at run time is found by name; its grid is centred on its own rate."""
    script = textwrap.dedent(
        f"""
        import sys
        from ano_optimizer import OptimizerSpec, register_optimizer
        from ano_optimizer.cli import main

        register_optimizer(OptimizerSpec(
            name="demosgd", description="SGD with momentum, registered by a test",
            torch_class="torch.optim:SGD", defaults={{"lr": 0.005, "momentum": 0.9}},
            has_betas=False, has_eps=False, has_momentum=True, source="test-plugin"))
        register_optimizer(OptimizerSpec(
            name="demokerasonly", description="a Keras-only optimizer",
            keras_class="keras.optimizers:SGD"))
        assert main(["demo", "--optimizers", "demokerasonly", "--output", {str(tmp_path)!r}]) == 2
        sys.exit(main(["demo", "--optimizers", "DemoSGD", "--tasks", "noise", "--quick",
                       "--output", {str(tmp_path)!r}]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer 'demokerasonly' has no PyTorch implementation" in result.stderr
    results = _read_json(tmp_path)
    assert results["settings"]["optimizers"]["demosgd"] == {
        "name": "demosgd",
        "target": "torch.optim:SGD",
        "recommended_lr": 0.005,
        "kwargs": {"momentum": 0.9},
        "origin": "test-plugin",
    }
    cell = results["tasks"]["noise"]["conditions"]["sigma=0"]["optimizers"]["demosgd"]
    assert cell["lr_grid"][3] == pytest.approx(0.15)  # 0.005 x the digits factor of 30
    assert cell["test_mean"] > 50


def test_importing_the_cli_does_not_import_the_demo_dependencies():
    # tqdm is left out: torch.hub imports it with torch itself.
    code = (
        "import sys; from ano_optimizer import cli; cli.build_parser(); "
        "print(sorted(m for m in ('sklearn', 'matplotlib', 'stable_baselines3', 'gymnasium') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CIFAR-10 format


def _batch(per_batch: int, name: str, generator) -> dict:
    """A CIFAR-10 python-format batch whose red channel grows and blue falls with the label."""
    labels = [i % 10 for i in range(per_batch)]
    images = torch.randint(0, 20, (per_batch, 3, 32, 32), generator=generator)
    for i, label in enumerate(labels):
        images[i, 0] += 20 * label  # red
        images[i, 2] += 200 - 20 * label  # blue
    data = images.to(torch.uint8).reshape(per_batch, 3072).numpy()
    return {b"batch_label": name.encode(), b"labels": labels, b"data": data}


def _write_fake_cifar10(folder: Path, per_batch: int = 20) -> None:
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for name in demo_data.CIFAR10_FILES:
        with (folder / name).open("wb") as handle:
            pickle.dump(_batch(per_batch, name, generator), handle)


def test_cifar10_loader_keeps_images_channels_and_labels_together(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar")
    data = demo_data.load_cifar10(tmp_path / "cifar")
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (90, 10, 20)
    assert tuple(data.x_train.shape[1:]) == (3, 32, 32)
    labels = torch.cat([data.y_train, data.y_val])
    assert labels.tolist() == [i % 10 for i in range(20)] * 5
    red = data.x_train[:, 0].mean(dim=(1, 2))
    blue = data.x_train[:, 2].mean(dim=(1, 2))
    order = torch.argsort(data.y_train, stable=True)
    steps = data.y_train[order].diff() > 0
    assert torch.all(red[order].diff()[steps] > 0) and torch.all(blue[order].diff()[steps] < 0)
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max().item() < 1e-5


@pytest.mark.slow
def test_cifar10_quick_run_uses_the_papers_model(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar")
    output = tmp_path / "out"
    args = ["--cifar10", str(tmp_path / "cifar"), "--quick", "--tasks", "noise,labels"]
    result = demo(*args, "--optimizers", "ano,adam", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    settings = _read_json(output)["settings"]
    assert (settings["dataset"], settings["model"], settings["epochs"]) == ("cifar10", "cnn", 1)
    cell = _read_json(output)["tasks"]["noise"]["conditions"]["sigma=0"]["optimizers"]["ano"]
    assert cell["lr_grid"][3] == pytest.approx(1e-4)  # the paper's rate, unscaled


class _RunsCode:
    """Pickles into a call of os.system: what a malicious 'CIFAR-10 batch' would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_its_code_never_runs(tmp_path, capsys):
    folder = tmp_path / "cifar"
    _write_fake_cifar10(folder)
    marker = tmp_path / "code-ran"
    with (folder / "data_batch_2").open("wb") as handle:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, handle)
    assert main(["demo", "--cifar10", str(folder), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'data_batch_2'} is not a CIFAR-10 python-format batch" in err
    assert "refused to load posix.system" in err
    assert not marker.exists()


def _replace(folder: Path, name: str, batch) -> None:
    with (folder / name).open("wb") as handle:
        pickle.dump(batch, handle)


def _base(per_batch=20):
    return _batch(per_batch, "x", torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("data_batch_3", None, "missing data_batch_3"),
        ("test_batch", b"not a pickle", "test_batch is not a CIFAR-10 python-format batch"),
        ("test_batch", {**_base(), b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
         "shape (N, 3072) with N >= 1, got (0, 3072)"),
        ("data_batch_1", {**_base(), b"data": ["a string"] * 20}, "must be a uint8 NumPy array"),
        ("data_batch_1", {**_base(), b"data": np.zeros((20, 100), np.uint8)},
         "shape (N, 3072) with N >= 1, got (20, 100)"),
        ("data_batch_4", {**_base(), b"labels": [12] * 20}, "labels must be whole numbers in 0..9, found 12"),
        ("data_batch_4", {**_base(), b"labels": np.full(20, np.nan)}, "found nan"),
        ("data_batch_5", {**_base(), b"labels": ["cat"] * 20}, "found 'cat'"),
        ("data_batch_5", {**_base(), b"labels": [0] * 3}, "b'labels' must be a list of 20 labels"),
        ("data_batch_2", [1, 2, 3], "expected a pickled dict with b'data' and b'labels'"),
        ("data_batch_2", "missing-module", "refused to load no_such_module.Thing"),
    ],
)  # fmt: skip
def test_every_malformed_cifar10_folder_stops_before_training(
    tmp_path, capsys, name, make, message
):
    folder = tmp_path / "cifar"
    _write_fake_cifar10(folder)
    if make is None:
        (folder / name).unlink()
    elif make == "missing-module":
        # protocol 0 text: GLOBAL 'no_such_module Thing', then STOP
        (folder / name).write_bytes(b"cno_such_module\nThing\n.")
    elif isinstance(make, bytes):
        (folder / name).write_bytes(make)
    else:
        _replace(folder, name, make)
    output = tmp_path / "out"
    assert main(["demo", "--cifar10", str(folder), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert name in err
    assert not (output / "runs.jsonl").exists()


@pytest.mark.slow
def test_an_8bit_name_trains_with_its_state_dtype_kept_in_the_settings(tmp_path):
    """``ano8bit``'s registry defaults hold a torch dtype: settings.json keeps it as a name, the
    RL runs (SB3's ``optimizer_kwargs``) and the supervised ones (``build``) get it back."""
    result = demo("--optimizers", "ano8bit", "--tasks", "rl", "--quick", "--output",
                  str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = _read_json(tmp_path)
    choice = results["settings"]["optimizers"]["ano8bit"]
    assert choice["kwargs"] == {"state_dtype": {"torch.dtype": "uint8"}}
    assert tasks.OptimizerChoice(**choice).options() == {"state_dtype": torch.uint8}
    optimizer = tasks.OptimizerChoice(**choice).build(torch.nn.Linear(64, 64).parameters(), 1e-3)
    assert optimizer.param_groups[0]["state_dtype"] is torch.uint8
    for condition in results["tasks"]["rl"]["conditions"].values():
        assert math.isfinite(condition["optimizers"]["ano8bit"]["test_mean"])
