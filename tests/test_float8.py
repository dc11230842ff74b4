"""Keras' float8 training and the int8 + LoRA recipe, accumulated.

``model.quantize("float8")`` gives each `Dense` scales and amax histories
flagged ``overwrite_with_gradient``: their "gradient" is their new value,
which Keras' optimizer assigns instead of taking a step. Accumulated, such a
variable must end its window with the value the big batch gives it (the
window's element-wise maximum), never summed, scaled or optimized. The
reference is plain Keras on the big batch (k micro-batches at once) from the
same weights.

Tolerances, and why they are not all float32 round-off:

- After one window the scales and histories are *equal* to the big batch's:
  each is a maximum of values the big batch computes too, or a shift of the
  same starting history.
- Kernels get the straight-through gradient of float8's quantize-dequantize,
  exact to float32 round-off (`RTOL`). Keras' float8 `Dense` rounds its bias
  to bfloat16 in the forward pass, so a bias's gradient is rounded to
  bfloat16 once per backward pass: per micro-batch here, once for the big
  batch; its update is compared to ``BFLOAT16_RTOL`` of its size.
- Over several windows a float32-sized difference can move a value across a
  float8 rounding boundary of the next forward pass, so the weights, scales
  and histories are compared to ``FLOAT8_RTOL``, half of float8 e4m3's
  relative step (2**-3). Summing the scales and histories instead (the bug
  this file specifies) makes them k times too large.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import RTOL, train_step_applying_its_gradients

import accum_keras

K, MICRO, FEATURES, OUTPUTS = 4, 8, 6, 2
# Four bfloat16 roundings (2**-8 relative each) of the micro-batches' bias
# gradients, one of the big batch's.
BFLOAT16_RTOL = 2**-6
FLOAT8_RTOL = 2**-4


def dense_stack(model_class=keras.Model, **kwargs) -> keras.Model:
    """Three `Dense` layers, float8-quantized, the same initial weights every call."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    # Named, so that variable paths match across the models of a test.
    hidden = keras.layers.Dense(16, activation="relu", name="first")(inputs)
    hidden = keras.layers.Dense(8, activation="tanh", name="second")(hidden)
    model = model_class(inputs, keras.layers.Dense(OUTPUTS, name="last")(hidden), **kwargs)
    model.quantize("float8")
    return model


def float8_twins(model_class=accum_keras.Model, optimizer=lambda: keras.optimizers.SGD(0.1)):
    accumulating = dense_stack(model_class, accumulation_steps=K)
    plain = dense_stack()
    plain.set_weights(accumulating.get_weights())
    accumulating.compile(optimizer(), loss="mse")
    plain.compile(optimizer(), loss="mse")
    return accumulating, plain


def data(micro_batches: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(micro_batches * MICRO, FEATURES)).astype("float32")
    y = rng.normal(size=(micro_batches * MICRO, OUTPUTS)).astype("float32")
    return x, y


def overwritten(model) -> list:
    return [v for v in model.weights if getattr(v, "overwrite_with_gradient", False)]


def optimized(model) -> list:
    return [v for v in model.trainable_weights if not getattr(v, "overwrite_with_gradient", False)]


def relative(a, b) -> float:
    """Largest difference of ``a`` from the reference ``b``, relative to ``b``'s largest entry."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-30)


def assert_values(accumulating, plain, rtol: float, what: str = "") -> None:
    for ours, reference in zip(accumulating, plain, strict=True):
        difference = relative(ours, reference)
        assert difference <= rtol, f"{what}{ours.path} differs by {difference:.3g} (relative)"


def assert_one_window_of_the_big_batch(accumulating, plain, initial) -> None:
    """Scales and histories equal, kernels to float32 round-off, bias updates to bfloat16's."""
    assert int(accumulating.optimizer.iterations.numpy()) == int(plain.optimizer.iterations.numpy())
    for ours, reference in zip(overwritten(accumulating), overwritten(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference), err_msg=ours.path)
    start = dict(zip([v.path for v in plain.weights], initial))
    for ours, reference in zip(optimized(accumulating), optimized(plain), strict=True):
        before = start[reference.path]
        if reference.path.endswith("bias"):
            difference = relative(np.asarray(ours) - before, np.asarray(reference) - before)
            assert difference <= BFLOAT16_RTOL, f"{ours.path}'s update differs by {difference:.3g}"
        else:
            assert relative(ours, reference) <= RTOL, ours.path


def test_a_window_gives_float8_scales_and_histories_the_big_batchs_values():
    accumulating, plain = float8_twins()
    initial = plain.get_weights()
    x, y = data(K)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert_one_window_of_the_big_batch(accumulating, plain, initial)


def test_float8_training_follows_the_big_batch_to_float8_round_off():
    accumulating, plain = float8_twins(optimizer=lambda: keras.optimizers.Adam(1e-2))
    x, y = data(2 * K)
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 4
    assert_values(overwritten(accumulating), overwritten(plain), FLOAT8_RTOL)
    assert_values(optimized(accumulating), optimized(plain), FLOAT8_RTOL)


def test_a_short_last_window_keeps_float8_values_unsummed():
    # One window of K micro-batches, then one of 2 closed at the epoch's end.
    # The short window's backward pass is normalized as a full window's
    # (docs/how-it-works.md), so its output-gradient amax is 2 / K of the
    # big batch's; every other scale and history is the big batch's.
    short = 2
    accumulating, plain = float8_twins()
    x, y = data(K + short)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 2
    for ours, reference in zip(overwritten(accumulating), overwritten(plain), strict=True):
        ours, expected = np.asarray(ours), np.asarray(reference).copy()
        if reference.path.endswith("outputs_grad_amax_history"):
            # The newest entry (Keras writes it at index 0) is the short window's.
            expected[0] *= short / K
        np.testing.assert_allclose(ours, expected, rtol=BFLOAT16_RTOL, err_msg=reference.path)
    assert_values(optimized(accumulating), optimized(plain), FLOAT8_RTOL)


def test_a_mid_window_save_resumes_float8_training_exactly(tmp_path):
    x, y = data(2 * K)
    uninterrupted, _ = float8_twins()
    interrupted, _ = float8_twins()
    uninterrupted.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    for step in range(K + 2):
        batch = slice(step * MICRO, (step + 1) * MICRO)
        interrupted.train_on_batch(x[batch], y[batch])
    path = tmp_path / "float8_mid_window.keras"
    interrupted.save(path)

    resumed = keras.models.load_model(path)
    assert resumed.pending_micro_steps == 2
    with pytest.warns(UserWarning, match="pending in an open window"):
        resumed.fit(
            x[(K + 2) * MICRO :], y[(K + 2) * MICRO :], batch_size=MICRO, shuffle=False, verbose=0
        )
    # A loaded float8 layer lists its scales before its kernel: match by path.
    by_path = {v.path: v for v in resumed.weights}
    assert_values([by_path[v.path] for v in uninterrupted.weights], uninterrupted.weights, RTOL)


def test_half_precision_accumulators_keep_float8_values_in_their_own_dtype():
    accumulating = dense_stack(
        accum_keras.Model, accumulation_steps=K, accumulator_dtype="bfloat16"
    )
    plain = dense_stack()
    plain.set_weights(accumulating.get_weights())
    initial = plain.get_weights()
    for model in (accumulating, plain):
        model.compile(keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(K)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    state = accumulating._accumulation_state
    for accumulator, variable in zip(state.gradients, state.accumulated_variables):
        flagged = getattr(variable, "overwrite_with_gradient", False)
        assert keras.backend.standardize_dtype(accumulator.dtype) == (
            "float32" if flagged else "bfloat16"
        ), variable.path
    for ours, reference in zip(overwritten(accumulating), overwritten(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference), err_msg=ours.path)
    del initial


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="a stateful user-written step (TensorFlow, PyTorch)"
)
def test_a_user_written_step_keeps_float8_values_unsummed():
    # The user's step differentiates each micro-batch's own mean loss, so its
    # output gradients are K times the big batch's per-sample ones (their
    # amax too); every scale and the forward histories are the big batch's.
    class UserStep(accum_keras.Model):
        def train_step(self, data):
            return train_step_applying_its_gradients(self, data)

    accumulating, plain = float8_twins(model_class=UserStep)
    x, y = data(K)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 1
    for ours, reference in zip(overwritten(accumulating), overwritten(plain), strict=True):
        expected = np.asarray(reference).copy()
        if reference.path.endswith("outputs_grad_amax_history"):
            expected[0] *= K
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=RTOL, err_msg=reference.path)
    assert_values(optimized(accumulating), optimized(plain), FLOAT8_RTOL)


def lora_stack(model_class=keras.Model, **kwargs) -> keras.Model:
    """The int8 + LoRA fine-tuning recipe: quantize, then train only rank-2 factors."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = model_class(inputs, keras.layers.Dense(OUTPUTS)(hidden), **kwargs)
    model.quantize("int8")
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.enable_lora(2)
            # LoRA's second factor starts at zero: give it values, so that
            # both factors get a gradient in the first window.
            layer.lora_kernel_b.assign(
                np.random.default_rng(2).normal(size=layer.lora_kernel_b.shape) * 0.1
            )
    return model


def test_int8_lora_fine_tuning_is_the_big_batchs_and_accumulates_only_the_factors():
    accumulating = lora_stack(accum_keras.Model, accumulation_steps=K)
    plain = lora_stack()
    plain.set_weights(accumulating.get_weights())
    for model in (accumulating, plain):
        model.compile(keras.optimizers.Adam(1e-2), loss="mse")
    x, y = data(2 * K)
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 4
    assert_values(accumulating.weights, plain.weights, RTOL)
    accumulated = accumulating._accumulation_state.accumulated_variables
    assert [v.path for v in accumulated] == [v.path for v in accumulating.trainable_variables]
    assert all("lora_kernel" in v.path or v.path.endswith("bias") for v in accumulated)
    assert any("lora_kernel_a" in v.path for v in accumulated)
