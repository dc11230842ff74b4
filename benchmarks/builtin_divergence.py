"""How far gradient accumulation ends up from the big batch: Keras' built-in vs accum_keras.

What is measured
----------------
For every case three models start from the same initial weights and train
for ``epochs`` epochs on the same data in the same order (``shuffle=False``):

- reference: a plain ``keras.Model``, ``fit(batch_size=16)`` (the big batch);
- built-in: a plain ``keras.Model`` whose optimizer has
  ``gradient_accumulation_steps=4``, ``fit(batch_size=4)``;
- accum_keras: ``accum_keras.Model(accumulation_steps=4)``, ``fit(batch_size=4)``.

The table reports, for each accumulating model, the largest weight difference
to the reference relative to the largest reference weight,
``max |w - w_ref| / max |w_ref|`` over all weights, and the optimizer
``iterations`` (number of updates) of built-in / accum_keras / reference.

How to read it
--------------
float32 round-off gives differences around 1e-7..1e-6; anything well above
that means the accumulating model did not make the big batch's updates.
The cases isolate one thing each:

- ``equal windows, Adam``: 64 samples, every window holds 4 full micro-batches
  of a mean loss; averaging 4 micro-batch gradients is exact here, so both
  should match (the control case);
- ``60 samples (short last window)``: 15 micro-batches per epoch. The big
  batch ends each epoch with a batch of 12; a window must end with the epoch
  and be normalized over its 12 samples, not run on into the next epoch;
- ``ExponentialDecay, SGD``: the schedule must advance once per update, not
  once per micro-batch;
- ``masked per-token loss``: variable-length sequences (padding 0,
  ``Embedding(mask_zero=True)``), so micro-batches hold different numbers of
  valid tokens and the big batch averages over all the window's tokens. SGD
  with momentum is used because Keras' TensorFlow Adam treats duplicate
  indices of sparse (embedding) gradients specially, which would mix a second
  effect into this one;
- ``mean_with_sample_weight``: random sample weights, the loss is divided by
  the sum of the window's weights, not averaged per micro-batch;
- ``use_ema=True``: the weights' moving average (written into the model at the
  end of ``fit``) must be updated once per update.

Usage::

    python benchmarks/builtin_divergence.py          # quick: one seed (about a minute)
    python benchmarks/builtin_divergence.py --full   # wider models, 3 seeds, worst case shown
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable

if __name__ == "__main__":
    # The command line first, before TensorFlow's start-up logs.
    print("$ " + shlex.join(sys.orig_argv), flush=True)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from _revision import library_revision

import accum_keras

K = 4
MICRO_BATCH = 4
BIG_BATCH = K * MICRO_BATCH


@dataclasses.dataclass
class Case:
    name: str
    samples: int
    build: Callable  # width -> (inputs, outputs)
    data: Callable  # (samples, rng) -> (x, y, sample_weight or None)
    optimizer: Callable  # extra kwargs -> optimizer
    loss: Callable  # () -> loss


# -- models and data --------------------------------------------------------

FEATURES = 6
VOCAB = 12
MAX_LEN = 10


def regression_model(width: int):
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(width, activation="tanh")(inputs)
    return inputs, keras.layers.Dense(2)(hidden)


def regression_data(samples: int, rng, sample_weights: bool = False):
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    y = rng.normal(size=(samples, 2)).astype("float32")
    weights = rng.uniform(0.0, 2.0, size=(samples,)).astype("float32") if sample_weights else None
    return x, y, weights


def token_model(width: int):
    inputs = keras.Input((MAX_LEN,), dtype="int32")
    embedded = keras.layers.Embedding(VOCAB, 8, mask_zero=True)(inputs)
    hidden = keras.layers.Dense(width, activation="tanh")(embedded)
    return inputs, keras.layers.Dense(VOCAB)(hidden)


def token_data(samples: int, rng):
    lengths = rng.integers(1, MAX_LEN + 1, size=samples)
    x = np.zeros((samples, MAX_LEN), "int32")
    for row, length in enumerate(lengths):
        x[row, :length] = rng.integers(1, VOCAB, size=length)
    y = rng.integers(0, VOCAB, size=(samples, MAX_LEN)).astype("int32")
    return x, y, None


def adam(**kwargs):
    return keras.optimizers.Adam(0.01, **kwargs)


def sgd_momentum(**kwargs):
    return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)


def sgd_decay(**kwargs):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=2, decay_rate=0.5, staircase=False
    )
    return keras.optimizers.SGD(schedule, **kwargs)


def adam_ema(**kwargs):
    return keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.9, **kwargs)


def mse():
    return keras.losses.MeanSquaredError()


CASES = [
    Case("equal windows, Adam (64 samples)", 64, regression_model, regression_data, adam, mse),
    Case(
        "60 samples (short last window), SGD momentum",
        60,
        regression_model,
        regression_data,
        sgd_momentum,
        mse,
    ),
    Case("60 samples (short last window), Adam", 60, regression_model, regression_data, adam, mse),
    Case("ExponentialDecay schedule, SGD", 64, regression_model, regression_data, sgd_decay, mse),
    Case(
        "masked per-token loss, SGD momentum",
        64,
        token_model,
        token_data,
        sgd_momentum,
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ),
    Case(
        "mean_with_sample_weight + random sample weights, SGD momentum",
        64,
        regression_model,
        lambda samples, rng: regression_data(samples, rng, sample_weights=True),
        sgd_momentum,
        lambda: keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"),
    ),
    Case("use_ema=True, Adam", 64, regression_model, regression_data, adam_ema, mse),
]


# -- one case ---------------------------------------------------------------


def relative_difference(weights, reference) -> float:
    largest = max(float(np.abs(w).max()) for w in reference)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(weights, reference))
    return difference / max(largest, 1e-12)


def run_case(case: Case, width: int, epochs: int, seed: int) -> dict:
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x, y, sample_weight = case.data(case.samples, rng)

    keras.utils.set_random_seed(seed)
    reference = keras.Model(*case.build(width))
    initial = reference.get_weights()
    builtin = keras.Model(*case.build(width))
    builtin.set_weights(initial)
    accumulating = accum_keras.Model(*case.build(width), accumulation_steps=K)
    accumulating.set_weights(initial)

    runs = (
        (reference, case.optimizer(), BIG_BATCH),
        (builtin, case.optimizer(gradient_accumulation_steps=K), MICRO_BATCH),
        (accumulating, case.optimizer(), MICRO_BATCH),
    )
    for model, optimizer, batch_size in runs:
        model.compile(optimizer=optimizer, loss=case.loss())
        model.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=batch_size,
            epochs=epochs,
            shuffle=False,
            verbose=0,
        )
    reference_weights = reference.get_weights()
    return {
        "builtin": relative_difference(builtin.get_weights(), reference_weights),
        "accum": relative_difference(accumulating.get_weights(), reference_weights),
        "iterations": tuple(
            int(model.optimizer.iterations.numpy()) for model in (builtin, accumulating, reference)
        ),
        "pending": accumulating.pending_micro_steps,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="wider models, 3 seeds (worst shown)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, help="number of seeds (default 1; --full: 3)")
    parser.add_argument("--width", type=int, help="hidden width (default 16; --full: 64)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (3 if args.full else 1)
    width = args.width or (64 if args.full else 16)
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, "
        f"accum_keras {accum_keras.__version__} ({library_revision()})"
    )
    start = time.perf_counter()
    rows = []
    for case in CASES:
        results = [run_case(case, width, args.epochs, seed) for seed in range(seeds)]
        iterations = {r["iterations"] for r in results}
        rows.append(
            (
                case.name,
                max(r["builtin"] for r in results),
                max(r["accum"] for r in results),
                " ; ".join("/".join(map(str, it)) for it in sorted(iterations)),
                max(r["pending"] for r in results),
            )
        )
    print(
        f"\nmicro-batch {MICRO_BATCH} x {K} steps vs big batch {BIG_BATCH}, {args.epochs} "
        f"epochs, shuffle=False, hidden width {width}, "
        + (f"worst of {seeds} seeds; " if seeds > 1 else "seed 0; ")
        + "cells: max |w - w_ref| / max |w_ref| (float32 round-off is ~1e-7..1e-6)\n"
    )
    print("| case | built-in | accum_keras | iterations built-in/accum/reference |")
    print("|---|---:|---:|---|")
    for name, builtin, accum, iterations, _ in rows:
        print(f"| {name} | {builtin:.2e} | {accum:.2e} | {iterations} |")
    pending = max(row[4] for row in rows)
    if pending:
        print(f"\nWARNING: accum_keras ended with {pending} pending micro-batches")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
