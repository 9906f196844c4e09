"""The study's data: scikit-learn's bundled digits, or a CIFAR-10 copy in the python format."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .models import cifar10_cnn, digits_mlp


class DemoInputError(ValueError):
    """Bad command-line input, reported before any training starts (exit code 2)."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], nn.Module]

    def to(self, device: torch.device) -> None:
        for name in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))


def load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits: a fixed stratified 80/20 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    # The split is the same for every seed: seeds vary the training, not the test set.
    train_idx, test_idx = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=0, stratify=bunch.target
    )
    return Dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], digits_mlp)


CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise DemoInputError(
            f"{path} is not a CIFAR-10 python-format batch (a pickled dict with b'data' and "
            f"b'labels'): {error!r}"
        ) from None
    x = torch.as_tensor(data, dtype=torch.uint8)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(labels) != x.shape[0]:
        raise DemoInputError(
            f"{path}: expected data of shape (N, 3072) and N labels, got data "
            f"{tuple(x.shape)} and {len(labels)} labels"
        )
    # Each row holds the 1024 red, then green, then blue values of a 32x32 image.
    return x.view(-1, 3, 32, 32), torch.as_tensor(labels, dtype=torch.long)


def load_cifar10(folder: Path) -> Dataset:
    """Read a CIFAR-10 python-format folder; normalise with the training set's channel stats."""
    if not folder.is_dir():
        raise DemoInputError(f"--cifar10 {folder}: no such folder")
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise DemoInputError(
            f"--cifar10 {folder}: missing {', '.join(missing)} (expected the python-format "
            f"files {', '.join(CIFAR10_FILES)})"
        )
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_FILES[:-1]]
    x_train = torch.cat([x for x, _ in parts]).float() / 255.0
    y_train = torch.cat([y for _, y in parts])
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    x_test = x_test.float() / 255.0
    for labels, name in ((y_train, "data_batch_*"), (y_test, "test_batch")):
        if labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) <= 9):
            raise DemoInputError(f"--cifar10 {folder}: labels of {name} must be in 0..9")
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Dataset(
        "cifar10", (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, cifar10_cnn
    )
