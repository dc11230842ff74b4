"""Every private Keras internal accum_keras uses still exists, with the shape it relies on.

One test per internal of `accum_keras._keras_internals`, named after it, so
that a Keras release that renames or reshapes one fails here first, with the
internal's name in the test id, instead of inside a user's ``fit()``.
Backend-specific internals are checked on their backend (this file is part of
every backend's suite).
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import inspect
import os

import keras
import numpy as np
import pytest

from accum_keras import _keras_internals as internals

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiled_two_output_model():
    inputs = keras.Input((3,))
    a = keras.layers.Dense(2, name="a")(inputs)
    b = keras.layers.Dense(1, name="b")(inputs)
    model = keras.Model(inputs, {"a": a, "b": b})
    model.compile(
        optimizer="sgd",
        loss={"a": "mse", "b": "mae"},
        loss_weights={"a": 1.0, "b": 0.5},
    )
    x = np.ones((4, 3), "float32")
    y = {"a": np.zeros((4, 2), "float32"), "b": np.zeros((4, 1), "float32")}
    return model, x, y


def test_min_keras_version_matches_setup_cfg():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    requirements = config["options"]["install_requires"].split()
    keras_requirement = next(r for r in requirements if r.startswith("keras"))
    assert f">={internals.MIN_KERAS_VERSION}" in keras_requirement, keras_requirement
    internals.check_keras_version()  # the installed Keras is supported


def test_check_keras_version_names_both_versions():
    with pytest.raises(ImportError, match=r"keras>=3\.\d+\.\d+.*installed keras is 3\.9\.2"):
        internals.check_keras_version("3.9.2")
    internals.check_keras_version(internals.MIN_KERAS_VERSION)
    internals.check_keras_version("4.0.0")


def test_KerasSaveable_and_obj_type():
    from keras.src.saving import saving_lib

    assert internals.KerasSaveable is keras.src.saving.keras_saveable.KerasSaveable
    assert isinstance(keras.layers.Dense(1), internals.KerasSaveable)
    # The type our state objects report must be one the saving walk accepts.
    skipset = saving_lib.get_attr_skipset(internals.SAVEABLE_OBJ_TYPE)
    assert "save_own_variables" not in skipset or internals.SAVEABLE_OBJ_TYPE == "Layer"
    walked = dict(saving_lib._walk_saveable(_Probe()))
    assert "payload" in walked


class _Probe(internals.KerasSaveable):
    def __init__(self):
        self.payload = 1

    def _obj_type(self):
        return internals.SAVEABLE_OBJ_TYPE


def test_compile_loss_and_compiled_loss_entries():
    model, x, y = compiled_two_output_model()
    internals.symbolic_build(model, (x, y))
    compiled = internals.compile_loss(model)
    assert compiled is not None and compiled.built
    entries = internals.compiled_loss_entries(compiled)
    assert isinstance(entries, list) and len(entries) == 2
    for entry in entries:
        assert isinstance(entry.loss, keras.losses.Loss)
        assert hasattr(entry, "loss_weights")
    assert sorted(float(e.loss_weights) for e in entries) == [0.5, 1.0]
    y_pred = model(x)
    before = float(keras.ops.convert_to_numpy(compiled(y, y_pred)))

    class Constant(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return keras.ops.ones_like(y_pred[..., 0]) * 100.0

    # Replacing an entry changes what the compiled loss computes.
    entries[0] = entries[0]._replace(loss=Constant())
    after = float(keras.ops.convert_to_numpy(compiled(y, y_pred)))
    assert after != before and after >= 50.0


def test_reduce_weighted_values():
    params = list(inspect.signature(internals.reduce_weighted_values).parameters)
    assert params[:5] == ["values", "sample_weight", "mask", "reduction", "dtype"]
    values = np.array([1.0, 2.0, 3.0, 6.0], "float32")
    weights = np.array([1.0, 1.0, 0.0, 0.0], "float32")
    reduced = internals.reduce_weighted_values(
        values, sample_weight=weights, reduction="sum_over_batch_size", dtype="float32"
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reduced), (1.0 + 2.0) / 4.0)


def test_apply_mask_and_squeeze_or_expand_to_same_rank():
    params = list(inspect.signature(internals.apply_mask).parameters)
    assert params == ["sample_weight", "mask", "dtype", "reduction"]
    mask = np.array([1.0, 1.0, 0.0, 0.0], "float32")
    weights = internals.apply_mask(None, mask, "float32", "mean_with_sample_weight")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weights), mask)
    values = keras.ops.ones((4, 1))
    _, expanded = internals.squeeze_or_expand_to_same_rank(values, keras.ops.ones((4,)))
    assert tuple(expanded.shape) == (4, 1)


def test_unscale_loss_for_distribution():
    assert list(inspect.signature(internals.unscale_loss_for_distribution).parameters) == ["value"]
    value = keras.ops.convert_to_tensor(3.0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(internals.unscale_loss_for_distribution(value)), 3.0
    )


def test_get_keras_mask():
    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(np.array([[1, 0, 2]]))
    mask = internals.get_keras_mask(embedded)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), [[True, False, True]])
    assert internals.get_keras_mask(keras.ops.ones((2,))) is None


def test_call_has_training_arg():
    class WithTraining(keras.layers.Layer):
        def call(self, x, training=None):
            return x

    class Without(keras.layers.Layer):
        def call(self, x):
            return x

    assert internals.call_has_training_arg(WithTraining()) is True
    assert internals.call_has_training_arg(Without()) is False


def test_compute_loss_and_loss_tracker():
    params = inspect.signature(keras.Model._compute_loss).parameters
    assert {"x", "y", "y_pred", "sample_weight", "training"} <= set(params)
    model, x, y = compiled_two_output_model()
    internals.symbolic_build(model, (x, y))
    y_pred = model(x)
    loss = internals.compute_loss(model, x, y, y_pred, None, training=True)
    expected = np.mean(keras.ops.convert_to_numpy(y_pred["a"]) ** 2) + 0.5 * np.mean(
        np.abs(keras.ops.convert_to_numpy(y_pred["b"]))
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), expected, rtol=1e-5)
    tracker = internals.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean) and tracker.name == "loss"


def test_sublayers():
    model, _, _ = compiled_two_output_model()
    names = {layer.name for layer in internals.sublayers(model)}
    assert {"a", "b"} <= names and model.name not in names


def test_symbolic_build():
    params = inspect.signature(keras.Model._symbolic_build).parameters
    assert "data_batch" in params
    model, x, y = compiled_two_output_model()
    internals.symbolic_build(model, (x, y))
    assert model.built and internals.compile_loss(model).built


def test_distribute_strategy_or_none():
    model, _, _ = compiled_two_output_model()
    strategy = internals.distribute_strategy_or_none(model)
    if BACKEND == "tensorflow":
        # Keras records the strategy the model was created under.
        assert hasattr(model, "_distribute_strategy")
    else:
        assert strategy is None


def test_learning_rate_of():
    optimizer = keras.optimizers.SGD(0.25)
    rate = internals.learning_rate_of(optimizer)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(rate)), 0.25)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert internals.learning_rate_of(keras.optimizers.Adam(schedule)) is schedule


def test_replace_learning_rate():
    optimizer = keras.optimizers.SGD(0.25)
    variable = internals.learning_rate_of(optimizer)
    internals.replace_learning_rate(optimizer, lambda: 0.5)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(optimizer.learning_rate)), 0.5)
    internals.replace_learning_rate(optimizer, variable)
    assert internals.learning_rate_of(optimizer) is variable


def test_compile_arguments():
    model, _, _ = compiled_two_output_model()
    arguments = internals.compile_arguments(model)
    assert arguments["optimizer"] is model.optimizer
    assert arguments["loss"] == {"a": "mse", "b": "mae"}
    assert arguments["loss_weights"] == {"a": 1.0, "b": 0.5}
    assert internals.compile_arguments(keras.Sequential([keras.layers.Dense(1)])) is None


def test_sequential_layers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    layers = internals.sequential_layers(model)
    assert isinstance(layers[0], keras.layers.InputLayer) and layers[1:] == model.layers


def test_functional_class():
    inputs = keras.Input((2,))
    assert type(keras.Model(inputs, keras.layers.Dense(1)(inputs))) is internals.functional_class()


def test_batch_norm_moments_and_reduction_axes():
    layer = keras.layers.BatchNormalization()
    inputs = np.random.default_rng(0).normal(size=(8, 3, 3, 4)).astype("float32")
    layer.build(inputs.shape)
    assert list(internals.batch_norm_reduction_axes(layer)) == [0, 1, 2]
    params = list(inspect.signature(type(layer)._moments).parameters)
    assert params == ["self", "inputs", "mask"]
    mean, variance = internals.batch_norm_moments(layer, keras.ops.convert_to_tensor(inputs), None)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(mean), inputs.mean(axis=(0, 1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variance), inputs.var(axis=(0, 1, 2)), rtol=1e-4
    )


@pytest.mark.parametrize("name", sorted(internals.OVERRIDDEN_TRAINER_METHODS))
def test_overridden_trainer_methods(name):
    module_name, class_name, parameters, required = internals.OVERRIDDEN_TRAINER_METHODS[name]
    backend_module = {
        "keras.src.backend.tensorflow.trainer": "tensorflow",
        "keras.src.backend.jax.trainer": "jax",
    }.get(module_name)
    if backend_module and importlib.util.find_spec(backend_module) is None:
        pytest.skip(f"{backend_module} is not installed")
    cls = getattr(importlib.import_module(module_name), class_name)
    method = getattr(cls, name, None)
    if method is None and not required:
        pytest.skip(f"{class_name}.{name} does not exist in Keras {keras.__version__}")
    assert method is not None, f"{class_name}.{name} is gone in Keras {keras.__version__}"
    assert tuple(inspect.signature(method).parameters) == parameters


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow distribution internals")
def test_in_multi_worker_mode_and_strategy_supports_no_merge_call():
    import tensorflow as tf

    assert internals.in_multi_worker_mode(tf.distribute.get_strategy()) is False
    assert internals.in_multi_worker_mode(tf.distribute.MirroredStrategy(["CPU:0"])) is False
    assert internals.strategy_supports_no_merge_call() in (True, False)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX trainer internals")
def test_jax_state_and_jax_state_synced():
    model, x, y = compiled_two_output_model()
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((internals.jax_state(model), internals.jax_state_synced(model)))

    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[Probe()])
    state, _ = seen[0]
    assert isinstance(state, dict) and "optimizer_variables" in state
    assert internals.jax_state_synced(model) is True


@pytest.mark.skipif(BACKEND != "jax", reason="JAX trainer internals")
def test_update_metrics_variables():
    params = list(inspect.signature(type(keras.Model())._update_metrics_variables).parameters)
    assert params == [
        "self",
        "metrics_variables",
        "unscaled_loss",
        "x",
        "y",
        "y_pred",
        "sample_weight",
    ]


def test_losses_override():
    layer = keras.layers.Dense(1)
    extra = [keras.ops.convert_to_tensor(2.0)]
    internals.set_losses_override(layer, extra)
    assert layer.losses == extra
    internals.clear_losses_override(layer)
    assert layer.losses == []


@pytest.mark.skipif(BACKEND != "jax", reason="only the JAX backend swaps variable values")
def test_variable_value():
    variable = keras.Variable(np.ones((2,), "float32"))
    raw = internals.variable_value(variable)
    replacement = keras.ops.convert_to_tensor(np.full((2,), 3.0, "float32"))
    internals.set_variable_value(variable, replacement)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable.value), 3.0)
    internals.set_variable_value(variable, raw)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable.value), 1.0)


@pytest.mark.skipif(BACKEND == "torch", reason="only the TensorFlow and JAX train functions use it")
def test_make_function_and_jit_compile_off():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", jit_compile=False)
    assert "step_function" in inspect.signature(type(model)._make_function).parameters
    function = internals.make_function(model, lambda data: {})
    assert callable(function)
    assert model._jit_compile is False
    model._jit_compile = True
    with internals.jit_compile_off(model):
        assert model.jit_compile is False
    assert model._jit_compile is True


@pytest.mark.skipif(BACKEND != "jax", reason="JAX trainer internals")
def test_state_sharding_spec():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.optimizer.build(model.trainable_variables)
    specs = internals.state_sharding_spec(model)
    from keras.src.backend.jax.trainer import JAXTrainer

    if hasattr(JAXTrainer, "_get_state_sharding_spec"):
        assert len(specs) == 4
    else:  # Keras 3.10
        assert specs is None
