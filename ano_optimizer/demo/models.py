"""The study's two models: an MLP for scikit-learn's digits and the paper's small CIFAR-10 CNN."""

from __future__ import annotations

from torch import nn


def digits_mlp() -> nn.Module:
    """~26k parameters: the 8x8 digits through two hidden layers of 128 ReLU units."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def cifar10_cnn() -> nn.Module:
    """The small CNN of the paper's noise study: two conv-pool stages and a 2-layer head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
