"""Adam on embeddings (TensorFlow): accum_keras vs plain Keras' big batch, sparse and dense.

On TensorFlow an `Embedding`'s gradient is a `tf.IndexedSlices` with one row
per token *occurrence*. Keras' TF Adam / RMSprop / Adagrad square those rows
one by one, so a token that occurs n times in the batch adds
``g_1² + ... + g_n²`` to the second moment instead of ``(g_1 + ... + g_n)²``,
the square of its gradient. JAX and PyTorch (dense gradients) and TensorFlow
with a dense gradient square the sum. accum_keras sums a window's sparse
gradients before the optimizer sees them, so it computes the square of the
sum too.

For three small NLP models with a non-tied `Embedding` (a BERT-like encoder,
an LSTM and a GRU classifier), trained from the same initial weights on the
same data with the optimizer given by ``--optimizer``, this prints the largest
weight difference relative to the largest weight:

- ``accum vs plain (sparse)``: accum_keras (micro-batch x k) against plain
  Keras on the big batch, its embedding gradients sparse (Keras' default);
- ``accum vs plain (dense)``: against plain Keras on the big batch with the
  same embedding table given a dense gradient (one-hot matmul: the same
  function of the same weights);
- ``plain sparse vs plain dense``: how far Keras' own sparse path is from the
  dense-gradient update, with no accum_keras involved;
- ``embedding rows``: the same for the embedding table only.

The size of the difference is driven by how often a row repeats within a
big batch (the script prints the mean occurrences per touched row): a
character-level vocabulary repeats every row far more than a word vocabulary.

    python benchmarks/sparse_adam.py                  # ~1-2 min on 2 CPU cores
    python benchmarks/sparse_adam.py --optimizer rmsprop
    python benchmarks/sparse_adam.py --vocabulary 30 --length 64   # character-level
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import accum_keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _revision import library_revision  # noqa: E402

VOCABULARY, LENGTH, WIDTH = 200, 16, 32
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
    "adagrad": lambda: keras.optimizers.Adagrad(1e-2),
}


class DenseGradientEmbedding(keras.layers.Embedding):
    """`Embedding` computed as one-hot x table: the same output, a dense gradient."""

    def call(self, inputs):
        one_hot = ops.one_hot(ops.cast(inputs, "int32"), self.input_dim, dtype=self.compute_dtype)
        return ops.matmul(one_hot, ops.cast(self.embeddings, self.compute_dtype))


class PositionEmbedding(keras.layers.Layer):
    """Learned positions added to the token embeddings (a dense weight)."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="random_normal", name="positions"
        )

    def call(self, inputs):
        return inputs + self.positions


def encoder(embedding):
    inputs = keras.Input((LENGTH,), dtype="int32")
    h = PositionEmbedding()(embedding(inputs))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=WIDTH // 2)(h, h)
    h = keras.layers.LayerNormalization()(h + attention)
    ffn = keras.layers.Dense(WIDTH)(keras.layers.Dense(2 * WIDTH, activation="gelu")(h))
    h = keras.layers.LayerNormalization()(h + ffn)
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    return inputs, keras.layers.Dense(2)(pooled)


def recurrent(cell):
    def build(embedding):
        inputs = keras.Input((LENGTH,), dtype="int32")
        h = cell(WIDTH)(embedding(inputs))
        return inputs, keras.layers.Dense(2)(h)

    return build


MODELS = {
    "BERT-like encoder": encoder,
    "LSTM": recurrent(keras.layers.LSTM),
    "GRU": recurrent(keras.layers.GRU),
}


def arms(build, accumulation_steps: int) -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    accum = accum_keras.Model(
        *build(keras.layers.Embedding(VOCABULARY, WIDTH)), accumulation_steps=accumulation_steps
    )
    sparse = keras.Model(*build(keras.layers.Embedding(VOCABULARY, WIDTH)))
    dense = keras.Model(*build(DenseGradientEmbedding(VOCABULARY, WIDTH)))
    for model in (sparse, dense):
        model.set_weights(accum.get_weights())
    return {"accum": accum, "sparse": sparse, "dense": dense}


def token_data(samples: int, seed: int = 0):
    """Zipf-like token frequencies, as in text: frequent tokens repeat within a batch."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCABULARY + 1)
    probabilities = (1.0 / ranks) / (1.0 / ranks).sum()
    tokens = rng.choice(VOCABULARY, size=(samples, LENGTH), p=probabilities).astype("int32")
    labels = (tokens[:, : LENGTH // 2].sum(axis=1) % 2).astype("int32")
    return tokens, labels


def repeats_per_row(tokens: np.ndarray, big: int) -> float:
    """Mean occurrences of a row among the rows a big batch touches."""
    counts = []
    for start in range(0, len(tokens), big):
        _, occurrences = np.unique(tokens[start : start + big], return_counts=True)
        counts.extend(occurrences)
    return float(np.mean(counts))


def relative_difference(a, b) -> float:
    largest = max(float(np.abs(w).max()) for w in b)
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b)) / largest


def embedding_table(model) -> list[np.ndarray]:
    layer = next(x for x in model.layers if isinstance(x, keras.layers.Embedding))
    return [keras.ops.convert_to_numpy(layer.embeddings)]


def main() -> None:
    # The model builders read the module's sizes.
    global VOCABULARY, LENGTH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--vocabulary", type=int, default=VOCABULARY)
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per sample")
    args = parser.parse_args()
    VOCABULARY, LENGTH = args.vocabulary, args.length
    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "This benchmark is about the TensorFlow backend (KERAS_BACKEND=tensorflow)."
        )
    print(f"command: python benchmarks/sparse_adam.py {' '.join(sys.argv[1:])}")
    print(f"accum_keras {library_revision()}, Keras {keras.__version__}, TensorFlow backend")
    big = args.micro * args.k
    updates = args.epochs * -(-args.samples // big)
    print(
        f"{args.optimizer}, micro-batch {args.micro} x {args.k} vs batch {big}, "
        f"{args.samples} samples x {args.epochs} epochs = {updates} updates, "
        f"vocabulary {VOCABULARY}, {LENGTH} tokens per sample\n"
    )
    started = time.time()
    tokens, labels = token_data(args.samples)
    print(f"mean occurrences per touched row per big batch: {repeats_per_row(tokens, big):.1f}\n")
    print(
        "| model | accum vs plain (sparse) | accum vs plain (dense) | "
        "plain sparse vs plain dense | embedding rows: accum vs sparse / vs dense |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, build in MODELS.items():
        models = arms(build, args.k)
        for arm, model in models.items():
            model.compile(
                OPTIMIZERS[args.optimizer](),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            batch = args.micro if arm == "accum" else big
            model.fit(
                tokens, labels, batch_size=batch, epochs=args.epochs, shuffle=False, verbose=0
            )
        weights = {arm: model.get_weights() for arm, model in models.items()}
        tables = {arm: embedding_table(model) for arm, model in models.items()}
        print(
            f"| {name} | {relative_difference(weights['accum'], weights['sparse']):.2e} "
            f"| {relative_difference(weights['accum'], weights['dense']):.2e} "
            f"| {relative_difference(weights['sparse'], weights['dense']):.2e} "
            f"| {relative_difference(tables['accum'], tables['sparse']):.2e} / "
            f"{relative_difference(tables['accum'], tables['dense']):.2e} |"
        )
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
