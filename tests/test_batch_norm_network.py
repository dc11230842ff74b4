"""AccumBatchNormalization in a real network (keras.applications.MobileNetV3Small).

What it guarantees, layer by layer, after a window:
- every layer's moving statistics are updated once, with the pooled mean and
  variance of the inputs *that layer saw* in the window (reference: NumPy,
  pooled over the layer inputs of each micro-batch);
- the first BatchNorm layer (whose input no earlier BatchNorm normalized) stores
  exactly what plain Keras' BatchNormalization stores on the big batch;
- deeper layers see activations normalized per micro-batch, so they are not
  the big batch's, only closer to it than plain BatchNormalization's.

TensorFlow only (a keras.applications model is slow to run eagerly on the
other backends; the layer itself is in every backend's suite,
``test_batch_norm.py``).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import accum_keras

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow-only (run time)"
)

MICRO, K = 4, 4


def mobilenet():
    return keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3, dropout_rate=0.0
    )


def batch_norm_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def statistics(model):
    return [
        (keras.ops.convert_to_numpy(b.moving_mean), keras.ops.convert_to_numpy(b.moving_variance))
        for b in batch_norm_layers(model)
    ]


def error(ours, reference):
    """Largest difference of mean (in standard deviations) or variance (relative)."""
    (mean, variance), (ref_mean, ref_variance) = ours, reference
    scale = np.sqrt(ref_variance.max())
    return max(
        np.abs(mean - ref_mean).max() / scale,
        np.abs(variance - ref_variance).max() / ref_variance.max(),
    )


def test_mobilenet_v3_small_moving_statistics_after_one_window():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 255.0, size=(MICRO * K, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, size=len(x)).astype("int32")

    keras.utils.set_random_seed(0)
    big = mobilenet()
    clone = mobilenet()
    ghost = accum_keras.Model(clone.input, clone.output, accumulation_steps=K)
    ghost.set_weights(big.get_weights())
    accum = accum_keras.layers.convert_batch_normalization(ghost)
    for model in (big, ghost, accum):
        # Momentum 0: the stored statistics are the last update's, unmixed
        # with the initial ones; learning rate 0: the same weights throughout.
        for layer in batch_norm_layers(model):
            layer.momentum = 0.0
        model.compile(keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
        model.run_eagerly = True
    big.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    ghost.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    accum.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    big_stats, ghost_stats, accum_stats = statistics(big), statistics(ghost), statistics(accum)
    assert len(accum_stats) == 34
    assert all(
        type(b) is accum_keras.layers.AccumBatchNormalization for b in batch_norm_layers(accum)
    )

    # Every layer: the pooled statistics of the inputs it saw, micro-batch by
    # micro-batch (the ghost model's layers, run in training mode, see the same
    # inputs: same weights, same per-micro-batch normalization).
    probe = keras.Model(ghost.input, [b.input for b in batch_norm_layers(ghost)])
    seen = [
        [keras.ops.convert_to_numpy(t) for t in probe(x[i : i + MICRO], training=True)]
        for i in range(0, len(x), MICRO)
    ]
    for index, (mean, variance) in enumerate(accum_stats):
        inputs = np.concatenate([micro[index] for micro in seen]).astype("float64")
        inputs = inputs.reshape(-1, inputs.shape[-1])
        expected = (inputs.mean(axis=0), inputs.var(axis=0))
        assert error((mean, variance), expected) < 1e-4, batch_norm_layers(accum)[index].name

    # The first layer: exactly the big batch's.
    assert error(accum_stats[0], big_stats[0]) < 1e-5
    # Deeper layers: not the big batch's, but closer than plain BatchNorm's.
    accum_errors = np.array([error(a, b) for a, b in zip(accum_stats, big_stats)])
    ghost_errors = np.array([error(g, b) for g, b in zip(ghost_stats, big_stats)])
    assert accum_errors[1:].max() > 1e-3  # deeper layers are not exact
    assert (accum_errors < ghost_errors).mean() >= 0.8
    assert np.median(accum_errors) < np.median(ghost_errors)
