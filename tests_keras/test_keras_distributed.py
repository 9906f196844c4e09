"""``tf.distribute.MirroredStrategy`` over 2 logical CPU devices gives the single-device result.

Logical devices must be configured before TensorFlow initialises them, hence a fresh process.
"""

from __future__ import annotations

import json

from keras_helpers import run_python, subprocess_env

_SCRIPT = """
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
import keras
import numpy as np
from ano_optimizer.keras import Ano

rng = np.random.default_rng(0)
x = rng.standard_normal((64, 4)).astype("float32")
y = np.tanh(x @ rng.standard_normal((4, 1))).astype("float32")


def build():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.LayerNormalization(),
        keras.layers.Dense(1),
    ])
    optimizer = Ano(learning_rate=1e-2, weight_decay=0.05, exclude_1d_from_weight_decay=True,
                    logarithmic_schedule=True)
    return model, optimizer


def with_fit(strategy):
    with strategy.scope():
        model, optimizer = build()
        model.compile(optimizer=optimizer, loss="mse")
    initial = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return initial, model.get_weights(), [np.asarray(v) for v in optimizer.variables]


def with_custom_loop(strategy):
    with strategy.scope():
        model, optimizer = build()
        # Optimizer variables are created up front, not inside the traced step.
        optimizer.build(model.trainable_variables)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    )

    @tf.function
    def step(batch_x, batch_y):
        def replica_step(bx, by):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(bx) - by)) / 16.0
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica_step, args=(batch_x, batch_y))

    initial = model.get_weights()
    for _ in range(3):
        for batch_x, batch_y in dataset:
            step(batch_x, batch_y)
    return initial, model.get_weights(), [np.asarray(v) for v in optimizer.variables]


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
report = {"replicas": mirrored.num_replicas_in_sync}
for name, run in (("fit", with_fit), ("custom_loop", with_custom_loop)):
    initial, single_weights, single_state = run(tf.distribute.get_strategy())
    _, mirrored_weights, mirrored_state = run(mirrored)
    report[name] = {
        "weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(single_weights, mirrored_weights)),
        "state_diff": max(float(np.abs(a - b).max()) for a, b in zip(single_state, mirrored_state)),
        "moved": min(float(np.abs(a - b).max()) for a, b in zip(single_weights, initial)),
        "iterations": [int(single_state[0]), int(mirrored_state[0])],
    }
print("REPORT" + json.dumps(report))
"""


def test_mirrored_strategy_on_two_cpus_equals_one_device():
    output = run_python(_SCRIPT, env=subprocess_env(), timeout=240)
    report = json.loads(output.split("REPORT", 1)[1])
    assert report["replicas"] == 2
    for name in ("fit", "custom_loop"):
        result = report[name]
        assert result["iterations"] == [12, 12], report
        assert result["moved"] > 1e-3, report  # every variable trained, so the comparison bites
        assert result["weight_diff"] < 1e-5, report
        assert result["state_diff"] < 1e-5, report
