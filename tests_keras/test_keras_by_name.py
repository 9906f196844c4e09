"""Every Keras-capable registry optimizer, the SignSGD test plugin included, by name in Keras."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from ano_optimizer.integrations.keras import KerasRegistrationWarning, register
from keras_helpers import plugin_fixture

import ano_optimizer.keras
from ano_optimizer.registry import (
    OptimizerSpec,
    get_optimizer_class,
    list_optimizers,
    register_optimizer,
)

KERAS_NAMES = list_optimizers(framework="keras")


def test_the_test_plugin_is_among_the_keras_optimizers():
    assert plugin_fixture.PLUGIN_NAME in KERAS_NAMES
    assert {"ano", "anolog"} <= set(KERAS_NAMES)


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_get_by_name_string_and_dict(name):
    cls = get_optimizer_class(name, "keras")
    for get in (keras.optimizers.get, tf.keras.optimizers.get):
        optimizer = get(name)
        assert type(optimizer) is cls
    optimizer = keras.optimizers.get({"class_name": name, "config": {"learning_rate": 0.25}})
    assert type(optimizer) is cls
    assert float(optimizer.learning_rate) == 0.25


@pytest.mark.parametrize("name", KERAS_NAMES)
def test_compile_by_name_and_fit(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = x @ rng.standard_normal((4, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is get_optimizer_class(name, "keras")
    before = model.get_weights()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations) == 4
    assert not np.allclose(model.get_weights()[0], before[0])


def test_plugin_by_name_follows_its_own_rule():
    """The plugin takes momentum and no betas: it must get its own arguments, not Ano's."""
    optimizer = keras.optimizers.get(
        {
            "class_name": plugin_fixture.PLUGIN_NAME,
            "config": {"learning_rate": 0.1, "momentum": 0.5},
        }
    )
    param0 = np.array([0.5, -1.0, 2.0])
    grads = np.random.default_rng(1).standard_normal((4, 3))
    variable = keras.Variable(param0.astype("float32"))
    trajectory = []
    for g in grads:
        optimizer.apply_gradients([(g.astype("float32"), variable)])
        trajectory.append(keras.ops.convert_to_numpy(variable))
    expected = plugin_fixture.signsgd_reference(param0, grads, lr=0.1, momentum=0.5)
    np.testing.assert_allclose(np.stack(trajectory), expected, rtol=0, atol=1e-6)


def test_spec_defaults_apply_by_name_in_keras_spelling():
    register_optimizer(
        OptimizerSpec(
            name="anokerastuned",
            description="Ano with tuned defaults (Keras by-name test)",
            torch_class=None,
            keras_class="ano_optimizer.keras:Ano",
            # torch spelling; foreach has no Keras counterpart and concerns torch only
            defaults={"lr": 0.25, "betas": (0.8, 0.9), "eps": 1e-6, "foreach": False},
        )
    )
    assert "anokerastuned" in register()
    optimizer = keras.optimizers.get("anokerastuned")
    assert type(optimizer) is ano_optimizer.keras.Ano
    config = optimizer.get_config()
    assert (config["beta_1"], config["beta_2"], config["epsilon"]) == (0.8, 0.9, 1e-6)
    assert float(optimizer.learning_rate) == 0.25
    # The caller's config wins over the spec's defaults.
    mine = keras.optimizers.get({"class_name": "anokerastuned", "config": {"learning_rate": 0.5}})
    assert float(mine.learning_rate) == 0.5 and mine.get_config()["beta_1"] == 0.8
    # Saved under the class's own name, so a file loads wherever ano_optimizer.keras is imported.
    assert keras.optimizers.serialize(optimizer)["registered_name"] == "ano_optimizer>Ano"


def test_a_keras_class_that_cannot_be_imported_is_skipped_with_a_warning():
    register_optimizer(
        OptimizerSpec(
            name="anokerasbroken",
            description="keras_class points nowhere (Keras by-name test)",
            torch_class=None,
            keras_class="ano_optimizer_no_such_module:Nothing",
        )
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = register()
    assert "anokerasbroken" not in registered
    assert {"ano", "anolog"} <= set(registered)
    messages = [str(w.message) for w in caught if w.category is KerasRegistrationWarning]
    assert any("anokerasbroken" in m and "ano_optimizer_no_such_module" in m for m in messages)
    with pytest.raises((ValueError, TypeError)):
        keras.optimizers.get("anokerasbroken")


def test_a_name_that_keras_already_has_is_not_hijacked():
    register_optimizer(
        OptimizerSpec(
            name="lion",
            description="a registry optimizer named like a Keras built-in (Keras by-name test)",
            torch_class=None,
            keras_class="ano_optimizer.keras:Ano",
        )
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = register()
    assert "lion" not in registered
    assert any(
        "'lion'" in str(w.message) and "built-in" in str(w.message)
        for w in caught
        if w.category is KerasRegistrationWarning
    )
    assert type(keras.optimizers.get("lion")) is keras.optimizers.Lion
