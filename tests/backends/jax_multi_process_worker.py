"""One of two JAX processes training with `keras.distribution.DataParallel` across processes.

Usage: ``jax_multi_process_worker.py COORDINATOR_PORT PROCESS_ID``. Started
twice (process 0 and 1) by `tests/test_jax_distribution.py`, on loopback with
gloo as JAX's CPU collectives. Each process feeds its own half of every
global micro-batch (``auto_shard_dataset = False``), so a global micro-batch
of 8 samples is 4 from each process, and a window of 4 micro-batches is a
global batch of 32.

Prints one JSON line: this process's final weights, the relative difference
to plain Keras trained on one device on the global big batch at ``k`` times
the learning rate (computed here, outside the distribution), both update
counts and the logged ``effective_batch_size``; under ``in_step``, the same
for ``micro_batch_size`` on global batches of 16, with both histories and the
collectives of its compiled train step (global batches of 12 and 16).
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import accum_keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import compiled_collectives, max_relative_difference  # noqa: E402

PROCESSES, GLOBAL_MICRO, K, SAMPLES = 2, 8, 4, 60
IN_STEP_BATCH, IN_STEP_MICRO = 16, 6


def build(accumulation_steps=None, micro_batch_size=None):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    outputs = keras.layers.Dense(1)(hidden)
    if micro_batch_size is not None:
        return accum_keras.Model(inputs, outputs, micro_batch_size=micro_batch_size)
    if accumulation_steps is None:
        return keras.Model(inputs, outputs)
    return accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)


def local_rows(process_id: int, global_batch: int = GLOBAL_MICRO) -> np.ndarray:
    """This process's half of each global batch (the last one is short)."""
    rows = []
    for start in range(0, SAMPLES, global_batch):
        batch = np.arange(start, min(start + global_batch, SAMPLES))
        rows.append(np.array_split(batch, PROCESSES)[process_id])
    return np.concatenate(rows)


def collectives_of(model, distribution, global_rows: int) -> list:
    """``[result shape, kind]`` of each collective of ``model``'s compiled train step.

    Compiled for a global batch of ``global_rows`` rows laid out as
    ``distribution`` lays out its inputs (shapes only: no data is placed).
    """
    batch = tuple(
        jax.ShapeDtypeStruct(shape, "float32") for shape in ((global_rows, 5), (global_rows, 1))
    )
    return compiled_collectives(model.train_step, model, distribution, batch)


def in_step(x, y, initial, process_id: int) -> dict:
    """``micro_batch_size=6`` on global batches of 16 (8 from each process).

    A batch of 16 is two micro-batches of 6 and a remainder of 4; the epoch's
    last batch of 12 is two of 6. The reference is plain Keras on one device
    on the same global batches.
    """
    keras.utils.set_random_seed(0)
    reference = build()
    reference.set_weights(initial)
    reference.compile(keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    reference_history = reference.fit(
        x, y, batch_size=IN_STEP_BATCH, epochs=2, shuffle=False, verbose=0
    ).history
    distribution = keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    rows = local_rows(process_id, IN_STEP_BATCH)
    with distribution.scope():
        model = build(micro_batch_size=IN_STEP_MICRO)
        model.set_weights(initial)
        model.compile(keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
        history = model.fit(
            x[rows],
            y[rows],
            batch_size=IN_STEP_BATCH // PROCESSES,
            epochs=2,
            shuffle=False,
            verbose=0,
        ).history
        weights = model.get_weights()
        # The epoch's last batch, 12 = 2 x 6, and a batch with a remainder,
        # 16 = 2 x 6 + 4: each process's 3 rows of every micro-batch and its
        # 2 of the remainder are its own.
        collectives = collectives_of(model, distribution, 12)
        remainder_collectives = collectives_of(model, distribution, 16)
    return {
        "weights": [w.ravel().tolist() for w in weights],
        "difference": max_relative_difference(weights, reference.get_weights()),
        "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "reference_updates": int(keras.ops.convert_to_numpy(reference.optimizer.iterations)),
        "history": history,
        "reference_history": reference_history,
        "collectives": collectives,
        "remainder_collectives": remainder_collectives,
    }


def main(port: int, process_id: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 5)).astype("float32")
    y = rng.normal(size=(SAMPLES, 1)).astype("float32")

    keras.utils.set_random_seed(0)
    keras.distribution.initialize(f"127.0.0.1:{port}", PROCESSES, process_id)
    assert jax.process_count() == PROCESSES

    # The reference: plain Keras on this process's own device, global batches.
    keras.utils.set_random_seed(0)
    reference = build()
    initial = reference.get_weights()
    # The callback's default linear scaling multiplies the rate by k.
    reference.compile(keras.optimizers.Adam(0.01 * K), loss="mse")
    reference.fit(x, y, batch_size=GLOBAL_MICRO * K, epochs=2, shuffle=False, verbose=0)

    distribution = keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    rows = local_rows(process_id)
    with distribution.scope():
        model = build(accumulation_steps=K)
        model.set_weights(initial)
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
        model.fit(
            x[rows],
            y[rows],
            batch_size=GLOBAL_MICRO // PROCESSES,  # per process
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[accum_keras.AccumulationCallback(lr_scaling="linear")],
        )
        weights = model.get_weights()
    print(
        json.dumps(
            {
                "process_id": jax.process_index(),
                "processes": jax.process_count(),
                "devices": len(jax.devices()),
                "weights": [w.ravel().tolist() for w in weights],
                "difference": max_relative_difference(weights, reference.get_weights()),
                "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
                "reference_updates": int(
                    keras.ops.convert_to_numpy(reference.optimizer.iterations)
                ),
                "effective_batch_size": model.history.history["effective_batch_size"],
                "in_step": in_step(x, y, initial, process_id),
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
