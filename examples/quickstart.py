"""Quickstart: micro-batch 4 x 8 accumulation steps trains like batch 32.

Trains a small classifier on a synthetic two-spirals data set twice from the
same initial weights -- once with accum_keras on micro-batches of 4 with
``accumulation_steps=8``, once with plain Keras on batches of 32 -- and prints
what happened: updates, effective batch size, accuracy, and how far apart the
two sets of weights ended up.

    python examples/quickstart.py             # 5 epochs
    python examples/quickstart.py --epochs 1  # the quickest run

Measured (``time python examples/quickstart.py``, 2 CPU cores shared with other
jobs, load average 13-14): 59 s wall, 13 s of CPU (user + system).

TensorFlow's start-up lines are hidden (``EXAMPLES_TF_LOGS=1`` shows them).
"""

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import quiet  # noqa: E402

quiet.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import accum_keras  # noqa: E402

MICRO_BATCH, STEPS = 4, 8


def two_spirals(samples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.5, 3.5 * np.pi, size=samples)
    label = rng.integers(0, 2, size=samples)
    sign = np.where(label == 0, 1.0, -1.0)
    points = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / 10.0
    points += rng.normal(scale=0.03, size=points.shape)
    return points.astype("float32"), label.astype("int32")


def layers():
    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    return inputs, keras.layers.Dense(2)(hidden)


def main(epochs: int) -> None:
    x, y = two_spirals(1000)
    keras.utils.set_random_seed(0)
    model = accum_keras.Model(*layers(), accumulation_steps=STEPS)
    reference = keras.Model(*layers())
    reference.set_weights(model.get_weights())
    for m in (model, reference):
        m.compile(
            keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    history = model.fit(
        x,
        y,
        batch_size=MICRO_BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)],
    ).history
    reference.fit(x, y, batch_size=MICRO_BATCH * STEPS, epochs=epochs, shuffle=False, verbose=0)

    largest = max(np.abs(w).max() for w in reference.get_weights())
    difference = max(
        np.abs(a - b).max() for a, b in zip(model.get_weights(), reference.get_weights())
    )
    print(f"micro-batch {MICRO_BATCH} x accumulation_steps {STEPS}, {epochs} epochs of {len(x)}")
    print(
        f"  optimizer updates: {int(model.optimizer.iterations.numpy())} "
        f"(plain Keras at batch {MICRO_BATCH * STEPS}: "
        f"{int(reference.optimizer.iterations.numpy())})"
    )
    micro_batches = math.ceil(len(x) / MICRO_BATCH)
    updates, short = divmod(micro_batches, STEPS)
    last = len(x) - updates * MICRO_BATCH * STEPS
    print(
        f"  effective batch size per epoch (counted): {history['effective_batch_size']}\n"
        f"    ({len(x)} samples / {updates + (short > 0)} updates: {updates} windows of "
        f"{MICRO_BATCH * STEPS}"
        + (f" and a short last window of {last}" if short else "")
        + f", as plain Keras at batch {MICRO_BATCH * STEPS} ends an epoch with a short batch)"
    )
    print(f"  final training accuracy: {history['accuracy'][-1]:.3f}")
    print(
        f"  largest weight difference vs batch {MICRO_BATCH * STEPS}: "
        f"{difference / largest:.1e} of the largest weight (float32 round-off)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    main(parser.parse_args().epochs)
