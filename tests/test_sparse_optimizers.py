"""Embeddings with Adam, AdamW, RMSprop and Adagrad (docs/compatibility.md).

accum_keras hands the optimizer the window's gradient; for an `Embedding`
that is the sum of the micro-batches' sparse gradients, so the update is the
one of the big batch with a *dense* embedding gradient (plain Keras on JAX and
PyTorch, or the same table as a one-hot matmul on TensorFlow). Keras' TF
optimizers square each token occurrence of a sparse gradient instead, so on
TensorFlow plain Keras' sparse big batch is *not* the reference; the second
test pins that documented difference, so that it fails (and the docs must
change) if Keras changes its sparse path.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import RTOL, assert_same_training, max_relative_difference

import accum_keras

MICRO, K = 4, 4
VOCABULARY, LENGTH = 12, 6
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
}


def embedding_model(dense_gradient: bool, accumulation_steps: int | None = None):
    inputs = keras.Input((LENGTH,), dtype="int32")
    if dense_gradient:
        # The same function of the same (VOCABULARY, 3) table, with a dense gradient.
        embedded = keras.layers.Dense(3, use_bias=False)(keras.ops.one_hot(inputs, VOCABULARY))
    else:
        embedded = keras.layers.Embedding(VOCABULARY, 3)(inputs)
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Flatten()(embedded))
    outputs = keras.layers.Dense(1)(hidden)
    if accumulation_steps is None:
        return keras.Model(inputs, outputs)
    return accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)


def tokens(samples=44, seed=0):
    rng = np.random.default_rng(seed)
    # Few tokens, so that each occurs many times in a batch.
    x = rng.integers(0, VOCABULARY, size=(samples, LENGTH)).astype("int32")
    return x, rng.normal(size=(samples, 1)).astype("float32")


def train(model, x, y, batch_size, optimizer):
    model.compile(optimizer=optimizer(), loss="mse")
    model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_accumulated_embedding_update_is_the_dense_gradient_big_batch(name):
    x, y = tokens()
    keras.utils.set_random_seed(0)
    accumulating = embedding_model(dense_gradient=False, accumulation_steps=K)
    reference = embedding_model(dense_gradient=True)
    reference.set_weights(accumulating.get_weights())
    train(accumulating, x, y, MICRO, OPTIMIZERS[name])
    train(reference, x, y, MICRO * K, OPTIMIZERS[name])
    assert_same_training(accumulating, reference)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="only TensorFlow has sparse gradients"
)
@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad"])
def test_keras_tensorflow_sparse_big_batch_is_not_the_dense_update(name):
    x, y = tokens()
    keras.utils.set_random_seed(0)
    sparse = embedding_model(dense_gradient=False)
    dense = embedding_model(dense_gradient=True)
    dense.set_weights(sparse.get_weights())
    train(sparse, x, y, MICRO * K, OPTIMIZERS[name])
    train(dense, x, y, MICRO * K, OPTIMIZERS[name])
    # Far above round-off: Keras squares each token occurrence.
    assert max_relative_difference(sparse.get_weights(), dense.get_weights()) > 1000 * RTOL


class AdamWithARequiredArgument(keras.optimizers.Adam):
    """An optimizer that its config cannot rebuild (an argument it does not record)."""

    def __init__(self, tag, **kwargs):
        super().__init__(**kwargs)
        self.tag = tag


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="only TensorFlow has sparse gradients"
)
def test_sparse_gradients_meeting_an_optimizer_that_cannot_be_rebuilt_still_warn():
    # Whether its sparse update differs cannot be measured on a copy: it may.
    optimizer = AdamWithARequiredArgument("mine", learning_rate=0.01)
    with pytest.raises(TypeError):
        AdamWithARequiredArgument.from_config(optimizer.get_config())
    x, y = tokens(samples=2 * MICRO * K)
    keras.utils.set_random_seed(0)
    model = embedding_model(dense_gradient=False, accumulation_steps=K)
    model.compile(optimizer=optimizer, loss="mse")
    with pytest.warns(accum_keras.SparseUpdateWarning, match="AdamWithARequiredArgument"):
        model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
