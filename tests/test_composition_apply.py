"""Every path that ends a window ends it the same way (issue 15, items 2, 3, 5).

The built-in step of each backend, a user-written ``train_step`` and
``apply_pending_window()`` all call `accum_keras._apply.apply_window`, so the
non-finite skip, `AccumBatchNormalization`'s statistics and the counters meet
every option. References are independent: moving statistics computed by hand
in NumPy from the inputs of the BatchNorm layer, plain Keras on the big batch,
uninterrupted training.
"""

import keras
import numpy as np
import pytest
from helpers import assert_same_training, regression_data
from keras import ops

import accum_keras
from accum_keras.layers import AccumBatchNormalization

K, MICRO, MOMENTUM = 4, 4, 0.8
BACKEND = keras.backend.backend()

needs_tf_or_torch = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "torch"),
    reason=f"custom train_step accumulation is not supported on {BACKEND} (raises instead)",
)


def _numpy(value):
    return np.asarray(ops.convert_to_numpy(value))


def _skipped(model) -> int:
    return int(_numpy(model._accumulation_state.skipped_updates))


# -- AccumBatchNormalization: hand-computed moving statistics -------------------


def _images(samples, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=1.0, scale=2.0, size=(samples, 4, 4, 2)).astype("float32")
    return x, rng.normal(size=(samples, 1)).astype("float32")


def _bn_model(**kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    features = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    hidden = AccumBatchNormalization(momentum=MOMENTUM, name="bn")(features)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(hidden))
    model = accum_keras.Model(inputs, outputs, accumulation_steps=K, **kwargs)
    # A zero rate keeps the convolution fixed, so the layer's inputs can be
    # computed once, outside training.
    model.compile(keras.optimizers.SGD(0.0), loss="mse")
    return model


def _bn_inputs(model, x):
    conv = model.get_layer("conv")
    return _numpy(keras.Model(model.inputs[0], conv.output)(x))


def _moving_statistics(model):
    layer = model.get_layer("bn")
    return _numpy(layer.moving_mean), _numpy(layer.moving_variance)


def _expected_statistics(windows, mean=None, variance=None):
    """The momentum rule over each window's pooled mean and biased variance (NumPy)."""
    channels = windows[0].shape[-1]
    mean = np.zeros(channels) if mean is None else np.array(mean, "float64")
    variance = np.ones(channels) if variance is None else np.array(variance, "float64")
    for values in windows:
        values = values.reshape(-1, channels).astype("float64")
        mean = mean * MOMENTUM + values.mean(axis=0) * (1 - MOMENTUM)
        variance = variance * MOMENTUM + values.var(axis=0) * (1 - MOMENTUM)
    return mean, variance


def _assert_statistics(model, expected):
    for ours, reference in zip(_moving_statistics(model), expected):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", ["input", "label"])
def test_a_skipped_window_leaves_no_trace_in_batch_norm_statistics(poison):
    # Four windows of four micro-batches; window 1 has a NaN. A NaN input
    # poisons the pooled statistics themselves; a NaN label only the gradient.
    x, y = _images(K * K * MICRO)
    features = _bn_inputs(_bn_model(), x)
    (x if poison == "input" else y)[5 * MICRO] = np.nan
    model = _bn_model(skip_nonfinite_updates=True)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(_numpy(model.optimizer.iterations)) == 3
    assert _skipped(model) == 1
    size = K * MICRO
    kept = [features[i * size : (i + 1) * size] for i in (0, 2, 3)]
    _assert_statistics(model, _expected_statistics(kept))


def test_a_window_a_loss_scale_optimizer_skips_leaves_no_trace_in_batch_norm_statistics():
    # The optimizer skips the window itself; the statistics follow it.
    x, y = _images(K * K * MICRO)
    features = _bn_inputs(_bn_model(), x)
    y[5 * MICRO] = np.nan
    model = _bn_model()
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0)), loss="mse")
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert _skipped(model) == 1
    size = K * MICRO
    kept = [features[i * size : (i + 1) * size] for i in (0, 2, 3)]
    _assert_statistics(model, _expected_statistics(kept))


def test_discarding_a_window_discards_its_batch_norm_statistics():
    x, y = _images(6 * MICRO)
    model = _bn_model()
    features = _bn_inputs(model, x)
    for i in range(2):
        model.train_on_batch(x[i * MICRO : (i + 1) * MICRO], y[i * MICRO : (i + 1) * MICRO])
    assert model.discard_pending_window() == 2
    for i in range(2, 6):
        model.train_on_batch(x[i * MICRO : (i + 1) * MICRO], y[i * MICRO : (i + 1) * MICRO])
    assert int(_numpy(model.optimizer.iterations)) == 1
    _assert_statistics(model, _expected_statistics([features[2 * MICRO :]]))


class _InterruptAtBatch(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError("interrupted")


def test_the_restore_at_fit_start_discards_the_open_windows_batch_norm_statistics(tmp_path):
    # Two windows per epoch; fit() is interrupted with window 2 open (two
    # micro-batches pooled), after BackupAndRestore saved it. The restarted
    # fit replays the epoch from its first batch: the pooled micro-batches
    # must not join its first window.
    x, y = _images(2 * K * MICRO)
    model = _bn_model()
    features = _bn_inputs(model, x)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=MICRO,
            shuffle=False,
            verbose=0,
            callbacks=[backup, _InterruptAtBatch(K + 2)],
        )
    assert model.pending_micro_steps == 2
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[backup])
    size = K * MICRO
    first, second = features[:size], features[size:]
    # Window 1 of the interrupted epoch (restored), then the replayed epoch.
    _assert_statistics(model, _expected_statistics([first, first, second]))


def test_a_frozen_batch_norm_keeps_its_moving_statistics():
    # The fine-tuning set-up: the layer runs in inference mode, its window
    # stays empty, and the other layers train.
    x, y = _images(2 * K * MICRO)
    model = _bn_model()
    layer = model.get_layer("bn")
    mean = np.array([0.5, -1.0, 2.0], "float32")
    variance = np.array([3.0, 0.25, 1.5], "float32")
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(variance)
    layer.trainable = False
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(_numpy(model.optimizer.iterations)) == 2
    _assert_statistics(model, (mean, variance))


@pytest.mark.parametrize("guard", ["skip_nonfinite_updates", "loss_scale_optimizer"])
def test_a_frozen_batch_norm_with_a_non_finite_guard_neither_moves_nor_breaks(guard):
    # Three windows, the second with a NaN label: it is not applied. A frozen
    # layer is a fixed function, so the other layers train exactly as plain
    # Keras with a frozen BatchNormalization on the two applied big batches.
    x, y = _images(3 * K * MICRO)
    y[K * MICRO + 1] = np.nan
    model = _bn_model(skip_nonfinite_updates=guard == "skip_nonfinite_updates")
    mean = np.array([0.5, -1.0, 2.0], "float32")
    variance = np.array([3.0, 0.25, 1.5], "float32")
    model.get_layer("bn").moving_mean.assign(mean)
    model.get_layer("bn").moving_variance.assign(variance)
    model.get_layer("bn").trainable = False
    optimizer = keras.optimizers.SGD(0.01)
    if guard == "loss_scale_optimizer":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer, loss="mse")

    inputs = keras.Input((4, 4, 2))
    frozen = keras.layers.BatchNormalization(momentum=MOMENTUM, name="bn")
    frozen.trainable = False
    hidden = frozen(keras.layers.Conv2D(3, 3, name="conv")(inputs))
    plain = keras.Model(
        inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(hidden))
    )
    plain.set_weights(model.get_weights())
    plain.compile(keras.optimizers.SGD(0.01), loss="mse")

    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    applied = np.r_[0 : K * MICRO, 2 * K * MICRO : 3 * K * MICRO]
    plain.fit(x[applied], y[applied], batch_size=K * MICRO, shuffle=False, verbose=0)
    assert _skipped(model) == 1
    _assert_statistics(model, (mean, variance))
    assert_same_training(model, plain)


def test_skipped_updates_is_logged_with_a_plain_optimizer():
    x, y = _images(K * K * MICRO)
    y[5 * MICRO] = np.nan
    model = _bn_model(skip_nonfinite_updates=True)
    history = model.fit(
        x,
        y,
        batch_size=MICRO,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback()],
    )
    assert history.history["skipped_updates"] == [1, 2]


# -- a user-written train_step ----------------------------------------------------


def _gradients(model, loss_fn, variables):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return loss, tape.gradient(loss, variables)
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss, [v.value.grad for v in variables]


def _no_grad():
    if BACKEND == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


def _custom_step(model, data):
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    variables = model.trainable_variables

    def loss_fn():
        return ops.mean(ops.square(ops.subtract(model(x, training=True), y)))

    loss, gradients = _gradients(model, loss_fn, variables)
    with _no_grad():
        model.optimizer.apply(gradients, variables)
    return {"loss": loss}


@keras.saving.register_keras_serializable(package="accum_keras_apply_tests")
class CustomStep(accum_keras.AccumulatingModel, keras.Model):
    """keras.io's custom-step pattern; ``norm`` adds an AccumBatchNormalization."""

    def __init__(self, norm=False, **kwargs):
        super().__init__(**kwargs)
        self.norm = norm
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.bn = AccumBatchNormalization(momentum=MOMENTUM) if norm else None
        self.head = keras.layers.Dense(1)

    def call(self, x, training=False):
        hidden = self.hidden(x)
        if self.bn is not None:
            hidden = self.bn(hidden, training=training)
        return self.head(hidden)

    def train_step(self, data):
        return _custom_step(self, data)

    def get_config(self):
        return {**super().get_config(), "norm": self.norm}


class PlainStep(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.head = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.head(self.hidden(x))

    def train_step(self, data):
        return _custom_step(self, data)


def _custom_model(optimizer, **kwargs):
    keras.utils.set_random_seed(0)
    model = CustomStep(accumulation_steps=K, **kwargs)
    model(np.zeros((1, 5), "float32"))
    model.compile(optimizer=optimizer)
    return model


def _plain_twin(model, optimizer):
    plain = PlainStep()
    plain(np.zeros((1, 5), "float32"))
    plain.compile(optimizer=optimizer)
    plain.set_weights(model.get_weights())
    return plain


@needs_tf_or_torch
def test_a_custom_step_skips_a_non_finite_window():
    x, y = regression_data(samples=K * K * MICRO)
    y[5 * MICRO] = np.nan  # window 1
    model = _custom_model(keras.optimizers.SGD(0.05, momentum=0.9), skip_nonfinite_updates=True)
    plain = _plain_twin(model, keras.optimizers.SGD(0.05, momentum=0.9))
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    size = K * MICRO
    keep = np.r_[0:size, 2 * size : 4 * size]
    plain.fit(x[keep], y[keep], batch_size=size, shuffle=False, verbose=0)
    assert _skipped(model) == 1
    assert_same_training(model, plain)


@needs_tf_or_torch
def test_a_custom_step_window_applies_batch_norm_statistics_and_counts_its_samples():
    x, y = regression_data(samples=2 * K * MICRO)
    model = _custom_model(keras.optimizers.SGD(0.0), norm=True)
    hidden = _numpy(model.hidden(x))
    logged = []
    history = model.fit(
        x,
        y,
        batch_size=MICRO,
        shuffle=False,
        verbose=0,
        callbacks=[
            accum_keras.AccumulationCallback(),
            keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: logged.append(
                    logs.get("effective_batch_size")
                )
            ),
        ],
    )
    assert logged == [None] * (K - 1) + [K * MICRO] * (K + 1)
    assert history.history["effective_batch_size"] == [K * MICRO]
    size = K * MICRO
    expected = _expected_statistics([hidden[:size], hidden[size:]])
    for ours, reference in zip(
        (_numpy(model.bn.moving_mean), _numpy(model.bn.moving_variance)), expected
    ):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


@needs_tf_or_torch
def test_a_custom_step_rate_scaled_to_its_windows_samples():
    # base_batch_size = the window's samples: the scaled rate is the rate
    # itself, which only holds when the custom step counts its samples.
    x, y = regression_data(samples=2 * K * MICRO)
    model = _custom_model(keras.optimizers.SGD(0.05))
    plain = _plain_twin(model, keras.optimizers.SGD(0.05))
    callback = accum_keras.AccumulationCallback(base_batch_size=K * MICRO)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[callback])
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert_same_training(model, plain)


def _batches(x, y):
    return [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, len(x), MICRO)]


@needs_tf_or_torch
@pytest.mark.parametrize("event", ["apply_pending_window", "lower_k", "compile"])
def test_a_loaded_custom_step_window_is_applied_before_any_step(tmp_path, event):
    x, y = regression_data(samples=6 * MICRO)
    model = _custom_model(keras.optimizers.SGD(0.05, momentum=0.9))
    for batch in _batches(x, y):
        model.train_on_batch(*batch)
    assert model.pending_micro_steps == 2
    path = str(tmp_path / "custom.keras")
    model.save(path)
    model.apply_pending_window()  # the uninterrupted reference

    loaded = keras.models.load_model(path)
    optimizer = loaded.optimizer  # loaded with its momentum
    assert loaded.pending_micro_steps == 2
    if event == "apply_pending_window":
        assert loaded.apply_pending_window()
    elif event == "lower_k":
        loaded.accumulation_steps = 2
    else:
        loaded.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    assert loaded.pending_micro_steps == 0
    assert int(_numpy(optimizer.iterations)) == 2
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in loaded.get_weights()]),
        np.concatenate([w.ravel() for w in model.get_weights()]),
        rtol=0,
        atol=1e-6,
    )


@keras.saving.register_keras_serializable(package="accum_keras_apply_tests")
class TwoOptimizers(accum_keras.AccumulatingModel, keras.Model):
    """Each tower has its own optimizer (a GAN's layout, without the coupling)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tower_a = keras.layers.Dense(1)
        self.tower_b = keras.layers.Dense(1)

    def compile(self, a_optimizer, b_optimizer):
        super().compile()
        self.a_optimizer = a_optimizer
        self.b_optimizer = b_optimizer

    def build(self, input_shape):
        self.tower_a.build(input_shape)
        self.tower_b.build(input_shape)

    def call(self, x):
        return self.tower_a(x) + self.tower_b(x)

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        for optimizer, tower in (
            (self.a_optimizer, self.tower_a),
            (self.b_optimizer, self.tower_b),
        ):
            variables = tower.trainable_variables

            def loss_fn():
                return ops.mean(ops.square(ops.subtract(self(x), y)))

            loss, gradients = _gradients(self, loss_fn, variables)
            with _no_grad():
                optimizer.apply(gradients, variables)
        return {"loss": loss}


def _compile_two(model):
    # Plain SGD: a fresh optimizer continues exactly (Keras does not reload
    # the optimizers that a custom compile() creates).
    model.compile(a_optimizer=keras.optimizers.SGD(0.1), b_optimizer=keras.optimizers.SGD(0.05))


@needs_tf_or_torch
def test_a_loaded_window_goes_to_the_optimizer_that_accumulated_each_variable(tmp_path):
    x, y = regression_data(samples=6 * MICRO)
    keras.utils.set_random_seed(0)
    model = TwoOptimizers(accumulation_steps=K)
    model.build((None, 5))
    _compile_two(model)
    for batch in _batches(x, y):
        model.train_on_batch(*batch)
    path = str(tmp_path / "two.keras")
    model.save(path)
    model.apply_pending_window()  # the uninterrupted reference

    with pytest.warns(UserWarning, match="call compile"):
        loaded = keras.models.load_model(path)
    _compile_two(loaded)
    assert loaded.apply_pending_window()
    assert int(_numpy(loaded.a_optimizer.iterations)) == 1
    assert int(_numpy(loaded.b_optimizer.iterations)) == 1
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in loaded.get_weights()]),
        np.concatenate([w.ravel() for w in model.get_weights()]),
        rtol=0,
        atol=1e-6,
    )


def _batch_log(key, into):
    return keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: into.append(logs.get(key))
    )


def test_a_skipped_window_is_not_the_last_update():
    # Windows of 16, 16 and a short last one of 8 samples (40 samples, k = 4,
    # micro-batch 4); the short window holds a NaN label and is skipped.
    x, y = _images(2 * K * MICRO + 2 * MICRO)
    y[2 * K * MICRO + 1] = np.nan
    model = _bn_model(skip_nonfinite_updates=True)
    logged = []
    model.fit(
        x,
        y,
        batch_size=MICRO,
        shuffle=False,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback(), _batch_log("effective_batch_size", logged)],
    )
    assert logged == [None] * (K - 1) + [K * MICRO] * (K + 3)
    assert _skipped(model) == 1
    # The last update is window 1's: the skipped window's 8 samples made none.
    assert int(_numpy(model._accumulation_state.last_update_samples)) == K * MICRO


@needs_tf_or_torch
def test_a_custom_step_at_one_accumulation_step_counts_its_samples():
    x, y = regression_data(samples=6 * MICRO + 2)
    model = _custom_model(keras.optimizers.SGD(0.05))
    model.accumulation_steps = 1
    logged = []
    history = model.fit(
        x,
        y,
        batch_size=MICRO,
        shuffle=False,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback(), _batch_log("effective_batch_size", logged)],
    )
    # Every micro-batch is its own update: 6 of 4 samples, then one of 2.
    assert logged == [MICRO] * 6 + [2]
    assert history.history["effective_batch_size"] == [pytest.approx((6 * MICRO + 2) / 7)]
    assert model._accumulation_state.total_samples_seen() == 6 * MICRO + 2


def test_a_discarded_windows_samples_are_not_counted_in_the_next_update():
    x, y = _images(6 * MICRO)
    model = _bn_model()
    for start in range(0, 2 * MICRO, MICRO):
        model.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    assert model.discard_pending_window() == 2
    for start in range(2 * MICRO, 6 * MICRO, MICRO):
        model.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    assert int(_numpy(model.optimizer.iterations)) == 1
    assert int(_numpy(model._accumulation_state.last_update_samples)) == K * MICRO
