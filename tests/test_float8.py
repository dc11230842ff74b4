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
import ml_dtypes
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
    """Two `Dense` layers, float8-quantized, the same initial weights every call."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    # Named, so that variable paths match across the models of a test.
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    model = model_class(inputs, keras.layers.Dense(OUTPUTS, name="last")(hidden), **kwargs)
    model.quantize("float8")
    return model


def compiled(model, optimizer=None) -> keras.Model:
    model.compile(optimizer or keras.optimizers.SGD(0.1), loss="mse")
    return model


def accumulating_stack(model_class=accum_keras.Model, **kwargs) -> keras.Model:
    return dense_stack(model_class, accumulation_steps=K, **kwargs)


def data(micro_batches: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(micro_batches * MICRO, FEATURES)).astype("float32")
    y = rng.normal(size=(micro_batches * MICRO, OUTPUTS)).astype("float32")
    return x, y


def values(variables) -> dict:
    return {v.path: np.asarray(v) for v in variables}


@pytest.fixture(scope="module")
def big_batch():
    """Plain Keras after one SGD step on the big batch: ``(initial, trained)`` values by path."""
    plain = compiled(dense_stack())
    initial = values(plain.weights)
    x, y = data(K)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    return initial, values(plain.weights)


def is_overwritten(variable) -> bool:
    return bool(getattr(variable, "overwrite_with_gradient", False))


def relative(a, b) -> float:
    """Largest difference of ``a`` from the reference ``b``, relative to ``b``'s largest entry."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-30)


def assert_close(model, reference: dict, rtol: float, expected=lambda variable, value: value):
    """Every weight of ``model`` within ``rtol`` of ``expected(variable, reference value)``."""
    for variable in model.weights:
        wanted = expected(variable, reference[variable.path].copy())
        difference = relative(variable, wanted)
        assert difference <= rtol, f"{variable.path} differs by {difference:.3g} (relative)"


def assert_one_window_of_the_big_batch(model, big_batch) -> None:
    """Scales and histories equal, kernels to float32 round-off, bias updates to bfloat16's."""
    initial, trained = big_batch
    assert int(model.optimizer.iterations.numpy()) == 1
    for variable in model.weights:
        ours, reference = np.asarray(variable), trained[variable.path]
        if is_overwritten(variable):
            np.testing.assert_array_equal(ours, reference, err_msg=variable.path)
        elif variable.path.endswith("bias"):
            before = initial[variable.path]
            difference = relative(ours - before, reference - before)
            assert difference <= BFLOAT16_RTOL, f"{variable.path}'s update: {difference:.3g}"
        else:
            assert relative(ours, reference) <= RTOL, variable.path


def test_a_window_gives_float8_scales_and_histories_the_big_batchs_values(big_batch):
    model = compiled(accumulating_stack())
    x, y = data(K)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert_one_window_of_the_big_batch(model, big_batch)


def test_a_loss_scale_optimizer_leaves_float8_values_unscaled():
    # Both models scale the loss (so the output-gradient amax holds the loss
    # scale in both); the values handed to the optimizer are not unscaled.
    def optimizer():
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))

    model = compiled(accumulating_stack(), optimizer())
    plain = compiled(dense_stack(), optimizer())
    initial = values(plain.weights)
    x, y = data(K)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert_one_window_of_the_big_batch(model, (initial, values(plain.weights)))


def test_half_precision_accumulators_keep_float8_values_in_their_own_dtype(big_batch):
    model = compiled(accumulating_stack(accumulator_dtype="bfloat16"))
    x, y = data(K)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    state = model._accumulation_state
    for accumulator, variable in zip(state.gradients, state.accumulated_variables):
        wanted = "float32" if is_overwritten(variable) else "bfloat16"
        assert keras.backend.standardize_dtype(accumulator.dtype) == wanted, variable.path
    _, trained = big_batch
    for variable in model.weights:
        if is_overwritten(variable):
            np.testing.assert_array_equal(np.asarray(variable), trained[variable.path])


def test_float8_training_follows_the_big_batch_to_float8_round_off():
    # SGD: a weight's difference is its gradients' (Adam would blow a
    # round-off difference of a near-zero gradient up to a step of its own).
    accumulating = compiled(accumulating_stack())
    plain = compiled(dense_stack())
    x, y = data(2 * K)
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 4
    assert_close(accumulating, values(plain.weights), FLOAT8_RTOL)


def test_a_short_last_window_keeps_float8_values_unsummed():
    # A window of K micro-batches, then one of 2 closed at the epoch's end.
    # The short window's backward pass is normalized as a full window's
    # (docs/how-it-works.md), so the output-gradient amax it records is
    # 2 / K of the big batch's.
    short = 2
    accumulating = compiled(accumulating_stack())
    plain = compiled(dense_stack())
    x, y = data(K + short)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 2

    def expected(variable, value):
        if variable.path.endswith("outputs_grad_amax_history"):
            value[0] *= short / K  # Keras writes the newest entry at index 0.
        return value

    assert_close(accumulating, values(plain.weights), FLOAT8_RTOL, expected)


def saturated_output_gradients(model, x, y) -> int:
    """How many of the last layer's output gradients plain Keras' next step on ``(x, y)`` clips.

    Keras' float8 `Dense` divides the gradient of its output by
    ``outputs_grad_scale`` (set from the amax history of earlier steps:
    delayed scaling) and clips it to float8 e5m2's largest value. With no
    activation after it, that gradient is the mean squared error's,
    ``2 (prediction - y) / size``; the forward pass it follows does not
    depend on ``training``.
    """
    prediction = keras.ops.convert_to_numpy(model(x))
    scaled = 2 * (prediction - y) / prediction.size
    scale = float(keras.ops.convert_to_numpy(model.get_layer("last").outputs_grad_scale))
    return int((np.abs(scaled / scale) > float(ml_dtypes.finfo("float8_e5m2").max)).sum())


def test_a_short_window_differs_from_plain_keras_only_where_its_delayed_scaling_saturates():
    # Two full windows set the output-gradient scales from real amaxes; then a
    # window of 2 micro-batches closes at the epoch's end. Plain Keras' short
    # batch has K / 2 times larger per-sample output gradients than the
    # window's backward passes (normalized by K micro-batches, see
    # docs/how-it-works.md) and clips some to e5m2's range. With its
    # output-gradient scales multiplied by K / 2 for that step, it rounds
    # every value as the window does (the same quotient, and K / 2 = 2 is a
    # power of two) and clips only what the window clips too: then the runs
    # agree. The newest output-gradient amax is the window's, 2 / K of plain
    # Keras'.
    short = 2
    accumulating = compiled(accumulating_stack())
    x, y = data(2 * K + short)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    full = 2 * K * MICRO

    plain = compiled(dense_stack())
    plain.fit(x[:full], y[:full], batch_size=K * MICRO, shuffle=False, verbose=0)
    after_full_windows = plain.get_weights()

    def plain_keras(output_gradient_scale_factor: float) -> tuple[int, dict]:
        """Plain Keras' short step from the state after the full windows (plain SGD: no slots)."""
        plain.set_weights(after_full_windows)
        for layer in ("hidden", "last"):
            scale = plain.get_layer(layer).outputs_grad_scale
            scale.assign(scale * output_gradient_scale_factor)
        clipped = saturated_output_gradients(plain, x[full:], y[full:])
        plain.fit(x[full:], y[full:], batch_size=K * MICRO, shuffle=False, verbose=0)
        return clipped, values(plain.weights)

    def expected(variable, value):
        if variable.path.endswith("outputs_grad_amax_history"):
            value[0] *= short / K
        return value

    clipped, clipping = plain_keras(1.0)
    assert clipped > 0, "plain Keras' short step should saturate e5m2 in this set-up"
    gap = relative(accumulating.get_layer("hidden").bias, clipping["hidden/bias"])
    assert gap > BFLOAT16_RTOL, f"plain Keras' clipped step is only {gap:.3g} away"

    rescaled_clipped, rescaled = plain_keras(K / short)
    assert rescaled_clipped < clipped
    assert int(accumulating.optimizer.iterations.numpy()) == 3
    # Kernels agree to ~1e-4, biases to the bfloat16 rounding of their
    # gradients (~2e-3 of the largest bias): 2**-6 bounds both.
    assert_close(accumulating, rescaled, BFLOAT16_RTOL, expected)


def test_a_mid_window_save_resumes_float8_training_exactly(tmp_path):
    x, y = data(2 * K)
    uninterrupted = compiled(accumulating_stack())
    interrupted = compiled(accumulating_stack())
    uninterrupted.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    for step in range(K + 2):
        batch = slice(step * MICRO, (step + 1) * MICRO)
        interrupted.train_on_batch(x[batch], y[batch])
    path = tmp_path / "float8_mid_window.keras"
    interrupted.save(path)

    # A loaded float8 layer lists its scales before its kernel.
    resumed = keras.models.load_model(path)
    assert resumed.pending_micro_steps == 2
    rest = slice((K + 2) * MICRO, None)
    with pytest.warns(UserWarning, match="pending in an open window"):
        resumed.fit(x[rest], y[rest], batch_size=MICRO, shuffle=False, verbose=0)
    assert_close(resumed, values(uninterrupted.weights), RTOL)


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="a stateful user-written step (TensorFlow, PyTorch)"
)
def test_a_user_written_step_keeps_float8_values_unsummed(big_batch):
    # The user's step differentiates each micro-batch's own mean loss, so its
    # output gradients are K times the big batch's per-sample ones (their
    # amax too); every scale and the forward histories are the big batch's.
    class UserStep(accum_keras.Model):
        def train_step(self, data):
            return train_step_applying_its_gradients(self, data)

    model = compiled(accumulating_stack(UserStep))
    x, y = data(K)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1

    def expected(variable, value):
        if variable.path.endswith("outputs_grad_amax_history"):
            value[0] *= K
        return value

    _, trained = big_batch
    for variable in model.weights:
        wanted = expected(variable, trained[variable.path].copy())
        rtol = RTOL if is_overwritten(variable) else FLOAT8_RTOL
        np.testing.assert_allclose(np.asarray(variable), wanted, rtol=rtol, err_msg=variable.path)


def test_convert_batch_normalization_keeps_a_float8_models_weights():
    # Keras rebuilds a float8 layer from its config with its scales before
    # its kernel: weights copied by position would not fit.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    normalized = keras.layers.BatchNormalization(name="bn")(inputs)
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(normalized)
    model = accum_keras.Model(
        inputs, keras.layers.Dense(OUTPUTS, name="last")(hidden), accumulation_steps=K
    )
    model.quantize("float8")
    compiled(model).fit(*data(K), batch_size=MICRO, shuffle=False, verbose=0)
    converted = accum_keras.layers.convert_batch_normalization(model)
    assert isinstance(converted.get_layer("bn"), accum_keras.layers.AccumBatchNormalization)
    assert converted.get_layer("hidden").quantization_mode == "float8"
    trained = values(model.weights)
    assert sorted(trained) == sorted(v.path for v in converted.weights)
    for variable in converted.weights:
        np.testing.assert_array_equal(np.asarray(variable), trained[variable.path], variable.path)


def lora_stack(model_class=keras.Model, **kwargs) -> keras.Model:
    """The int8 + LoRA fine-tuning recipe: quantize, then train only rank-2 factors."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    model = model_class(inputs, keras.layers.Dense(OUTPUTS, name="last")(hidden), **kwargs)
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
    accumulating = compiled(
        lora_stack(accum_keras.Model, accumulation_steps=K), keras.optimizers.Adam(1e-2)
    )
    plain = compiled(lora_stack(), keras.optimizers.Adam(1e-2))
    x, y = data(2 * K)
    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, epochs=2, shuffle=False, verbose=0)
    assert int(accumulating.optimizer.iterations.numpy()) == 4
    assert_close(accumulating, values(plain.weights), RTOL)
    accumulated = accumulating._accumulation_state.accumulated_variables
    assert [v.path for v in accumulated] == [v.path for v in accumulating.trainable_variables]
    assert all("lora_kernel" in v.path or v.path.endswith("bias") for v in accumulated)
    assert any("lora_kernel_a" in v.path for v in accumulated)
