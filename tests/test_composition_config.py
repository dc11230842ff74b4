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


def _layers():
    return [keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)]


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
    samples = 32  # two windows
    x, _ = regression_data(samples=samples)
    rng = np.random.default_rng(1)
    y = [rng.normal(size=(samples, n)).astype("float32") for n in (1, 2)]
    sample_weight = rng.random(samples).astype("float32")
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


class _SetRatePerUpdate(keras.callbacks.Callback):
    """The reference: plain Keras given, before each update, the rate to apply."""

    def __init__(self, rates):
        super().__init__()
        self.rates = rates

    def on_train_batch_begin(self, batch, logs=None):
        update = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.model.optimizer.learning_rate.assign(self.rates[update])


def test_scaled_rate_reads_and_assigns_like_a_keras_variable():
    base_rate, new_rate, warmup = 0.01, 0.02, 3
    keras.utils.set_random_seed(0)
    model = accum_keras.Sequential(_layers(), accumulation_steps=K)
    plain = keras.Sequential(_layers())
    plain.set_weights(model.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(base_rate), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(base_rate), loss="mse")
    x, y = regression_data(samples=32)  # two updates per epoch
    idioms = _RateIdioms(new_rate)
    scaling = accum_keras.AccumulationCallback(lr_scaling="linear", warmup_updates=warmup)
    model.fit(
        x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[scaling, idioms]
    )

    # By hand: the multiplier warms up from 1 to k over `warmup` updates; the
    # rate assigned before update 2 is the rate applied at update 2, and the
    # warmup goes on acting relative to it.
    def multiplier(update):
        return 1 + (K - 1) * min(1.0, update / warmup)

    new_base = new_rate / multiplier(2)
    rates = [base_rate * multiplier(u) for u in (0, 1)] + [new_base * multiplier(u) for u in (2, 3)]
    np.testing.assert_allclose(idioms.seen, [[rates[0]] * 4, [rates[2]] * 4], rtol=1e-6)
    plain.fit(
        x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0,
        callbacks=[_SetRatePerUpdate(rates)],
    )  # fmt: skip
    assert_same_training(model, plain)
    # After the fit the optimizer has its own rate, with the change kept unscaled.
    rate = model.optimizer.learning_rate
    assert isinstance(rate, keras.Variable)
    np.testing.assert_allclose(float(rate.numpy()), new_base, rtol=1e-6)


# -- gaps: each test kills a one-line change that the suite let through --------


def _twins(accumulation_steps=K, rate=0.05, **options):
    """An `accum_keras.Sequential` and a plain `keras.Sequential` with equal weights."""
    keras.utils.set_random_seed(0)
    model = accum_keras.Sequential(_layers(), accumulation_steps=accumulation_steps, **options)
    plain = keras.Sequential(_layers())
    plain.set_weights(model.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(rate), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(rate), loss="mse")
    return model, plain


def _skipped(model) -> int:
    return int(keras.ops.convert_to_numpy(model._accumulation_state.skipped_updates))


class _EvaluateAt(keras.callbacks.Callback):
    def __init__(self, x, y, batches):
        super().__init__()
        self.x, self.y, self.batches, self.pending = x, y, batches, []

    def on_train_batch_end(self, batch, logs=None):
        if batch in self.batches:
            self.model.evaluate(self.x, self.y, batch_size=8, verbose=0)
            self.pending.append(getattr(self.model, "pending_micro_steps", 0))


def test_evaluate_from_a_callback_mid_window_does_not_apply_the_window():
    model, plain = _twins()
    x, y = regression_data(samples=32)
    probe = _EvaluateAt(x[:8], y[:8], batches=(1,))
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[probe])
    assert probe.pending == [2]  # the open window stayed open
    reference = _EvaluateAt(x[:8], y[:8], batches=(0,))
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0, callbacks=[reference])
    assert_same_training(model, plain)


def test_compiled_and_trained_at_one_then_set_to_k_accumulates():
    model, plain = _twins(accumulation_steps=1)
    x, y = regression_data(samples=32)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    model.accumulation_steps = K
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    assert_same_training(model, plain)


def test_from_config_and_load_model_keep_every_model_option(tmp_path):
    model = accum_keras.Sequential(_layers(), accumulation_steps=3, skip_nonfinite_updates=True)
    copy = accum_keras.Sequential.from_config(model.get_config())
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for other in (copy, loaded):
        assert type(other) is accum_keras.Sequential
        assert other.accumulation_steps == 3
        assert other.skip_nonfinite_updates is True


def test_window_loaded_into_fewer_trainable_variables_with_a_matching_prefix_starts_empty(
    tmp_path,
):
    # Saved: accumulators for [kernel 5x3, bias 3, kernel 3x1, bias 1]. Loaded
    # with the last layer frozen: [kernel 5x3, bias 3], whose shapes match the
    # first two. Half a window is not a window: it starts empty.
    model, _ = _twins()
    x, y = regression_data(samples=8)
    for index in range(2):
        model.train_on_batch(x[index * MICRO : (index + 1) * MICRO], y[:MICRO])
    assert model.pending_micro_steps == 2
    path = str(tmp_path / "open.weights.h5")
    model.save_weights(path)
    other, _ = _twins()
    other.layers[-1].trainable = False
    with pytest.warns(UserWarning, match="the window starts empty"):
        other.load_weights(path)
    assert other.pending_micro_steps == 0
    for a, b in zip(other.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def _nan_window_data(samples=32):
    x, y = regression_data(samples=samples)
    y = y.copy()
    y[MICRO + 1] = np.nan  # micro-batch 1: the first window is skipped
    return x, y


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def test_skipped_updates_survive_load_weights_load_model_and_backup_and_restore(tmp_path):
    x, y = _nan_window_data()
    model, _ = _twins(skip_nonfinite_updates=True)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert _skipped(model) == 1
    weights_path, model_path = str(tmp_path / "m.weights.h5"), str(tmp_path / "m.keras")
    model.save_weights(weights_path)
    model.save(model_path)
    other, _ = _twins(skip_nonfinite_updates=True)
    other.load_weights(weights_path)
    assert _skipped(other) == 1
    assert _skipped(keras.models.load_model(model_path)) == 1

    # Uninterrupted reference: two epochs skip the window with the NaN twice.
    uninterrupted, _ = _twins(skip_nonfinite_updates=True)
    uninterrupted.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    assert _skipped(uninterrupted) == 2
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted, _ = _twins(skip_nonfinite_updates=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(
            x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0,
            callbacks=[backup, _Interrupt()],
        )  # fmt: skip
    resumed, _ = _twins(skip_nonfinite_updates=True)
    resumed.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[backup])
    assert _skipped(resumed) == 2
    assert_same_training(resumed, uninterrupted, rtol=0)


def test_accumulation_schedule_without_epoch_zero_starts_at_the_models_k():
    model, plain = _twins()
    x, y = regression_data(samples=32)
    schedule = accum_keras.AccumulationCallback(lr_scaling=None, accumulation_schedule={1: 2})
    model.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[schedule])
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * 2, shuffle=False, verbose=0)
    assert_same_training(model, plain)
    assert model.accumulation_steps == 2


def _hand_warmup(base, multiplier, warmup, step):
    return base * (1 + (multiplier - 1) * min(1.0, step / warmup))


def test_scaled_learning_rate_warmup_by_hand():
    base, multiplier, warmup = 0.1, 5.0, 4
    rate = accum_keras.ScaledLearningRate(base, multiplier=multiplier, warmup_updates=warmup)
    for step in (0, 1, warmup - 1, warmup, warmup + 3):
        np.testing.assert_allclose(
            float(keras.ops.convert_to_numpy(rate(step))),
            _hand_warmup(base, multiplier, warmup, step),
            rtol=1e-6,
            err_msg=f"step {step}",
        )
    # In an optimizer: update u applies the rate of step u (iterations before it).
    variable = keras.Variable(0.0)
    optimizer = keras.optimizers.SGD(rate)
    updates = warmup + 2
    for _ in range(updates):
        optimizer.apply([keras.ops.ones(())], [variable])
    expected = -sum(_hand_warmup(base, multiplier, warmup, u) for u in range(updates))
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(variable)), expected, rtol=1e-6)


@pytest.mark.parametrize("form", ["instance", "serialized"])
def test_loss_scale_optimizer_around_an_accumulating_optimizer_is_refused(form):
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(gradient_accumulation_steps=4)
    )
    if form == "serialized":
        optimizer = keras.optimizers.serialize(optimizer)
    model = accum_keras.Sequential(_layers(), accumulation_steps=K)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        model.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        model.compile(optimizer, "mse")
    assert not model.compiled


# -- clones and conversions keep accumulating ----------------------------------


def _functional(model_class, batch_norm=False, **options):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(3, activation="tanh")(inputs)
    if batch_norm:
        hidden = keras.layers.BatchNormalization()(hidden)
    return model_class(inputs, keras.layers.Dense(1)(hidden), **options)


def _sequential(model_class, batch_norm=False, **options):
    layers = _layers()
    if batch_norm:
        layers.insert(2, keras.layers.BatchNormalization())
    return model_class(layers, **options)


KINDS = {
    "functional": (_functional, accum_keras.Model, keras.Model),
    "sequential": (_sequential, accum_keras.Sequential, keras.Sequential),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_clone_model_keeps_the_class_and_options_and_trains_as_the_big_batch(kind):
    build, accum_class, keras_class = KINDS[kind]
    keras.utils.set_random_seed(0)
    model = build(accum_class, accumulation_steps=K, skip_nonfinite_updates=True)
    clone = accum_keras.clone_model(model)
    assert type(clone) is accum_class
    assert (clone.accumulation_steps, clone.skip_nonfinite_updates) == (K, True)
    clone.set_weights(model.get_weights())
    plain = build(keras_class)
    plain.set_weights(model.get_weights())
    for m in (clone, plain):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _nan_window_data(samples=32)  # window 0 holds a NaN label: skipped
    clone.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert _skipped(clone) == 1
    tail = slice(MICRO * K, None)
    plain.fit(x[tail], y[tail], batch_size=MICRO * K, shuffle=False, verbose=0)
    assert_same_training(clone, plain)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_convert_batch_normalization_keeps_the_class_and_options(kind):
    build, accum_class, _ = KINDS[kind]
    keras.utils.set_random_seed(0)
    model = build(accum_class, batch_norm=True, accumulation_steps=K, skip_nonfinite_updates=True)
    converted = accum_keras.layers.convert_batch_normalization(model)
    assert type(converted) is accum_class
    assert (converted.accumulation_steps, converted.skip_nonfinite_updates) == (K, True)
    assert any(isinstance(x, accum_keras.layers.AccumBatchNormalization) for x in converted.layers)
    for a, b in zip(converted.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    converted.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _nan_window_data(samples=32)
    converted.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    # two windows of k micro-batches, the first skipped for its NaN label
    assert int(keras.ops.convert_to_numpy(converted.optimizer.iterations)) == 1
    assert _skipped(converted) == 1


def test_clone_model_of_a_compiled_sequential_is_compiled_like_keras_clones():
    model = accum_keras.Sequential(_layers(), accumulation_steps=K)
    model.compile(optimizer="adam", loss="mae")
    clone = accum_keras.clone_model(model)
    keras_clone = keras.models.clone_model(model)
    assert clone.compiled and keras_clone.compiled
    assert clone.get_compile_config() == keras_clone.get_compile_config()
    assert clone.optimizer is not model.optimizer


def test_clone_model_leaves_other_models_to_keras():
    model = keras.Sequential(_layers())
    assert type(accum_keras.clone_model(model)) is keras.Sequential
