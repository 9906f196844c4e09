"""Arguments, configuration, weight decay, schedules and Keras base-optimizer options."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_helpers import ano_reference, keras_step_reference, run_keras_optimizer

from ano_optimizer.keras import Ano, Anolog
from ano_optimizer.tensorflow import AnoTF

HYPER = dict(betas=(0.92, 0.99), eps=1e-8, weight_decay=0.0, logarithmic_schedule=False)


def _grads(shape, steps, seed=0):
    return np.random.default_rng(seed).standard_normal((steps, *shape))


# ---- configuration -------------------------------------------------------------------------

EVERY_ARGUMENT = dict(
    learning_rate=3e-3,
    beta_1=0.8,
    beta_2=0.95,
    weight_decay=0.02,
    epsilon=1e-6,
    exclude_1d_from_weight_decay=True,
    clipnorm=0.5,
    use_ema=True,
    ema_momentum=0.9,
    ema_overwrite_frequency=3,
    loss_scale_factor=4.0,
    gradient_accumulation_steps=2,
    name="my_ano",
)


@pytest.mark.parametrize(
    "cls, arguments",
    [
        (Ano, {**EVERY_ARGUMENT, "logarithmic_schedule": True}),
        (Anolog, EVERY_ARGUMENT),
        (AnoTF, {**EVERY_ARGUMENT, "logarithmic_schedule": True}),
        (AnoTF, {"global_clipnorm": 1.0}),
        (Ano, {"clipvalue": 0.1, "weight_decay": None}),
    ],
    ids=["ano", "anolog", "anotf", "anotf-global-clipnorm", "ano-clipvalue"],
)
def test_config_round_trips_every_argument(cls, arguments):
    optimizer = cls(**arguments)
    config = optimizer.get_config()
    for key, value in arguments.items():
        expected = pytest.approx(value, rel=1e-7) if isinstance(value, float) else value
        assert config[key] == expected, key
    again = cls.from_config(config)
    assert type(again) is cls
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is cls
    assert restored.get_config() == config


def test_anolog_config_has_no_logarithmic_schedule_to_contradict():
    config = Anolog().get_config()
    assert "logarithmic_schedule" not in config
    assert Anolog.from_config(config).logarithmic_schedule is True
    with pytest.raises(TypeError, match="logarithmic"):
        Anolog(logarithmic_schedule=False)


def test_default_names_are_not_swapped():
    # Keras numbers automatic names (ano, ano_1, ...) within a process.
    assert re.fullmatch(r"ano(_\d+)?", Ano().name)
    assert re.fullmatch(r"anolog(_\d+)?", Anolog().name)
    assert Ano().get_config()["logarithmic_schedule"] is False


def test_learning_rate_schedule_round_trips():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=3, decay_rate=0.5)
    optimizer = Ano(learning_rate=schedule)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert restored.get_config() == optimizer.get_config()


def test_anotf_keeps_the_seed_signature():
    parameters = list(inspect.signature(AnoTF).parameters.values())
    assert [(p.name, p.default) for p in parameters[:-1]] == [
        ("learning_rate", 1e-4),
        ("beta_1", 0.92),
        ("beta_2", 0.99),
        ("weight_decay", 0.0),
        ("epsilon", 1e-8),
        ("logarithmic_schedule", False),
        ("name", None),
    ]
    assert parameters[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert isinstance(AnoTF(), Ano)


@pytest.mark.parametrize("cls", [Ano, Anolog, AnoTF])
def test_unknown_keyword_is_an_error(cls):
    with pytest.raises(TypeError, match="lerning_rate"):
        cls(lerning_rate=1e-3)


def test_anotf_unknown_keyword_lists_what_is_accepted():
    with pytest.raises(TypeError, match="gradient_accumulation_steps") as error:
        AnoTF(amsgrad=True)
    assert "'amsgrad'" in str(error.value)


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        ({"learning_rate": -1e-3}, "-0.001"),
        ({"learning_rate": float("nan")}, "nan"),
        ({"learning_rate": "fast"}, "'fast'"),
        ({"beta_1": 1.0}, "beta1=1.0"),
        ({"beta_1": -0.1}, "beta1=-0.1"),
        ({"beta_2": 0.3}, "beta2=0.3"),
        ({"beta_2": 1.0}, "beta2=1.0"),
        ({"epsilon": 0.0}, "eps=0.0"),
        ({"weight_decay": -0.5}, "weight_decay=-0.5"),
        ({"logarithmic_schedule": "yes"}, "'yes'"),
        ({"exclude_1d_from_weight_decay": 1}, "exclude_1d_from_weight_decay"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1"),
    ],
)
@pytest.mark.parametrize("cls", [Ano, AnoTF])
def test_invalid_hyper_parameters_raise_value_error_naming_the_value(cls, arguments, fragment):
    with pytest.raises(ValueError) as error:
        cls(**arguments)
    assert fragment in str(error.value)


def test_integer_learning_rate_is_accepted_as_float():
    assert Ano(learning_rate=1).get_config()["learning_rate"] == 1.0


# ---- weight decay --------------------------------------------------------------------------


def test_weight_decay_is_applied_once_and_scaled_by_the_learning_rate():
    """With zero gradients Ano itself does not move (sign(0) = 0): what remains is the decay,
    p * (1 - lr * wd) per step, applied exactly once (1.0.0 applied it twice)."""
    lr, wd, steps = 0.1, 0.5, 4
    param0 = np.array([[1.0, -2.0], [0.5, 4.0]])
    trajectories, _, _ = run_keras_optimizer(
        Ano(learning_rate=lr, weight_decay=wd),
        [param0],
        [np.zeros((steps, 2, 2))],
        [np.ones(steps, dtype=bool)],
    )
    expected = np.stack([param0 * (1 - lr * wd) ** k for k in range(1, steps + 1)])
    np.testing.assert_allclose(trajectories[0], expected, rtol=1e-6)


def _decay_model():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.LayerNormalization()]
    )
    return model, {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}


def _step_with_zero_gradients(optimizer, model, steps=3):
    for _ in range(steps):
        optimizer.apply_gradients(
            [(np.zeros(v.shape, "float32"), v) for v in model.trainable_variables]
        )
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}


@pytest.mark.parametrize("exclude", [True, False])
def test_exclude_1d_from_weight_decay(exclude):
    model, before = _decay_model()
    for v in model.trainable_variables:  # non-zero biases and offsets, so decay would show
        v.assign(np.ones(v.shape, "float32"))
    before = {path: np.ones_like(value) for path, value in before.items()}
    optimizer = Ano(learning_rate=0.1, weight_decay=0.5, exclude_1d_from_weight_decay=exclude)
    after = _step_with_zero_gradients(optimizer, model)
    for v in model.trainable_variables:
        factor = 1.0 if (exclude and len(v.shape) <= 1) else 0.95**3
        np.testing.assert_allclose(
            after[v.path], before[v.path] * factor, rtol=1e-6, err_msg=v.path
        )


def test_keras_exclude_from_weight_decay_still_works():
    model, _ = _decay_model()
    for v in model.trainable_variables:
        v.assign(np.ones(v.shape, "float32"))
    optimizer = Ano(learning_rate=0.1, weight_decay=0.5, exclude_1d_from_weight_decay=True)
    optimizer.exclude_from_weight_decay(var_names=["kernel"])
    after = _step_with_zero_gradients(optimizer, model)
    # kernel: excluded by name; bias, gamma, beta: excluded as 1-D. Nothing decays.
    for path, value in after.items():
        np.testing.assert_array_equal(value, 1.0, err_msg=path)


# ---- learning rates ------------------------------------------------------------------------


def test_learning_rate_schedule_is_followed_step_by_step():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=2, decay_rate=0.5)
    steps = 6
    grads = _grads((5,), steps, seed=1)
    param0 = np.linspace(-1, 1, 5)
    has = np.ones(steps, dtype=bool)
    trajectories, _, _ = run_keras_optimizer(
        Ano(learning_rate=schedule, weight_decay=0.1), [param0], [grads], [has]
    )
    # Keras evaluates the schedule at the current iterations (0, 1, 2, ...) on each step.
    lrs = [1e-2 * 0.5 ** (i / 2) for i in range(steps)]
    expected, _, _ = keras_step_reference(
        param0, grads, has, lrs=lrs, **{**HYPER, "weight_decay": 0.1}
    )
    np.testing.assert_allclose(trajectories[0], expected, rtol=0, atol=2e-6)
    constant, _, _ = keras_step_reference(
        param0, grads, has, lrs=[1e-2] * steps, **{**HYPER, "weight_decay": 0.1}
    )
    assert not np.allclose(trajectories[0], constant, rtol=0, atol=1e-4)


def test_callable_learning_rate_equals_the_float():
    grads = _grads((4,), 5, seed=2)
    has = np.ones(5, dtype=bool)
    by_float, _, _ = run_keras_optimizer(Ano(learning_rate=3e-3), [np.ones(4)], [grads], [has])
    by_callable, _, _ = run_keras_optimizer(
        Ano(learning_rate=lambda: 3e-3), [np.ones(4)], [grads], [has]
    )
    np.testing.assert_array_equal(by_callable[0], by_float[0])


def test_learning_rate_can_be_set_between_steps():
    optimizer = Ano(learning_rate=1e-3)
    optimizer.learning_rate = 5e-2
    grads = _grads((3,), 1, seed=4)
    trajectories, _, _ = run_keras_optimizer(optimizer, [np.zeros(3)], [grads], [np.ones(1, bool)])
    expected, _, _, _ = ano_reference(np.zeros(3), grads, [True], lr=5e-2, **HYPER)
    np.testing.assert_allclose(trajectories[0], expected, rtol=0, atol=1e-7)


# ---- Keras base-optimizer options ----------------------------------------------------------


def test_gradient_accumulation_steps_take_one_ano_step_per_window():
    """4 calls with accumulation 2 = 2 Ano steps on the window means; k counts Ano steps."""
    grads = _grads((6,), 4, seed=5)
    param0 = np.linspace(0, 1, 6)
    trajectories, _, _ = run_keras_optimizer(
        Anolog(learning_rate=1e-2, gradient_accumulation_steps=2),
        [param0],
        [grads],
        [np.ones(4, bool)],
    )
    means = np.stack([(grads[0] + grads[1]) / 2, (grads[2] + grads[3]) / 2])
    expected, _, _, _ = ano_reference(
        param0, means, [True, True], lr=1e-2, **{**HYPER, "logarithmic_schedule": True}
    )
    np.testing.assert_array_equal(trajectories[0][0], param0.astype("float32"))
    np.testing.assert_allclose(trajectories[0][[1, 3]], expected, rtol=0, atol=2e-6)


def test_clipvalue_clips_before_the_update():
    grads = _grads((8,), 4, seed=6) * 3
    has = np.ones(4, bool)
    trajectories, _, _ = run_keras_optimizer(
        Ano(learning_rate=1e-2, clipvalue=0.5), [np.zeros(8)], [grads], [has]
    )
    expected, _, _, _ = ano_reference(np.zeros(8), np.clip(grads, -0.5, 0.5), has, lr=1e-2, **HYPER)
    np.testing.assert_allclose(trajectories[0], expected, rtol=0, atol=2e-6)


def test_indexed_slices_gradient_equals_its_dense_form():
    """Embedding lookups give tf.IndexedSlices gradients; Ano treats them as the dense
    gradient (the absent rows have gradient 0: their m and v decay, they do not move)."""
    table = np.random.default_rng(7).standard_normal((5, 3)).astype("float32")
    results = []
    for sparse in (True, False):
        variable = keras.Variable(table)
        optimizer = Ano(learning_rate=1e-2)
        for rows in ([0, 2], [2, 3], [0, 4]):
            with tf.GradientTape() as tape:
                looked_up = tf.gather(variable.value, rows)
                loss = tf.reduce_sum(looked_up**3)
            (grad,) = tape.gradient(loss, [variable.value])
            assert isinstance(grad, tf.IndexedSlices)
            optimizer.apply_gradients([(grad if sparse else tf.convert_to_tensor(grad), variable)])
        results.append(keras.ops.convert_to_numpy(variable))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0][1], table[1])  # never looked up: never moves


# ---- the seed README's TensorFlow usage, as written there ---------------------------------


@pytest.mark.parametrize("logarithmic_schedule", [False, True])
def test_seed_readme_gradient_tape_usage(logarithmic_schedule):
    from ano_optimizer.tensorflow import AnoTF

    rng = np.random.default_rng(8)
    inputs = rng.standard_normal((16, 4)).astype("float32")
    targets = rng.standard_normal((16, 2)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    loss_fn = keras.losses.MeanSquaredError()
    initial = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    if logarithmic_schedule:
        optimizer = AnoTF(learning_rate=1e-4, logarithmic_schedule=True)
    else:
        optimizer = AnoTF(learning_rate=1e-4)

    seen = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            predictions = model(inputs)
            loss = loss_fn(targets, predictions)

        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))  # noqa: B905 (as in the seed)
        seen.append([g.numpy() for g in gradients])

    assert int(optimizer.iterations) == 3
    hyper = {**HYPER, "logarithmic_schedule": logarithmic_schedule}
    for i, variable in enumerate(model.trainable_variables):
        grads = np.stack([step[i] for step in seen])
        expected, _, _, _ = ano_reference(initial[i], grads, [True] * 3, lr=1e-4, **hyper)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(variable), expected[-1], rtol=0, atol=1e-6
        )
        assert not np.allclose(keras.ops.convert_to_numpy(variable), initial[i], rtol=0, atol=1e-5)


# ---- compilation and mixed precision -------------------------------------------------------


def _fit_weights(**compile_arguments):
    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((48, 4)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((4, 2))).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=Anolog(learning_rate=1e-2, weight_decay=0.1), loss="mse", **compile_arguments
    )
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return model, history.history["loss"]


def test_xla_compiled_training_equals_eager_training():
    eager, _ = _fit_weights(run_eagerly=True)
    compiled, _ = _fit_weights(jit_compile=True)
    for a, b in zip(eager.get_weights(), compiled.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert int(compiled.optimizer.iterations) == 9


def test_mixed_precision_wraps_ano_in_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, losses = _fit_weights()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert type(model.optimizer.inner_optimizer) is Anolog
    assert int(model.optimizer.inner_optimizer.iterations) == 9
    assert losses[-1] < losses[0]


def test_a_keras_older_than_3_10_is_refused_on_import_naming_the_version_needed():
    """Keras 3.0-3.9 lack Optimizer.add_optimizer_variables, which build() uses: the import
    fails at once with the version needed, not at the first step."""
    code = (
        "import keras\n"
        "from keras.src.optimizers.base_optimizer import BaseOptimizer\n"
        "del BaseOptimizer.add_optimizer_variables\n"
        "import ano_optimizer.keras\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "ano_optimizer.keras needs Keras 3.10 or later" in result.stderr
    assert f"this is Keras {keras.__version__}" in result.stderr
