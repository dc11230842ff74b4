"""What ``accumulator_dtype`` costs in accuracy, and what it saves in memory.

What is measured
----------------
For each ``k`` in ``--steps`` and each model dtype (a float32 model, and the
same model held in bfloat16 with the dtype policy ``"bfloat16"``, so that the
weights themselves are bfloat16), models start from the same initial weights
(rounded to bfloat16, so that both model dtypes start from identical values)
and make ``--updates`` updates of SGD with momentum on the same data in the
same order (not Adam: Keras' Adam computes in the variable's dtype, and
``beta_2 = 0.999`` in bfloat16 is 1.0, so a bfloat16 model under Adam never
moves):

- reference: a plain float32 ``keras.Model``, ``fit(batch_size=b * k)``;
- plain: a plain ``keras.Model`` in the model dtype on the big batch (for the
  bfloat16 model, the floor: what bfloat16 weights cost with no accumulation);
- accum_keras with ``accumulator_dtype`` float32, bfloat16 and float16,
  ``fit(batch_size=b)``. ``"variable"`` is float32 on the float32 model and
  bfloat16 on the bfloat16 model: those rows.

Each cell is ``max |w - w_ref| / max |w_ref|`` over all weights after the
last update; a second table measures the same against the plain big batch
in the model's own dtype (what the accumulators add to the weights' dtype).
The memory column is the accumulators' bytes per byte of the trainable
weights they belong to, read from the variables.

Summation schemes accum_keras does not offer are measured on one window's
sum, in NumPy, from the model's real micro-batch gradients (at its initial
weights, read as ``w0 - w1`` after one ``SGD(1.0)`` step of a plain float32
model, exact to ~1e-6 relative): round-to-nearest bfloat16 (the rule
accum_keras follows: the float32 sum rounded once per micro-batch),
stochastic rounding to bfloat16 (float32 bits plus 16 random bits,
truncated), and Kahan-compensated bfloat16 (sum and compensation stored in
bfloat16, the arithmetic in float32), against float16 and float32. Cells: ``max |s - s_exact| / max
|s_exact|``, the mean over ``--windows`` windows.

Usage::

    python benchmarks/accumulator_dtype.py             # k = 4, 16, 64; 300 updates
    KERAS_BACKEND=jax python benchmarks/accumulator_dtype.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

if __name__ == "__main__":
    # The command line first, before the backends' start-up logs.
    print("$ " + shlex.join(sys.orig_argv), flush=True)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import ml_dtypes
import numpy as np
from _revision import library_revision

import accum_keras

FEATURES, HIDDEN, OUTPUTS = 16, 32, 4
MODEL_DTYPES = ("float32", "bfloat16")
ACCUMULATOR_DTYPES = ("float32", "bfloat16", "float16")
LEARNING_RATE = 0.02


def layers():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh")(inputs)
    hidden = keras.layers.Dense(HIDDEN, activation="tanh")(hidden)
    return inputs, keras.layers.Dense(OUTPUTS)(hidden)


def data(samples: int, seed: int):
    """A noisy random teacher: the gradients stay informative for hundreds of updates."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    teacher = rng.normal(size=(FEATURES, OUTPUTS)) / np.sqrt(FEATURES)
    y = np.tanh(x @ teacher) + 0.1 * rng.normal(size=(samples, OUTPUTS))
    return x, y.astype("float32")


def initial_weights(seed: int) -> list[np.ndarray]:
    """Glorot weights rounded to bfloat16, so every model dtype starts from the same values."""
    keras.utils.set_random_seed(seed)
    keras.config.set_dtype_policy("bfloat16")
    try:
        model = keras.Model(*layers())
        return [np.asarray(w, "float32") for w in model.get_weights()]
    finally:
        keras.config.set_dtype_policy("float32")


def optimizer():
    return keras.optimizers.SGD(LEARNING_RATE, momentum=0.9)


def train(model_dtype, init, x, y, batch_size, k=None, accumulator_dtype=None):
    """Trains one arm; returns its weights (float64) and its accumulator memory ratio."""
    keras.config.set_dtype_policy(model_dtype)
    try:
        if k is None:
            model = keras.Model(*layers())
        else:
            model = accum_keras.Model(
                *layers(), accumulation_steps=k, accumulator_dtype=accumulator_dtype
            )
        model.set_weights(init)
        model.compile(optimizer(), loss="mse", steps_per_execution=k or 1)
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    weights = [np.asarray(w, "float64") for w in model.get_weights()]
    memory = None
    if k is not None:
        state = model._accumulation_state
        accumulator_bytes = sum(_nbytes(a) for a in state.gradients)
        memory = accumulator_bytes / sum(_nbytes(v) for v in model.trainable_variables)
    return weights, memory


def _nbytes(variable) -> int:
    dtype = keras.backend.standardize_dtype(variable.dtype)
    itemsize = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    return int(np.prod(variable.shape)) * itemsize


# -- one window's sum under each summation scheme (NumPy) ---------------------


def micro_batch_gradients(init, x, y, micro_batch: int) -> np.ndarray:
    """Rows: the float32 model's flattened gradient of each micro-batch's mean loss."""
    model = keras.Model(*layers())
    model.compile(keras.optimizers.SGD(1.0), loss="mse")
    start = np.concatenate([w.ravel() for w in init]).astype("float64")
    rows = []
    for begin in range(0, len(x), micro_batch):
        model.set_weights(init)
        model.train_on_batch(x[begin : begin + micro_batch], y[begin : begin + micro_batch])
        after = np.concatenate([np.asarray(w, "float64").ravel() for w in model.get_weights()])
        rows.append(start - after)
    return np.stack(rows)


def as_float32(values: np.ndarray) -> np.ndarray:
    return values.astype("float32").astype("float64")


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    return values.astype("float32").astype(ml_dtypes.bfloat16).astype("float64")


def stochastic_bfloat16(values: np.ndarray, rng) -> np.ndarray:
    """Rounds float32 values up or down to bfloat16 with probability by distance."""
    bits = values.astype("float32").view("uint32")
    noise = rng.integers(0, 1 << 16, size=bits.shape, dtype="uint32")
    rounded = ((bits + noise) & np.uint32(0xFFFF0000)).view("float32")
    return rounded.astype("float64")


def window_sum(gradients: np.ndarray, scheme: str, rng) -> np.ndarray:
    """Sums the rows of ``gradients`` as an accumulator of ``scheme`` would."""
    total = np.zeros(gradients.shape[1])
    compensation = np.zeros_like(total)
    for gradient in gradients:
        if scheme == "float32":
            total = as_float32(total + gradient)
        elif scheme == "float16":
            total = (total + gradient).astype("float32").astype("float16").astype("float64")
        elif scheme == "bfloat16":
            total = to_bfloat16(total + gradient)
        elif scheme == "bfloat16, stochastic rounding":
            total = stochastic_bfloat16(total + gradient, rng)
        elif scheme == "bfloat16 + Kahan compensation":
            # Both words stored in bfloat16, the arithmetic in float32 (as
            # accum_keras sums): the pair carries ~16 significant bits.
            corrected = as_float32(gradient - compensation)
            new_total = to_bfloat16(total + corrected)
            compensation = to_bfloat16(as_float32(new_total - total) - corrected)
            total = new_total
        else:
            raise ValueError(scheme)
    # The compensation holds what the bfloat16 sum lost: read the pair in
    # float32 when the window is applied.
    return as_float32(total - compensation)


SCHEMES = (
    # name, accumulator bytes per float32 weight byte
    ("float32", 1.0),
    ("float16", 0.5),
    ("bfloat16", 0.5),
    ("bfloat16, stochastic rounding", 0.5),
    ("bfloat16 + Kahan compensation", 1.0),
)


def summation_table(init, steps, windows: int, micro_batch: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = data(windows * max(steps) * micro_batch, seed + 1)
    gradients = micro_batch_gradients(init, x, y, micro_batch)
    columns = " | ".join(f"k = {k}" for k in steps)
    print(
        "\nOne window's sum of real micro-batch gradients (NumPy), relative error:\n\n"
        f"| accumulator | bytes per float32 weight byte | {columns} |\n"
        f"|---|---:|{'---:|' * len(steps)}"
    )
    for scheme, ratio in SCHEMES:
        cells = []
        for k in steps:
            errors = []
            for window in range(windows):
                # The accumulation objective's gradients: 1/k of each mean-loss gradient.
                block = gradients[window * k : (window + 1) * k] / k
                exact = block.sum(axis=0)
                error = np.abs(window_sum(block, scheme, rng) - exact).max()
                errors.append(error / np.abs(exact).max())
            cells.append(f"{np.mean(errors):.1e}")
        print(f"| {scheme} | {ratio:.2f} | {' | '.join(cells)} |")


# -- training ------------------------------------------------------------------


def relative_error(weights, reference) -> float:
    largest = max(float(np.abs(w).max()) for w in reference)
    return max(float(np.abs(a - b).max()) for a, b in zip(weights, reference)) / largest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="4,16,64", help="values of k, comma-separated")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=16, help="windows of the NumPy table")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    print(
        f"backend {keras.backend.backend()}, keras {keras.__version__}, "
        f"accum_keras {accum_keras.__version__} ({library_revision()}); "
        f"{args.updates} updates of SGD({LEARNING_RATE}, momentum=0.9), "
        f"micro-batch {args.micro_batch}, "
        f"MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{OUTPUTS}"
    )
    init = initial_weights(args.seed)
    started = time.perf_counter()
    summation_table(init, steps, args.windows, args.micro_batch, args.seed)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    # Per row: errors against the float32 big batch and against the plain big
    # batch in the model's dtype, by k.
    errors: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    memory: dict[tuple[str, str], float] = {}
    for k in steps:
        x, y = data(args.updates * k * args.micro_batch, args.seed)
        big = k * args.micro_batch
        reference, _ = train("float32", init, x, y, big)
        for model_dtype in MODEL_DTYPES:
            plain, _ = train(model_dtype, init, x, y, big)
            errors.setdefault((model_dtype, "plain, big batch"), {})[k] = (
                relative_error(plain, reference),
                0.0,
            )
            for accumulator_dtype in ACCUMULATOR_DTYPES:
                weights, ratio = train(
                    model_dtype, init, x, y, args.micro_batch, k, accumulator_dtype
                )
                row = (model_dtype, accumulator_dtype)
                errors.setdefault(row, {})[k] = (
                    relative_error(weights, reference),
                    relative_error(weights, plain),
                )
                memory[row] = ratio
        print(f"k = {k} trained ({time.perf_counter() - started:.0f} s)", flush=True)

    columns = " | ".join(f"k = {k}" for k in steps)
    for index, against in enumerate(
        ("the float32 big batch", "the plain big batch in the model's dtype")
    ):
        print(
            f"\nWeights after {args.updates} updates, relative error against {against}:\n\n"
            f"| model weights | accumulators | bytes per weight byte | {columns} |\n"
            f"|---|---|---:|{'---:|' * len(steps)}"
        )
        for (model_dtype, arm), by_k in errors.items():
            ratio = memory.get((model_dtype, arm))
            ratio_text = "—" if ratio is None else f"{ratio:.2f}"
            cells = " | ".join(f"{by_k[k][index]:.1e}" for k in steps)
            print(f"| {model_dtype} | {arm} | {ratio_text} | {cells} |")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
