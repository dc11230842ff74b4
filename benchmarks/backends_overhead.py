"""Time per micro-batch on each Keras backend: accum_keras vs Keras' built-in vs plain.

Three arms train the same MLP at the same micro-batch size ``b`` with ``fit``:

- ``plain``: a plain ``keras.Model``, one optimizer update per micro-batch;
- ``built-in``: a plain ``keras.Model`` whose optimizer has
  ``gradient_accumulation_steps=k`` (on JAX it computes an update on every
  micro-batch and discards it; it is not exact, see shared notes §1);
- ``accum_keras``: ``accum_keras.Model(..., accumulation_steps=k)``.

Keras fixes its backend at import, so each backend runs in its own process
(``--backend`` picks one; without it the script runs every installed one).
Each arm is first fitted once untimed (tracing, compiling). Then the arms take
turns, one epoch of ``steps`` micro-batches each (a multiple of ``k``),
``repeats`` times, in an order rotated every round so that drift of a shared
machine is shared between the arms. A callback time-stamps every micro-batch;
the first window of an epoch (it holds ``fit()``'s set-up) is left out, and
the median over windows of (window time / k) is reported in milliseconds per
micro-batch, in wall-clock and in process CPU time (which other jobs on a
shared machine disturb less).

Usage::

    python benchmarks/backends_overhead.py                  # all installed backends
    python benchmarks/backends_overhead.py --backend jax --steps 64 --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")
ARMS = ("plain", "built-in", "accum_keras")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--k", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--batch", type=int, default=64, help="micro-batch size")
    parser.add_argument("--width", type=int, default=1024, help="hidden units (2 layers)")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--steps", type=int, default=48, help="micro-batches per epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per arm")
    parser.add_argument("--json", action="store_true", help="print one JSON line per backend")
    return parser.parse_args(argv)


def run_all(args) -> None:
    results = {}
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped", file=sys.stderr)
            continue
        command = [sys.executable, os.path.abspath(__file__), "--backend", backend, "--json"]
        for name in ("k", "batch", "width", "features", "steps", "repeats"):
            command += [f"--{name}", str(getattr(args, name))]
        env = dict(os.environ, KERAS_BACKEND=backend)
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"{backend}: failed\n{completed.stderr[-3000:]}", file=sys.stderr)
            continue
        results[backend] = json.loads(completed.stdout.strip().splitlines()[-1])
    print_table(results, args)


def print_table(results: dict, args) -> None:
    print(
        f"MLP {args.features}-{args.width}-{args.width}-10, Adam, micro-batch {args.batch}, "
        f"k={args.k}, {args.steps} micro-batches x {args.repeats} epochs per arm"
    )
    for clock in ("wall", "cpu"):
        print(f"\n{clock} ms per micro-batch (median over windows)")
        print(
            f"{'backend':<11} {'plain':>8} {'built-in':>9} {'accum':>8} "
            f"{'accum/built-in':>15} {'accum/plain':>12}"
        )
        for backend, result in results.items():
            times = result[clock]
            print(
                f"{backend:<11} {times['plain']:8.2f} {times['built-in']:9.2f} "
                f"{times['accum_keras']:8.2f} "
                f"{times['accum_keras'] / times['built-in']:15.2f} "
                f"{times['accum_keras'] / times['plain']:12.2f}"
            )


def run_backend(args) -> dict:
    os.environ["KERAS_BACKEND"] = args.backend
    import keras
    import numpy as np

    import accum_keras

    rng = np.random.default_rng(0)
    samples = args.batch * args.steps
    x = rng.normal(size=(samples, args.features)).astype("float32")
    y = rng.integers(0, 10, size=(samples,)).astype("int32")

    def layers():
        inputs = keras.Input((args.features,))
        hidden = keras.layers.Dense(args.width, activation="relu")(inputs)
        hidden = keras.layers.Dense(args.width, activation="relu")(hidden)
        return inputs, keras.layers.Dense(10)(hidden)

    keras.utils.set_random_seed(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    models = {
        "plain": keras.Model(*layers()),
        "built-in": keras.Model(*layers()),
        "accum_keras": accum_keras.Model(*layers(), accumulation_steps=args.k),
    }
    models["plain"].compile(keras.optimizers.Adam(1e-4), loss=loss)
    models["built-in"].compile(
        keras.optimizers.Adam(1e-4, gradient_accumulation_steps=args.k), loss=loss
    )
    models["accum_keras"].compile(keras.optimizers.Adam(1e-4), loss=loss)

    class Stamps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.wall, self.cpu = [], []

        def on_train_batch_end(self, batch, logs=None):
            # Wait for the step (JAX and TF dispatch asynchronously), as a
            # progress bar would; every arm pays the same.
            float(keras.ops.convert_to_numpy(logs["loss"]))
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def window_times(stamps: list[float]) -> list[float]:
        # Window i runs from the end of window i-1 to the end of window i.
        ends = stamps[args.k - 1 :: args.k]
        return [(b - a) / args.k * 1000 for a, b in zip(ends, ends[1:])]

    for model in models.values():  # trace / compile, untimed
        model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    per_arm = {arm: {"wall": [], "cpu": []} for arm in ARMS}
    for repeat in range(args.repeats):
        order = ARMS[repeat % 3 :] + ARMS[: repeat % 3]
        for arm in order:
            stamps = Stamps()
            models[arm].fit(
                x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[stamps]
            )
            per_arm[arm]["wall"] += window_times(stamps.wall)
            per_arm[arm]["cpu"] += window_times(stamps.cpu)
    return {
        clock: {arm: statistics.median(per_arm[arm][clock]) for arm in ARMS}
        for clock in ("wall", "cpu")
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.backend is None:
        run_all(args)
        return
    result = run_backend(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table({args.backend: result}, args)


if __name__ == "__main__":
    main()
