"""Shared test helpers: twin models and the independent big-batch reference.

Every exactness test trains two models from the same initial weights on the
same data order: an accumulating model on micro-batches, and a *plain Keras*
model (no accum_keras code involved) on the big batch. The plain model is the
reference.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator

import keras
import numpy as np

import accum_keras

# float32 round-off, relative to the largest weight.
RTOL = 2e-6


def max_relative_difference(weights_a, weights_b) -> float:
    """Largest absolute weight difference divided by the largest weight."""
    largest = max(float(np.abs(w).max()) for w in weights_b)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(weights_a, weights_b))
    return diff / max(largest, 1e-12)


def assert_same_training(accumulating, plain, rtol: float = RTOL) -> None:
    """Same weights (to round-off) and the same number of optimizer updates."""
    assert int(accumulating.optimizer.iterations.numpy()) == int(
        plain.optimizer.iterations.numpy()
    ), (
        f"updates: accumulating {int(accumulating.optimizer.iterations.numpy())} "
        f"vs big batch {int(plain.optimizer.iterations.numpy())}"
    )
    difference = max_relative_difference(accumulating.get_weights(), plain.get_weights())
    assert difference <= rtol, f"weights differ by {difference:.3g} (relative)"


def functional_twins(build_layers, accumulation_steps, seed=0):
    """An `accum_keras.Model` and a plain `keras.Model` with the same weights.

    Args:
        build_layers: function returning ``(inputs, outputs)`` of a fresh graph.
        accumulation_steps: k of the accumulating model.
        seed: initial-weights seed.
    """
    keras.utils.set_random_seed(seed)
    inputs, outputs = build_layers()
    accumulating = accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)
    inputs, outputs = build_layers()
    plain = keras.Model(inputs, outputs)
    plain.set_weights(accumulating.get_weights())
    return accumulating, plain


def small_regression_layers(features=5, hidden=8, outputs=1, regularizer=None):
    def build():
        inputs = keras.Input((features,))
        hidden_layer = keras.layers.Dense(
            hidden, activation="tanh", kernel_regularizer=regularizer
        )(inputs)
        return inputs, keras.layers.Dense(outputs)(hidden_layer)

    return build


def regression_data(samples=64, features=5, outputs=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype("float32")
    y = rng.normal(size=(samples, outputs)).astype("float32")
    return x, y


# `ACCUM_KERAS_TEST_XLA=1` runs the TensorFlow specification with XLA (see
# tests/conftest.py), the path Keras takes by default on a GPU.
XLA_ENV = "ACCUM_KERAS_TEST_XLA"


@contextlib.contextmanager
def xla_by_default() -> Iterator[None]:
    """Makes ``compile()`` default to ``jit_compile=True`` (XLA) on TensorFlow.

    Keras resolves ``jit_compile="auto"`` to False on CPU-only machines; on a
    GPU it is True. An explicit ``jit_compile`` passed to ``compile()`` wins.
    """
    from keras.src.trainers.trainer import Trainer

    original = Trainer.compile

    @functools.wraps(original)
    def compile_with_xla(self, *args, **kwargs):
        if kwargs.get("jit_compile", "auto") == "auto" and not kwargs.get("run_eagerly"):
            kwargs["jit_compile"] = True
        return original(self, *args, **kwargs)

    Trainer.compile = compile_with_xla
    try:
        yield
    finally:
        Trainer.compile = original


def padded_token_data(samples, length, vocabulary=20, seed=0):
    """Token ids padded with 0 to random lengths, and per-token class targets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=samples)
    tokens = rng.integers(1, vocabulary, size=(samples, length))
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0  # padding
    targets = rng.integers(0, 3, size=(samples, length))
    return tokens.astype("int32"), targets.astype("int32")


def masked_token_layers(vocabulary=20):
    """A per-token classifier whose `Embedding(mask_zero=True)` masks the padding."""

    def build():
        inputs = keras.Input((None,), dtype="int32")
        embedded = keras.layers.Embedding(vocabulary, 6, mask_zero=True)(inputs)
        return inputs, keras.layers.Dense(3)(embedded)

    return build


def train_step_applying_its_gradients(model, data, scale_loss: bool = False):
    """A user-written ``train_step`` that hands its gradients to ``optimizer.apply`` itself.

    keras.io's custom-step style: a mean squared error over the micro-batch,
    differentiated with the backend's own tool (TensorFlow's ``GradientTape``,
    PyTorch's ``backward``). There is no such step on JAX, whose steps are
    stateless functions. With ``scale_loss`` it differentiates
    ``optimizer.scale_loss(loss)`` (Keras' mixed-precision custom-step idiom;
    ``optimizer.apply`` unscales). The loss is formed in the labels' dtype
    (float32 under every dtype policy).
    """
    from keras import ops

    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    # `train_on_batch` hands PyTorch steps NumPy arrays.
    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    variables = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(ops.cast(model(x, training=True), y.dtype) - y))
            scaled = model.optimizer.scale_loss(loss) if scale_loss else loss
        model.optimizer.apply(tape.gradient(scaled, variables), variables)
    elif backend == "torch":
        import torch

        model.zero_grad()
        loss = ops.mean(ops.square(ops.cast(model(x, training=True), y.dtype) - y))
        (model.optimizer.scale_loss(loss) if scale_loss else loss).backward()
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
    else:
        raise NotImplementedError(f"no user-written gradient step on {backend}")
    return {"loss": loss}


def split_rows_by_shard(rows: np.ndarray, micro_batch_size: int, shards: int = 1) -> list:
    """The in-step mode's micro-batches of a batch (docs/how-it-works.md), in NumPy.

    ``rows`` are ``shards`` equal blocks (the devices' shares); with ``n = B //
    m``, full micro-batch ``j`` is rows ``j, j + n, ...`` of the first ``n * m
    / s`` rows of every block, block after block, and the remainder (if any)
    is every block's rows after those. Returns the micro-batches in the order
    the step runs them.
    """
    blocks = np.split(np.asarray(rows), shards)
    per_block = micro_batch_size // shards
    full = len(rows) // micro_batch_size
    parts = [
        np.concatenate([block[: full * per_block][j::full] for block in blocks])
        for j in range(full)
    ]
    if len(rows) % micro_batch_size:
        parts.append(np.concatenate([block[full * per_block :] for block in blocks]))
    return parts


def full_jax_state(model) -> tuple:
    """The state tuple Keras' JAX trainer hands ``train_step`` (every kind of variable)."""
    return model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )


# An HLO instruction ``%name = <result> <op>(...)``; XLA combines several
# all-reduces into one with a tuple result.
_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def compiled_collectives(step, model, distribution, batch) -> list:
    """``[result shape, kind]`` of each collective in ``step`` compiled as Keras does (JAX).

    As Keras' JAX trainer compiles its step: ``jax.jit`` with the state's
    layouts as output shardings, on a batch laid out by the distribution.

    Args:
        step: the train step (``model.train_step`` or another step of it).
        model: the model whose state the step takes.
        distribution: the `keras.distribution` the model was built under.
        batch: the step's data (arrays or `jax.ShapeDtypeStruct`s), laid
            out here as ``distribution`` lays out its inputs.

    Returns:
        The sorted ``[shape, kind]`` pairs (a tuple result counts each shape).
    """
    import jax

    state = full_jax_state(model)
    # Shapes only: no data is placed (across processes, none could be).
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=distribution.get_data_layout(a.shape).backend_layout
        ),
        batch,
    )
    compiled = jax.jit(step, out_shardings=(None, model._get_state_sharding_spec()))
    text = compiled.lower(state, batch).compile().as_text()
    found = []
    for result, kind in _COLLECTIVE.findall(text):
        found.extend([shape, kind] for shape in _SHAPE.findall(result))
    return sorted(found)
