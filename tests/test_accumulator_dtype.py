"""``accumulator_dtype``: accumulators below one float32 copy, rounded exactly as specified.

The reference for the rounding is a NumPy simulation of the rule the docs
state: each micro-batch's sum ``accumulator + gradient`` is formed exactly (in
float32) and rounded once to the accumulator's dtype, and the window is scaled
in float32 and cast once to the variable's dtype. The data make every gradient
exactly representable in bfloat16 (small integers times powers of two, a
linear model starting at zero), so the backends' gradients are exact and the
simulation predicts the weights bit for bit; only the accumulators round.
"""

import os

import keras
import ml_dtypes
import numpy as np
import pytest

import accum_keras

K, MICRO, FEATURES = 16, 4, 6


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


def linear_model(accumulator_dtype="float32", k=K, optimizer=None, **kwargs):
    """Zero-initialized ``y = x W``: one SGD(1) window leaves ``W = -gradient``."""
    inputs = keras.Input((FEATURES,))
    outputs = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inputs)
    model = accum_keras.Model(
        inputs, outputs, accumulation_steps=k, accumulator_dtype=accumulator_dtype, **kwargs
    )
    model.compile(optimizer or keras.optimizers.SGD(1.0), loss="mse")
    return model


def integer_data(high=8, seed=0):
    """Non-negative integers below ``high``, for one window.

    With ``high=8`` every micro-batch's gradient is exact in bfloat16 (so a
    bfloat16 model computes it exactly) and their sums are not; with
    ``high=32`` the gradients themselves need up to 12 bits (exact in float32
    only), which tells one rounding of the sum from rounding the gradient
    first. All gradients have one sign, so ``sum |g_n| = |sum g_n|``.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, high, size=(K * MICRO, FEATURES)).astype("float32")
    y = rng.integers(1, high, size=(K * MICRO, 1)).astype("float32")
    return x, y


def simulated_kernel(x, y, accumulator_dtype, variable_dtype):
    """The kernel after one window of SGD(1) from zero, by the documented rounding rule."""
    # MSE of y = x W at W = 0, weighted by D_n / D_ref = 1 / K: the gradient
    # of micro-batch n is -2 x_n^T y_n / (K * MICRO), a power-of-two multiple
    # of an integer (exact in float32, and in bfloat16 for `integer_data(8)`).
    accumulator = np.zeros((FEATURES, 1)).astype(accumulator_dtype)
    for n in range(K):
        rows = slice(n * MICRO, (n + 1) * MICRO)
        gradient = -2.0 * x[rows].astype("float64").T @ y[rows] / (K * MICRO)
        exact_sum = accumulator.astype("float64") + gradient  # exact in float32 too
        accumulator = exact_sum.astype(accumulator_dtype)
    window_gradient = accumulator.astype("float64").astype(variable_dtype)  # D_ref / T = 1
    return -window_gradient.astype("float64")


def _numpy_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def kernel_of(model):
    return np.asarray(model.get_weights()[0], "float64")


@pytest.mark.parametrize(
    "policy", ["float32", "bfloat16", "mixed_bfloat16", "mixed_float16"], indirect=True
)
@pytest.mark.parametrize("choice", ["float32", "bfloat16", "float16", "variable"])
def test_accumulators_have_the_chosen_dtype(policy, choice):
    # "variable" follows the variables' dtype, which mixed policies keep in
    # float32 (their compute dtype is half precision).
    variable_dtype = keras.DTypePolicy(policy).variable_dtype
    model = linear_model(choice)
    model.build((None, FEATURES))
    model.make_train_function()
    expected = variable_dtype if choice == "variable" else choice
    assert model.accumulator_dtype == choice
    state = model._accumulation_state
    assert [keras.backend.standardize_dtype(a.dtype) for a in state.gradients] == [expected]
    assert keras.backend.standardize_dtype(model.trainable_variables[0].dtype) == variable_dtype


@pytest.mark.parametrize(
    "policy, choice",
    [
        ("float32", "float32"),
        ("float32", "bfloat16"),
        ("float32", "float16"),
        ("bfloat16", "float32"),
        ("bfloat16", "variable"),
    ],
    indirect=["policy"],
)
def test_one_window_rounds_exactly_as_documented(policy, choice):
    # A bfloat16 model computes its gradients in bfloat16: keep them exact.
    x, y = integer_data(high=32 if policy == "float32" else 8)
    model = linear_model(choice)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    accumulator_dtype = policy if choice == "variable" else choice
    expected = simulated_kernel(x, y, _numpy_dtype(accumulator_dtype), _numpy_dtype(policy))
    np.testing.assert_array_equal(kernel_of(model), expected)
    if accumulator_dtype == "bfloat16":
        # The data make bfloat16 accumulators round (the test would not see
        # float32 accumulators otherwise); the error stays within the
        # recursive-summation bound K * u * sum |g_n|, u = 2**-8, plus the
        # final cast of the window to the variable's dtype.
        exact = simulated_kernel(x, y, np.float64, np.float64)
        error = np.abs(kernel_of(model) - exact)
        assert error.max() > 0
        bound = K * 2.0**-8 * np.abs(exact) + 2.0**-8 * np.abs(exact)
        assert np.all(error <= bound)


@pytest.mark.parametrize("policy", ["bfloat16"], indirect=True)
@pytest.mark.parametrize("scaling", ["factor", "loss_scale_optimizer"])
def test_accumulators_of_the_variables_half_dtype_get_the_loss_scale_taken_off(policy, scaling):
    # The accumulator has the variable's own dtype, so PyTorch could let
    # autograd add into it in place; the rule is still the half-precision
    # one: each micro-batch's gradient unscaled, summed in float32, rounded
    # once. A power-of-two scale changes no rounding: the result is exact.
    x, y = integer_data(high=8)
    sgd = keras.optimizers.SGD(1.0, loss_scale_factor=4.0 if scaling == "factor" else None)
    optimizer = (
        sgd if scaling == "factor" else keras.optimizers.LossScaleOptimizer(sgd, initial_scale=4.0)
    )
    model = linear_model("variable", optimizer=optimizer)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    expected = simulated_kernel(x, y, ml_dtypes.bfloat16, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(kernel_of(model), expected)


@pytest.mark.parametrize("policy", ["bfloat16"], indirect=True)
def test_float32_accumulators_on_a_bfloat16_model_are_the_default(policy):
    x, y = integer_data()
    default = linear_model()
    default.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert default.accumulator_dtype == "float32"
    # A float32 sum of the window, rounded once to the bfloat16 weights: not
    # what bfloat16 accumulators give on these data.
    expected = simulated_kernel(x, y, np.float32, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(kernel_of(default), expected)
    assert not np.array_equal(
        expected, simulated_kernel(x, y, ml_dtypes.bfloat16, ml_dtypes.bfloat16)
    )


@pytest.mark.parametrize(
    "value",
    ["fp16", "bf16", "float64", "Float32", None, 16, np.float32, np.dtype("float16"), "int8"],
)
def test_bad_accumulator_dtypes_are_refused_early(value):
    with pytest.raises(ValueError, match=r"`accumulator_dtype` must be one of 'float32'"):
        linear_model(value)


def test_from_config_refuses_a_bad_accumulator_dtype():
    config = linear_model("bfloat16").get_config()
    config["accumulator_dtype"] = "fp8"
    with pytest.raises(ValueError, match="accumulator_dtype='fp8'"):
        accum_keras.Model.from_config(config)


def test_accumulate_passes_the_dtype_and_refuses_to_change_it():
    inputs = keras.Input((FEATURES,))
    base = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    twin = accum_keras.accumulate(base, 4, accumulator_dtype="bfloat16")
    assert twin.accumulator_dtype == "bfloat16"
    assert accum_keras.accumulate(base, 4).accumulator_dtype == "float32"
    assert accum_keras.accumulate(twin, 8) is twin
    assert accum_keras.accumulate(twin, 8, accumulator_dtype="bfloat16") is twin
    with pytest.raises(ValueError, match="cannot change the options of an accumulating model"):
        accum_keras.accumulate(twin, 8, accumulator_dtype="float32")
    with pytest.raises(ValueError, match="`accumulator_dtype` must be one of"):
        accum_keras.accumulate(base, 4, accumulator_dtype="half")


def test_config_keeps_the_dtype_and_float32_stays_out_of_it():
    assert "accumulator_dtype" not in linear_model().get_config()
    config = linear_model("variable").get_config()
    assert config["accumulator_dtype"] == "variable"
    assert accum_keras.Model.from_config(config).accumulator_dtype == "variable"


def test_clones_and_conversions_keep_the_dtype():
    model = linear_model("bfloat16")
    assert accum_keras.clone_model(model).accumulator_dtype == "bfloat16"
    sequential = accum_keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.BatchNormalization(), keras.layers.Dense(1)],
        accumulation_steps=4,
        accumulator_dtype="float16",
    )
    converted = accum_keras.layers.convert_batch_normalization(sequential)
    assert type(converted) is accum_keras.Sequential
    assert converted.accumulator_dtype == "float16"
    assert accum_keras.clone_model(sequential).accumulator_dtype == "float16"


def test_the_dtype_is_settable_until_the_accumulators_exist():
    model = linear_model()
    model.accumulator_dtype = "bfloat16"
    x, y = integer_data()
    model.fit(x[: 2 * MICRO], y[: 2 * MICRO], batch_size=MICRO, verbose=0)
    state = model._accumulation_state
    assert [keras.backend.standardize_dtype(a.dtype) for a in state.gradients] == ["bfloat16"]
    model.accumulator_dtype = "bfloat16"  # unchanged: fine
    with pytest.raises(ValueError, match="can only be set before the accumulators exist"):
        model.accumulator_dtype = "float32"
    with pytest.raises(ValueError, match="`accumulator_dtype` must be one of"):
        model.accumulator_dtype = "half"


@pytest.mark.parametrize("policy", ["bfloat16"], indirect=True)
@pytest.mark.parametrize("fmt", ["keras", "weights.h5"])
def test_a_bfloat16_window_saved_mid_window_resumes_exactly(policy, fmt, tmp_path):
    x, y = integer_data()
    batches = [(x[n * MICRO : (n + 1) * MICRO], y[n * MICRO : (n + 1) * MICRO]) for n in range(K)]
    uninterrupted = linear_model("bfloat16")
    for batch in batches:
        uninterrupted.train_on_batch(*batch)

    interrupted = linear_model("bfloat16")
    for batch in batches[: K - 1]:
        interrupted.train_on_batch(*batch)
    path = os.path.join(tmp_path, f"window.{fmt}")
    if fmt == "keras":
        interrupted.save(path)
        resumed = keras.models.load_model(path)
    else:
        interrupted.save_weights(path)
        resumed = linear_model("bfloat16")
        resumed.build((None, FEATURES))
        resumed.load_weights(path)
    assert resumed.accumulator_dtype == "bfloat16"
    assert resumed.pending_micro_steps == K - 1
    saved = interrupted._accumulation_state.gradients[0]
    loaded = resumed._accumulation_state.gradients[0]
    assert keras.backend.standardize_dtype(loaded.dtype) == "bfloat16"
    np.testing.assert_array_equal(
        np.asarray(keras.ops.convert_to_numpy(loaded), "float32"),
        np.asarray(keras.ops.convert_to_numpy(saved), "float32"),
    )
    resumed.train_on_batch(*batches[-1])
    assert resumed.pending_micro_steps == 0
    np.testing.assert_array_equal(kernel_of(resumed), kernel_of(uninterrupted))
    # And both are the documented rounding, not merely equal to each other.
    np.testing.assert_array_equal(
        kernel_of(uninterrupted),
        simulated_kernel(x, y, ml_dtypes.bfloat16, ml_dtypes.bfloat16),
    )


class CustomStepLinear(accum_keras.AccumulatingModel, keras.Model):
    """A user-written ``train_step`` (keras.io style) on the zero-initialized linear model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = keras.ops.mean(keras.ops.square(self(x) - y))
            gradients = tape.gradient(loss, variables)
            self.optimizer.apply(gradients, variables)
        else:
            import torch

            self.zero_grad()
            loss = keras.ops.mean(keras.ops.square(self(x) - y))
            loss.backward()
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in variables], variables)
        return {"loss": loss}


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="custom train_step accumulation is not on JAX"
)
def test_a_custom_train_step_rounds_as_documented():
    x, y = integer_data(high=32)
    model = CustomStepLinear(accumulation_steps=K, accumulator_dtype="bfloat16")
    model(x[:1])
    model.compile(keras.optimizers.SGD(1.0))
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    state = model._accumulation_state
    assert [keras.backend.standardize_dtype(a.dtype) for a in state.gradients] == ["bfloat16"]
    # The custom path sums MICRO * g_n and divides by the window's samples:
    # power-of-two rescalings of the same sums, so the same rounding.
    np.testing.assert_array_equal(
        kernel_of(model), simulated_kernel(x, y, ml_dtypes.bfloat16, np.float32)
    )


TOKENS, ROWS, WIDTH = 8, 3, 4


def embedding_model(accumulator_dtype):
    """A zero-initialized ``Embedding(3, 4)`` read as the output: its gradient is sparse on TF."""
    model = accum_keras.Sequential(
        [
            keras.Input((TOKENS,), dtype="int32"),
            keras.layers.Embedding(ROWS, WIDTH, embeddings_initializer="zeros"),
        ],
        accumulation_steps=MICRO,
        accumulator_dtype=accumulator_dtype,
    )
    model.compile(keras.optimizers.SGD(1.0), loss="mse")
    return model


def repeated_tokens(seed=0):
    """Three tokens, each repeated about ten times per micro-batch, integer targets below 256.

    Each occurrence's gradient is exact in bfloat16 and float16, a token's sum
    over a micro-batch is not, nor is the window's: only the accumulator rounds.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, ROWS, size=(MICRO * MICRO, TOKENS)).astype("int32")
    targets = rng.integers(1, 256, size=(MICRO * MICRO, TOKENS, WIDTH)).astype("float32")
    return tokens, targets


def simulated_embedding_accumulator(tokens, targets, micro_batches, accumulator_dtype):
    """The accumulator after ``micro_batches`` micro-batches, by the documented rounding rule."""
    accumulator = np.zeros((ROWS, WIDTH)).astype(accumulator_dtype)
    for n in range(micro_batches):
        rows = slice(n * MICRO, (n + 1) * MICRO)
        # MSE at zero weights, weighted 1 / k: each occurrence of a token adds
        # -2 y / (MICRO * TOKENS * WIDTH * k), a power-of-two multiple of y.
        gradient = np.zeros((ROWS, WIDTH))
        np.add.at(
            gradient,
            tokens[rows].ravel(),
            -2.0 * targets[rows].reshape(-1, WIDTH) / (MICRO * TOKENS * WIDTH * MICRO),
        )
        accumulator = (accumulator.astype("float64") + gradient).astype(accumulator_dtype)
    return accumulator


@pytest.mark.parametrize("choice", ["bfloat16", "float16"])
def test_embedding_gradients_round_once_per_micro_batch(choice):
    # On TensorFlow an Embedding's gradient is sparse (one row per token
    # occurrence): its occurrences are summed in float32 too, not one by one
    # in the accumulator's precision.
    tokens, targets = repeated_tokens()
    model = embedding_model(choice)
    for n in range(MICRO - 1):
        rows = slice(n * MICRO, (n + 1) * MICRO)
        model.train_on_batch(tokens[rows], targets[rows])
    assert model.pending_micro_steps == MICRO - 1
    pending = np.asarray(
        keras.ops.convert_to_numpy(
            keras.ops.cast(model._accumulation_state.gradients[0].value, "float32")
        ),
        "float64",
    )
    expected = simulated_embedding_accumulator(tokens, targets, MICRO - 1, _numpy_dtype(choice))
    np.testing.assert_array_equal(pending, np.asarray(expected, "float64"))
    # The data make the accumulator round (else any summation order would pass).
    assert not np.array_equal(
        expected, simulated_embedding_accumulator(tokens, targets, MICRO - 1, np.float64)
    )

    rows = slice((MICRO - 1) * MICRO, MICRO * MICRO)
    model.train_on_batch(tokens[rows], targets[rows])
    assert int(model.optimizer.iterations.numpy()) == 1
    window = simulated_embedding_accumulator(tokens, targets, MICRO, _numpy_dtype(choice))
    np.testing.assert_array_equal(kernel_of(model), -np.asarray(window, "float64"))


SHORT = 3  # micro-batches of a short window of K_SHORT


@pytest.mark.parametrize("choice", ["bfloat16", "float16"])
def test_a_short_window_is_scaled_in_float32_and_rounded_once(choice):
    # A window of SHORT micro-batches out of k = SHORT + 1 is scaled by
    # k / SHORT = 4/3: a product that rounds in half precision, so scaling
    # the half-precision sum in its own dtype would round twice.
    k = SHORT + 1
    x, y = integer_data(high=32)
    x, y = x[: SHORT * MICRO], y[: SHORT * MICRO]
    model = linear_model(choice, k=k)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    accumulator = np.zeros((FEATURES, 1)).astype(_numpy_dtype(choice))
    for n in range(SHORT):
        rows = slice(n * MICRO, (n + 1) * MICRO)
        gradient = -2.0 * x[rows].astype("float64").T @ y[rows] / (k * MICRO)
        accumulator = (accumulator.astype("float64") + gradient).astype(accumulator.dtype)
    scale = np.float32(k * MICRO) / np.float32(SHORT * MICRO)  # D_ref / T, in float32
    window_gradient = accumulator.astype("float32") * scale
    np.testing.assert_array_equal(kernel_of(model), -window_gradient.astype("float64"))
    rounded_twice = (accumulator * accumulator.dtype.type(scale)).astype("float32")
    assert not np.array_equal(window_gradient, rounded_twice)


def test_float16_accumulators_under_a_loss_scale_hold_unscaled_gradients():
    # Gradients up to ~100 times the initial loss scale 2**15 exceed float16's
    # range (65504): the accumulator must receive them unscaled, in float32.
    x, y = integer_data(high=32)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1.0))
    model = linear_model("float16", optimizer=optimizer)
    start_scale = float(keras.ops.convert_to_numpy(model.optimizer.scale_loss(1.0)))
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model._accumulation_state.skipped_updates.numpy()) == 0
    assert int(model.optimizer.iterations.numpy()) == 1
    assert float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale)) == start_scale
    expected = simulated_kernel(x, y, np.float16, np.float32)
    np.testing.assert_array_equal(kernel_of(model), expected)
    assert np.abs(expected).max() * start_scale > np.finfo(np.float16).max
