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


@pytest.mark.parametrize("samples", [16, 12], ids=["full_window", "short_window"])
def test_one_window_stores_the_big_batch_statistics(samples):
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
    for ours, reference in zip(moving_statistics(model), moving_statistics(plain)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


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
