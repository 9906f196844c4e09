"""``.keras`` save, then load in a fresh process that imports ``ano_optimizer.keras``: same
optimizer class, config and state, and training continues to the same weights as a run that was
never interrupted. For every Keras-capable registry optimizer (the test plugin included)."""

from __future__ import annotations

import json

import keras
import numpy as np
from keras_helpers import run_python, subprocess_env

from ano_optimizer.keras import AnoTF
from ano_optimizer.registry import list_optimizers

KERAS_NAMES = list_optimizers(framework="keras")
BATCHES_BEFORE, BATCHES_AFTER = 3, 3


def _optimizers() -> dict:
    made = {
        name: keras.optimizers.get(
            {"class_name": name, "config": {"learning_rate": 1e-2, "weight_decay": 0.01}}
        )
        for name in KERAS_NAMES
    }
    # The seed class, with a schedule and every option that the config must carry over.
    made["anotf-schedule"] = AnoTF(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.7),
        beta_1=0.9,
        logarithmic_schedule=True,
        weight_decay=0.05,
        exclude_1d_from_weight_decay=True,
        clipnorm=1.0,
    )
    return made


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8 * (BATCHES_BEFORE + BATCHES_AFTER), 5)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((5, 2))).astype("float32")
    return x, y


def _batches(start, stop):
    x, y = _data()
    return [(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]) for i in range(start, stop)]


def _model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(2),
        ]
    )


def _state(optimizer) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in optimizer.variables]


# Runs in the fresh process: import ano_optimizer.keras only, load, check nothing, report.
_RESUME = """
import json, sys
import numpy as np
import keras
import ano_optimizer.keras
sys.path.insert(0, "tests_keras")
import test_keras_saving as t

manifest = json.loads(open(sys.argv[1]).read())
out = {}
for label, path in manifest.items():
    model = keras.saving.load_model(path)
    optimizer = model.optimizer
    out[label] = {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "config": json.dumps(optimizer.get_config(), sort_keys=True),
    }
    np.savez(path + ".state.npz", *t._state(optimizer))
    for x, y in t._batches(t.BATCHES_BEFORE, t.BATCHES_BEFORE + t.BATCHES_AFTER):
        model.train_on_batch(x, y)
    np.savez(path + ".weights.npz", *model.get_weights())
open(sys.argv[2], "w").write(json.dumps(out))
"""


def test_keras_file_resumes_in_a_fresh_process(tmp_path):
    expected = {}
    manifest = {}
    for label, optimizer in _optimizers().items():
        model = _model()
        model.compile(optimizer=optimizer, loss="mse")
        for x, y in _batches(0, BATCHES_BEFORE):
            model.train_on_batch(x, y)
        path = str(tmp_path / f"{label}.keras")
        model.save(path)
        manifest[label] = path
        saved = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "config": json.dumps(optimizer.get_config(), sort_keys=True),
            "state": _state(optimizer),
        }
        for x, y in _batches(BATCHES_BEFORE, BATCHES_BEFORE + BATCHES_AFTER):
            model.train_on_batch(x, y)
        saved["weights"] = model.get_weights()
        expected[label] = saved

    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = tmp_path / "report.json"
    run_python(
        _RESUME,
        str(tmp_path / "manifest.json"),
        str(report),
        env=subprocess_env(plugin=True),
        timeout=240,
    )
    loaded = json.loads(report.read_text())

    assert set(loaded) == set(expected)
    for label, saved in expected.items():
        assert loaded[label]["class"] == saved["class"], label
        assert loaded[label]["config"] == saved["config"], label
        state = np.load(manifest[label] + ".state.npz")
        assert len(state.files) == len(saved["state"]), label
        assert int(saved["state"][0]) == BATCHES_BEFORE  # iterations
        for i, value in enumerate(saved["state"]):
            np.testing.assert_array_equal(state[f"arr_{i}"], value, err_msg=f"{label} state {i}")
        weights = np.load(manifest[label] + ".weights.npz")
        for i, value in enumerate(saved["weights"]):
            np.testing.assert_array_equal(weights[f"arr_{i}"], value, err_msg=f"{label} weight {i}")
