"""Runs accumulation under MirroredStrategy on two logical CPUs (own process).

Prints one JSON line: for each case, the relative weight difference to plain
Keras on one device with the global big batch, and both update counts; for
the ``resume_*`` cases (argument ``resume``), the difference between a run resumed from a
mid-window save and the uninterrupted run; and ``randomized_state_machine``, the
randomized window test run under the strategy (tests/distributed_state_machine.py).
"""

import json
import os
import sys
import tempfile

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
import distributed_state_machine  # noqa: E402
from helpers import max_relative_difference  # noqa: E402

GLOBAL_MICRO, K = 8, 4


def new_strategy():
    """A MirroredStrategy on the two CPUs whose collectives are its own.

    Every MirroredStrategy numbers its collectives from the same keys, and
    TensorFlow's runtime remembers the shape of each key: a second strategy
    in the process whose cases all-reduce in another order fails unless it
    starts from other keys (TensorFlow's tests set this class attribute too).
    """
    tf.distribute.MirroredStrategy._collective_key_base += 1000
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


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

    strategy = new_strategy()
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


def skip_with_nan_on_one_replica():
    """``skip_nonfinite_updates`` with a NaN label in one sample, i.e. on one replica.

    100 samples in windows of 32, 32, 32 and 4 (the last applied at the epoch's
    end), 2 epochs; the NaNs poison the second window and the short last one.
    The reference is plain Keras on the global big batch without those windows.
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 5)).astype("float32")
    y = rng.normal(size=(100, 1)).astype("float32")
    y[45] = np.nan
    y[97] = np.nan
    kept = np.r_[0:32, 64:96]
    keras.utils.set_random_seed(0)
    reference = keras.Model(*layers())
    initial = reference.get_weights()
    reference.compile(keras.optimizers.Adam(0.01), loss="mse")
    reference.fit(x[kept], y[kept], batch_size=GLOBAL_MICRO * K, epochs=2, shuffle=False, verbose=0)

    strategy = new_strategy()
    with strategy.scope():
        model = accum_keras.Model(*layers(), accumulation_steps=K, skip_nonfinite_updates=True)
        model.set_weights(initial)
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
    callback = accum_keras.AccumulationCallback(lr_scaling=None)
    fit = {"batch_size": GLOBAL_MICRO, "shuffle": False, "verbose": 0, "callbacks": [callback]}
    # The first epoch with fit() outside the scope (docs/distributed.md), the
    # second inside it: both ways work.
    histories = [model.fit(x, y, **fit).history]
    with strategy.scope():
        histories.append(model.fit(x, y, **fit).history)
    return "skip_nan_on_one_replica", {
        "difference": max_relative_difference(model.get_weights(), reference.get_weights()),
        "updates": int(model.optimizer.iterations.numpy()),
        "reference_updates": int(reference.optimizer.iterations.numpy()),
        "skipped_updates": [h["skipped_updates"][0] for h in histories],
        "effective_batch_size": [h["effective_batch_size"][0] for h in histories],
    }


def train_on_batch_then_fit():
    """A window opened by ``train_on_batch`` and closed by ``fit()``, micro-batches of 3.

    Keras' ``train_on_batch`` hands every replica the whole batch, ``fit()``
    splits its batches (2 + 1 rows here); the reference is plain Keras on one
    device, on the window's 12 rows at once.
    """
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    reference = keras.Model(*layers())
    initial = reference.get_weights()
    reference.compile(keras.optimizers.SGD(0.1), loss="mse")
    reference.train_on_batch(x, y)
    strategy = new_strategy()
    with strategy.scope():
        model = accum_keras.Model(*layers(), accumulation_steps=K)
        model.set_weights(initial)
        model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(x[:3], y[:3])
    model.fit(x[3:], y[3:], batch_size=3, shuffle=False, verbose=0)
    return "train_on_batch_then_fit", {
        "difference": max_relative_difference(model.get_weights(), reference.get_weights()),
        "updates": int(model.optimizer.iterations.numpy()),
        "reference_updates": int(reference.optimizer.iterations.numpy()),
    }


class SaveAt(keras.callbacks.Callback):
    """Saves the model (or its weights) after one batch, mid-window."""

    def __init__(self, batch, path):
        super().__init__()
        self.batch, self.path = batch, path

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            if self.path.endswith(".keras"):
                self.model.save(self.path)
            else:
                self.model.save_weights(self.path)


def resume_case(name, accumulator_dtype, fmt):
    """A mid-window save with half-precision accumulators, resumed on two replicas."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * K * GLOBAL_MICRO, 5)).astype("float32")
    y = rng.normal(size=(2 * K * GLOBAL_MICRO, 1)).astype("float32")
    strategy = new_strategy()

    def make():
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = accum_keras.Model(
                *layers(), accumulation_steps=K, accumulator_dtype=accumulator_dtype
            )
            model.compile(keras.optimizers.Adam(0.01), loss="mse")
        return model

    cut = 2 * K - 1  # three micro-batches into the second window
    path = os.path.join(tempfile.mkdtemp(), f"window.{fmt}")
    uninterrupted = make()
    uninterrupted.fit(
        x, y, batch_size=GLOBAL_MICRO, shuffle=False, verbose=0, callbacks=[SaveAt(cut - 1, path)]
    )
    if fmt == "keras":
        with strategy.scope():
            resumed = keras.models.load_model(path)
    else:
        resumed = make()
        with strategy.scope():
            # Keras loads an optimizer's state only into a built optimizer.
            resumed.optimizer.build(resumed.trainable_variables)
        resumed.load_weights(path)
    pending = resumed.pending_micro_steps
    rest = slice(cut * GLOBAL_MICRO, None)
    resumed.fit(x[rest], y[rest], batch_size=GLOBAL_MICRO, shuffle=False, verbose=0)
    return name, {
        "pending": pending,
        "updates": int(resumed.optimizer.iterations.numpy()),
        "difference": max_relative_difference(resumed.get_weights(), uninterrupted.get_weights()),
    }


def run_in_step_case(name, make_optimizer, regularizer=None, samples=60, batch=16, micro=3):
    """``micro_batch_size``: each replica splits its own share of the batch.

    The reference is plain Keras on the same batches under the same strategy.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 5)).astype("float32")
    y = rng.normal(size=(samples, 1)).astype("float32")
    strategy = new_strategy()
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
        # One window (a float8 value after more windows depends on the
        # weights' float8 round-off, see tests/test_float8.py).
        run_case(
            "float8_one_window",
            lambda: keras.optimizers.SGD(0.1),
            samples=GLOBAL_MICRO * K,
            epochs=1,
            quantize="float8",
        ),
        skip_with_nan_on_one_replica(),
        train_on_batch_then_fit(),
        # After other strategies' fits: each strategy has its own collective
        # keys (`new_strategy`).
        resume_case("resume_bfloat16", "bfloat16", "keras"),
    ]
)
# Last: its examples make strategies of their own (`new_strategy`).
cases["randomized_state_machine"] = distributed_state_machine.run(new_strategy=new_strategy)
print(json.dumps(cases), flush=True)
# Once, after an explored randomized draw (ACCUM_KERAS_STATE_MACHINE_EXPLORE=1),
# the process printed its results and then never exited (TensorFlow's
# runtime at shutdown, not diagnosed): the results are out, so leave now.
os._exit(0)
