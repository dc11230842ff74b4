"""BatchNorm under accumulation: which of the usual choices behaves like the big batch?

Trains the same small CNN on a synthetic image task (bright squares vs bright
discs on noisy backgrounds, generated here) with micro-batch 4 x 8 accumulation
steps, five ways, from the same initial weights:

- ``batch 32, BatchNorm``: plain Keras on the true big batch: the reference;
- ``4x8, BatchNorm``: plain BatchNormalization inside the window (ghost batch
  norm: per-micro-batch normalization, moving statistics updated 8x per update);
- ``4x8, AccumBatchNormalization``: per-micro-batch normalization, moving
  statistics updated once per window with the window's pooled statistics;
- ``4x8, frozen BatchNorm``: ``trainable=False`` (inference-mode normalization
  with the initial statistics, as Mask R-CNN does at batch 2);
- ``4x8, GroupNormalization``: no batch statistics at all.

It reports the validation accuracy and loss, and how far each arm's moving
variance is from what the big batch stored after the *first* update (the one
point where both saw exactly the same weights).

    python benchmarks/batch_norm_choices.py          # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import accum_keras  # noqa: E402

MICRO, K = 4, 8


def shapes_data(samples: int, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.4, size=(samples, size, size, 1)).astype("float32")
    y = rng.integers(0, 2, size=samples)
    yy, xx = np.mgrid[:size, :size]
    for i in range(samples):
        r = rng.integers(3, 6)
        cy, cx = rng.integers(r, size - r, size=2)
        if y[i]:
            x[i, ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r, 0] += 2.0
        else:
            x[i, cy - r : cy + r, cx - r : cx + r, 0] += 2.0
    return x, y.astype("int32")


def build(norm: str, accumulation_steps: int | None):
    def normalization():
        if norm == "group":
            return keras.layers.GroupNormalization(groups=4)
        if norm == "accum":
            return accum_keras.layers.AccumBatchNormalization()
        layer = keras.layers.BatchNormalization()
        layer.trainable = norm != "frozen"
        return layer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    h = inputs
    for filters in (16, 32):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(normalization()(h))
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(2)(h)
    if accumulation_steps is None:
        return keras.Model(inputs, outputs)
    return accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)


def first_bn_variance(model):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer.moving_variance.numpy()
    return None


def run(epochs: int) -> None:
    x, y = shapes_data(512)
    x_val, y_val = shapes_data(256, seed=1)
    arms = [
        ("batch 32, BatchNorm (reference)", "batch", None, MICRO * K),
        ("4x8, BatchNorm (ghost)", "batch", K, MICRO),
        ("4x8, AccumBatchNormalization", "accum", K, MICRO),
        ("4x8, frozen BatchNorm", "frozen", K, MICRO),
        ("4x8, GroupNormalization", "group", K, MICRO),
    ]
    print(f"$ python {' '.join(sys.argv)}")
    print(
        f"{len(x)} training images 16x16, {epochs} epochs, Adam 1e-3, micro-batch {MICRO} x {K}\n"
    )
    rows, reference_variance = [], None
    for name, norm, k, batch_size in arms:
        model = build(norm, k)
        model.compile(
            keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        # One update first, to compare the moving statistics it leaves.
        model.fit(x[: MICRO * K], y[: MICRO * K], batch_size=batch_size, shuffle=False, verbose=0)
        variance = first_bn_variance(model)
        if reference_variance is None:
            reference_variance = variance
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
        seconds = time.perf_counter() - start
        loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
        if variance is None:
            stats = "no batch statistics"
        else:
            error = np.abs(variance - reference_variance).max() / np.abs(reference_variance).max()
            stats = f"{error:.1e}"
        rows.append((name, accuracy, loss, stats, seconds))

    print(
        "| arm | val accuracy | val loss | moving variance after 1 update vs batch 32 | train s |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, accuracy, loss, stats, seconds in rows:
        print(f"| {name} | {accuracy:.3f} | {loss:.3f} | {stats} | {seconds:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="10 epochs")
    args = parser.parse_args()
    run(10 if args.full else args.epochs)
