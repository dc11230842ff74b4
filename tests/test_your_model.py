"""Models you already have: `accumulate`, loaded files, and reloading any base class.

The reference is always the plain Keras model on the big batch.
"""

import os

import keras
import numpy as np
import pytest
from helpers import assert_same_training, max_relative_difference, regression_data

import accum_keras

K = 4
MICRO = 8
DOC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "your-model.md"
)


def _mobilenet(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3, dropout_rate=0.0
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # fine-tuning practice; see docs/your-model.md
    return model


def _images(samples=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((samples, 32, 32, 3), dtype="float32"), rng.integers(0, 3, samples)


def test_applications_network_is_exact_and_reloads(tmp_path):
    base = _mobilenet()
    plain = keras.models.clone_model(base)
    plain.set_weights(base.get_weights())
    model = accum_keras.accumulate(base, accumulation_steps=K)
    assert isinstance(model, accum_keras.Model)
    assert model.weights[0] is base.weights[0]
    for m in (model, plain):
        m.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss="sparse_categorical_crossentropy",
        )
    x, y = _images()
    model.fit(x, y, batch_size=MICRO, epochs=1, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=1, shuffle=False, verbose=0)
    assert_same_training(model, plain)

    path = str(tmp_path / "mobilenet.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is accum_keras.Model and reloaded.accumulation_steps == K
    for a, b in zip(reloaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def _functional():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(hidden))


def _sequential():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )


@pytest.mark.parametrize("build", [_functional, _sequential])
def test_accumulate_shares_weights_and_is_exact(build):
    keras.utils.set_random_seed(0)
    existing = build()
    plain = build()
    plain.set_weights(existing.get_weights())
    model = accum_keras.accumulate(existing, accumulation_steps=K)
    assert [id(v) for v in model.weights] == [id(v) for v in existing.weights]
    for m in (model, plain):
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = regression_data(samples=72)  # a short last window per epoch
    model.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(model, plain)
    # The model passed in holds the trained weights: they are the same variables.
    assert max_relative_difference(existing.get_weights(), plain.get_weights()) <= 2e-6


def test_a_loaded_file_continues_with_its_optimizer_state(tmp_path):
    keras.utils.set_random_seed(0)
    colleague = _sequential()
    colleague.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    x, y = regression_data(samples=64)
    colleague.fit(x, y, batch_size=MICRO * K, epochs=1, verbose=0)
    path = str(tmp_path / "colleague.keras")
    colleague.save(path)

    model = accum_keras.accumulate(keras.models.load_model(path), accumulation_steps=K)
    plain = keras.models.load_model(path)
    assert int(model.optimizer.iterations.numpy()) == 2
    model.fit(x, y, batch_size=MICRO, epochs=1, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=1, shuffle=False, verbose=0)
    assert_same_training(model, plain)


def test_accumulate_returns_accumulating_models_themselves():
    model = accum_keras.Model(*_graph(), accumulation_steps=2)
    assert accum_keras.accumulate(model, accumulation_steps=K) is model
    assert model.accumulation_steps == K


def _graph():
    inputs = keras.Input((5,))
    return inputs, keras.layers.Dense(1)(inputs)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)


def test_accumulate_refuses_subclassed_models_with_the_mixin_recipe():
    with pytest.raises(
        TypeError, match=r"class AccumSubclassed\(accum_keras.AccumulatingModel, Subclassed\)"
    ):
        accum_keras.accumulate(Subclassed(), accumulation_steps=K)
    with pytest.raises(ValueError, match="accumulation_steps"):
        accum_keras.accumulate(_functional(), accumulation_steps=0)
    with pytest.raises(ValueError, match="keras.Input"):
        accum_keras.accumulate(keras.Sequential([keras.layers.Dense(1)]), accumulation_steps=K)


# -- from_config lets every base class deserialize ---------------------------


@keras.saving.register_keras_serializable(package="accum_keras_tests")
class AccumSubclassed(accum_keras.AccumulatingModel, Subclassed):
    pass


@keras.saving.register_keras_serializable(package="accum_keras_tests")
class WithOwnFromConfig(accum_keras.AccumulatingModel, keras.Model):
    """Holds a layer object in its config, as KerasHub tasks hold their backbone."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x)

    def get_config(self):
        return {**super().get_config(), "inner": keras.layers.serialize(self.inner)}

    @classmethod
    def from_config(cls, config):
        config = {**config, "inner": keras.layers.deserialize(config["inner"])}
        return super().from_config(config)


@pytest.mark.parametrize(
    "make",
    [
        lambda: accum_keras.Model(*_graph(), accumulation_steps=K),
        lambda: accum_keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(1)], accumulation_steps=K
        ),
        lambda: AccumSubclassed(accumulation_steps=K),
        lambda: WithOwnFromConfig(keras.layers.Dense(1), accumulation_steps=K),
    ],
    ids=["functional", "sequential", "subclassed", "own_from_config"],
)
def test_reloads_keep_the_class_the_weights_and_the_steps(make, tmp_path):
    model = make()
    model(np.zeros((2, 5), "float32"))
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(samples=24)
    model.fit(x, y, batch_size=4, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded) is type(model)
    assert reloaded.accumulation_steps == K
    for a, b in zip(reloaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    clone = type(model).from_config(model.get_config())
    assert clone.accumulation_steps == K


# -- the documentation runs as pasted ----------------------------------------
