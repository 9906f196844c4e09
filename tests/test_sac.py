"""``ano-optimizer demo --tasks sac``: the paper's SAC setting on MuJoCo, its update schedule,
the paper's vendored logs and the comparison table, and a SAC study interrupted and resumed."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ano_optimizer.demo import sac

ROOT = Path(__file__).resolve().parent.parent
needs_mujoco = pytest.mark.skipif(
    importlib.util.find_spec("mujoco") is None,
    reason="MuJoCo is an extra: pip install 'ano-optimizer[mujoco]'",
)


# ------------------------------------------------------------------------ the paper's logs


@pytest.mark.parametrize(
    ("env", "config", "steps", "n", "mean", "std"),
    [
        ("HalfCheetah-v5", "AnoBaseline", 24_576, 10, 1864.8, 203.6),
        ("HalfCheetah-v5", "AdamBaseline", 24_576, 10, 331.4, 348.6),
        ("HalfCheetah-v5", "AdamBaseline", 30_720, 10, 979.2, 383.5),
        ("HalfCheetah-v5", "Anolog", 30_720, 10, 2779.8, 774.4),
    ],
)
def test_the_paper_s_logs_read_back_at_its_table_s_points(env, config, steps, n, mean, std):
    """The values of the paper's README table (selected figures), read from the vendored file."""
    point = sac.point_at(sac.paper_curves()[(env, config)], steps)
    assert point == sac.LoggedPoint(steps, n, mean, std)


def test_the_paper_s_logs_cover_every_env_and_config_every_window():
    curves = sac.paper_curves()
    envs = {"HalfCheetah-v5", "Hopper-v5", "Ant-v5", "Humanoid-v5"}
    assert set(curves) == {(e, c) for e in envs for c in sac.PAPER_CONFIGS}
    for points in curves.values():
        steps = [p.steps for p in points]
        assert steps == list(range(sac.WINDOW, steps[-1] + 1, sac.WINDOW))
        assert steps[-1] == 999_424
    hopper = sac.point_at(curves[("Hopper-v5", "AnoBaseline")], 49_152)
    assert (hopper.n, hopper.mean, hopper.std) == (5, 706.5, 272.0)  # "707 ± 272 (5)"


# ------------------------------------------------------------------------ the metric and table


def test_windowed_returns_average_the_episodes_ended_in_each_window():
    episodes = [(1000, 10.0), (2048, 20.0), (2049, 5.0), (5000, 7.0), (5100, 9.0), (7000, 1.0)]
    assert sac.windowed_returns(episodes, 3 * sac.WINDOW) == [15.0, 5.0, 8.0]
    assert sac.windowed_returns([], 2 * sac.WINDOW) == [None, None]


def test_matched_steps_are_the_paper_s_table_steps_reached_and_the_last_window():
    assert sac.matched_steps(30_720) == [24_576, 30_720]
    assert sac.matched_steps(50_000) == [24_576, 30_720, 49_152]
    assert sac.matched_steps(4_096) == [4_096]


def test_the_matched_table_of_a_synthetic_pair_of_curves():
    """Ours from runs (mean and sample std over seeds), the paper's as given, the gap of each
    config to the Adam baseline in each source."""
    runs = [
        {"condition": "E", "optimizer": "AnoBaseline", "curve": [10.0, 100.0]},
        {"condition": "E", "optimizer": "AnoBaseline", "curve": [20.0, 140.0]},
        {"condition": "E", "optimizer": "AdamBaseline", "curve": [5.0, 50.0]},
        {"condition": "E", "optimizer": "AdamBaseline", "curve": [7.0, None]},
        {"condition": "other", "optimizer": "AnoBaseline", "curve": [1e9, 1e9]},
    ]
    configs = ["AnoBaseline", "AdamBaseline"]
    ours = {("E", c): sac.our_curve(runs, "E", c) for c in configs}
    assert ours[("E", "AnoBaseline")] == [
        sac.LoggedPoint(2048, 2, 15.0, math.sqrt(50.0)),
        sac.LoggedPoint(4096, 2, 120.0, math.sqrt(800.0)),
    ]
    assert ours[("E", "AdamBaseline")][1] == sac.LoggedPoint(4096, 1, 50.0, None)
    paper = {
        ("E", "AnoBaseline"): [sac.LoggedPoint(4096, 10, 300.0, 30.0)],
        ("E", "AdamBaseline"): [sac.LoggedPoint(4096, 10, 200.0, 20.0)],
    }
    (row,) = sac.matched_table(ours, paper, "E", configs, [4096])
    assert row["paper AnoBaseline - AdamBaseline"] == 100.0
    assert row["ours AnoBaseline - AdamBaseline"] == 70.0
    assert row["ours AdamBaseline"].n == 1
    table = sac.format_matched_table([row], configs)
    assert table.splitlines()[2] == (
        "| E | 4,096 | 300 ± 30 (10) | 120 ± 28 (2) | 200 ± 20 (10) | 50 (1) | +100 | +70 |"
    )
    (missing,) = sac.matched_table(ours, {}, "E", configs, [4096])
    assert missing["paper AnoBaseline"] is None
    assert missing["paper AnoBaseline - AdamBaseline"] is None


# ------------------------------------------------------------------------ the update schedule


def test_paper_sac_updates_as_the_paper_s_runs_did():
    """One critic update per environment step; every second step, two actor updates with the
    gradient norm at most 0.5 and two entropy-coefficient updates (on Pendulum, no MuJoCo)."""
    import gymnasium as gym
    from stable_baselines3.common.logger import Logger

    from ano_optimizer import Ano

    torch.manual_seed(0)
    model = sac.paper_sac_class()(
        "MlpPolicy", gym.make("Pendulum-v1"), learning_rate=3e-4, learning_starts=100,
        batch_size=32, seed=0, device="cpu",
        policy_kwargs={"net_arch": [16, 16], "optimizer_class": Ano},
    )  # fmt: skip
    model.set_logger(Logger(folder=None, output_formats=[]))
    steps = {"critic": 0, "actor": 0, "alpha": 0}
    actor_norms = []

    def count(name):
        def hook(optimizer, args, kwargs):
            steps[name] += 1
            if name == "actor":
                grads = [p.grad for p in model.actor.parameters() if p.grad is not None]
                actor_norms.append(float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads]))))  # fmt: skip

        return hook

    model.critic.optimizer.register_step_pre_hook(count("critic"))
    model.actor.optimizer.register_step_pre_hook(count("actor"))
    model.ent_coef_optimizer.register_step_pre_hook(count("alpha"))
    model.learn(total_timesteps=160)
    updates = 160 - 100
    assert steps == {"critic": updates, "actor": updates, "alpha": updates}
    assert isinstance(model.actor.optimizer, Ano) and isinstance(model.critic.optimizer, Ano)
    assert max(actor_norms) <= 0.5 + 1e-5
    assert max(actor_norms) >= 0.5 - 1e-5  # the clip was reached at least once


# ------------------------------------------------------------------------ the study


def _default_sigint() -> None:
    """Ctrl-C's default action in the child: a pytest-xdist worker ignores SIGINT, and an
    ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _demo(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "ano_optimizer.cli", "demo", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


TINY = ["--tasks", "sac", "--sac-steps", "2048", "--sac-seeds", "0", "--workers", "1",
        "--sac-configs", "anobaseline,adambaseline"]  # fmt: skip


def test_the_sac_task_refuses_bad_values_before_training(tmp_path, capsys):
    from ano_optimizer.cli import main

    for flags, message in (
        (["--sac-steps", "100"], "must be at least 2048"),
        (["--sac-configs", "adamw"], "unknown config 'adamw'; the paper's: AnoBaseline"),
        (["--tasks", "sacc"], "unknown task 'sacc'"),
    ):
        with pytest.raises(SystemExit) as raised:
            main(["demo", "--tasks", "sac", *flags, "--output", str(tmp_path)])
        assert raised.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["demo", *TINY[:2], "--sac-envs", "CartPole-v1", "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "'CartPole-v1' has discrete actions" in error or "the sac task needs mujoco" in error


@needs_mujoco
@pytest.mark.slow
def test_a_tiny_sac_study_interrupted_resumes_and_writes_curves_table_and_plot(tmp_path):
    """A SAC study at a tiny budget (one seed, two configs, one run at a time) through the
    command: SIGINT once a run has finished keeps that run; the resumed study runs the other
    and writes the curves, the matched-step table and the plot."""
    output = tmp_path / "sac"
    process = subprocess.Popen(
        [sys.executable, "-m", "ano_optimizer.cli", "demo", *TINY, "--output", str(output)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    log = output / "runs.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    (saved,) = log.read_text().splitlines()

    result = _demo("--resume", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 runs already done" in result.stdout
    lines = log.read_text().splitlines()
    assert lines[0] == saved and len(lines) == 2
    runs = [json.loads(line) for line in lines]
    assert {r["optimizer"] for r in runs} == {"AnoBaseline", "AdamBaseline"}
    assert {r["lr"] for r in runs} == {sac.PAPER_LR} and {r["seed"] for r in runs} == {0}

    assert "sac (the paper's setting) on HalfCheetah-v5" in result.stdout
    results = json.loads((output / "results.json").read_text())
    entry = results["sac"]["HalfCheetah-v5"]
    assert entry["configs"] == ["AnoBaseline", "AdamBaseline"]
    for config in entry["configs"]:
        (point,) = entry["curves"][config]
        assert point[:2] == [2048, 1] and math.isfinite(point[2])
        assert entry["evaluation"][config]["n"] == 1
        assert math.isfinite(entry["evaluation"][config]["mean"])
    (row,) = entry["matched"]
    assert row["steps"] == 2048 and row["paper AnoBaseline"]["n"] == 10
    assert "| HalfCheetah-v5 | 2,048 |" in result.stdout
    assert [r for r in results["runs"] if r["task"] == "sac"] == runs
    with (output / "sac_curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["config"], r["source"]) for r in rows} == {
        (c, s) for c in ("AnoBaseline", "AdamBaseline") for s in ("ours", "paper")
    }
    assert max(int(r["steps"]) for r in rows) == 2048
    assert (output / "sac-HalfCheetah-v5.png").stat().st_size > 10_000
