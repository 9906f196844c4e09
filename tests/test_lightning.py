"""Ano in PyTorch Lightning: ``configure_optimizers``, exact ``ckpt_path`` resume, and
``LightningCLI`` choosing it by class path or short name (docs/lightning.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ano_optimizer import Ano, Anolog

pytest.importorskip("lightning.pytorch")

ANO_OPTIMIZER = Path(sys.executable).with_name("ano-optimizer")


# Runs in its own process: torch's own OptimizerInfo tests (tests/test_torch_conformance.py)
# freeze torch.backends' flags for the rest of the pytest process, and Lightning's Trainer sets
# them.
TRAIN_AND_RESUME = """
import json, sys
import torch
import lightning.pytorch as pl
from ano_optimizer import Ano, Anolog

optimizer_cls = {"Ano": Ano, "Anolog": Anolog}[sys.argv[1]]
root = sys.argv[2]


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return optimizer_cls(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-2,
        )


def loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=generator)
    y = x[:, :1] * 2.0 - x[:, 1:2]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def trainer(name, epochs):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=f"{root}/{name}",
        deterministic=True,
    )


def model():
    torch.manual_seed(0)
    return Regression()


whole = model()
run = trainer("whole", 4)
run.fit(whole, loader())
optimizer = run.optimizers[0]

first = model()
half = trainer("half", 2)
half.fit(first, loader())
half.save_checkpoint(f"{root}/half.ckpt")
resumed = model()  # fresh weights: everything comes from the checkpoint
trainer("resumed", 4).fit(resumed, loader(), ckpt_path=f"{root}/half.ckpt")

print(json.dumps({
    "class": type(optimizer).__name__,
    "weight_decays": [g["weight_decay"] for g in optimizer.param_groups],
    "steps": sorted({float(s["step"]) for s in optimizer.state.values()}),
    "resumed_equal": all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters())),
    "half_differs": not torch.equal(first.net[0].weight, whole.net[0].weight),
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_cls", [Ano, Anolog])
def test_configure_optimizers_trains_and_ckpt_path_resumes_exactly(tmp_path, optimizer_cls):
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_RESUME, optimizer_cls.__name__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "class": optimizer_cls.__name__,
        "weight_decays": [0.1, 0.0],
        "steps": [12.0],  # 4 epochs of 3 batches
        "resumed_equal": True,  # ckpt_path resume reaches the uninterrupted weights exactly
        "half_differs": True,
    }


# An unchanged LightningCLI program: it never imports ano_optimizer itself.
CLI_SCRIPT = """
import json, sys
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()


if __name__ == "__main__":
    torch.manual_seed(0)
    cli = LightningCLI(Model, BoringDataModule, run=False, save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    print(json.dumps({
        "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "lr": optimizer.param_groups[0]["lr"],
        "betas": optimizer.param_groups[0]["betas"],
        "steps": sorted({float(s["step"]) for s in optimizer.state.values()}),
    }))
"""
TRAINER_ARGS = [
    *("--trainer.max_steps", "3", "--trainer.logger", "false"),
    *("--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"),
    *("--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"),
]


def _cli(tmp_path, launcher: list[str], optimizer_args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "cli_train.py"
    script.write_text(CLI_SCRIPT)
    return subprocess.run(
        [*launcher, str(script), *TRAINER_ARGS, *optimizer_args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )


def _report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_lightning_cli_takes_the_class_path(tmp_path):
    class_path = ["--optimizer", "ano_optimizer.Ano", "--optimizer.lr", "0.01"]
    report = _report(
        _cli(tmp_path, [sys.executable], [*class_path, "--optimizer.betas", "[0.9, 0.99]"])
    )
    assert report == {
        "class": "ano_optimizer.optimizer.Ano",
        "lr": 0.01,
        "betas": [0.9, 0.99],
        "steps": [3.0],
    }


@pytest.mark.slow
def test_lightning_cli_short_name_through_ano_optimizer_run(tmp_path):
    """jsonargparse resolves a short class name among the imported Optimizer subclasses, so the
    name works once ano_optimizer is imported: 'ano-optimizer run' does that for the script."""
    short = ["--optimizer", "Anolog", "--optimizer.lr", "0.003"]
    report = _report(_cli(tmp_path, [str(ANO_OPTIMIZER), "run"], short))
    assert report["class"] == "ano_optimizer.optimizer.Anolog"
    assert (report["lr"], report["steps"]) == (0.003, [3.0])
