"""Ano in PyTorch Lightning: ``configure_optimizers``, exact ``ckpt_path`` resume, and
``LightningCLI`` choosing it by class path or short name (docs/lightning.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ano_optimizer import Ano, Anolog

lightning = pytest.importorskip("lightning.pytorch")

ANO_OPTIMIZER = Path(sys.executable).with_name("ano-optimizer")


class Regression(lightning.LightningModule):
    """A small MLP on a fixed regression set; Ano with the usual decay / no-decay groups."""

    def __init__(self, optimizer_cls=Ano, lr: float = 1e-2):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.optimizer_cls, self.lr = optimizer_cls, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return self.optimizer_cls(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )


def _loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=generator)
    y = x[:, :1] * 2.0 - x[:, 1:2]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _trainer(tmp_path, epochs: int) -> lightning.Trainer:
    return lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )


def _model(optimizer_cls) -> Regression:
    torch.manual_seed(0)
    return Regression(optimizer_cls)


@pytest.mark.parametrize("optimizer_cls", [Ano, Anolog])
def test_configure_optimizers_trains_and_ckpt_path_resumes_exactly(tmp_path, optimizer_cls):
    whole = _model(optimizer_cls)
    trainer = _trainer(tmp_path / "whole", epochs=4)
    trainer.fit(whole, _loader())
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is optimizer_cls
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert {float(s["step"]) for s in optimizer.state.values()} == {12.0}

    first = _model(optimizer_cls)
    half = _trainer(tmp_path / "half", epochs=2)
    half.fit(first, _loader())
    checkpoint = tmp_path / "half.ckpt"
    half.save_checkpoint(checkpoint)

    resumed = _model(optimizer_cls)  # a fresh model: everything comes from the checkpoint
    _trainer(tmp_path / "resumed", epochs=4).fit(resumed, _loader(), ckpt_path=checkpoint)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.net[0].weight, whole.net[0].weight)


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


def test_lightning_cli_short_name_through_ano_optimizer_run(tmp_path):
    """jsonargparse resolves a short class name among the imported Optimizer subclasses, so the
    name works once ano_optimizer is imported: 'ano-optimizer run' does that for the script."""
    short = ["--optimizer", "Anolog", "--optimizer.lr", "0.003"]
    failed = _cli(tmp_path, [sys.executable], short)
    assert failed.returncode != 0 and "Expected a dot import path string: Anolog" in failed.stderr
    report = _report(_cli(tmp_path, [str(ANO_OPTIMIZER), "run"], short))
    assert report["class"] == "ano_optimizer.optimizer.Anolog"
    assert (report["lr"], report["steps"]) == (0.003, [3.0])
