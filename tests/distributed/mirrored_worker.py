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
# One strategy for every case: collectives of strategies created one after
# the other in a process can share instance keys, and a case whose collectives
# have other shapes than the previous case's then fails (TensorFlow 2.21).
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def layers(regularizer=None):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer)(inputs)
    return inputs, keras.layers.Dense(1)(hidden)


def run_case(name, make_optimizer, loss="mse", regularizer=None, samples=60):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 5)).astype("float32")
    y = rng.normal(size=(samples, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    reference = keras.Model(*layers(regularizer))
    initial = reference.get_weights()
    reference.compile(make_optimizer(), loss=loss)
    reference.fit(x, y, batch_size=GLOBAL_MICRO * K, epochs=2, shuffle=False, verbose=0)

    strategy = STRATEGY
    with strategy.scope():
        model = accum_keras.Model(*layers(regularizer), accumulation_steps=K)
        model.set_weights(initial)
        model.compile(make_optimizer(), loss=loss)
    callback = accum_keras.AccumulationCallback(lr_scaling=None)
    model.fit(
        x, y, batch_size=GLOBAL_MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[callback]
    )
    return name, {
        "difference": max_relative_difference(model.get_weights(), reference.get_weights()),
        "updates": int(model.optimizer.iterations.numpy()),
        "reference_updates": int(reference.optimizer.iterations.numpy()),
        "replicas": strategy.num_replicas_in_sync,
        "effective_batch_size": model.history.history["effective_batch_size"],
    }


def run_in_step_case(name, make_optimizer, regularizer=None, samples=60, batch=16, micro=3):
    """``micro_batch_size``: each replica splits its own share of the batch.

    The reference is plain Keras on the same batches under the same strategy.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 5)).astype("float32")
    y = rng.normal(size=(samples, 1)).astype("float32")
    strategy = STRATEGY
    histories, models = [], []
    keras.utils.set_random_seed(0)
    for micro_batch_size in (micro, None):
        with strategy.scope():
            if micro_batch_size is None:
                model = keras.Model(*layers(regularizer))
                model.set_weights(models[0].get_weights())
            else:
                model = accum_keras.Model(*layers(regularizer), micro_batch_size=micro_batch_size)
                initial = model.get_weights()
            model.compile(make_optimizer(), loss="mse", metrics=["mae"])
        models.append(model)
    models[1].set_weights(initial)
    for model in models:
        histories.append(
            model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0).history
        )
    in_step, plain = models
    return name, {
        "difference": max_relative_difference(in_step.get_weights(), plain.get_weights()),
        "updates": int(in_step.optimizer.iterations.numpy()),
        "reference_updates": int(plain.optimizer.iterations.numpy()),
        "replicas": strategy.num_replicas_in_sync,
        "history": histories[0],
        "reference_history": histories[1],
    }


cases = dict(
    [
        # Per replica: batches of 8 (two micro-batches of 3 and one of 2),
        # and the epoch's last batch of 12 (6 per replica: two of 3).
        run_in_step_case(
            "in_step_adam_l2",
            lambda: keras.optimizers.Adam(0.01),
            regularizer=keras.regularizers.L2(0.01),
        ),
        run_case("sgd_momentum", lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
        run_case("adam", lambda: keras.optimizers.Adam(0.01)),
        run_case(
            "adam_l2_equal_windows",
            lambda: keras.optimizers.Adam(0.01),
            regularizer=keras.regularizers.L2(0.01),
            samples=64,
        ),
    ]
)
print(json.dumps(cases))
