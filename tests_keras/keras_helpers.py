"""Shared pieces of the Keras tests: the oracles, the plugin fixture, subprocess runs."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Copied from the project's shared/reference (its source of truth) so a clone runs every oracle test.
REFERENCE_DIR = REPO / "tests" / "data"
PLUGIN_DIR_ENV = "ANO_KERAS_TEST_PLUGIN_DIR"


def load_by_path(name: str, path: Path):
    # tests/ holds torch-side modules; these two import numpy only, so load them by path
    # rather than putting tests/ on sys.path.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


reference = load_by_path("ano_test_reference", REPO / "tests" / "reference.py")
plugin_fixture = load_by_path("ano_test_plugin_fixture", REPO / "tests" / "plugin_fixture.py")
ano_reference = reference.ano_reference


def keras_step_reference(
    param0, grads, has_grad, *, lrs, betas, eps, weight_decay, logarithmic_schedule
):
    """Float64 Ano as Keras runs it: the step count is the optimizer's ``iterations + 1`` for
    every variable (also on steps where this one had no gradient), and ``lrs[i]`` is the
    learning rate of step ``i`` (a schedule). Returns (params after every step, m, v)."""
    beta1, beta2 = betas
    p = np.array(param0, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    trajectory = []
    for iterations, (g, has, lr) in enumerate(zip(grads, has_grad, lrs, strict=True)):
        if has:
            k = iterations + 1
            g = np.asarray(g, dtype=np.float64)
            b1 = 1.0 - 1.0 / math.log(k + 2) if logarithmic_schedule else beta1
            m = b1 * m + (1.0 - b1) * g
            v = beta2 * v + (1.0 - beta2) * np.sign(g * g - v) * g * g
            p = p * (1.0 - lr * weight_decay)
            p = p - lr * np.abs(g) * np.sign(m) / (np.sqrt(v / (1.0 - beta2**k)) + eps)
        trajectory.append(p.copy())
    return np.stack(trajectory), m, v


def subprocess_env(backend: str = "tensorflow", plugin: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    paths = [str(REPO / "tests_keras")]
    if plugin:
        paths.insert(0, os.environ[PLUGIN_DIR_ENV])
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_python(script: str, *args: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``script`` in a fresh interpreter from the repo root; fail with its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"subprocess failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result.stdout


def run_keras_optimizer(optimizer, param0s, grads, has_grad, dtype="float32"):
    """Apply ``grads[i][step]`` to variable ``i`` on the steps where ``has_grad[i][step]``.

    Returns (trajectories: one (steps x shape) array per variable, exp_avgs, exp_avg_sqs).
    """
    import keras

    variables = [keras.Variable(np.asarray(p, dtype=dtype)) for p in param0s]
    # Built on every variable up front: the first step may not have them all.
    optimizer.build(variables)
    trajectories = [[] for _ in variables]
    for step in range(len(grads[0])):
        optimizer.apply_gradients(
            [
                (np.asarray(grads[i][step], dtype=dtype), variable)
                for i, variable in enumerate(variables)
                if has_grad[i][step]
            ]
        )
        for i, variable in enumerate(variables):
            trajectories[i].append(keras.ops.convert_to_numpy(variable))
    indices = [optimizer._get_variable_index(v) for v in variables]
    exp_avgs = [keras.ops.convert_to_numpy(optimizer._exp_avgs[i]) for i in indices]
    exp_avg_sqs = [keras.ops.convert_to_numpy(optimizer._exp_avg_sqs[i]) for i in indices]
    return [np.stack(t) for t in trajectories], exp_avgs, exp_avg_sqs
