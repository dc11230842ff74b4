"""Options that compose: `accumulate()`, clones, the fit-time rate, loading, schedules.

Each test pits an option against another feature and checks the result against
an independent reference: plain Keras on the big batch (same data order, same
initial weights), or a hand computation.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import assert_same_training, regression_data

import accum_keras

BACKEND = keras.backend.backend()
K = 4
MICRO = 4


# -- accumulate() compiles its twin with the original objects -----------------


def script_loss(y_true, y_pred):
    """A loss defined in a user's script: not registered with Keras."""
    return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


def _closure_loss(scale):
    def loss(y_true, y_pred):
        return scale * keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)

    return loss


class ScriptMetric(keras.metrics.Metric):
    """An unregistered metric class: the largest absolute error seen."""

    def __init__(self, name="largest_error", **kwargs):
        super().__init__(name=name, **kwargs)
        self.largest = self.add_variable(shape=(), initializer="zeros", name="largest")

    def update_state(self, y_true, y_pred, sample_weight=None):
        error = keras.ops.max(keras.ops.abs(y_true - y_pred))
        self.largest.assign(keras.ops.maximum(self.largest, error))

    def result(self):
        return keras.ops.convert_to_tensor(self.largest)


def _two_heads():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(
        inputs, [keras.layers.Dense(1, name="a")(hidden), keras.layers.Dense(2, name="b")(hidden)]
    )


# Each case: the compile() arguments (built fresh per model) of a compiled
# model handed to `accumulate()`; together they cover every argument.
COMPILE_CASES = {
    "script_objects": lambda: {
        "loss": [script_loss, lambda t, p: keras.ops.mean((t - p) ** 2, axis=-1)],
        "loss_weights": [0.25, 2.0],
        "metrics": [[ScriptMetric()], ["mae"]],
        "weighted_metrics": [["mse"], [ScriptMetric(name="b_largest")]],
    },
    "closure_run_eagerly": lambda: {
        "loss": [_closure_loss(3.0), "mse"],
        "run_eagerly": True,
    },
    "steps_per_execution_jit_compile": lambda: {
        "loss": ["mse", script_loss],
        "steps_per_execution": 1 if BACKEND == "torch" else 3,  # torch: 1 only
        "jit_compile": BACKEND != "torch",
    },
}


@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_accumulate_compiles_the_twin_with_the_original_objects(case):
    keras.utils.set_random_seed(0)
    base = _two_heads()
    plain = _two_heads()
    plain.set_weights(base.get_weights())
    for model in (base, plain):
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5), **COMPILE_CASES[case]())
    twin = accum_keras.accumulate(base, accumulation_steps=K)

    assert twin.optimizer is base.optimizer
    assert list(twin.loss) == list(base.loss)  # the same functions
    for setting in ("run_eagerly", "jit_compile", "steps_per_execution"):
        assert getattr(twin, setting) == getattr(base, setting), setting
    x, _ = regression_data(samples=64)
    rng = np.random.default_rng(1)
    y = [rng.normal(size=(64, 1)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")]
    sample_weight = rng.random(64).astype("float32")
    kwargs = dict(epochs=1, shuffle=False, verbose=0, sample_weight=sample_weight)
    twin_history = twin.fit(x, y, batch_size=MICRO, **kwargs).history
    plain_history = plain.fit(x, y, batch_size=MICRO * K, **kwargs).history
    assert_same_training(twin, plain)
    assert sorted(twin_history) == sorted(plain_history)


def test_accumulate_keeps_an_unscaled_optimizer_under_mixed_precision():
    # A model compiled with auto_scale_loss=False keeps its plain optimizer:
    # compiling the twin must not wrap it in a LossScaleOptimizer.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        base = _two_heads()
        base.compile(optimizer="sgd", loss="mse", auto_scale_loss=False)
        twin = accum_keras.accumulate(base, accumulation_steps=K)
    finally:
        keras.config.set_dtype_policy("float32")
    assert twin.optimizer is base.optimizer
    assert not isinstance(twin.optimizer, keras.optimizers.LossScaleOptimizer)


# -- the fit-time rate is a Variable, as on plain Keras ------------------------


class _RateIdioms(keras.callbacks.Callback):
    """Reads the rate every way Keras code does; assigns one at epoch 1."""

    def __init__(self, new_rate):
        super().__init__()
        self.new_rate = new_rate
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        rate = self.model.optimizer.learning_rate
        if epoch == 1:
            rate.assign(self.new_rate)
        self.seen.append(
            (
                float(rate),
                float(rate.numpy()),
                float(keras.ops.convert_to_numpy(rate)),
                float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            )
        )


class _SetRate(keras.callbacks.Callback):
    """The reference: plain Keras given the applied rate of each epoch."""

    def __init__(self, rates):
        super().__init__()
        self.rates = rates

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(self.rates[epoch])


def test_scaled_rate_reads_and_assigns_like_a_keras_variable():
    base_rate, new_rate = 0.01, 0.02
    keras.utils.set_random_seed(0)
    model = accum_keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)],
        accumulation_steps=K,
    )
    plain = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)]
    )
    plain.set_weights(model.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(base_rate), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(base_rate), loss="mse")
    x, y = regression_data(samples=32)
    idioms = _RateIdioms(new_rate)
    model.fit(
        x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0,
        callbacks=[accum_keras.AccumulationCallback(lr_scaling="linear"), idioms],
    )  # fmt: skip
    # linear scaling by k at epoch 0; the assigned rate is applied from epoch 1
    np.testing.assert_allclose(idioms.seen, [[K * base_rate] * 4, [new_rate] * 4], rtol=1e-6)
    plain.fit(
        x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0,
        callbacks=[_SetRate([K * base_rate, new_rate])],
    )  # fmt: skip
    assert_same_training(model, plain)
    # After the fit the optimizer has its own rate, with the change kept unscaled.
    rate = model.optimizer.learning_rate
    assert isinstance(rate, keras.Variable)
    np.testing.assert_allclose(float(rate.numpy()), new_rate / K, rtol=1e-6)
