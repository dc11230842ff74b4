"""Runs accumulation under MirroredStrategy on two logical CPUs (own process).

Prints one JSON line: for each case, the relative weight difference to plain
Keras on one device with the global big batch, and both update counts.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402

import accum_keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import max_relative_difference  # noqa: E402

GLOBAL_MICRO, K = 8, 4


def layers(regularizer=None):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer)(inputs)
    return inputs, keras.layers.Dense(1)(hidden)


def run_case(
    name, make_optimizer, loss="mse", regularizer=None, samples=60, epochs=2, quantize=None
):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 5)).astype("float32")
    y = rng.normal(size=(samples, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    reference = keras.Model(*layers(regularizer))
    if quantize:
        reference.quantize(quantize)
    initial = reference.get_weights()
    reference.compile(make_optimizer(), loss=loss)
    reference.fit(x, y, batch_size=GLOBAL_MICRO * K, epochs=epochs, shuffle=False, verbose=0)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = accum_keras.Model(*layers(regularizer), accumulation_steps=K)
        if quantize:
            model.quantize(quantize)
        model.set_weights(initial)
        model.compile(make_optimizer(), loss=loss)
    callback = accum_keras.AccumulationCallback(lr_scaling=None)
    model.fit(
        x, y, batch_size=GLOBAL_MICRO, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback]
    )
    overwritten = [
        (ours, theirs)
        for ours, theirs in zip(model.weights, reference.weights)
        if getattr(ours, "overwrite_with_gradient", False)
    ]
    result = {}
    if overwritten:
        # Data-independent values (the kernels' amax and scale) against the
        # reference; the first layer's input amax against NumPy: the maximum
        # over the first replica's halves of the window's micro-batches.
        kernel = [(a, b) for a, b in overwritten if "kernel_" in a.path]
        result["kernel_values_difference"] = max_relative_difference(
            [np.asarray(a) for a, _ in kernel], [np.asarray(b) for _, b in kernel]
        )
        half = GLOBAL_MICRO // 2
        first_replica = np.concatenate([x[i : i + half] for i in range(0, samples, GLOBAL_MICRO)])
        result["inputs_amax"] = float(np.asarray(model.layers[1].inputs_amax_history)[0])
        result["first_replica_inputs_amax"] = float(np.abs(first_replica).max())
        result["global_inputs_amax"] = float(np.abs(x).max())
        optimized = [
            (a, b)
            for a, b in zip(model.weights, reference.weights)
            if not getattr(a, "overwrite_with_gradient", False)
        ]
        result["optimized_difference"] = max_relative_difference(
            [np.asarray(a) for a, _ in optimized], [np.asarray(b) for _, b in optimized]
        )
    return name, {
        **result,
        "difference": max_relative_difference(model.get_weights(), reference.get_weights()),
        "updates": int(model.optimizer.iterations.numpy()),
        "reference_updates": int(reference.optimizer.iterations.numpy()),
        "replicas": strategy.num_replicas_in_sync,
        "effective_batch_size": model.history.history["effective_batch_size"],
    }


cases = dict(
    [
        run_case("sgd_momentum", lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
        run_case("adam", lambda: keras.optimizers.Adam(0.01)),
        run_case(
            "adam_l2_equal_windows",
            lambda: keras.optimizers.Adam(0.01),
            regularizer=keras.regularizers.L2(0.01),
            samples=64,
        ),
        # One window (a float8 value after more windows depends on the
        # weights' float8 round-off, see tests/test_float8.py).
        run_case(
            "float8_one_window",
            lambda: keras.optimizers.SGD(0.1),
            samples=GLOBAL_MICRO * K,
            epochs=1,
            quantize="float8",
        ),
    ]
)
print(json.dumps(cases))
