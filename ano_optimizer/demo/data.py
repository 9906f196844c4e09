"""The study's data: scikit-learn's bundled digits, or a CIFAR-10 copy in the python format.

Both come as three fixed parts: training (what the optimizer sees), validation (what picks the
learning rate and the epoch) and test (what is reported). CIFAR-10's python-format batches are
pickles, so they are read with a restricted unpickler that builds only dicts, lists, bytes,
strings, numbers and NumPy arrays: a crafted file cannot run code.
"""

from __future__ import annotations

import io
import math
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
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], nn.Module]

    def to(self, device: torch.device) -> Dataset:
        for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def with_label_noise(self, fraction: float, seed: int) -> Dataset:
        """A copy whose training and validation labels are symmetrically noisy: each is, with
        probability ``fraction``, replaced by one of the other nine classes drawn uniformly.
        Validation is noisy too (a user holds out from the labels they have); test stays clean."""
        if fraction == 0:
            return self
        generator = torch.Generator().manual_seed(50_000 + seed)

        def corrupt(labels: torch.Tensor) -> torch.Tensor:
            flip = torch.rand(len(labels), generator=generator) < fraction
            shift = torch.randint(1, 10, (len(labels),), generator=generator)
            return torch.where(
                flip.to(labels.device), (labels + shift.to(labels.device)) % 10, labels
            )

        return Dataset(
            self.name,
            self.x_train,
            corrupt(self.y_train),
            self.x_val,
            corrupt(self.y_val),
            self.x_test,
            self.y_test,
            self.make_model,
        )


def load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits: a fixed stratified 60/20/20 split, pixels in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    # The split is the same for every seed: seeds vary the training, not the held-out sets.
    rest, test = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=0, stratify=bunch.target
    )
    train, val = train_test_split(rest, test_size=0.25, random_state=0, stratify=bunch.target[rest])
    return Dataset("digits", x[train], y[train], x[val], y[val], x[test], y[test], digits_mlp)


CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
# The globals a CIFAR-10 python-format pickle may name: NumPy's array reconstruction.
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, bytes, strings, numbers and NumPy arrays; nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: a CIFAR-10 batch holds only data "
            "(dicts, lists, bytes, strings, numbers, NumPy arrays)"
        )


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    def bad(problem: str) -> DemoInputError:
        return DemoInputError(f"--cifar10: {path} is not a CIFAR-10 python-format batch: {problem}")

    try:
        raw = path.read_bytes()
        batch = _DataOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except OSError as error:
        raise bad(f"cannot read it ({error.strerror or error})") from None
    except Exception as error:  # any malformed pickle: EOF, bad opcode, refused global, ...
        raise bad(f"{type(error).__name__}: {error}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise bad("expected a pickled dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise bad(f"b'data' must be a uint8 NumPy array, got {type(data).__name__}"
                  + (f" of {data.dtype}" if isinstance(data, np.ndarray) else ""))  # fmt: skip
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] == 0:
        raise bad(f"b'data' must have shape (N, 3072) with N >= 1, got {data.shape}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != data.shape[0]:
        raise bad(f"b'labels' must be a list of {data.shape[0]} labels, one per image")
    values = []
    for label in labels:
        if (isinstance(label, (int, np.integer)) and not isinstance(label, bool)) or (
            isinstance(label, (float, np.floating)) and math.isfinite(label) and label == int(label)
        ):
            value = int(label)
        else:
            shown = label.item() if isinstance(label, np.generic) else label
            raise bad(f"labels must be whole numbers in 0..9, found {shown!r}")
        if not 0 <= value <= 9:
            raise bad(f"labels must be whole numbers in 0..9, found {value}")
        values.append(value)
    # Each row holds the 1024 red, then green, then blue values of a 32x32 image.
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return x, torch.tensor(values, dtype=torch.long)


def load_cifar10(folder: Path) -> Dataset:
    """Read and check a CIFAR-10 python-format folder (every file, before any training).

    The last 5,000 training images are the validation part; normalised with the training
    part's channel statistics.
    """
    if not folder.is_dir():
        raise DemoInputError(f"--cifar10 {folder}: no such folder")
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise DemoInputError(
            f"--cifar10 {folder}: missing {', '.join(missing)} (expected the python-format "
            f"files {', '.join(CIFAR10_FILES)})"
        )
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_FILES]
    x_all = torch.cat([x for x, _ in parts[:-1]]).float() / 255.0
    y_all = torch.cat([y for _, y in parts[:-1]])
    n_val = max(1, len(y_all) // 10)
    if len(y_all) - n_val < 1:
        raise DemoInputError(f"--cifar10 {folder}: too few training images ({len(y_all)})")
    x_train, y_train = x_all[:-n_val], y_all[:-n_val]
    x_val, y_val = x_all[-n_val:], y_all[-n_val:]
    x_test, y_test = parts[-1][0].float() / 255.0, parts[-1][1]
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).nan_to_num(1.0).clamp_min(1e-6)

    def norm(x):
        return (x - mean) / std

    return Dataset(
        "cifar10", norm(x_train), y_train, norm(x_val), y_val, norm(x_test), y_test, cifar10_cnn
    )
