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
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == 0.25


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
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == 0.25
    # The caller's config wins over the spec's defaults.
    mine = keras.optimizers.get({"class_name": "anokerastuned", "config": {"learning_rate": 0.5}})
    assert float(keras.ops.convert_to_numpy(mine.learning_rate)) == 0.5
    assert mine.get_config()["beta_1"] == 0.8
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


def _register_keras_spec(name: str) -> list[str]:
    register_optimizer(
        OptimizerSpec(
            name=name,
            description=f"Ano under a name Keras has elsewhere ({name}, Keras by-name test)",
            torch_class=None,
            keras_class="ano_optimizer.keras:Ano",
        )
    )
    return register()


def test_a_registry_name_resolves_as_an_optimizer_only(tmp_path):
    """An optimizer plugin named "mse" once made every model compiled with loss="mse" fail to
    load: its name went into Keras's global custom objects, which every lookup consults. Now
    it is an optimizer name only: the loss, the activation and load_model are untouched."""
    assert {"mse", "relu"} <= set(_register_keras_spec("mse")) | set(_register_keras_spec("relu"))
    assert type(keras.optimizers.get("mse")) is ano_optimizer.keras.Ano
    assert keras.activations.get("relu") is keras.activations.relu
    assert "mse" not in keras.saving.get_custom_objects()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="relu")])
    model.compile(optimizer="anolog", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is ano_optimizer.keras.Anolog
    expected = float(np.mean((model.predict(x, verbose=0) - y) ** 2))
    assert np.isclose(loaded.evaluate(x, y, verbose=0), expected, rtol=1e-5)


def test_without_keras_s_optimizer_table_no_global_name_shadows_another(monkeypatch):
    """Keras's table of optimizer names is private: where it is gone, names go into the global
    custom objects, but only names that Keras and the user do not already resolve."""
    from ano_optimizer.integrations import keras as adapter

    monkeypatch.setattr(adapter, "_optimizer_names", lambda: None)
    custom = keras.saving.get_custom_objects()
    kept = dict(custom)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registered = _register_keras_spec("mae")
        assert "mae" not in registered and "mae" not in custom
        assert any("'mae'" in str(w.message) and "a Keras loss" in str(w.message) for w in caught)
        assert "ano" in registered and custom["ano"].cls is ano_optimizer.keras.Ano
        assert type(keras.optimizers.get("ano")) is ano_optimizer.keras.Ano
    finally:
        custom.clear()
        custom.update(kept)


def test_an_undecorated_plugin_class_is_saved_under_a_qualified_name(tmp_path):
    """A plugin's Keras class that its author did not register gets a name qualified by its
    module, so a .keras file resolves it without a bare name that could collide."""
    module = tmp_path / "undecorated_keras_plugin.py"
    module.write_text("import keras\nclass Plain(keras.optimizers.SGD):\n    pass\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        register_optimizer(
            OptimizerSpec(
                name="plainsgd",
                description="an undecorated Keras class (Keras by-name test)",
                torch_class=None,
                keras_class="undecorated_keras_plugin:Plain",
            )
        )
        assert "plainsgd" in register()
        optimizer = keras.optimizers.get("plainsgd")
        name = keras.saving.get_registered_name(type(optimizer))
        assert name == "undecorated_keras_plugin>Plain"
        assert "Plain" not in keras.saving.get_custom_objects()
    finally:
        sys.path.remove(str(tmp_path))
