"""The gradient-noise study: its settings, the optimizers it compares, one training run, and
the command that runs them all (``ano-optimizer demo``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import Dataset, DemoInputError, load_cifar10, load_digits
from .report import format_table, plot_results, summarize, write_results

DEFAULT_SIGMAS = (0.0, 0.05, 0.1, 0.2)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_OUTPUT = "demo-results"


# Baselines the registry does not hold: name -> ("module:Class", recommended lr, extra kwargs,
# pip extra that provides the module). Lion's rate follows its paper (3-10x below AdamW's).
BASELINES: dict[str, tuple[str, float, dict, str | None]] = {
    "adam": ("torch.optim:Adam", 1e-3, {}, None),
    "adamw": ("torch.optim:AdamW", 1e-3, {}, None),
    "sgd": ("torch.optim:SGD", 1e-2, {"momentum": 0.9}, None),
    "lion": ("timm.optim:Lion", 1e-4, {}, "timm"),
}


@dataclass(frozen=True)
class Setting:
    """One dataset + model + schedule: the digits default or the paper's CIFAR-10 setting."""

    name: str
    epochs: int
    quick_epochs: int
    lr_scale: float
    batch_size: int = 64


DIGITS = Setting(name="digits", epochs=20, quick_epochs=3, lr_scale=10.0)
CIFAR10 = Setting(name="cifar10", epochs=100, quick_epochs=1, lr_scale=1.0)


@dataclass(frozen=True)
class OptimizerChoice:
    name: str
    target: str  # "module:Class"
    recommended_lr: float
    kwargs: dict = field(default_factory=dict)
    origin: str = "registry"

    def build(self, params, lr: float) -> torch.optim.Optimizer:
        return _load(self.target)(params, **{**self.kwargs, "lr": lr})


def _load(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _float_list(text: str) -> list[float]:
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {item!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(
                f"sigma must be a finite number >= 0, got {item.strip()!r}"
            )
        values.append(value)
    return values


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected optimizer names, got {text!r}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _lr_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. ano=1e-3), got {text!r}")
    return name.strip().lower(), _positive_float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizers",
        type=_name_list,
        default=None,
        metavar="NAMES",
        help="comma-separated registry names (see `ano-optimizer list`) or torch baselines "
        f"({', '.join(BASELINES)}); default: ano,anolog,adam,adamw, plus lion when timm is "
        "installed",
    )
    parser.add_argument(
        "--sigmas",
        type=_float_list,
        default=list(DEFAULT_SIGMAS),
        metavar="S1,S2,...",
        help="gradient-noise standard deviations (default: 0,0.05,0.1,0.2)",
    )
    parser.add_argument(
        "--seeds",
        type=_int_list,
        default=None,
        metavar="N1,N2,...",
        help="seeds: each seeds the model's initial weights, the batch order and the noise, "
        "identically for every optimizer (default: 0,1,2; --quick: 0)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"epochs per run (default: {DIGITS.epochs} on digits, {CIFAR10.epochs} on CIFAR-10; "
        f"--quick: {DIGITS.quick_epochs} / {CIFAR10.quick_epochs})",
    )
    parser.add_argument(
        "--lr-scale",
        type=_positive_float,
        default=None,
        help="multiplies every recommended learning rate (default: 10 on digits, 1 on CIFAR-10)",
    )
    parser.add_argument(
        "--lr",
        type=_lr_override,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="exact learning rate for one optimizer, e.g. --lr ano=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(DEFAULT_OUTPUT),
        help=f"folder for results.json, results.csv, runs.csv, noise_study.png "
        f"(default: ./{DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--cifar10",
        type=Path,
        default=None,
        metavar="PATH",
        help="run the paper's setting on this CIFAR-10 python-format folder "
        "(data_batch_1..5, test_batch)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on, e.g. cuda (default: cpu); results are reproducible "
        "per device",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one seed and a few epochs (CI smoke run, well under a minute on digits)",
    )


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

    Registry optimizers run at their own defaults (``spec.defaults``) and their default
    learning rate; baselines at the rates in :data:`BASELINES`.
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
        kwargs = dict(spec.defaults)
        lr = kwargs.pop("lr", None)
        if lr is None:
            lr = _signature_lr(cls)
        if lr is None:
            raise DemoInputError(
                f"optimizer {name!r} has no default learning rate; give one with --lr {key}=VALUE"
            )
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


def add_gradient_noise(params: Sequence[torch.Tensor], sigma: float, generator) -> None:
    """Add N(0, sigma²) noise, drawn from ``generator``, to every entry of every gradient."""
    if sigma == 0:
        return
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                noise = torch.randn(
                    p.grad.shape, generator=generator, dtype=p.grad.dtype, device=p.grad.device
                )
                p.grad.add_(noise, alpha=sigma)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy in %) on ``x``, ``y``."""
    model.eval()
    losses, correct = [], 0
    for start in range(0, len(y), 1024):
        logits = model(x[start : start + 1024])
        target = y[start : start + 1024]
        losses.append(nn.functional.cross_entropy(logits, target, reduction="sum").item())
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train()
    return sum(losses) / max(len(y), 1), 100.0 * correct / max(len(y), 1)


def train_run(
    data: Dataset,
    choice: OptimizerChoice,
    lr: float,
    sigma: float,
    seed: int,
    epochs: int,
    batch_size: int,
    on_epoch: Callable[[], None] = lambda: None,
) -> dict:
    """Train one model; every optimizer sees the same initial weights, batches and noise."""
    device = data.x_train.device
    torch.manual_seed(seed)
    model = data.make_model().to(device)
    optimizer = choice.build(model.parameters(), lr)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(10_000 + seed)
    history = []
    started = time.perf_counter()
    n = len(data.y_train)
    for _ in range(epochs):
        order = torch.randperm(n, generator=batches).to(device)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            add_gradient_noise(params, sigma, noise)
            optimizer.step()
            total += loss.detach() * len(index)
            count += len(index)
        total = float(total)
        test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
        history.append(
            {"train_loss": total / count, "test_loss": test_loss, "test_accuracy": test_accuracy}
        )
        on_epoch()
        if not math.isfinite(total):
            break  # diverged: the remaining epochs cannot recover from NaN weights
    accuracies = [h["test_accuracy"] for h in history]
    return {
        "optimizer": choice.name,
        "sigma": sigma,
        "seed": seed,
        "lr": lr,
        "best_test_accuracy": max(accuracies),
        "final_test_accuracy": accuracies[-1],
        "diverged": len(history) < epochs,
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def _jsonable(value):
    if isinstance(value, Path):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise DemoInputError(f"--device {name!r} is not usable here: {error}") from None
    return device


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


def _plan(args: argparse.Namespace):
    setting = CIFAR10 if args.cifar10 is not None else DIGITS
    names = args.optimizers if args.optimizers else _default_optimizer_names()
    choices = {}
    for name in names:
        choice = resolve_optimizer(name)
        choices.setdefault(choice.name, choice)
    overrides = dict(args.lr)
    unknown = sorted(set(overrides) - set(choices))
    if unknown:
        raise DemoInputError(
            f"--lr names {', '.join(unknown)}, which is not among the optimizers being run "
            f"({', '.join(choices)})"
        )
    scale = args.lr_scale if args.lr_scale is not None else setting.lr_scale
    lrs = {n: overrides.get(n, c.recommended_lr * scale) for n, c in choices.items()}
    epochs = args.epochs or (setting.quick_epochs if args.quick else setting.epochs)
    seeds = args.seeds or ([0] if args.quick else list(DEFAULT_SEEDS))
    sigmas = list(dict.fromkeys(args.sigmas))
    return setting, choices, lrs, scale, epochs, list(dict.fromkeys(seeds)), sigmas


def _run_all(data, setting, choices, lrs, epochs, seeds, sigmas, tqdm) -> list[dict]:
    optimizers = list(choices)
    print(
        f"Gradient-noise study on {data.name}: {len(data.y_train)} training / "
        f"{len(data.y_test)} test examples, batch {setting.batch_size}, {epochs} epochs, "
        f"seeds {seeds}"
    )
    print("learning rates: " + ", ".join(f"{n} {lrs[n]:g}" for n in optimizers))
    runs = []
    total = len(optimizers) * len(sigmas) * len(seeds) * epochs
    with tqdm(total=total, unit="epoch", desc="noise study", dynamic_ncols=True) as bar:
        for sigma in sigmas:
            for seed in seeds:
                for name in optimizers:
                    bar.set_postfix_str(f"{name} σ={sigma:g} seed={seed}")
                    result = train_run(
                        data,
                        choices[name],
                        lrs[name],
                        sigma,
                        seed,
                        epochs,
                        setting.batch_size,
                        on_epoch=lambda: bar.update(1),
                    )
                    bar.update(epochs - len(result["history"]))
                    runs.append(result)

    return runs


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        setting, choices, lrs, scale, epochs, seeds, sigmas = _plan(args)
        output = _prepare_output(args.output)
        device = _check_device(args.device)
        data = load_cifar10(args.cifar10) if args.cifar10 is not None else load_digits()
        data.to(device)
    except DemoInputError as error:
        print(f"ano-optimizer demo: error: {error}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = _run_all(data, setting, choices, lrs, epochs, seeds, sigmas, tqdm)
    finally:
        torch.set_num_threads(threads)
    optimizers = list(choices)
    summary = summarize(runs, optimizers, sigmas)
    runtime = time.perf_counter() - started
    config = {
        "arguments": {k: _jsonable(v) for k, v in vars(args).items() if not k.startswith("_")},
        "dataset": data.name,
        "model": "mlp" if setting is DIGITS else "cnn",
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "batch_size": setting.batch_size,
        "epochs": epochs,
        "sigmas": sigmas,
        "seeds": seeds,
        "lr_scale": scale,
        "optimizers": {
            n: {
                "class": c.target,
                "origin": c.origin,
                "lr": lrs[n],
                "recommended_lr": c.recommended_lr,
                "kwargs": c.kwargs,
            }
            for n, c in choices.items()
        },
        "runtime_seconds": runtime,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "device": str(data.x_train.device),
    }
    write_results(output, config, runs, summary)
    plot_results(
        output / "noise_study.png",
        runs,
        summary,
        optimizers,
        sigmas,
        f"{data.name}: best test accuracy",
    )
    print()
    print("Best test accuracy (%), mean ± std over seeds " + ",".join(map(str, seeds)) + ":")
    print(format_table(summary, optimizers, sigmas))
    print()
    print(
        f"runtime {runtime:.0f} s; results in {os.fspath(output)}/ (results.json, results.csv, "
        "runs.csv, noise_study.png)"
    )
    return 0
