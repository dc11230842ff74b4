"""What crosses replicas, and what it costs: accum_keras vs plain per-step training.

Runs under `tf.distribute.MirroredStrategy` on two replicas (two logical CPU
devices here; real GPUs where present) and reports, for a parameter-heavy MLP:

1. all-reduce calls and bytes per optimizer update and per micro-batch,
   *counted* at run time: the training step is run eagerly
   (``run_eagerly=True``) with `ReplicaContext.all_reduce` instrumented, so
   only the branches actually taken are counted;
2. the wall time per micro-batch of the compiled step (arms take turns, one
   epoch each, so that other load on the machine hits them alike).

Arms: plain Keras (one update per micro-batch), accum_keras with
``accumulation_steps=k`` and Keras' built-in ``gradient_accumulation_steps=k``
(which, in Keras 3.15, fails under MirroredStrategy: keras-team/keras#20582).

    python benchmarks/distributed.py          # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_gpus = tf.config.list_physical_devices("GPU")
if len(_gpus) < 2:
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

import keras  # noqa: E402

import accum_keras  # noqa: E402

K, GLOBAL_MICRO = 4, 16


class AllReduceCounter:
    """Counts `ReplicaContext.all_reduce` calls and bytes (per replica call)."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self._original = tf.distribute.ReplicaContext.all_reduce

    def __enter__(self):
        counter = self

        def counted(context, reduce_op, value, options=None):
            for tensor in tf.nest.flatten(value):
                counter.calls += 1
                counter.bytes += int(np.prod(tensor.shape)) * tensor.dtype.size
            return counter._original(context, reduce_op, value, options)

        tf.distribute.ReplicaContext.all_reduce = counted
        return self

    def __exit__(self, *exc):
        tf.distribute.ReplicaContext.all_reduce = self._original


def mlp(width: int):
    inputs = keras.Input((256,))
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    hidden = keras.layers.Dense(width, activation="relu")(hidden)
    return inputs, keras.layers.Dense(10)(hidden)


def build(arm: str, strategy, width: int, run_eagerly: bool):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        if arm == "accum_keras":
            model = accum_keras.Model(*mlp(width), accumulation_steps=K)
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        else:
            model = keras.Model(*mlp(width))
            steps = K if arm == "built-in" else None
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9, gradient_accumulation_steps=steps)
        model.compile(
            optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=run_eagerly,
        )
    return model


def data(micro_batches: int):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_MICRO * micro_batches, 256)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int32")
    return x, y


def count(arm, strategy, width):
    x, y = data(2 * K)
    model = build(arm, strategy, width, run_eagerly=True)
    model.fit(x[:GLOBAL_MICRO], y[:GLOBAL_MICRO], batch_size=GLOBAL_MICRO, verbose=0)  # build
    start_updates = int(model.optimizer.iterations.numpy())
    with AllReduceCounter() as counter:
        model.fit(x, y, batch_size=GLOBAL_MICRO, shuffle=False, verbose=0)
    updates = int(model.optimizer.iterations.numpy()) - start_updates
    replicas = strategy.num_replicas_in_sync
    micro_batches = len(x) // GLOBAL_MICRO
    return {
        "updates": updates,
        "calls_per_update": counter.calls / replicas / max(updates, 1),
        "mb_per_update": counter.bytes / replicas / max(updates, 1) / 2**20,
        "mb_per_micro_batch": counter.bytes / replicas / micro_batches / 2**20,
    }


def compiled_models(arms, strategy, width, x, y):
    """Builds and warms up each arm's compiled step; returns models and failures."""
    models, failed = {}, {}
    for arm in arms:
        try:
            model = build(arm, strategy, width, run_eagerly=False)
            model.fit(x, y, batch_size=GLOBAL_MICRO, verbose=0)  # trace and warm up
            models[arm] = model
        except Exception as error:  # the built-in under MirroredStrategy
            first_line = str(error).strip().splitlines()[0][:90]
            failed[arm] = f"{type(error).__name__}: {first_line}"
    return models, failed


def times_per_micro_batch(models, x, y, repeats):
    """Median seconds per micro-batch of each arm; arms take turns, one epoch each."""
    arms = list(models)
    times = {arm: [] for arm in arms}
    for round_ in range(repeats):
        order = arms[round_ % len(arms) :] + arms[: round_ % len(arms)]
        for arm in order:
            start = time.perf_counter()
            models[arm].fit(x, y, batch_size=GLOBAL_MICRO, shuffle=False, verbose=0)
            times[arm].append((time.perf_counter() - start) / (len(x) // GLOBAL_MICRO))
    return {arm: statistics.median(values) for arm, values in times.items()}


def main(width: int, repeats: int) -> None:
    strategy = tf.distribute.MirroredStrategy()
    print(f"$ python {' '.join(sys.argv)}")
    params = sum(int(np.prod(v.shape)) for v in build("plain", strategy, width, False).weights)
    print(
        f"{strategy.num_replicas_in_sync} replicas ({strategy.extended.worker_devices}), MLP "
        f"256-{width}-{width}-10 ({params / 1e6:.2f} M parameters, "
        f"{params * 4 / 2**20:.1f} MiB of fp32 gradients), global micro-batch "
        f"{GLOBAL_MICRO}, k={K}\n"
    )
    print(
        "| arm | all-reduce calls / update | MiB all-reduced / update "
        "| MiB all-reduced / micro-batch | ms / micro-batch |"
    )
    print("| --- | --- | --- | --- | --- |")
    arms = ["plain", "accum_keras", "built-in"]
    x, y = data(8 * K)
    models, failed = compiled_models(arms, strategy, width, x, y)
    seconds = times_per_micro_batch(models, x, y, repeats)
    for arm in arms:
        if arm in failed:
            print(f"| {arm} | compiled step fails: `{failed[arm]}` | | | |")
            continue
        counted = count(arm, strategy, width)
        print(
            f"| {arm} | {counted['calls_per_update']:.1f} | {counted['mb_per_update']:.2f} "
            f"| {counted['mb_per_micro_batch']:.2f} | {seconds[arm] * 1e3:.1f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="wider MLP, more repeats")
    args = parser.parse_args()
    main(width=2048 if args.full else 1024, repeats=7 if args.full else 5)
