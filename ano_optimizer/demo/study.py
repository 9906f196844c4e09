"""The study: its settings, the optimizers it compares, and the command that runs it
(``ano-optimizer demo``) over a pool of processes, saving every run as it finishes."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import platform
import queue
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import protocol, sac
from .data import DemoInputError, load_cifar10, load_digits
from .tasks import (
    OptimizerChoice,
    condition_key,
    timed,
    to_settings,
    train_rl,
    train_supervised,
)

DEFAULT_OUTPUT = "demo-results"
TASK_NAMES = ("noise", "labels", "rl")  # what the study runs by default
# sac: the paper's own setting (fixed rates, MuJoCo), asked for by name: it takes ~45 minutes.
ALL_TASKS = (*TASK_NAMES, "sac")
DEFAULT_SAC_ENV = "HalfCheetah-v5"
DEFAULT_SIGMAS = (0.0, 0.05, 0.1, 0.2)
DEFAULT_LABEL_NOISE = (0.0, 0.2, 0.4)
DEFAULT_RL_ENV = "CartPole-v1"
METRICS = {
    "noise": "test accuracy (%)",
    "labels": "test accuracy (%), clean test labels",
    "rl": "mean return of the deterministic policy over the evaluation episodes",
}
# Each grid is centred on the optimizer's recommended rate for the paper's 100-epoch CIFAR-10
# runs times a task factor, the same for every optimizer so the paper's ratios between them
# stay. Digits: a run takes ~200 steps where CIFAR-10 takes 78,200, and short noisy runs favour
# large rates (sign-based methods most: their step does not shrink with the noise), so 30.
# RL: 3, which centres Ano on the paper's RL rate (3e-4).
DIGITS_LR_SCALE = 30.0
RL_LR_SCALE = 3.0

# Baselines the registry does not hold: name -> ("module:Class", recommended lr, extra kwargs,
# pip extra that provides the module). Lion's rate follows its paper (3-10x below AdamW's).
BASELINES: dict[str, tuple[str, float, dict, str | None]] = {
    "adam": ("torch.optim:Adam", 1e-3, {}, None),
    "adamw": ("torch.optim:AdamW", 1e-3, {}, None),
    "sgd": ("torch.optim:SGD", 1e-2, {"momentum": 0.9}, None),
    "lion": ("timm.optim:Lion", 1e-4, {}, "timm"),
}


@dataclass(frozen=True)
class Budget:
    """How much each run trains, and with which seeds."""

    epochs: int
    rl_steps: int
    rl_episodes: int
    tuning_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...]
    sigmas: tuple[float, ...]
    label_noise: tuple[float, ...]
    sac_steps: int
    sac_seeds: tuple[int, ...]
    sac_evaluation_episodes: int


DEFAULT_BUDGET = Budget(
    epochs=12, rl_steps=8192, rl_episodes=5, tuning_seeds=(0, 1), test_seeds=(2, 3, 4, 5, 6),
    sigmas=DEFAULT_SIGMAS, label_noise=DEFAULT_LABEL_NOISE, sac_steps=30_720,
    sac_seeds=(0, 1, 2), sac_evaluation_episodes=5,
)  # fmt: skip
QUICK_BUDGET = Budget(
    epochs=2, rl_steps=1024, rl_episodes=2, tuning_seeds=(0,), test_seeds=(1,),
    sigmas=(0.0, 0.2), label_noise=(0.0, 0.4), sac_steps=2 * sac.WINDOW, sac_seeds=(0,),
    sac_evaluation_episodes=1,
)  # fmt: skip
CIFAR10_EPOCHS = 100  # the paper's
BATCH_SIZE = 64
# Seconds per run on one core of this project's 2-core machine, for the estimate printed at the
# start (the progress bar's ETA then follows the measured pace).
_SECONDS_PER_DIGITS_EPOCH = 0.025
_SECONDS_PER_CIFAR10_EPOCH = 150.0
_SECONDS_PER_1K_RL_STEPS = 0.32
_SECONDS_PER_1K_SAC_STEPS = 25.0  # after the random steps; those cost next to nothing


# ------------------------------------------------------------------------ command-line values


def _number_list(text: str, what: str, low: float = 0.0, high: float = math.inf) -> list[float]:
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {item!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"{what} must be a finite number in [{low:g}, {high:g}], got {item.strip()!r}"
            )
        values.append(value)
    return list(dict.fromkeys(values))


def _sigmas(text: str) -> list[float]:
    return _number_list(text, "sigma")


def _fractions(text: str) -> list[float]:
    return _number_list(text, "a label-noise fraction", 0.0, 0.9)


def _factors(text: str) -> list[float]:
    factors = _number_list(text, "a grid factor", 1e-6, 1e6)
    if any(f == 0 for f in factors) or len(factors) < 2:
        raise argparse.ArgumentTypeError(f"expected at least two factors > 0, got {text!r}")
    return sorted(factors)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
    return list(dict.fromkeys(values))


def _name_list(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names, got {text!r}")
    return list(dict.fromkeys(names))


def _tasks(text: str) -> list[str]:
    names = _name_list(text)
    unknown = [n for n in names if n not in ALL_TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown task {unknown[0]!r}; choose from {', '.join(ALL_TASKS)}"
        )
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


# Study flags: with --resume, the folder's settings.json decides them all.
_STUDY_FLAGS = (
    "tasks", "optimizers", "sigmas", "label_noise", "rl_env", "rl_steps", "epochs",
    "tuning_seeds", "test_seeds", "lr_grid", "cifar10", "device", "quick", "sac_envs",
    "sac_steps", "sac_seeds", "sac_configs",
)  # fmt: skip


def _sac_configs(text: str) -> list[str]:
    known = {name.lower(): name for name in sac.PAPER_CONFIGS}
    names = [known.get(name) or name for name in _name_list(text)]
    unknown = [n for n in names if n not in sac.PAPER_CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown config {unknown[0]!r}; the paper's: {', '.join(sac.PAPER_CONFIGS)}"
        )
    return names


def _env_ids(text: str) -> list[str]:
    ids = [item.strip() for item in text.split(",") if item.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"expected Gymnasium ids, got {text!r}")
    return list(dict.fromkeys(ids))


def _sac_steps(text: str) -> int:
    value = _positive_int(text)
    if value < sac.WINDOW:
        raise argparse.ArgumentTypeError(
            f"must be at least {sac.WINDOW} (one of the paper's logging windows), got {text!r}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--tasks",
        type=_tasks,
        default=None,
        metavar="NAMES",
        help=f"tasks to run: {', '.join(ALL_TASKS)} (default: {','.join(TASK_NAMES)}; sac "
        "is the paper's SAC-on-MuJoCo setting, ~45 minutes, needs ano-optimizer[mujoco])",
    )
    add(
        "--optimizers",
        type=_name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated registry names (see `ano-optimizer list`) or torch baselines "
        f"({', '.join(BASELINES)}); default: ano,anolog,adam,adamw, plus lion with timm",
    )
    add(
        "--sigmas",
        type=_sigmas,
        default=None,
        metavar="S1,S2,...",
        help="noise task: gradient-noise standard deviations (default: 0,0.05,0.1,0.2)",
    )
    add(
        "--label-noise",
        type=_fractions,
        default=None,
        metavar="F1,F2,...",
        help="labels task: fractions of training labels replaced (default: 0,0.2,0.4)",
    )
    add(
        "--rl-env",
        default=None,
        metavar="ID",
        help=f"rl task: a Gymnasium id (default {DEFAULT_RL_ENV}); discrete actions train "
        "with PPO, continuous ones (e.g. Pendulum-v1) with SAC",
    )
    add(
        "--rl-steps",
        type=_positive_int,
        default=None,
        help=f"rl task: environment steps per run (default {DEFAULT_BUDGET.rl_steps})",
    )
    add(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"noise and labels tasks: epochs per run (default {DEFAULT_BUDGET.epochs} on "
        f"digits, {CIFAR10_EPOCHS} on CIFAR-10)",
    )
    add(
        "--tuning-seeds",
        type=_int_list,
        default=None,
        metavar="N1,N2,...",
        help="seeds whose validation scores choose each learning rate (default: 0,1)",
    )
    add(
        "--test-seeds",
        type=_int_list,
        default=None,
        metavar="N1,N2,...",
        help="other seeds, trained at the chosen rate and scored on test (default: 2,3,4,5,6)",
    )
    add(
        "--lr-grid",
        type=_factors,
        default=None,
        metavar="F1,F2,...",
        help="factors of each optimizer's recommended rate to try, the same for all "
        f"(default: {','.join(map(str, protocol.DEFAULT_GRID))})",
    )
    add(
        "--workers",
        type=_positive_int,
        default=None,
        help="parallel runs, one thread each (default: the number of CPU cores)",
    )
    add(
        "--output",
        type=Path,
        default=Path(DEFAULT_OUTPUT),
        help=f"folder for the results (default: ./{DEFAULT_OUTPUT})",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the study saved in --output, skipping its completed runs",
    )
    add(
        "--cifar10",
        type=Path,
        default=None,
        metavar="PATH",
        help="noise and labels tasks on this CIFAR-10 python-format folder (data_batch_1..5, "
        "test_batch) with the paper's CNN and 100 epochs",
    )
    add(
        "--device", default="cpu", help="torch device for the noise and labels tasks (default: cpu)"
    )
    add(
        "--sac-envs",
        type=_env_ids,
        default=None,
        metavar="IDS",
        help=f"sac task: Gymnasium MuJoCo ids (default {DEFAULT_SAC_ENV}; the paper's: "
        "HalfCheetah-v5, Hopper-v5, Ant-v5, Humanoid-v5)",
    )
    add(
        "--sac-steps",
        type=_sac_steps,
        default=None,
        help=f"sac task: environment steps per run (default {DEFAULT_BUDGET.sac_steps:,}; the "
        "paper's 1,000,000)",
    )
    add(
        "--sac-seeds",
        type=_int_list,
        default=None,
        metavar="N1,N2,...",
        help="sac task: seeds per config (default: 0,1,2)",
    )
    add(
        "--sac-configs",
        type=_sac_configs,
        default=None,
        metavar="NAMES",
        help=f"sac task: the paper's optimizer configs to run (default: "
        f"{','.join(sac.PAPER_CONFIGS)})",
    )
    add(
        "--quick",
        action="store_true",
        help="every task at a tiny scale (one seed each, few epochs and steps): under a minute",
    )


# ------------------------------------------------------------------------ optimizers


def _default_optimizer_names() -> list[str]:
    names = ["ano", "anolog", "adam", "adamw"]
    if importlib.util.find_spec("timm") is not None:
        names.append("lion")
    return names


def _signature_lr(cls) -> float | None:
    parameter = inspect.signature(cls).parameters.get("lr")
    if parameter is None or not isinstance(parameter.default, (int, float)):
        return None
    return float(parameter.default)


def resolve_optimizer(name: str) -> OptimizerChoice:
    """Map a registry name or a torch baseline name to an :class:`OptimizerChoice`.

    Registry optimizers run at their own defaults (``spec.defaults``) and are centred on their
    default learning rate; baselines on the rates in :data:`BASELINES`.
    """
    from .. import registry

    key = name.strip().lower()
    try:
        spec = registry.get_optimizer_spec(key)
    except ValueError as error:
        registry_error = str(error)
    else:
        if spec.torch_class is None:
            raise DemoInputError(f"optimizer {name!r} has no PyTorch implementation")
        try:
            cls = registry.get_optimizer_class(key, "torch")
        except ImportError as error:
            raise DemoInputError(f"optimizer {name!r} cannot be loaded: {error}") from None
        kwargs = {key: to_settings(value) for key, value in spec.defaults.items()}
        lr = kwargs.pop("lr", None)
        if lr is None:
            lr = _signature_lr(cls)
        if lr is None:
            raise DemoInputError(f"optimizer {name!r} has no default learning rate")
        return OptimizerChoice(key, spec.torch_class, float(lr), kwargs, origin=spec.source)
    if key in BASELINES:
        target, lr, kwargs, extra = BASELINES[key]
        if importlib.util.find_spec(target.partition(":")[0].split(".")[0]) is None:
            raise DemoInputError(
                f"optimizer {name!r} needs {extra}: pip install 'ano-optimizer[{extra}]'"
            )
        return OptimizerChoice(key, target, lr, dict(kwargs), origin="torch baseline")
    raise DemoInputError(
        f"unknown optimizer {name!r}. {registry_error} "
        f"Torch baselines known to the demo: {', '.join(BASELINES)}."
    )


# ------------------------------------------------------------------------ settings and plan


def _check_device(name: str) -> str:
    try:
        torch.empty(1, device=torch.device(name))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise DemoInputError(f"--device {name!r} is not usable here: {error}") from None
    return name


def _check_rl_env(env_id: str) -> None:
    missing = [m for m in ("stable_baselines3", "gymnasium") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoInputError(
            f"the rl task needs {' and '.join(missing)}: pip install 'ano-optimizer[demo]' "
            "(or leave it out: --tasks noise,labels)"
        )
    import gymnasium as gym

    try:
        gym.make(env_id).close()
    except Exception as error:  # an unknown id, or an environment that needs an extra package
        raise DemoInputError(f"--rl-env {env_id!r} cannot be made: {error}") from None


def _check_sac_env(env_id: str) -> None:
    needs = ("stable_baselines3", "gymnasium", "mujoco")
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoInputError(
            f"the sac task needs {' and '.join(missing)}: pip install 'ano-optimizer[mujoco]'"
        )
    import gymnasium as gym

    try:
        env = gym.make(env_id)
    except Exception as error:
        raise DemoInputError(f"--sac-envs {env_id!r} cannot be made: {error}") from None
    continuous = isinstance(env.action_space, gym.spaces.Box)
    env.close()
    if not continuous:
        raise DemoInputError(f"--sac-envs {env_id!r} has discrete actions; SAC needs continuous")


def _sac_settings(args: argparse.Namespace, base: Budget) -> dict:
    envs = args.sac_envs or [DEFAULT_SAC_ENV]
    for env_id in envs:
        _check_sac_env(env_id)
    configs = args.sac_configs or list(sac.PAPER_CONFIGS)
    return {
        "envs": envs,
        "steps": args.sac_steps or base.sac_steps,
        "seeds": list(args.sac_seeds or base.sac_seeds),
        "configs": {
            name: {
                "target": sac.PAPER_CONFIGS[name].target,
                "kwargs": sac.PAPER_CONFIGS[name].kwargs,
            }
            for name in configs
        },
        "lr": sac.PAPER_LR,
        "evaluation_episodes": base.sac_evaluation_episodes,
        "metric": f"mean return of the training episodes ended in each {sac.WINDOW}-step window",
    }


def sac_runs(settings: dict) -> list[dict]:
    """Every run of the sac task: each env, config and seed at the paper's fixed rate."""
    spec = settings.get("sac")
    if not spec:
        return []
    return [
        {"task": "sac", "condition": env, "value": env, "optimizer": config, "phase": "paper",
         "lr": spec["lr"], "seed": seed}
        for env in spec["envs"] for config in spec["configs"] for seed in spec["seeds"]
    ]  # fmt: skip


def build_settings(args: argparse.Namespace) -> dict:
    """Every choice of the study, checked, as saved in settings.json."""
    base = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    tasks = args.tasks or list(TASK_NAMES)
    names = args.optimizers or _default_optimizer_names()
    choices = {}
    for name in names:
        choice = resolve_optimizer(name)
        choices.setdefault(choice.name, choice)
    tuning = tuple(args.tuning_seeds or base.tuning_seeds)
    test = tuple(args.test_seeds or base.test_seeds)
    shared = sorted(set(tuning) & set(test))
    if shared:
        raise DemoInputError(
            f"--tuning-seeds and --test-seeds share {shared}: the reported figures must come "
            "from seeds that did not choose the learning rate"
        )
    cifar = args.cifar10
    if cifar is not None and args.quick is False and args.epochs is None:
        epochs = CIFAR10_EPOCHS
    else:
        epochs = args.epochs or (1 if cifar is not None and args.quick else base.epochs)
    rl_env = args.rl_env or DEFAULT_RL_ENV
    if "rl" in tasks:
        _check_rl_env(rl_env)
    sac_settings = _sac_settings(args, base) if "sac" in tasks else None
    if any(t in tasks for t in ("noise", "labels")):
        _check_device(args.device)
    conditions = {
        "noise": list(args.sigmas or base.sigmas),
        "labels": list(args.label_noise or base.label_noise),
        "rl": [rl_env],
    }
    return {
        "tasks": {
            task: {
                "metric": METRICS[task],
                "conditions": {condition_key(task, v): v for v in conditions[task]},
                "lr_scale": RL_LR_SCALE
                if task == "rl"
                else (1.0 if cifar is not None else DIGITS_LR_SCALE),
            }
            for task in tasks
            if task != "sac"
        },
        "sac": sac_settings,
        "optimizers": {n: asdict(c) for n, c in choices.items()},
        "lr_grid_factors": list(args.lr_grid or protocol.DEFAULT_GRID),
        "tuning_seeds": list(tuning),
        "test_seeds": list(test),
        "dataset": "cifar10" if cifar is not None else "digits",
        "cifar10": os.fspath(cifar) if cifar is not None else None,
        "model": "cnn" if cifar is not None else "mlp",
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "rl_steps": args.rl_steps or base.rl_steps,
        "rl_episodes": base.rl_episodes,
        "device": args.device,
        "quick": bool(args.quick),
        "threads_per_run": 1,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def cells(settings: dict) -> list[dict]:
    """Every (task, condition, optimizer) of the study, with its learning-rate grid."""
    found = []
    for task, spec in settings["tasks"].items():
        for condition, value in spec["conditions"].items():
            for name, choice in settings["optimizers"].items():
                center = choice["recommended_lr"] * spec["lr_scale"]
                found.append({
                    "task": task, "condition": condition, "value": value, "optimizer": name,
                    "grid": protocol.lr_grid(center, settings["lr_grid_factors"]),
                })  # fmt: skip
    return found


def runs_per_cell(settings: dict) -> int:
    """Every rate of the grid per tuning seed, then the chosen rate per test seed."""
    grid = len(settings["lr_grid_factors"])
    return grid * len(settings["tuning_seeds"]) + len(settings["test_seeds"])


def _study_cost(settings: dict, plan: list[dict]) -> float:
    tuned = sum(_run_cost(cell, settings) for cell in plan) * runs_per_cell(settings)
    return tuned + sum(_run_cost(run, settings) for run in sac_runs(settings))


def _run_cost(run: dict, settings: dict) -> float:
    if run["task"] == "sac":
        steps = settings["sac"]["steps"]
        learning = steps - min(sac.LEARNING_STARTS, steps // 2)
        return learning / 1000 * _SECONDS_PER_1K_SAC_STEPS
    if run["task"] == "rl":
        return settings["rl_steps"] / 1000 * _SECONDS_PER_1K_RL_STEPS
    per_epoch = _SECONDS_PER_CIFAR10_EPOCH if settings["cifar10"] else _SECONDS_PER_DIGITS_EPOCH
    return settings["epochs"] * per_epoch


# ------------------------------------------------------------------------ the worker side

_WORKER: dict = {}


def _init_worker(settings: dict) -> None:
    # Ctrl-C reaches every process of the terminal's group; the parent alone handles it. SIGTERM
    # (the pool's terminate() sends it) ends a worker at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    _WORKER.clear()
    _WORKER["settings"] = settings


def _dataset(settings: dict):
    if "data" not in _WORKER:
        cifar = settings["cifar10"]
        data = load_cifar10(Path(cifar)) if cifar else load_digits()
        _WORKER["data"] = data.to(torch.device(settings["device"]))
    return _WORKER["data"]


def execute(run: dict, settings: dict | None = None) -> dict:
    """Train one run of the plan and return it with its result (in a worker process)."""
    settings = settings or _WORKER["settings"]
    if run["task"] == "sac":
        spec = settings["sac"]
        result = timed(
            sac.train_paper_sac, run["condition"], run["optimizer"], run["seed"], spec["steps"],
            spec["evaluation_episodes"],
        )  # fmt: skip
        return {**run, **result}
    choice = OptimizerChoice(**settings["optimizers"][run["optimizer"]])
    test = run["phase"] == "test"
    if run["task"] == "rl":
        result = timed(
            train_rl, run["value"], choice, run["lr"], run["seed"], settings["rl_steps"],
            settings["rl_episodes"], test=test,
        )  # fmt: skip
    else:
        data = _dataset(settings)
        sigma = run["value"] if run["task"] == "noise" else 0.0
        if run["task"] == "labels":
            data = data.with_label_noise(run["value"], seed=run["seed"])
        result = timed(
            train_supervised, data, choice, run["lr"], run["seed"], settings["epochs"],
            settings["batch_size"], sigma=sigma, test=test,
        )  # fmt: skip
    return {**run, **result}


# ------------------------------------------------------------------------ the study folder


def _prepare_output(folder: Path) -> Path:
    """Create the output folder and prove it is writable, before any training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise DemoInputError(
            f"output folder {str(folder)!r} is not writable: {error.strerror or error}"
        ) from None
    return folder


# What every saved run holds, by phase.
_RUN_FIELDS = {
    phase: ("task", "condition", "optimizer", "phase", "lr", "seed", *results)
    for phase, results in (
        ("tuning", ("validation", "test")),
        ("test", ("validation", "test")),
        ("paper", ("curve", "evaluation")),
    )
}


def _read_saved_runs(path: Path, settings: dict) -> list[dict]:
    """The runs of the study ``settings`` describes saved in ``path``; a last line cut short
    by a kill is dropped (that run reruns), any other line that is not a run of this study is
    refused."""
    known = {protocol.cell_key(run) for run in [*cells(settings), *sac_runs(settings)]}
    runs = []
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise DemoInputError(f"{path}, line {number}: not JSON ({line[:60]!r})") from None
        fields = _RUN_FIELDS.get(run.get("phase")) if isinstance(run, dict) else None
        if fields is None or any(field not in run for field in fields):
            raise DemoInputError(
                f"{path}, line {number}: not a run (a run has "
                f"{', '.join(_RUN_FIELDS['tuning'])}, or curve and evaluation for sac)"
            )
        if protocol.cell_key(run) not in known:
            raise DemoInputError(
                f"{path}, line {number}: a run of another study "
                f"({run['task']} {run['condition']} {run['optimizer']} {run['phase']})"
            )
        runs.append(run)
    return runs


class _RunLog:
    """runs.jsonl: one line per completed run, flushed to disk as each run finishes."""

    def __init__(self, path: Path, fresh: bool):
        self.handle = path.open("w" if fresh else "a")

    def append(self, run: dict) -> None:
        self.handle.write(json.dumps(run) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _load_resumed(args: argparse.Namespace, folder: Path) -> tuple[dict, list[dict]]:
    given = [f"--{f.replace('_', '-')}" for f in _STUDY_FLAGS
             if getattr(args, f) not in (None, False, "cpu")]  # fmt: skip
    if given:
        raise DemoInputError(
            f"--resume takes every setting from {folder / 'settings.json'}; drop {', '.join(given)}"
        )
    path = folder / "settings.json"
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise DemoInputError(f"--resume: no study to resume in {folder} (no {path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DemoInputError(f"--resume: {path} cannot be read ({error})") from None
    _check_saved_settings(settings, path)
    return settings, _read_saved_runs(folder / "runs.jsonl", settings)


def _settings_argv(settings: dict) -> list[str]:
    """The study flags that give ``settings``."""
    conditions = {
        task: list(spec["conditions"].values()) for task, spec in settings["tasks"].items()
    }
    joined = lambda values: ",".join(map(str, values))  # noqa: E731
    paper = settings["sac"]
    tasks = [*settings["tasks"], *(["sac"] if paper is not None else [])]
    argv = [
        "--tasks", joined(tasks), "--optimizers", joined(settings["optimizers"]),
        "--rl-steps", str(settings["rl_steps"]), "--epochs", str(settings["epochs"]),
        "--tuning-seeds", joined(settings["tuning_seeds"]),
        "--test-seeds", joined(settings["test_seeds"]),
        "--lr-grid", joined(settings["lr_grid_factors"]), "--device", str(settings["device"]),
    ]  # fmt: skip
    for flag, task in (("--sigmas", "noise"), ("--label-noise", "labels"), ("--rl-env", "rl")):
        if task in conditions:
            argv += [flag, joined(conditions[task])]
    if settings["cifar10"] is not None:
        argv += ["--cifar10", str(settings["cifar10"])]
    if paper is not None:
        argv += [
            "--sac-envs", joined(paper["envs"]), "--sac-steps", str(paper["steps"]),
            "--sac-seeds", joined(paper["seeds"]), "--sac-configs", joined(paper["configs"]),
        ]  # fmt: skip
    return argv + (["--quick"] if settings["quick"] else [])


class _SettingsParser(argparse.ArgumentParser):
    def error(self, message):
        raise DemoInputError(message)


def _check_saved_settings(settings, path: Path) -> None:
    """Refuse a settings.json that the same flags would not write again (edited, cut, or from
    another version): the resumed runs must belong to the study that was started."""
    parser = _SettingsParser(prog="settings.json")
    add_arguments(parser)
    try:
        rebuilt = build_settings(parser.parse_args(_settings_argv(settings)))
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        reason = f"no {error}" if isinstance(error, KeyError) else str(error)
        raise DemoInputError(f"--resume: {path} is not a study's settings ({reason})") from None
    rebuilt = json.loads(json.dumps(rebuilt))
    for key in sorted(set(settings) | set(rebuilt)):
        if key not in ("torch", "python") and settings.get(key) != rebuilt.get(key):
            raise DemoInputError(
                f"--resume: {path} is not a study's settings: its {key!r} is "
                f"{settings.get(key)!r} where its flags give {rebuilt.get(key)!r}"
            )


# ------------------------------------------------------------------------ running it all


def _pool_context():
    """Workers start from a fresh server process that has imported this module and nothing
    else: forking the caller's process would copy whatever it holds (autograd's threads,
    which torch then refuses to use in the child; open files; a CUDA context)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _schedule(settings: dict, plan: list[dict], done: dict[tuple, dict]) -> list[dict]:
    """The tuning runs still to do, the long ones first."""
    todo = []
    for cell in plan:
        runs = protocol.tuning_runs(
            cell["task"], cell["condition"], cell["value"], cell["optimizer"], cell["grid"],
            settings["tuning_seeds"],
        )  # fmt: skip
        todo += [r for r in runs if protocol.run_key(r) not in done]
    todo += [r for r in sac_runs(settings) if protocol.run_key(r) not in done]
    # The long runs first: better packing.
    todo.sort(key=lambda r: {"sac": 0, "rl": 1}.get(r["task"], 2))
    return todo


def _test_runs_for(cell: dict, settings: dict, done: dict[tuple, dict]) -> list[dict]:
    runs = [r for r in done.values() if protocol.cell_key(r) == protocol.cell_key(cell)]
    curve = protocol.validation_curve(runs, cell["grid"], settings["tuning_seeds"])
    if curve is None:
        return []
    chosen, _ = protocol.choose(curve)
    wanted = protocol.test_runs(
        cell["task"], cell["condition"], cell["value"], cell["optimizer"], chosen,
        settings["test_seeds"],
    )  # fmt: skip
    return [r for r in wanted if protocol.run_key(r) not in done]


class Terminated(Exception):
    """Raised in the main process by SIGTERM (``kill``, batch schedulers, container runtimes):
    the study stops as on Ctrl-C, keeping what finished."""


def _terminated(signum, frame) -> None:
    raise Terminated


def run_study(
    settings: dict, plan: list[dict], done_runs: list[dict], log: _RunLog, workers: int, tqdm
) -> int | None:
    """Run every missing run of ``plan`` (from :func:`cells`); return None when all are done,
    else the signal that stopped it, SIGINT or SIGTERM (what finished is in ``log``)."""
    done = {protocol.run_key(r): r for r in done_runs}
    todo = _schedule(settings, plan, done)
    by_key = {protocol.cell_key(cell): cell for cell in plan}
    for cell in plan:  # a resumed study: cells whose tuning had finished
        todo += _test_runs_for(cell, settings, done)
    submitted = set(done) | {protocol.run_key(r) for r in todo}
    n_runs = len(plan) * runs_per_cell(settings) + len(sac_runs(settings))
    cost_total = _study_cost(settings, plan)
    cost_done = sum(_run_cost(r, settings) for r in done.values())
    results: queue.Queue = queue.Queue()
    pool = _pool_context().Pool(workers, initializer=_init_worker, initargs=(settings,))
    bar = tqdm(total=round(cost_total, 1), initial=round(cost_done, 1), unit="s",
               dynamic_ncols=True, desc="study", mininterval=1.0,
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")  # fmt: skip
    bar.set_postfix_str(f"{len(done)}/{n_runs} runs")

    def submit(run: dict) -> None:
        pool.apply_async(execute, (run,), callback=results.put, error_callback=results.put)

    for run in todo:
        submit(run)
    pending = len(todo)
    try:
        while pending:
            try:
                finished = results.get(timeout=0.2)
            except queue.Empty:
                continue
            pending -= 1
            if isinstance(finished, BaseException):
                raise finished
            done[protocol.run_key(finished)] = finished
            log.append(finished)
            bar.update(round(_run_cost(finished, settings), 1))
            bar.set_postfix_str(f"{len(done)}/{n_runs} runs")
            if finished["phase"] == "tuning":
                cell = by_key[protocol.cell_key(finished)]
                for run in _test_runs_for(cell, settings, done):
                    if protocol.run_key(run) not in submitted:
                        submitted.add(protocol.run_key(run))
                        submit(run)
                        pending += 1
    except KeyboardInterrupt:
        return signal.SIGINT
    except Terminated:
        return signal.SIGTERM
    finally:
        pool.terminate()
        pool.join()
        bar.close()
    return None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .report import format_tables, write_outputs

    started = time.perf_counter()
    folder = args.output
    try:
        if args.resume:
            settings, saved = _load_resumed(args, folder)
        else:
            settings, saved = build_settings(args), []
        _prepare_output(folder)
        if settings["cifar10"] and any(t in settings["tasks"] for t in ("noise", "labels")):
            load_cifar10(Path(settings["cifar10"]))  # every file checked before any training
    except DemoInputError as error:
        print(f"ano-optimizer demo: error: {error}", file=sys.stderr)
        return 2
    if not args.resume:
        (folder / "settings.json").write_text(json.dumps(settings, indent=1))
    workers = args.workers or os.cpu_count() or 1
    plan = cells(settings)
    per_cell = runs_per_cell(settings)
    remaining = _study_cost(settings, plan) - sum(_run_cost(r, settings) for r in saved)
    if plan:
        print(
            f"ano-optimizer demo: tasks {', '.join(settings['tasks'])}; optimizers "
            f"{', '.join(settings['optimizers'])}; {len(plan)} cells x {per_cell} runs "
            f"({len(settings['lr_grid_factors'])} rates x {len(settings['tuning_seeds'])} "
            f"tuning seeds + {len(settings['test_seeds'])} test seeds); {settings['dataset']} "
            f"{settings['epochs']} epochs, rl {settings['rl_steps']} steps"
        )
    paper = settings["sac"]
    if paper:
        print(
            f"ano-optimizer demo: sac (the paper's setting) on {', '.join(paper['envs'])}; "
            f"{', '.join(paper['configs'])} at lr {paper['lr']:g}; {len(paper['seeds'])} "
            f"seeds x {paper['steps']:,} steps = {len(sac_runs(settings))} runs"
        )
    print(
        f"{len(saved)} runs already done; estimated {remaining / workers / 60:.1f} min on "
        f"{workers} workers, one thread each"
    )
    log = _RunLog(folder / "runs.jsonl", fresh=not args.resume)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        stopped = run_study(settings, plan, saved, log, workers, tqdm)
    finally:
        signal.signal(signal.SIGTERM, previous)
        log.close()
    runs = _read_saved_runs(folder / "runs.jsonl", settings)
    results = write_outputs(folder, settings, runs, plan)
    print()
    print(format_tables(results))
    runtime = time.perf_counter() - started
    if stopped is not None:
        print(
            f"\ninterrupted after {runtime:.0f} s: {len(runs)} runs saved in {folder}/; "
            f"continue with: ano-optimizer demo --resume --output {folder}",
            file=sys.stderr,
        )
        return 128 + stopped  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
    print(
        f"\nruntime {runtime:.0f} s; results in {os.fspath(folder)}/ (results.json, "
        "results.csv, runs.csv, one PNG per task"
        + ("; sac_curves.csv, one PNG per environment)" if settings["sac"] else ")")
    )
    return 0
