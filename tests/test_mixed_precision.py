"""Mixed precision: float32 accumulators, loss-scale aware, non-finite windows skipped and counted."""

import keras
import numpy as np
import pytest
from helpers import functional_twins, max_relative_difference, regression_data

import accum_keras

K, MICRO = 4, 4


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


def layers():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    outputs = keras.layers.Dense(1, dtype="float32")(hidden)
    return inputs, outputs


def fit_pair(x, y, epochs=2):
    accumulating, plain = functional_twins(layers, K)
    for model in (accumulating, plain):
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    accumulating.fit(x, y, batch_size=MICRO, epochs=epochs, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=epochs, shuffle=False, verbose=0)
    return accumulating, plain


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_accumulators_are_float32_and_training_matches_the_big_batch(policy):
    x, y = regression_data(samples=60)
    accumulating, plain = fit_pair(x, y)
    state = accumulating._accumulation_state
    assert all(a.dtype == "float32" for a in state.gradients)
    if policy == "mixed_float16":
        assert isinstance(accumulating.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(accumulating.optimizer.iterations.numpy()) == int(plain.optimizer.iterations.numpy())
    # Half-precision matmuls sum the big batch in one pass and the micro-batches
    # in four, so the gradients differ by half-precision round-off. Measured
    # after 8 updates: 2.1e-4 (float16), 1.5e-3 (bfloat16, 8-bit mantissa);
    # float32 gives 1.2e-7. The bounds leave a factor of ~10.
    tolerance = {"mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}[policy]
    assert max_relative_difference(accumulating.get_weights(), plain.get_weights()) < tolerance


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_float16_accumulation_stays_close_to_float32_accumulation(policy):
    x, y = regression_data(samples=60)
    half, _ = fit_pair(x, y)
    keras.config.set_dtype_policy("float32")
    full, _ = fit_pair(x, y)
    # Measured: 3.0e-4 after 8 updates.
    assert max_relative_difference(half.get_weights(), full.get_weights()) < 5e-3


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_a_window_with_a_non_finite_gradient_is_skipped_and_counted(policy):
    x, y = regression_data(samples=32)
    x[5, 0] = np.inf  # micro-batch 1 of the first window
    keras.utils.set_random_seed(0)
    model = accum_keras.Model(*layers(), accumulation_steps=K)
    model.compile(keras.optimizers.SGD(0.05), loss="mse")
    initial = [w.copy() for w in model.get_weights()]
    # The optimizer is built by fit(); its scale starts at the configured one.
    start_scale = model.optimizer.initial_scale
    model.fit(x[:16], y[:16], batch_size=MICRO, shuffle=False, verbose=0)
    state = model._accumulation_state
    assert int(state.skipped_updates.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == 0
    np.testing.assert_array_equal(model.get_weights()[0], initial[0])
    assert model.pending_micro_steps == 0  # nothing carried into the next window
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert scale == start_scale / 2
    # The next window trains normally.
    model.fit(x[16:], y[16:], batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    assert int(state.skipped_updates.numpy()) == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_skipped_updates_are_logged(policy):
    x, y = regression_data(samples=16)
    x[0, 0] = np.inf
    keras.utils.set_random_seed(0)
    model = accum_keras.Model(*layers(), accumulation_steps=K)
    model.compile(keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(
        x,
        y,
        batch_size=MICRO,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)],
    ).history
    assert history["skipped_updates"] == [1]


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_skip_nonfinite_updates_with_a_loss_scale_optimizer_skips_once_and_halves_the_scale(
    policy,
):
    # Both would skip the window: it is counted once, and the loss-scale
    # optimizer still sees the non-finite gradient (its scale halves).
    x, y = regression_data(samples=32)
    x[5, 0] = np.inf  # the first window
    keras.utils.set_random_seed(0)
    model = accum_keras.Model(*layers(), accumulation_steps=K, skip_nonfinite_updates=True)
    model.compile(keras.optimizers.SGD(0.05), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    initial = model.get_weights()
    model.fit(x[:16], y[:16], batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model._accumulation_state.skipped_updates.numpy()) == 1
    assert float(model.optimizer.dynamic_scale.numpy()) == model.optimizer.initial_scale / 2
    assert int(model.optimizer.iterations.numpy()) == 0
    for weight, start in zip(model.get_weights(), initial):
        np.testing.assert_array_equal(weight, start)
