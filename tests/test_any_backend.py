"""Window state as callbacks and the compiled step see it, on every backend.

On JAX the window state travels in the state Keras threads through the
compiled step and reaches the variables only when synced; on PyTorch the
step decides on a host mirror of the window counter. These tests check what
that must not change: callbacks read the live window, and values the step
reads (``accumulation_steps``, the learning-rate multiplier) can change between
epochs without retracing.
"""

import keras
import numpy as np
from helpers import assert_same_training, functional_twins, regression_data, small_regression_layers

import accum_keras

K, MICRO = 4, 4


def test_callbacks_read_the_live_window_mid_epoch():
    x, y = regression_data(samples=40)  # 10 micro-batches: windows of 4, 4, 2
    model, _ = functional_twins(small_regression_layers(), K)
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(
                (
                    self.model.pending_micro_steps,
                    int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)),
                    logs.get("effective_batch_size"),  # absent before the first update
                )
            )

    callbacks = [Probe(), accum_keras.AccumulationCallback(lr_scaling=None)]
    model.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    pending = [p for p, _, _ in seen]
    updates = [u for _, u, _ in seen]
    effective = [e for _, _, e in seen]
    assert pending == [1, 2, 3, 0, 1, 2, 3, 0, 1, 2] * 2
    assert updates == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5]
    assert effective[3] == 16 and effective[10] == 8  # the short window of epoch 1
    assert model.history.history["effective_batch_size"] == [40 / 3, 40 / 3]


def test_a_batch_schedule_with_linear_scaling_takes_effect_without_retracing():
    # k goes 2 -> 8 at epoch 1 and the callback raises the rate's multiplier
    # from 2 to 8 at that epoch's start: plain Keras on batch 8 at rate 0.02,
    # then on batch 32 at rate 0.08, with the same optimizer state.
    x, y = regression_data(samples=64)
    accumulating, plain = functional_twins(small_regression_layers(), 2)
    accumulating.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    plain.compile(keras.optimizers.SGD(0.02, momentum=0.9), loss="mse")
    callback = accum_keras.AccumulationCallback(
        lr_scaling="linear", accumulation_schedule={0: 2, 1: 8}
    )
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[callback]
    )
    plain.fit(x, y, batch_size=MICRO * 2, shuffle=False, verbose=0)
    plain.optimizer.learning_rate.assign(0.08)
    plain.fit(x, y, batch_size=MICRO * 8, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
    np.testing.assert_allclose(accumulating.history.history["learning_rate"], [0.02, 0.08])
