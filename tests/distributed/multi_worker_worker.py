"""One worker of a two-process MultiWorkerMirroredStrategy run (own process).

TF_CONFIG (set by the test) points both workers at loopback ports. Each worker
trains the accumulating model under the strategy and, outside it, plain Keras
on one device with the global big batch; it prints one JSON line with the
relative weight difference and both update counts. It does the same for the
in-step mode (``micro_batch_size``), with both histories.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402

import accum_keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import max_relative_difference  # noqa: E402

GLOBAL_MICRO, K, SAMPLES = 8, 4, 60


def layers():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return inputs, keras.layers.Dense(1)(hidden)


rng = np.random.default_rng(0)
x = rng.normal(size=(SAMPLES, 5)).astype("float32")
y = rng.normal(size=(SAMPLES, 1)).astype("float32")

keras.utils.set_random_seed(0)
reference = keras.Model(*layers())
initial = reference.get_weights()
reference.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
reference.fit(x, y, batch_size=GLOBAL_MICRO * K, epochs=2, shuffle=False, verbose=0)

with strategy.scope():
    model = accum_keras.Model(*layers(), accumulation_steps=K)
    model.set_weights(initial)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_MICRO)
model.fit(dataset, epochs=2, verbose=0)

# `skip_nonfinite_updates` with a NaN label in one sample of the second
# window (28 samples): on one worker only. The reference leaves that window out.
poisoned = y.copy()
poisoned[45] = np.nan
keras.utils.set_random_seed(0)
kept_reference = keras.Model(*layers())
kept_reference.set_weights(initial)
kept_reference.compile(keras.optimizers.Adam(0.01), loss="mse")
kept_reference.fit(x[:32], y[:32], batch_size=GLOBAL_MICRO * K, epochs=2, shuffle=False, verbose=0)
with strategy.scope():
    skipping = accum_keras.Model(*layers(), accumulation_steps=K, skip_nonfinite_updates=True)
    skipping.set_weights(initial)
    skipping.compile(keras.optimizers.Adam(0.01), loss="mse")
skipping.fit(
    tf.data.Dataset.from_tensor_slices((x, poisoned)).batch(GLOBAL_MICRO), epochs=2, verbose=0
)

# micro_batch_size: each worker splits its own share of every global batch of
# 16 (8 per replica: two micro-batches of 3 and a remainder of 2; the epoch's
# last batch of 12 is 6 per replica, two of 3). The reference is plain Keras
# on one device with the same global batches: a plain Keras model cannot fit
# under this strategy (its first batch's reduction fails, as the accumulating
# models' `_maybe_symbolic_build` says).
keras.utils.set_random_seed(0)
in_step_reference = keras.Model(*layers())
in_step_reference.set_weights(initial)
in_step_reference.compile(keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
in_step_reference_history = in_step_reference.fit(
    x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
).history
with strategy.scope():
    in_step = accum_keras.Model(*layers(), micro_batch_size=3)
    in_step.set_weights(initial)
    in_step.compile(keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
in_step_history = in_step.fit(
    tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=2, verbose=0
).history
print(
    json.dumps(
        {
            "in_step_difference": max_relative_difference(
                in_step.get_weights(), in_step_reference.get_weights()
            ),
            "in_step_updates": int(in_step.optimizer.iterations.numpy()),
            "in_step_reference_updates": int(in_step_reference.optimizer.iterations.numpy()),
            "in_step_history": in_step_history,
            "in_step_reference_history": in_step_reference_history,
            "workers": strategy.cluster_resolver.cluster_spec().num_tasks("worker"),
            "difference": max_relative_difference(model.get_weights(), reference.get_weights()),
            "updates": int(model.optimizer.iterations.numpy()),
            "reference_updates": int(reference.optimizer.iterations.numpy()),
            "skip_difference": max_relative_difference(
                skipping.get_weights(), kept_reference.get_weights()
            ),
            "skip_updates": int(skipping.optimizer.iterations.numpy()),
            "skipped_updates": int(skipping._accumulation_state.skipped_updates.numpy()),
        }
    )
)
