"""Random sequences of window events against a plain-Keras reference of the lifecycle table.

`hypothesis` drives an accumulating model through random sequences of the
events of `accum_keras._lifecycle` (micro-batches, fits that end, stop or are
interrupted, apply, discard, resize, save and load into a fresh model,
recompile, freeze and recompile). The reference is written from the table
alone: a list of pending micro-batches and a plain Keras model that trains on
their concatenation whenever the table says a window is applied. After every
event the two must have the same weights, the same number of optimizer
updates and the same number of pending micro-batches.

The budget is set by ``ACCUM_KERAS_STATE_MACHINE_EXAMPLES`` (default: 120 on
TensorFlow, 20 on the other backends, which run the whole suite too).
"""

import os
import warnings

import keras
import numpy as np
import pytest
from helpers import max_relative_difference
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import accum_keras

MICRO = 3
POOL = 24  # micro-batches of data, used round-robin
TOLERANCE = 1e-5  # relative, over sequences of up to ~30 updates

_DEFAULT_EXAMPLES = 120 if keras.backend.backend() == "tensorflow" else 20
EXAMPLES = int(os.environ.get("ACCUM_KERAS_STATE_MACHINE_EXAMPLES", _DEFAULT_EXAMPLES))

_rng = np.random.default_rng(0)
X = _rng.normal(size=(POOL * MICRO, 4)).astype("float32")
Y = _rng.normal(size=(POOL * MICRO, 1)).astype("float32")


def layers():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="tanh", name="hidden")(inputs)
    return inputs, keras.layers.Dense(1, name="head")(hidden)


def optimizer():
    return keras.optimizers.SGD(0.05, momentum=0.9)


def updates(model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_batch, stop):
        super().__init__()
        self.at_batch, self.stop = at_batch, stop

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at_batch:
            if self.stop:
                self.model.stop_training = True
            else:
                raise KeyboardInterrupt


class WindowLife(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        keras.utils.set_random_seed(1)
        self.k = 3
        self.model = self._new_model()
        self.plain = keras.Model(*layers())
        self.plain.set_weights(self.model.get_weights())
        self.plain.compile(optimizer(), loss="mse", run_eagerly=True)
        self.plain_updates = 0
        self.pending: list[int] = []  # indices of the reference's pending micro-batches
        self.cursor = 0
        self.frozen = False

    def _new_model(self):
        model = accum_keras.Model(*layers(), accumulation_steps=self.k)
        model.compile(optimizer(), loss="mse", run_eagerly=True)
        return model

    # -- the reference, from the lifecycle table alone --------------------------

    def _reference_apply(self):
        if not self.pending:
            return
        rows = np.concatenate([np.arange(i * MICRO, (i + 1) * MICRO) for i in self.pending])
        self.plain.train_on_batch(X[rows], Y[rows])
        self.plain_updates += 1
        self.pending = []

    def _reference_add(self, index):
        self.pending.append(index)
        if len(self.pending) >= self.k:
            self._reference_apply()

    def _next_indices(self, count):
        indices = [(self.cursor + i) % POOL for i in range(count)]
        self.cursor = (self.cursor + count) % POOL
        return indices

    @staticmethod
    def _rows(indices):
        return np.concatenate([np.arange(i * MICRO, (i + 1) * MICRO) for i in indices])

    # -- events ---------------------------------------------------------------------

    @rule(count=st.integers(1, 4))
    def train_on_batch(self, count):
        for index in self._next_indices(count):
            rows = self._rows([index])
            self.model.train_on_batch(X[rows], Y[rows])
            self._reference_add(index)

    @rule(count=st.integers(1, 6), ending=st.sampled_from(["epoch_end", "stop", "interrupt"]))
    def fit(self, count, ending):
        indices = self._next_indices(count)
        rows = self._rows(indices)
        last = count - 1 if ending == "epoch_end" else (count - 1) // 2
        callbacks = [] if ending == "epoch_end" else [Interrupt(last, stop=ending == "stop")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.model.fit(
                    X[rows],
                    Y[rows],
                    batch_size=MICRO,
                    shuffle=False,
                    verbose=0,
                    callbacks=callbacks,
                )
            except KeyboardInterrupt:
                assert ending == "interrupt"
        for index in indices[: last + 1]:
            self._reference_add(index)
        if ending != "interrupt":
            self._reference_apply()  # the epoch ends, early or not
        # Data not trained on is handed out again.
        self.cursor = (indices[last] + 1) % POOL

    @rule()
    def apply_pending_window(self):
        applied = self.model.apply_pending_window()
        assert applied == bool(self.pending)
        self._reference_apply()

    @rule()
    def discard_pending_window(self):
        assert self.model.discard_pending_window() == len(self.pending)
        self.pending = []

    @rule(k=st.integers(1, 5))
    def resize(self, k):
        self.model.accumulation_steps = k
        self.k = k
        if len(self.pending) >= k:
            self._reference_apply()

    @rule()
    def save_and_load_into_a_fresh_model(self):
        path = os.path.join(self.directory, "window.weights.h5")
        self.model.save_weights(path)
        fresh = self._new_model()
        fresh.layers[1].trainable = not self.frozen
        fresh.compile(optimizer(), loss="mse", run_eagerly=True)
        fresh.optimizer.build(fresh.trainable_variables)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh.load_weights(path)
        self.model = fresh

    @rule()
    def recompile(self):
        self.model.compile(optimizer(), loss="mse", run_eagerly=True)
        self._reference_apply()
        self.plain.compile(optimizer(), loss="mse", run_eagerly=True)
        self.plain_updates = 0

    @rule()
    def toggle_freeze_and_recompile(self):
        self.frozen = not self.frozen
        self.model.layers[1].trainable = not self.frozen
        self.model.compile(optimizer(), loss="mse", run_eagerly=True)
        self._reference_apply()  # with the variables that opened the window
        self.plain.layers[1].trainable = not self.frozen
        self.plain.compile(optimizer(), loss="mse", run_eagerly=True)
        self.plain_updates = 0

    # -- what must hold after every event -----------------------------------------

    @invariant()
    def same_training(self):
        assert self.model.pending_micro_steps == len(self.pending)
        assert self.model.accumulation_steps == self.k
        assert updates(self.model) == self.plain_updates == updates(self.plain)
        difference = max_relative_difference(self.model.get_weights(), self.plain.get_weights())
        assert difference <= TOLERANCE, f"weights differ by {difference:.3g}"


@pytest.fixture
def machine(tmp_path):
    WindowLife.directory = str(tmp_path)
    return WindowLife


def test_random_window_event_sequences_match_the_reference(machine):
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=10,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
