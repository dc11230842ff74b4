"""Runs accumulation under `keras.distribution.DataParallel` on two host devices.

JAX must see two CPU devices before it starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``) and the backend is
fixed at import, so this runs in its own process (`tests/test_backend_suites.py`).

Prints one JSON line: for each case, the relative weight difference to plain
Keras on one device with the global big batch, and both update counts.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import accum_keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import max_relative_difference  # noqa: E402

GLOBAL_MICRO, K = 8, 4


def layers(regularizer=None):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer)(inputs)
    return inputs, keras.layers.Dense(1)(hidden)


def run_case(
    name, make_optimizer, regularizer=None, samples=60, sample_weight=False, lr_scaling=None
):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 5)).astype("float32")
    y = rng.normal(size=(samples, 1)).astype("float32")
    weights = rng.uniform(0.1, 2.0, size=(samples,)).astype("float32") if sample_weight else None
    keras.utils.set_random_seed(0)
    reference = keras.Model(*layers(regularizer))
    initial = reference.get_weights()
    reference.compile(make_optimizer(K if lr_scaling == "linear" else 1), loss="mse")
    reference.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=GLOBAL_MICRO * K,
        epochs=2,
        shuffle=False,
        verbose=0,
    )

    distribution = keras.distribution.DataParallel(devices=jax.devices())
    with distribution.scope():
        model = accum_keras.Model(*layers(regularizer), accumulation_steps=K)
        model.set_weights(initial)
        model.compile(make_optimizer(1), loss="mse")
        callback = accum_keras.AccumulationCallback(lr_scaling=lr_scaling)
        model.fit(
            x,
            y,
            sample_weight=weights,
            batch_size=GLOBAL_MICRO,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[callback],
        )
        kernel = model.trainable_variables[0].value
        accumulator = model._accumulation_state.gradients[0].value
    return name, {
        "difference": max_relative_difference(model.get_weights(), reference.get_weights()),
        "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "reference_updates": int(keras.ops.convert_to_numpy(reference.optimizer.iterations)),
        "devices": len(jax.devices()),
        "kernel_devices": len(kernel.sharding.device_set),
        "accumulator_devices": len(accumulator.sharding.device_set),
        "effective_batch_size": model.history.history["effective_batch_size"],
    }


cases = dict(
    [
        # The callback's learning-rate multiplier travels in the state too.
        run_case(
            "adam_linear_scaling", lambda f: keras.optimizers.Adam(0.01 * f), lr_scaling="linear"
        ),
        run_case(
            "adamw_l2_sample_weights",
            lambda f: keras.optimizers.AdamW(0.01 * f, weight_decay=0.1),
            regularizer=keras.regularizers.L2(0.01),
            sample_weight=True,
        ),
    ]
)
print(json.dumps(cases))
