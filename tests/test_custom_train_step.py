"""Models that write their own ``train_step`` (keras.io's VAE/GAN style).

The gradients such a step hands to ``optimizer.apply`` / ``apply_gradients``
are accumulated and applied once per window, for every optimizer the step
uses. The reference is the same plain Keras class on the big batch.
"""

import keras
import numpy as np
import pytest
from helpers import (
    assert_same_training,
    max_relative_difference,
    regression_data,
    train_step_applying_its_gradients,
)
from keras import ops

import accum_keras

K = 4
MICRO = 4
BACKEND = keras.backend.backend()

needs_tf_or_torch = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "torch"),
    reason=f"custom train_step accumulation is not supported on {BACKEND} (raises instead)",
)


def gradients_of(model, loss_fn, variables):
    """``(loss, gradients)`` as keras.io's custom-step examples compute them."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return loss, tape.gradient(loss, variables)
    if BACKEND == "torch":
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss, [v.value.grad for v in variables]
    raise NotImplementedError(BACKEND)


def _no_grad():
    if BACKEND == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()


# -- one optimizer -----------------------------------------------------------


def _build(model):
    model.hidden = keras.layers.Dense(8, activation="tanh")
    model.head = keras.layers.Dense(1)


def _call(model, x):
    return model.head(model.hidden(x))


def _mean_squared_error_step(model, data):
    x, y = data
    variables = model.trainable_variables

    def loss_fn():
        return ops.mean(ops.square(model(x, training=True) - y))

    loss, gradients = gradients_of(model, loss_fn, variables)
    with _no_grad():
        model.optimizer.apply(gradients, variables)
    return {"loss": loss}


class PlainRegressor(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _build(self)

    def call(self, x):
        return _call(self, x)

    def train_step(self, data):
        return _mean_squared_error_step(self, data)


class StepBeforeMixin(accum_keras.AccumulatingModel, keras.Model):
    """The user's class defines ``train_step``: it comes before the mixin."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _build(self)

    def call(self, x):
        return _call(self, x)

    def train_step(self, data):
        return _mean_squared_error_step(self, data)


class StepAfterMixin(accum_keras.AccumulatingModel, PlainRegressor):
    """The mixin on an existing class with a step: the mixin comes first."""


def _twins(cls, optimizer, seed=0):
    keras.utils.set_random_seed(seed)
    accumulating = cls(accumulation_steps=K)
    plain = PlainRegressor()
    for model in (accumulating, plain):
        model(np.zeros((1, 5), "float32"))
        model.compile(optimizer=optimizer())
    plain.set_weights(accumulating.get_weights())
    return accumulating, plain


@needs_tf_or_torch
@pytest.mark.parametrize("cls", [StepBeforeMixin, StepAfterMixin])
def test_custom_step_is_accumulated_exactly(cls):
    # 72 samples: four full windows and a short one (2 micro-batches) per epoch.
    x, y = regression_data(samples=72)
    accumulating, plain = _twins(cls, lambda: keras.optimizers.SGD(0.05, momentum=0.9))
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 10
    assert_same_training(accumulating, plain)


class StepUnpackingItsData(StepBeforeMixin):
    """The same step, for ``train_on_batch`` (which hands it ``(x, y, None)``)."""

    def train_step(self, data):
        return train_step_applying_its_gradients(self, data)


@needs_tf_or_torch
def test_lowering_k_to_1_applies_the_open_window_as_its_big_batch():
    # At k = 1 the user's step runs as in plain Keras, but the window it
    # filled at k = 4 must still be applied by the custom-step path.
    x, y = regression_data(samples=3 * MICRO)
    accumulating, plain = _twins(
        StepUnpackingItsData, lambda: keras.optimizers.SGD(0.05, momentum=0.9)
    )
    for start in (0, MICRO):
        accumulating.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    accumulating.accumulation_steps = 1
    accumulating.train_on_batch(x[2 * MICRO :], y[2 * MICRO :])
    for part in (slice(0, 2 * MICRO), slice(2 * MICRO, None)):
        plain.fit(x[part], y[part], batch_size=2 * MICRO, shuffle=False, verbose=0)
    assert accumulating.pending_micro_steps == 0
    assert_same_training(accumulating, plain)


@needs_tf_or_torch
def test_custom_step_with_adam_and_a_schedule():
    x, y = regression_data(samples=64)
    schedule = lambda: keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)  # noqa: E731
    accumulating, plain = _twins(StepBeforeMixin, lambda: keras.optimizers.Adam(schedule()))
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    # Adam's first steps divide by tiny second moments: round-off grows a little.
    assert_same_training(accumulating, plain, rtol=2e-5)


# -- a step that scales its loss (mixed_float16) ------------------------------


def _loss_scaled_step(model, data):
    """keras.io's mixed-precision step: gradients of ``optimizer.scale_loss(loss)``."""
    x, y = data
    variables = model.trainable_variables

    def scaled_loss():
        prediction = ops.cast(model(x, training=True), "float32")
        return model.optimizer.scale_loss(ops.mean(ops.square(prediction - y)))

    scaled, gradients = gradients_of(model, scaled_loss, variables)
    with _no_grad():
        model.optimizer.apply(gradients, variables)
    return {"loss": scaled}


class PlainLossScaled(PlainRegressor):
    def train_step(self, data):
        return _loss_scaled_step(self, data)


class AccumLossScaled(accum_keras.AccumulatingModel, PlainLossScaled):
    pass


@needs_tf_or_torch
def test_a_step_that_scales_its_loss_accumulates_unscaled_gradients():
    # Under mixed_float16 the step's gradients carry the loss scale (2**15):
    # accumulated as given, a float16 accumulator would hold scale x samples x
    # gradient and overflow although the gradients are small.
    x, y = regression_data(samples=MICRO * K * 8)
    # Halved targets keep each micro-batch's own float16 backward pass finite
    # (a micro-batch's mean weighs each sample K times the big batch's).
    y = 0.5 * y
    keras.config.set_dtype_policy("mixed_float16")
    try:
        models = {}
        for name, cls, kwargs in [
            ("plain", PlainLossScaled, {}),
            ("float16", AccumLossScaled, {"accumulation_steps": K, "accumulator_dtype": "float16"}),
            ("float32", AccumLossScaled, {"accumulation_steps": K}),
        ]:
            keras.utils.set_random_seed(0)
            model = cls(**kwargs)
            model(np.zeros((1, 5), "float32"))
            model.compile(optimizer=keras.optimizers.SGD(0.05))
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            models[name] = model
    finally:
        keras.config.set_dtype_policy("float32")
    start_scale = float(models["plain"].optimizer.scale_loss(1.0))
    models["plain"].fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    for name in ("float16", "float32"):
        models[name].fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    for name, model in models.items():
        assert int(model.optimizer.iterations.numpy()) == 8, name
        assert float(model.optimizer.dynamic_scale.numpy()) == start_scale, name
    assert int(models["float16"]._accumulation_state.skipped_updates.numpy()) == 0
    # float16 matmuls round the micro-batches' and the big batch's sums
    # differently; measured: 7.2e-5 (float16 accumulators), 2.5e-5 (float32).
    plain = models["plain"].get_weights()
    assert max_relative_difference(models["float16"].get_weights(), plain) < 1e-3
    assert max_relative_difference(models["float32"].get_weights(), plain) < 1e-3


# -- two optimizers ------------------------------------------------------------


def _two_tower_step(model, data):
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    # `train_on_batch` hands PyTorch steps NumPy arrays.
    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    logs = {}
    for name, tower, optimizer in (
        ("a", model.tower_a, model.a_optimizer),
        ("b", model.tower_b, model.b_optimizer),
    ):
        variables = tower.trainable_variables

        def loss_fn(tower=tower):
            return ops.mean(ops.abs(tower(x, training=True) - y))

        logs[name], gradients = gradients_of(model, loss_fn, variables)
        with _no_grad():
            optimizer.apply_gradients(zip(gradients, variables))
    return logs


@keras.saving.register_keras_serializable(package="accum_keras_tests")
class PlainTowers(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tower_a = keras.Sequential(
            [keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
        )
        self.tower_b = keras.Sequential([keras.layers.Dense(1)])

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
        return _two_tower_step(self, data)


@keras.saving.register_keras_serializable(package="accum_keras_tests")
class AccumTowers(accum_keras.AccumulatingModel, PlainTowers):
    pass


def _compile_towers(model, stateless=False):
    if stateless:
        # Keras does not reload optimizers that a custom compile() creates.
        model.compile(a_optimizer=keras.optimizers.SGD(0.1), b_optimizer=keras.optimizers.SGD(0.05))
    else:
        model.compile(
            a_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            b_optimizer=keras.optimizers.RMSprop(0.01),
        )


def _towers(cls, stateless=False, **kwargs):
    keras.utils.set_random_seed(1)
    model = cls(**kwargs)
    model.build((None, 5))
    _compile_towers(model, stateless)
    return model


@needs_tf_or_torch
def test_every_optimizer_of_the_step_updates_once_per_window():
    x, y = regression_data(samples=64)
    accumulating = _towers(AccumTowers, accumulation_steps=K)
    plain = _towers(PlainTowers)
    plain.set_weights(accumulating.get_weights())
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    for name in ("a_optimizer", "b_optimizer"):
        assert int(getattr(accumulating, name).iterations.numpy()) == 8
        assert int(getattr(plain, name).iterations.numpy()) == 8
    assert max_relative_difference(accumulating.get_weights(), plain.get_weights()) < 2e-6


@needs_tf_or_torch
def test_custom_step_saved_mid_window_continues_like_uninterrupted(tmp_path):
    x, y = regression_data(samples=48)
    batches = [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, 48, MICRO)]
    uninterrupted = _towers(AccumTowers, stateless=True, accumulation_steps=K)
    interrupted = _towers(AccumTowers, stateless=True, accumulation_steps=K)
    interrupted.set_weights(uninterrupted.get_weights())
    for batch in batches:
        uninterrupted.train_on_batch(*batch)
    for batch in batches[:6]:
        interrupted.train_on_batch(*batch)
    assert interrupted.pending_micro_steps == 2
    path = str(tmp_path / "towers.keras")
    interrupted.save(path)
    with pytest.warns(UserWarning, match="call compile"):
        resumed = keras.models.load_model(path)
    assert resumed.pending_micro_steps == 2
    _compile_towers(resumed, stateless=True)
    for batch in batches[6:]:
        resumed.train_on_batch(*batch)
    # The freshly compiled optimizers made the two updates after loading.
    assert int(resumed.a_optimizer.iterations.numpy()) == 2
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in resumed.get_weights()]),
        np.concatenate([w.ravel() for w in uninterrupted.get_weights()]),
        rtol=0,
        atol=1e-6,
    )


def _two_tower_step_weighting_b(model, data):
    """The two-tower step, with the sample weights in tower b's loss only."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    weight = ops.reshape(ops.convert_to_tensor(sample_weight), (-1, 1))
    logs = {}
    for name, tower, optimizer, weights in (
        ("a", model.tower_a, model.a_optimizer, ops.ones_like(weight)),
        ("b", model.tower_b, model.b_optimizer, weight),
    ):
        variables = tower.trainable_variables

        def loss_fn(tower=tower, weights=weights):
            return ops.mean(ops.abs(tower(x, training=True) - y) * weights)

        logs[name], gradients = gradients_of(model, loss_fn, variables)
        with _no_grad():
            optimizer.apply_gradients(zip(gradients, variables))
    return logs


class PlainTowersWeightingB(PlainTowers):
    def train_step(self, data):
        return _two_tower_step_weighting_b(self, data)


class AccumTowersWeightingB(accum_keras.AccumulatingModel, PlainTowersWeightingB):
    pass


@needs_tf_or_torch
def test_a_non_finite_gradient_of_the_second_optimizer_skips_the_window_for_both():
    # A NaN sample weight in window 2 reaches tower b's gradient only; the
    # reference is the plain step on the big batch without that window.
    x, y = regression_data(samples=64)
    sample_weight = np.ones(64, "float32")
    sample_weight[K * MICRO + 3] = np.nan
    accumulating = _towers(AccumTowersWeightingB, accumulation_steps=K, skip_nonfinite_updates=True)
    plain = _towers(PlainTowersWeightingB)
    plain.set_weights(accumulating.get_weights())
    accumulating.fit(x, y, sample_weight=sample_weight, batch_size=MICRO, shuffle=False, verbose=0)
    kept = np.r_[0 : K * MICRO, 2 * K * MICRO : 64]
    plain.fit(
        x[kept],
        y[kept],
        sample_weight=sample_weight[kept],
        batch_size=MICRO * K,
        shuffle=False,
        verbose=0,
    )
    assert int(accumulating._accumulation_state.skipped_updates.numpy()) == 1
    for name in ("a_optimizer", "b_optimizer"):
        assert int(getattr(accumulating, name).iterations.numpy()) == 3
        assert int(getattr(plain, name).iterations.numpy()) == 3
    assert max_relative_difference(accumulating.get_weights(), plain.get_weights()) < 2e-6


@needs_tf_or_torch
def test_a_two_optimizer_window_loaded_into_a_one_optimizer_model_is_refused_whole(tmp_path):
    x, y = regression_data(samples=2 * MICRO)
    saved = _towers(AccumTowers, stateless=True, accumulation_steps=K)
    for start in range(0, 2 * MICRO, MICRO):
        saved.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    path = str(tmp_path / "towers.weights.h5")
    saved.save_weights(path)
    loaded = _towers(AccumTowers, accumulation_steps=K)
    shared = keras.optimizers.SGD(0.1)
    loaded.compile(a_optimizer=shared, b_optimizer=shared)  # one optimizer for both towers
    loaded.load_weights(path)
    assert loaded.pending_micro_steps == 2
    before = loaded.get_weights()
    with pytest.raises(RuntimeError, match="fewer optimizers now"):
        loaded.apply_pending_window()
    # Neither tower was updated, and the window is still there to discard.
    for weight, start in zip(loaded.get_weights(), before):
        np.testing.assert_array_equal(weight, start)
    assert loaded.discard_pending_window() == 2


class TowerAOnly(accum_keras.AccumulatingModel, PlainTowers):
    """A step that trains tower a only: tower b's variables get no gradient."""

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
        variables = self.tower_a.trainable_variables

        def loss_fn():
            return ops.mean(ops.abs(self.tower_a(x, training=True) - y))

        loss, gradients = gradients_of(self, loss_fn, variables)
        with _no_grad():
            self.a_optimizer.apply(gradients, variables)
        return {"loss": loss}


def _tower_a_only():
    keras.utils.set_random_seed(1)
    model = TowerAOnly(accumulation_steps=K)
    model.build((None, 5))
    # Weight decay would shrink tower b if it were handed to an optimizer.
    model.compile(
        a_optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.5),
        b_optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.5),
    )
    return model


@needs_tf_or_torch
def test_a_loaded_window_of_a_step_updating_some_variables_is_applied_to_those_only(tmp_path):
    x, y = regression_data(samples=6 * MICRO)
    batches = [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, 6 * MICRO, MICRO)]
    uninterrupted = _tower_a_only()
    interrupted = _tower_a_only()
    for batch in batches[:2]:
        uninterrupted.train_on_batch(*batch)
        interrupted.train_on_batch(*batch)
    path = str(tmp_path / "tower_a_only.weights.h5")
    interrupted.save_weights(path)
    resumed = _tower_a_only()
    resumed.load_weights(path)
    # The loaded window is applied before any step ran in this model.
    assert resumed.apply_pending_window()
    uninterrupted.apply_pending_window()
    for batch in batches[2:]:
        uninterrupted.train_on_batch(*batch)
        resumed.train_on_batch(*batch)
    assert int(resumed.a_optimizer.iterations.numpy()) == 2
    assert int(resumed.b_optimizer.iterations.numpy()) == 0
    np.testing.assert_array_equal(
        resumed.tower_b.get_weights()[0], interrupted.tower_b.get_weights()[0]
    )
    assert max_relative_difference(resumed.get_weights(), uninterrupted.get_weights()) < 1e-6


# -- a GAN: the generator's step reads the discriminator ---------------------


class GAN(accum_keras.AccumulatingModel, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = keras.Sequential([keras.layers.Dense(5)])
        self.discriminator = keras.Sequential([keras.layers.Dense(1)])

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer

    def call(self, x):
        return self.discriminator(self.generator(x))

    def train_step(self, data):
        real, noise = data
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        d_vars = self.discriminator.trainable_variables
        g_vars = self.generator.trainable_variables

        def d_loss():
            fake = self.generator(noise)
            return bce(ops.ones_like(real[:, :1]), self.discriminator(real)) + bce(
                ops.zeros_like(real[:, :1]), self.discriminator(fake)
            )

        d_value, d_grads = gradients_of(self, d_loss, d_vars)
        with _no_grad():
            self.d_optimizer.apply(d_grads, d_vars)

        def g_loss():
            return bce(ops.ones_like(real[:, :1]), self.discriminator(self.generator(noise)))

        g_value, g_grads = gradients_of(self, g_loss, g_vars)
        with _no_grad():
            self.g_optimizer.apply(g_grads, g_vars)
        return {"d_loss": d_value, "g_loss": g_value}


@needs_tf_or_torch
def test_gan_updates_both_networks_once_per_window():
    real, noise = regression_data(samples=64, outputs=5)
    gan = GAN(accumulation_steps=K)
    gan(np.zeros((1, 5), "float32"))
    gan.compile(d_optimizer=keras.optimizers.Adam(1e-3), g_optimizer=keras.optimizers.Adam(1e-3))
    gan.fit(real, noise, batch_size=MICRO, epochs=2, verbose=0)
    # 2 epochs of 4 windows each, not 32 updates per network.
    assert int(gan.d_optimizer.iterations.numpy()) == 8
    assert int(gan.g_optimizer.iterations.numpy()) == 8


# -- a step that delegates to the mixin --------------------------------------


class Rescaling(accum_keras.AccumulatingModel, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, *args):
        *state, data = args
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        return super().train_step(*state, (x * 2.0, y))


def _rescaling(plain_twin=False, accumulation_steps=K):
    """A compiled `Rescaling` model, and a plain Keras twin with its weights if asked."""
    model = Rescaling(accumulation_steps=accumulation_steps)
    model(np.zeros((1, 5), "float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    if not plain_twin:
        return model
    inputs = keras.Input((5,))
    plain = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    plain.set_weights(model.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model, plain


def test_a_step_that_calls_super_counts_each_sample_once_at_k_1():
    x, y = regression_data(samples=40)
    model = _rescaling(accumulation_steps=1)
    callback = accum_keras.AccumulationCallback(lr_scaling=None)
    model.fit(x, y, batch_size=MICRO, verbose=0, callbacks=[callback])
    assert model._accumulation_state.total_samples_seen() == 40
    assert model.history.history["effective_batch_size"] == [float(MICRO)]


def test_a_step_that_calls_super_uses_the_built_in_accumulation():
    x, y = regression_data(samples=40)
    keras.utils.set_random_seed(0)
    accumulating, plain = _rescaling(plain_twin=True)
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x * 2.0, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_a_loaded_window_of_a_step_that_calls_super_is_applied_as_the_built_in_one(tmp_path):
    # Found by the randomized window test: a fresh model has not run its step
    # yet, so only the checkpoint can say which step filled the window.
    x, y = regression_data(samples=2 * MICRO)
    keras.utils.set_random_seed(0)
    model, plain = _rescaling(plain_twin=True)
    for start in (0, MICRO):
        model.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    path = str(tmp_path / "window.weights.h5")
    model.save_weights(path)
    fresh = _rescaling()
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    assert fresh.pending_micro_steps == 2
    assert fresh.apply_pending_window()
    plain.train_on_batch(x * 2.0, y)
    assert_same_training(fresh, plain)


# -- what cannot be accumulated fails before any update ----------------------


class AssignsWeights(accum_keras.AccumulatingModel, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, _ = data
        self.dense.kernel.assign(self.dense.kernel * 0.5)
        return {"out": ops.mean(self(x))}


class AppliesTwice(StepBeforeMixin):
    def train_step(self, data):
        _mean_squared_error_step(self, data)
        return _mean_squared_error_step(self, data)


@needs_tf_or_torch
@pytest.mark.parametrize(
    "cls, error, words",
    [
        (AssignsWeights, ValueError, "handed no gradients to an optimizer"),
        (AppliesTwice, NotImplementedError, "same optimizer twice"),
    ],
)
def test_steps_that_cannot_be_accumulated_raise_at_the_first_step(cls, error, words):
    x, y = regression_data(samples=16)
    model = cls(accumulation_steps=K)
    model(np.zeros((1, 5), "float32"))
    model.compile(optimizer="sgd")
    before = model.get_weights()
    with pytest.raises(error, match=words) as raised:
        model.fit(x, y, batch_size=MICRO, verbose=0)
    assert "train_step" in str(raised.value)
    assert int(model.optimizer.iterations.numpy()) == 0
    if BACKEND == "tensorflow":
        # Raised while fit() traced the step: nothing of it ran.
        for old, new in zip(before, model.get_weights()):
            np.testing.assert_array_equal(old, new)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX refuses custom steps; the others accumulate")
def test_jax_refuses_a_custom_step_before_any_update():
    x, y = regression_data(samples=16)
    model = StepBeforeMixin(accumulation_steps=K)
    model(np.zeros((1, 5), "float32"))
    model.compile(optimizer="sgd")
    before = model.get_weights()
    with pytest.raises(NotImplementedError, match="StepBeforeMixin.train_step"):
        model.fit(x, y, batch_size=MICRO, verbose=0)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
