"""Gradient-noise study: does Ano's lead over Adam grow with gradient noise?

Trains a small MLP on scikit-learn's digits (bundled, no download) with Gaussian noise of
standard deviation sigma added to every gradient entry before each optimizer step, for every
optimizer, sigma and seed. Prints the best test accuracy (mean ± std over seeds) per sigma and
optimizer, and writes results.json, results.csv, runs.csv and noise_study.png (accuracy against
sigma, and loss curves) to the output folder.

Learning rates: each optimizer's recommended rate for the paper's 100-epoch CIFAR-10 setting
(Ano, Anolog, Lion 1e-4; Adam, AdamW 1e-3; SGD 1e-2 with momentum 0.9; a registry optimizer's
own default), multiplied by --lr-scale: default 10 on digits, about the square root of the ~170x
fewer steps a 20-epoch digits run takes; 1 with --cifar10. --lr NAME=VALUE sets one optimizer's
rate exactly. Runs use one CPU thread: these models are too small to gain from more.

With --cifar10 PATH it runs the paper's setting instead (small CNN, batch 64, 100 epochs) on a
CIFAR-10 copy in the python format (data_batch_1 ... data_batch_5 and test_batch pickles).
"""

from __future__ import annotations

from .study import add_arguments, run

__all__ = ["add_arguments", "run"]
