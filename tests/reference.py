"""A float64 NumPy transcription of the Ano update rule (``shared/spec/ALGORITHM.md``).

The tests' own oracle: deliberately written as plainly as the spec, with no shared code.
"""

from __future__ import annotations

import math

import numpy as np


def ano_reference(
    param0, grads, has_grad, *, lr, betas, eps, weight_decay, logarithmic_schedule, maximize=False
):
    """Run Ano on one tensor. Returns (params after every step, exp_avg, exp_avg_sq, steps taken)."""
    beta1, beta2 = betas
    p = np.array(param0, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    k = 0
    trajectory = []
    for g, has in zip(grads, has_grad, strict=True):
        if has:
            g = np.asarray(g, dtype=np.float64)
            if maximize:
                g = -g
            k += 1
            b1 = 1.0 - 1.0 / math.log(k + 2) if logarithmic_schedule else beta1
            m = b1 * m + (1.0 - b1) * g
            v = beta2 * v + (1.0 - beta2) * np.sign(g * g - v) * g * g
            v_hat = v / (1.0 - beta2**k)
            p = p * (1.0 - lr * weight_decay)
            p = p - lr * np.abs(g) * np.sign(m) / (np.sqrt(v_hat) + eps)
        trajectory.append(p.copy())
    return np.stack(trajectory), m, v, k
