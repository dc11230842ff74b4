"""AccumBatchNormalization: moving statistics of the whole window, once per window."""

import keras
import numpy as np
import pytest

import accum_keras
from accum_keras.layers import AccumBatchNormalization, convert_batch_normalization

K, MICRO = 4, 4


def bn_layers(norm):
    def build():
        inputs = keras.Input((6, 6, 3))
        hidden = keras.layers.Conv2D(4, 3)(inputs)
        hidden = norm(momentum=0.8)(hidden)
        pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(hidden))
        return inputs, keras.layers.Dense(1)(pooled)

    return build


def images(samples, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=1.0, scale=2.0, size=(samples, 6, 6, 3)).astype("float32")
    return x, rng.normal(size=(samples, 1)).astype("float32")


def moving_statistics(model):
    layer = next(x for x in model.layers if isinstance(x, keras.layers.BatchNormalization))
    return keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(
        layer.moving_variance
    )


@pytest.fixture
def policy(request):
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy("float32")


def one_window_and_the_big_batch(samples):
    """The same network after one window of micro-batches and after one big batch."""
    x, y = images(samples)
    keras.utils.set_random_seed(0)
    model = accum_keras.Model(*bn_layers(AccumBatchNormalization)(), accumulation_steps=K)
    plain = keras.Model(*bn_layers(keras.layers.BatchNormalization)())
    plain.set_weights(model.get_weights())
    # Zero learning rate: the convolution is the same for every micro-batch,
    # so the statistics are comparable sample for sample.
    for m in (model, plain):
        m.compile(keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    return model, plain


@pytest.mark.parametrize("samples", [16, 12], ids=["full_window", "short_window"])
def test_one_window_stores_the_big_batch_statistics(samples):
    model, plain = one_window_and_the_big_batch(samples)
    for ours, reference in zip(moving_statistics(model), moving_statistics(plain)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


# Both sides pool the same half-precision inputs in float32, in one pass or
# micro-batch by micro-batch: float32 round-off under the mixed policies (the
# moving statistics are float32). Under `bfloat16` the moving statistics are
# bfloat16 and both sides round a float32 result to them once: the two
# float32 results may fall either side of a rounding boundary, one unit in
# the last place (2**-7 of the value at most).
POLICY_TOLERANCE = {
    "mixed_float16": dict(rtol=1e-5, atol=1e-6),
    "mixed_bfloat16": dict(rtol=1e-5, atol=1e-6),
    "bfloat16": dict(rtol=2**-7, atol=0),
}


@pytest.mark.parametrize("policy", list(POLICY_TOLERANCE), indirect=True)
def test_under_a_dtype_policy_one_window_stores_the_big_batch_statistics(policy):
    model, plain = one_window_and_the_big_batch(16)
    variable_dtype = keras.mixed_precision.Policy(policy).variable_dtype
    for ours, reference, layer in zip(
        moving_statistics(model), moving_statistics(plain), ("mean", "variance"), strict=True
    ):
        assert ours.dtype == reference.dtype, layer
        # Not the initial values (0 and 1): the comparison has something to see.
        assert not np.allclose(reference, 0.0 if layer == "mean" else 1.0, atol=1e-2)
        np.testing.assert_allclose(
            ours.astype("float32"), reference.astype("float32"), **POLICY_TOLERANCE[policy]
        )
    bn = next(x for x in model.layers if isinstance(x, AccumBatchNormalization))
    assert keras.backend.standardize_dtype(bn.moving_mean.dtype) == variable_dtype


def test_plain_batch_norm_updates_per_micro_batch_and_differs():
    x, y = images(16)
    keras.utils.set_random_seed(0)
    ghost = accum_keras.Model(*bn_layers(keras.layers.BatchNormalization)(), accumulation_steps=K)
    plain = keras.Model(*bn_layers(keras.layers.BatchNormalization)())
    plain.set_weights(ghost.get_weights())
    for m in (ghost, plain):
        m.compile(keras.optimizers.SGD(0.0), loss="mse")
    ghost.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)
    assert not np.allclose(moving_statistics(ghost)[1], moving_statistics(plain)[1], rtol=1e-3)


def shared_bn_model(norm, accumulation_steps=None):
    """One BatchNorm layer called twice per step, on two projections of the input."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    first = keras.layers.Dense(3, name="first")(inputs)
    second = keras.layers.Dense(3, name="second")(inputs)
    shared = norm(momentum=0.8, name="bn")
    both = keras.layers.Concatenate()([shared(first), shared(second)])
    outputs = keras.layers.Dense(1)(both)
    if accumulation_steps is None:
        model = keras.Model(inputs, outputs)
    else:
        model = accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)
    model.compile(keras.optimizers.SGD(0.0), loss="mse")
    return model


def test_a_layer_called_twice_per_step_makes_one_update_with_both_calls_pooled():
    # Plain BatchNormalization on the big batch updates twice per step, in
    # call order; AccumBatchNormalization pools the inputs of every call of
    # the window and updates once (docs/batch-norm.md).
    x, y = images(K * MICRO)
    x = x.reshape(len(x), -1)[:, :5]
    model = shared_bn_model(AccumBatchNormalization, accumulation_steps=K)
    plain = shared_bn_model(keras.layers.BatchNormalization)
    plain.set_weights(model.get_weights())
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=K * MICRO, shuffle=False, verbose=0)

    def outputs(name):
        kernel, bias = model.get_layer(name).get_weights()
        return x.astype("float64") @ kernel + bias

    pooled = np.concatenate([outputs("first"), outputs("second")])
    expected = (0.2 * pooled.mean(axis=0), 0.8 + 0.2 * pooled.var(axis=0))
    for ours, reference in zip(moving_statistics(model), expected, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    # The big batch's two updates store something else.
    assert not np.allclose(moving_statistics(model)[0], moving_statistics(plain)[0], atol=1e-3)


def test_outside_windows_it_is_batch_normalization():
    x, _ = images(8)
    keras.utils.set_random_seed(0)
    ours = AccumBatchNormalization(momentum=0.5)
    reference = keras.layers.BatchNormalization(momentum=0.5)
    ours.build(x.shape), reference.build(x.shape)
    to_numpy = keras.ops.convert_to_numpy
    np.testing.assert_allclose(
        to_numpy(ours(x, training=True)), to_numpy(reference(x, training=True)), rtol=1e-6
    )
    np.testing.assert_allclose(to_numpy(ours.moving_variance), to_numpy(reference.moving_variance))
    assert len(ours.weights) == len(reference.weights)


def test_conversion_keeps_weights_and_serializes(tmp_path):
    keras.utils.set_random_seed(0)
    model = accum_keras.Model(*bn_layers(keras.layers.BatchNormalization)(), accumulation_steps=3)
    converted = convert_batch_normalization(model)
    assert any(isinstance(layer, AccumBatchNormalization) for layer in converted.layers)
    assert converted.accumulation_steps == 3
    for a, b in zip(model.get_weights(), converted.get_weights()):  # noqa: B905
        np.testing.assert_array_equal(a, b)
    converted.compile("sgd", "mse")
    x, y = images(12)
    converted.fit(x, y, batch_size=MICRO, verbose=0)
    converted.save(tmp_path / "bn.keras")
    restored = keras.models.load_model(tmp_path / "bn.keras")
    assert any(isinstance(layer, AccumBatchNormalization) for layer in restored.layers)
    np.testing.assert_allclose(restored.predict(x, verbose=0), converted.predict(x, verbose=0))


def test_renorm_is_rejected():
    with pytest.raises(ValueError, match="renorm"):
        AccumBatchNormalization(renorm=True)


def test_a_window_applied_right_after_loading_leaves_the_next_window_its_own_statistics(tmp_path):
    # Found by the randomized test under distributions (on JAX, one device
    # too): a window loaded into a fresh model and applied by
    # `apply_pending_window()` before any step kept its pooled statistics in
    # the layer, and the next window pooled them again with its own.
    x, y = images((1 + K) * MICRO)
    path = str(tmp_path / "window.weights.h5")

    def accumulating():
        keras.utils.set_random_seed(0)
        model = accum_keras.Model(*bn_layers(AccumBatchNormalization)(), accumulation_steps=K)
        model.compile(keras.optimizers.SGD(0.0), loss="mse")
        return model

    model = accumulating()
    plain = keras.Model(*bn_layers(keras.layers.BatchNormalization)())
    plain.set_weights(model.get_weights())
    plain.compile(keras.optimizers.SGD(0.0), loss="mse")
    model.train_on_batch(x[:MICRO], y[:MICRO])  # a window of one micro-batch, open
    model.save_weights(path)
    fresh = accumulating()
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    assert fresh.apply_pending_window()
    for start in range(MICRO, (1 + K) * MICRO, MICRO):
        fresh.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    # The big batch's: the loaded window's micro-batch, then a batch of K.
    plain.train_on_batch(x[:MICRO], y[:MICRO])
    plain.train_on_batch(x[MICRO:], y[MICRO:])
    assert fresh.pending_micro_steps == 0
    for ours, reference in zip(moving_statistics(fresh), moving_statistics(plain)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
