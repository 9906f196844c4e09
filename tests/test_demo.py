"""``ano-optimizer demo``: the gradient-noise study on digits and on a CIFAR-10-format folder."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ano_optimizer.cli import main
from ano_optimizer.demo import data as demo_data
from ano_optimizer.demo import study

ROOT = Path(__file__).resolve().parent.parent


def _read_json(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run, exactly as CI runs it: every default optimizer and sigma."""
    output = tmp_path_factory.mktemp("quick") / "results"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--quick", "--output", str(output)])
    return code, output, stdout.getvalue()


def test_quick_run_learns_and_reports_every_optimizer_and_sigma(quick_run):
    code, output, stdout = quick_run
    assert code == 0
    results = _read_json(output)
    config = results["config"]
    names = list(config["optimizers"])
    assert names[:4] == ["ano", "anolog", "adam", "adamw"]
    assert config["sigmas"] == [0.0, 0.05, 0.1, 0.2]
    assert config["seeds"] == [0] and config["epochs"] == 3 and config["batch_size"] == 64
    # Recommended rates times the digits scale of 10, the paper's ratios kept.
    assert config["optimizers"]["ano"]["lr"] == pytest.approx(1e-3)
    assert config["optimizers"]["anolog"]["lr"] == pytest.approx(1e-3)
    assert config["optimizers"]["adam"]["lr"] == pytest.approx(1e-2)
    assert config["optimizers"]["ano"]["class"] == "ano_optimizer.optimizer:Ano"

    cells = {(r["optimizer"], r["sigma"]): r for r in results["summary"]}
    assert set(cells) == {(n, s) for n in names for s in config["sigmas"]}
    for run in results["runs"]:
        accuracies = [h["test_accuracy"] for h in run["history"]]
        assert len(accuracies) == 3
        assert run["best_test_accuracy"] == max(accuracies)
        cell = cells[(run["optimizer"], run["sigma"])]
        assert cell["best_test_accuracy_mean"] == run["best_test_accuracy"]  # one seed
    for name in names:
        # Ten classes: chance is 10%. Three noise-free epochs get every optimizer far above it.
        assert cells[(name, 0.0)]["best_test_accuracy_mean"] > 60, name
        assert all(math.isfinite(h["train_loss"]) for r in results["runs"] for h in r["history"])

    # The printed table shows the same numbers.
    for name in names:
        row = next(line for line in stdout.splitlines() if line.startswith(f"{name} ("))
        for sigma in config["sigmas"]:
            assert f"{cells[(name, sigma)]['best_test_accuracy_mean']:.2f} ± 0.00" in row


def test_quick_run_writes_csv_and_plot_matching_the_json(quick_run):
    _, output, _ = quick_run
    results = _read_json(output)
    with (output / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results["summary"])
    for row, cell in zip(rows, results["summary"], strict=True):
        assert (row["optimizer"], float(row["sigma"])) == (cell["optimizer"], cell["sigma"])
        assert float(row["best_test_accuracy_mean"]) == pytest.approx(
            cell["best_test_accuracy_mean"], abs=1e-4
        )
    with (output / "runs.csv").open() as handle:
        per_epoch = list(csv.DictReader(handle))
    assert len(per_epoch) == sum(len(r["history"]) for r in results["runs"])
    width, height = _png_size(output / "noise_study.png")
    assert width > 1000 and height > 200


def test_runs_are_reproducible_and_seeds_matter():
    data = demo_data.load_digits()
    choice = study.resolve_optimizer("ano")
    first = study.train_run(data, choice, 1e-3, 0.1, seed=5, epochs=1, batch_size=64)
    again = study.train_run(data, choice, 1e-3, 0.1, seed=5, epochs=1, batch_size=64)
    other = study.train_run(data, choice, 1e-3, 0.1, seed=6, epochs=1, batch_size=64)
    assert first["history"] == again["history"]
    assert first["history"] != other["history"]


def test_gradient_noise_has_the_requested_distribution():
    generator = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.zeros(400, 500))
    big.grad = torch.full_like(big, 0.5)
    untouched = torch.nn.Parameter(torch.zeros(3))  # no gradient: stays without one
    study.add_gradient_noise([big, untouched], 0.2, generator)
    noise = big.grad - 0.5
    assert noise.mean().abs().item() < 0.002
    assert noise.std().item() == pytest.approx(0.2, rel=0.01)
    assert untouched.grad is None

    before = big.grad.clone()
    study.add_gradient_noise([big], 0.0, generator)
    assert torch.equal(big.grad, before)


def test_unknown_optimizer_fails_before_training(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["demo", "--optimizers", "ano,adamx", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'adamx'" in err
    assert "ano" in err and "adamw" in err  # the names that exist
    assert not output.exists()


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        ("0,-0.1", "sigma must be a finite number >= 0, got '-0.1'"),
        ("nan", "sigma must be a finite number >= 0, got 'nan'"),
        ("0,x", "not a number: 'x'"),
    ],
)
def test_bad_sigma_is_a_usage_error(sigmas, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--sigmas", sigmas, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--sigmas" in err and message in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--quick", "--output", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "not writable" in err and str(blocker) in err


def test_unusable_device_fails_before_training(tmp_path, capsys):
    assert main(["demo", "--device", "tpu9", "--output", str(tmp_path / "out")]) == 2
    assert "--device 'tpu9' is not usable here" in capsys.readouterr().err


def test_lr_override_must_name_a_running_optimizer(tmp_path, capsys):
    args = ["demo", "--optimizers", "ano", "--lr", "adam=1e-3", "--output", str(tmp_path)]
    assert main(args) == 2
    assert "--lr names adam" in capsys.readouterr().err


def test_exit_code_from_the_installed_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ano_optimizer.cli", "demo", "--sigmas=-0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "sigma must be a finite number >= 0, got '-0.5'" in result.stderr
    assert not (tmp_path / "demo-results").exists()


def test_any_registry_name_runs_including_a_plugin_spec(tmp_path):
    """A spec registered at runtime is found by name, with its own defaults and learning rate."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from ano_optimizer import OptimizerSpec, register_optimizer
        from ano_optimizer.cli import main

        register_optimizer(OptimizerSpec(
            name="demosgd", description="SGD with momentum, registered by a test",
            torch_class="torch.optim:SGD", keras_class=None,
            defaults={{"lr": 0.05, "momentum": 0.9}},
            has_betas=False, has_eps=False, has_momentum=True, source="test-plugin"))
        register_optimizer(OptimizerSpec(
            name="demokerasonly", description="a Keras-only optimizer",
            torch_class=None, keras_class="keras.optimizers:SGD"))
        assert main(["demo", "--optimizers", "demokerasonly", "--output", {str(tmp_path)!r}]) == 2
        code = main(["demo", "--optimizers", "DemoSGD,Anolog", "--sigmas", "0", "--epochs", "2",
                     "--lr-scale", "1", "--output", {str(tmp_path)!r}])
        sys.exit(code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert "optimizer 'demokerasonly' has no PyTorch implementation" in result.stderr
    config = _read_json(tmp_path)["config"]
    assert config["optimizers"]["demosgd"] == {
        "class": "torch.optim:SGD",
        "origin": "test-plugin",
        "lr": 0.05,
        "recommended_lr": 0.05,
        "kwargs": {"momentum": 0.9},
    }
    assert config["optimizers"]["anolog"]["lr"] == pytest.approx(1e-4)  # scale 1: the default
    summary = {row["optimizer"]: row for row in _read_json(tmp_path)["summary"]}
    assert set(summary) == {"demosgd", "anolog"}
    assert summary["demosgd"]["best_test_accuracy_mean"] > 60  # SGD with momentum did learn


def test_importing_the_cli_does_not_import_the_demo_dependencies():
    # tqdm is left out: torch.hub imports it with torch itself.
    code = (
        "import sys; from ano_optimizer import cli; cli.build_parser(); "
        "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CIFAR-10 format


def _write_fake_cifar10(folder: Path, per_batch: int = 20) -> None:
    """CIFAR-10 python-format pickles whose red channel grows and blue channel falls with the
    label, so the channel order of the loader can be checked."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for name in demo_data.CIFAR10_FILES:
        labels = [i % 10 for i in range(per_batch)]
        images = torch.randint(0, 20, (per_batch, 3, 32, 32), generator=generator)
        for i, label in enumerate(labels):
            images[i, 0] += 20 * label  # red
            images[i, 2] += 200 - 20 * label  # blue
        data = images.to(torch.uint8).reshape(per_batch, 3072).numpy()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle)


def test_cifar10_loader_keeps_images_channels_and_labels_together(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar")
    data = demo_data.load_cifar10(tmp_path / "cifar")
    assert tuple(data.x_train.shape) == (100, 3, 32, 32) and tuple(data.x_test.shape) == (
        20,
        3,
        32,
        32,
    )
    assert data.y_train.tolist() == [i % 10 for i in range(20)] * 5
    red = data.x_train[:, 0].mean(dim=(1, 2))
    blue = data.x_train[:, 2].mean(dim=(1, 2))
    by_label = torch.argsort(data.y_train, stable=True)
    assert torch.all(red[by_label].diff()[data.y_train[by_label].diff() > 0] > 0)
    assert torch.all(blue[by_label].diff()[data.y_train[by_label].diff() > 0] < 0)
    # Normalised with the training set's per-channel statistics.
    mean = data.x_train.mean(dim=(0, 2, 3))
    assert mean.abs().max().item() < 1e-5


def test_cifar10_quick_run_uses_the_papers_setting(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar")
    output = tmp_path / "out"
    args = ["demo", "--cifar10", str(tmp_path / "cifar"), "--quick", "--optimizers", "ano,adam"]
    assert main([*args, "--sigmas", "0,0.1", "--output", str(output)]) == 0
    config = _read_json(output)["config"]
    assert (config["dataset"], config["model"], config["batch_size"]) == ("cifar10", "cnn", 64)
    assert (config["n_train"], config["n_test"], config["epochs"]) == (100, 20, 1)
    # The paper's learning rates, unscaled.
    assert config["optimizers"]["ano"]["lr"] == pytest.approx(1e-4)
    assert config["optimizers"]["adam"]["lr"] == pytest.approx(1e-3)
    assert len(_read_json(output)["runs"]) == 4
    _png_size(output / "noise_study.png")


def test_cifar10_folder_with_missing_files_is_rejected(tmp_path, capsys):
    folder = tmp_path / "cifar"
    _write_fake_cifar10(folder)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").write_bytes(b"not a pickle")
    assert main(["demo", "--cifar10", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert "missing data_batch_3" in capsys.readouterr().err

    (folder / "data_batch_3").write_bytes((folder / "data_batch_1").read_bytes())
    assert main(["demo", "--cifar10", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert "test_batch is not a CIFAR-10 python-format batch" in capsys.readouterr().err
