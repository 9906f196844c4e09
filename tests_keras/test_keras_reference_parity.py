"""The Keras Ano/Anolog against the float64 oracles: the shared reference trajectories and the
project's own NumPy transcription of the spec (``tests/reference.py``)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from keras_helpers import (
    REFERENCE_DIR,
    ano_reference,
    keras_step_reference,
    run_keras_optimizer,
)

from ano_optimizer.keras import Ano, Anolog

REFERENCE_JSON = REFERENCE_DIR / "ano_trajectories.json"


def _rtol(hyper: dict) -> float:
    # Keras's TensorFlow backend applies weight decay with tf.cast(weight_decay, dtype), which
    # rounds a Python float through float32 first: float64 runs with decay agree to ~1e-10.
    return 2e-9 if hyper["weight_decay"] else 1e-11


REFERENCE_NPZ = REFERENCE_DIR / "ano_trajectories.npz"


@pytest.fixture
def float64():
    """Run Keras in float64 (variables and the learning-rate variable), so the comparison with
    the float64 oracles is tight enough to see any deviation from the formula."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield "float64"
    keras.config.set_floatx(previous)


def _keras_optimizer(hyper: dict):
    return Ano(
        learning_rate=hyper["lr"],
        beta_1=hyper["betas"][0],
        beta_2=hyper["betas"][1],
        epsilon=hyper["eps"],
        weight_decay=hyper["weight_decay"],
        logarithmic_schedule=hyper["logarithmic_schedule"],
    )


def _reference_cases():
    return [
        pytest.param(case, id=case["name"])
        for case in json.loads(REFERENCE_JSON.read_text())["cases"]
    ]


@pytest.mark.parametrize("case", _reference_cases())
def test_shared_reference_trajectories(case, float64):
    data = np.load(REFERENCE_NPZ)
    keys = [f"{case['name']}/{i}" for i in range(len(case["shapes"]))]
    param0s = [data[f"{key}/param0"] for key in keys]
    grads = [data[f"{key}/grads"] for key in keys]
    has_grad = [data[f"{key}/has_grad"].astype(bool) for key in keys]

    trajectories, exp_avgs, exp_avg_sqs = run_keras_optimizer(
        _keras_optimizer(case), param0s, grads, has_grad, dtype=float64
    )

    hyper = {k: case[k] for k in ("betas", "eps", "weight_decay", "logarithmic_schedule")}
    for i, key in enumerate(keys):
        if has_grad[i].all():
            expected = data[f"{key}/paper/params"]
            expected_m = data[f"{key}/paper/exp_avg"]
            expected_v = data[f"{key}/paper/exp_avg_sq"]
        else:
            # Keras counts steps once per optimizer (iterations + 1), torch per tensor: a tensor
            # that misses gradients follows the shared-counter form of the same rule.
            lrs = [case["lr"]] * case["steps"]
            expected, expected_m, expected_v = keras_step_reference(
                param0s[i], grads[i], has_grad[i], lrs=lrs, **hyper
            )
            assert not np.allclose(expected, data[f"{key}/paper/params"], rtol=1e-9, atol=0)
        rtol = _rtol(case)
        np.testing.assert_allclose(trajectories[i], expected, rtol=rtol, atol=1e-13)
        np.testing.assert_allclose(exp_avgs[i], expected_m, rtol=rtol, atol=1e-15)
        np.testing.assert_allclose(exp_avg_sqs[i], expected_v, rtol=rtol, atol=1e-20)


def _generated(shapes, steps, seed, scale=1.0, zero_fraction=0.0):
    rng = np.random.default_rng(seed)
    param0s = [rng.standard_normal(shape) for shape in shapes]
    grads = []
    for shape in shapes:
        g = rng.standard_normal((steps, *shape)) * scale
        g[rng.random(g.shape) < zero_fraction] = 0.0
        grads.append(g)
    has_grad = [np.ones(steps, dtype=bool) for _ in shapes]
    return param0s, grads, has_grad


OWN_CASES = {
    "ano": dict(
        lr=1e-3, betas=(0.92, 0.99), eps=1e-8, weight_decay=0.0, logarithmic_schedule=False
    ),
    "ano-wd": dict(
        lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, logarithmic_schedule=False
    ),
    "ano-beta1-zero": dict(
        lr=1e-2, betas=(0.0, 0.5), eps=1e-6, weight_decay=0.0, logarithmic_schedule=False
    ),
    "anolog": dict(
        lr=1e-3, betas=(0.92, 0.99), eps=1e-8, weight_decay=0.0, logarithmic_schedule=True
    ),
    "anolog-wd": dict(
        lr=2e-3, betas=(0.95, 0.995), eps=1e-8, weight_decay=0.05, logarithmic_schedule=True
    ),
}


@pytest.mark.parametrize("name", OWN_CASES)
def test_numpy_oracle_float64(name, float64):
    hyper = OWN_CASES[name]
    param0s, grads, has_grad = _generated([(5, 4), (4,)], steps=12, seed=7, zero_fraction=0.2)
    trajectories, exp_avgs, exp_avg_sqs = run_keras_optimizer(
        _keras_optimizer(hyper), param0s, grads, has_grad, dtype=float64
    )
    for i in range(len(param0s)):
        expected, m, v, k = ano_reference(param0s[i], grads[i], has_grad[i], **hyper)
        assert k == 12
        rtol = _rtol(hyper)
        np.testing.assert_allclose(trajectories[i], expected, rtol=rtol, atol=1e-13)
        np.testing.assert_allclose(exp_avgs[i], m, rtol=rtol, atol=1e-15)
        np.testing.assert_allclose(exp_avg_sqs[i], v, rtol=rtol, atol=1e-20)


@pytest.mark.parametrize("name", ["ano", "anolog-wd"])
def test_numpy_oracle_float32(name):
    """The ordinary float32 run follows the oracle to float32 precision."""
    hyper = OWN_CASES[name]
    param0s, grads, has_grad = _generated([(6, 3)], steps=10, seed=3)
    trajectories, _, _ = run_keras_optimizer(_keras_optimizer(hyper), param0s, grads, has_grad)
    expected, _, _, _ = ano_reference(param0s[0], grads[0], has_grad[0], **hyper)
    assert trajectories[0].dtype == np.float32
    np.testing.assert_allclose(trajectories[0], expected, rtol=0, atol=2e-6)


def test_tiny_gradients_put_eps_outside_sqrt(float64):
    """With |g| ~ 1e-5 the paper's sqrt(v_hat) + eps and 1.0.0's sqrt(v_hat + eps) differ ~10x."""
    hyper = OWN_CASES["ano"]
    param0s, grads, has_grad = _generated([(8,)], steps=6, seed=11, scale=1e-5)
    trajectories, _, _ = run_keras_optimizer(
        _keras_optimizer(hyper), param0s, grads, has_grad, dtype=float64
    )
    expected, _, _, _ = ano_reference(param0s[0], grads[0], has_grad[0], **hyper)
    np.testing.assert_allclose(trajectories[0], expected, rtol=1e-11, atol=1e-15)
    # Step 1: v_hat = g^2, so the step is lr * |g| / (|g| + eps); 1.0.0's
    # lr * |g| / sqrt(g^2 + eps) would be about 10x smaller at this gradient size.
    g0 = np.abs(grads[0][0])
    first_step = np.abs(trajectories[0][0] - param0s[0])
    np.testing.assert_allclose(first_step, hyper["lr"] * g0 / (g0 + hyper["eps"]), rtol=1e-12)
    assert np.all(first_step > 3 * hyper["lr"] * g0 / np.sqrt(g0**2 + hyper["eps"]))


def test_missing_gradients_use_the_shared_step_counter(float64):
    """A variable without a gradient is skipped (no update, no decay); the step count keeps
    running, since Keras has one ``iterations`` for all variables."""
    hyper = dict(OWN_CASES["anolog-wd"])
    param0s, grads, _ = _generated([(3, 2), (2,)], steps=8, seed=5)
    has_grad = [np.ones(8, dtype=bool), np.array([1, 0, 0, 1, 1, 0, 1, 1], dtype=bool)]
    trajectories, _, _ = run_keras_optimizer(
        _keras_optimizer(hyper), param0s, grads, has_grad, dtype=float64
    )
    lr = hyper.pop("lr")
    for i in range(2):
        expected, _, _ = keras_step_reference(
            param0s[i], grads[i], has_grad[i], lrs=[lr] * 8, **hyper
        )
        np.testing.assert_allclose(trajectories[i], expected, rtol=_rtol(hyper), atol=1e-13)
    # Skipped steps leave the variable exactly as it was.
    np.testing.assert_array_equal(trajectories[1][1], trajectories[1][0])
    np.testing.assert_array_equal(trajectories[1][2], trajectories[1][0])


def test_shared_counter_oracle_equals_spec_oracle_when_every_step_has_a_gradient():
    """Anchors the Keras-form oracle above to ``tests/reference.py``."""
    param0s, grads, has_grad = _generated([(4, 3)], steps=9, seed=2, zero_fraction=0.1)
    hyper = dict(OWN_CASES["anolog-wd"])
    lr = hyper.pop("lr")
    ours, m, v = keras_step_reference(param0s[0], grads[0], has_grad[0], lrs=[lr] * 9, **hyper)
    spec, spec_m, spec_v, _ = ano_reference(param0s[0], grads[0], has_grad[0], lr=lr, **hyper)
    np.testing.assert_allclose(ours, spec, rtol=1e-14, atol=0)
    np.testing.assert_allclose(m, spec_m, rtol=1e-14, atol=0)
    np.testing.assert_allclose(v, spec_v, rtol=1e-14, atol=0)


def test_sign_of_zero_is_zero(float64):
    """A coordinate whose gradient is exactly zero on every step never moves."""
    param0s = [np.array([1.0, -2.0, 3.0])]
    grads = [np.array([[0.5, 0.0, -1.0]] * 4)]
    trajectories, exp_avgs, _ = run_keras_optimizer(
        Ano(learning_rate=0.1), param0s, grads, [np.ones(4, dtype=bool)], dtype=float64
    )
    np.testing.assert_array_equal(trajectories[0][:, 1], -2.0)
    assert exp_avgs[0][1] == 0.0
    assert trajectories[0][-1, 0] < 1.0 < 3.0 < trajectories[0][-1, 2]


def test_anolog_class_equals_ano_with_logarithmic_schedule(float64):
    param0s, grads, has_grad = _generated([(3, 3)], steps=6, seed=9)
    by_flag, _, _ = run_keras_optimizer(
        Ano(learning_rate=1e-2, logarithmic_schedule=True), param0s, grads, has_grad, float64
    )
    by_class, _, _ = run_keras_optimizer(
        Anolog(learning_rate=1e-2), param0s, grads, has_grad, float64
    )
    np.testing.assert_array_equal(by_class[0], by_flag[0])
    plain, _, _ = run_keras_optimizer(Ano(learning_rate=1e-2), param0s, grads, has_grad, float64)
    assert not np.allclose(plain[0], by_flag[0])
