"""AccumBatchNormalization on a real network: how close are the moving statistics, layer by layer?

`AccumBatchNormalization` pools a window's per-micro-batch statistics, so a
BatchNorm layer whose input does not depend on any earlier batch-normalized
layer (the first one) stores exactly the big batch's moving statistics after a
window. Deeper layers see activations that earlier layers normalized *per
micro-batch* (ghost batch norm), which the big batch normalizes with its own
statistics: their pooled statistics are close to the big batch's, not equal.

This script measures that on ``keras.applications.MobileNetV3Small``
(32x32x3 inputs, 3 classes, no pretrained weights, dropout off), micro-batch
``--micro`` x ``--k`` accumulation steps vs plain Keras on the big batch, from
the same initial weights on the same data, three arms:

- ``big batch``: plain Keras BatchNormalization at batch ``micro * k``: the
  reference;
- ``ghost``: the same layers in an `accum_keras.Model` (BatchNormalization
  updates its moving statistics every micro-batch);
- ``accum``: `convert_batch_normalization` of it (`AccumBatchNormalization`).

Every BatchNorm layer's momentum is set to 0 for the measurement, so what a
layer stores is the statistics of its last update, unmixed with earlier ones:
the big batch's statistics, the window's pooled statistics (accum), or the
last micro-batch's (ghost; with a momentum m > 0 ghost BatchNorm also moves its
averages k times per update instead of once, which this does not count). The
error of a layer is the larger of ``max |mean - big mean| / big std`` and
``max |var - big var| / max big var``. Reported after the first update (same
weights in every arm, so only the normalization inside the window differs) and
after ``--updates`` updates with SGD(0.05) (the weights then differ too:
per-micro-batch normalization gives a different gradient than the big
batch's).

    python benchmarks/batch_norm_deep.py       # ~1-2 min on 2 CPU cores
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _revision import library_revision  # noqa: E402


def mobilenet() -> keras.Model:
    return keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3, dropout_rate=0.0
    )


def arms(accumulation_steps: int, seed: int = 0) -> dict[str, keras.Model]:
    """The big-batch reference, ghost BatchNorm and AccumBatchNormalization, same weights."""
    keras.utils.set_random_seed(seed)
    big = mobilenet()
    clone = mobilenet()
    ghost = accum_keras.Model(clone.inputs, clone.outputs, accumulation_steps=accumulation_steps)
    ghost.set_weights(big.get_weights())
    accum = accum_keras.layers.convert_batch_normalization(ghost)
    return {"big batch": big, "ghost": ghost, "accum": accum}


def batch_norm_statistics(model: keras.Model) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, moving_mean, moving_variance)`` of every BatchNorm layer, in graph order."""
    return [
        (
            layer.name,
            keras.ops.convert_to_numpy(layer.moving_mean),
            keras.ops.convert_to_numpy(layer.moving_variance),
        )
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def layer_error(ours, reference) -> float:
    """Mean error in standard deviations, or variance error relative, whichever is larger."""
    (_, mean, variance), (_, ref_mean, ref_variance) = ours, reference
    largest = float(ref_variance.max())
    return max(
        float(np.abs(mean - ref_mean).max()) / np.sqrt(largest),
        float(np.abs(variance - ref_variance).max()) / largest,
    )


def train(models, x, y, micro: int, k: int, learning_rate: float) -> None:
    for name, model in models.items():
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        model.compile(keras.optimizers.SGD(learning_rate), loss="sparse_categorical_crossentropy")
        batch = micro * k if name == "big batch" else micro
        model.fit(x, y, batch_size=batch, shuffle=False, verbose=0)


def report(title: str, models) -> dict[str, list[float]]:
    big = batch_norm_statistics(models["big batch"])
    errors = {
        name: [layer_error(a, b) for a, b in zip(batch_norm_statistics(model), big)]
        for name, model in models.items()
        if name != "big batch"
    }
    ghost, accum = np.array(errors["ghost"]), np.array(errors["accum"])
    print(f"\n{title} ({len(ghost)} BatchNorm layers)")
    print("| arm | first layer | median over layers | max over layers | layers closer than ghost |")
    print("|---|---:|---:|---:|---:|")
    for name, values in (("ghost BatchNorm", ghost), ("AccumBatchNormalization", accum)):
        closer = f"{int((accum < ghost).sum())} / {len(ghost)}" if values is accum else "-"
        print(
            f"| {name} | {values[0]:.2e} | {np.median(values):.2e} | {values.max():.2e} | {closer} |"
        )
    print("per layer (ghost / accum):")
    for (name, _, _), g, a in zip(big, ghost, accum):
        print(f"  {name:40s} {g:.2e} / {a:.2e}")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--updates", type=int, default=3)
    args = parser.parse_args()
    print(f"command: python benchmarks/batch_norm_deep.py {' '.join(sys.argv[1:])}")
    print(f"accum_keras {library_revision()}, Keras {keras.__version__}, {keras.backend.backend()}")
    started = time.time()
    big_batch = args.micro * args.k
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 255.0, size=(args.updates * big_batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 3, size=len(x)).astype("int32")

    # One update, zero learning rate: every arm has the same weights, so only
    # the normalization inside the window differs.
    print(f"micro-batch {args.micro} x {args.k} vs batch {big_batch}")
    models = arms(args.k)
    train(models, x[:big_batch], y[:big_batch], args.micro, args.k, learning_rate=0.0)
    report("after 1 update, same weights", models)

    models = arms(args.k)
    train(models, x, y, args.micro, args.k, learning_rate=0.05)
    report(f"after {args.updates} updates, SGD(0.05)", models)
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
