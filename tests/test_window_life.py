"""The window's life around fit(): every micro-batch is applied exactly once, or dropped only on request.

Each test drives one event of `accum_keras._lifecycle` (resize, interrupt,
stop, restore, load, recompile, freeze) and compares against plain Keras
applying the same micro-batches in the windows the lifecycle table promises.
"""

import warnings

import keras
import numpy as np
import pytest
from helpers import (
    assert_same_training,
    functional_twins,
    max_relative_difference,
    regression_data,
    small_regression_layers,
)

import accum_keras

MICRO, K = 4, 4


def twins(k=K, optimizer=lambda: keras.optimizers.Adam(0.01)):
    accumulating, plain = functional_twins(small_regression_layers(), k)
    for model in (accumulating, plain):
        model.compile(optimizer(), loss="mse")
    return accumulating, plain


def micro(x, y, index):
    batch = slice(index * MICRO, (index + 1) * MICRO)
    return x[batch], y[batch]


def apply_big_batch(plain, x, y, first, count):
    """Plain Keras applies micro-batches ``first .. first+count-1`` as one batch."""
    batch = slice(first * MICRO, (first + count) * MICRO)
    plain.train_on_batch(x[batch], y[batch])


def updates(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


# -- apply and discard: the public levers ----------------------------------------


def test_apply_pending_window_applies_a_short_window_like_a_short_big_batch():
    x, y = regression_data()
    accumulating, plain = twins()
    for index in range(6):
        accumulating.train_on_batch(*micro(x, y, index))
    assert accumulating.pending_micro_steps == 2
    assert accumulating.apply_pending_window() is True
    assert accumulating.pending_micro_steps == 0
    assert accumulating.apply_pending_window() is False
    apply_big_batch(plain, x, y, 0, 4)
    apply_big_batch(plain, x, y, 4, 2)
    assert_same_training(accumulating, plain)


def test_discard_pending_window_drops_it_without_an_update():
    x, y = regression_data()
    accumulating, plain = twins()
    for index in range(7):
        accumulating.train_on_batch(*micro(x, y, index))
    assert accumulating.discard_pending_window() == 3
    assert accumulating.pending_micro_steps == 0
    # The next window starts from scratch: nothing of the dropped one remains.
    for index in range(8, 12):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 0, 4)
    apply_big_batch(plain, x, y, 8, 4)
    assert_same_training(accumulating, plain)


# -- resize --------------------------------------------------------------------


@pytest.mark.parametrize("pending", [2, 3])
def test_lowering_k_to_at_most_the_pending_count_applies_the_window_at_once(pending):
    x, y = regression_data()
    accumulating, plain = twins()
    for index in range(pending):
        accumulating.train_on_batch(*micro(x, y, index))
    accumulating.accumulation_steps = 2
    assert accumulating.pending_micro_steps == 0
    apply_big_batch(plain, x, y, 0, pending)
    assert_same_training(accumulating, plain)
    # Then windows of 2.
    for index in range(pending, pending + 4):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, pending, 2)
    apply_big_batch(plain, x, y, pending + 2, 2)
    assert_same_training(accumulating, plain)


def test_lowering_k_above_the_pending_count_closes_the_window_at_the_new_k():
    x, y = regression_data()
    accumulating, plain = twins(k=8)
    for index in range(3):
        accumulating.train_on_batch(*micro(x, y, index))
    accumulating.accumulation_steps = 5
    assert accumulating.pending_micro_steps == 3
    for index in range(3, 5):
        accumulating.train_on_batch(*micro(x, y, index))
    assert accumulating.pending_micro_steps == 0
    apply_big_batch(plain, x, y, 0, 5)
    assert_same_training(accumulating, plain)


def test_lowering_k_from_a_callback_in_the_middle_of_an_epoch():
    x, y = regression_data()
    accumulating, plain = twins()

    class Lower(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 6:  # micro-batches 4, 5, 6 pending
                self.model.accumulation_steps = 2

    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[Lower()])
    apply_big_batch(plain, x, y, 0, 4)
    apply_big_batch(plain, x, y, 4, 3)
    for first in range(7, 15, 2):
        apply_big_batch(plain, x, y, first, 2)
    apply_big_batch(plain, x, y, 15, 1)  # the epoch's short last window
    assert_same_training(accumulating, plain)


def test_a_loaded_window_fuller_than_the_model_k_is_applied_before_the_next_step(tmp_path):
    x, y = regression_data()
    accumulating, plain = twins()
    for index in range(3):
        accumulating.train_on_batch(*micro(x, y, index))
    path = str(tmp_path / "three_pending.weights.h5")
    accumulating.save_weights(path)
    smaller, _ = twins(k=2)
    smaller.train_on_batch(*micro(x, y, 0))  # build; its window is replaced
    smaller.load_weights(path)
    assert smaller.pending_micro_steps == 3
    for index in range(3, 5):
        smaller.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 0, 3)
    apply_big_batch(plain, x, y, 3, 2)
    assert_same_training(smaller, plain)


# -- interrupt and stop ------------------------------------------------------------


class Raise(keras.callbacks.Callback):
    def __init__(self, at_batch, error=KeyboardInterrupt):
        super().__init__()
        self.at_batch, self.error = at_batch, error

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at_batch:
            raise self.error()


def test_an_interrupted_fit_keeps_the_window_and_the_next_fit_continues_it_with_a_warning():
    x, y = regression_data()
    accumulating, plain = twins()
    with pytest.raises(KeyboardInterrupt):
        accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[Raise(5)])
    assert accumulating.pending_micro_steps == 2
    with pytest.warns(UserWarning, match="2 micro-batch\\(es\\) pending"):
        accumulating.fit(x[24:], y[24:], batch_size=MICRO, shuffle=False, verbose=0)
    # Micro-batches 0..5 then 6..15 of the second fit (data 24..63): windows
    # [0-3], [4, 5, 6, 7], [8-11], [12-15] with indices of the data below.
    apply_big_batch(plain, x, y, 0, 4)
    apply_big_batch(plain, x, y, 4, 4)  # 4, 5 (first fit) + 6, 7 (second fit)
    apply_big_batch(plain, x, y, 8, 4)
    apply_big_batch(plain, x, y, 12, 4)
    assert_same_training(accumulating, plain)


def test_no_warning_when_fit_starts_with_an_empty_window():
    x, y = regression_data()
    accumulating, _ = twins()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pending in an open window.*")
        accumulating.fit(x, y, batch_size=MICRO, epochs=2, verbose=0)


def test_stop_training_ends_the_epoch_and_applies_its_short_window():
    x, y = regression_data()
    accumulating, plain = twins()

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                self.model.stop_training = True

    accumulating.fit(x, y, batch_size=MICRO, epochs=3, shuffle=False, verbose=0, callbacks=[Stop()])
    assert accumulating.pending_micro_steps == 0
    apply_big_batch(plain, x, y, 0, 4)
    apply_big_batch(plain, x, y, 4, 2)
    assert_same_training(accumulating, plain)


# -- BackupAndRestore ----------------------------------------------------------------


def fit_with_backup(model, backup_dir, batch_size, save_freq, interrupt=None):
    x, y = regression_data()
    callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=save_freq)]
    if interrupt is not None:
        callbacks.append(interrupt)
    model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_mid_window_replays_like_plain_keras_on_the_big_batch(tmp_path):
    # Micro-batch backups every 6 micro-batches: the last one before the
    # interruption is at micro-batch 14 of epoch 1 (3 windows of the epoch
    # applied, 2 micro-batches pending). Keras restores it and replays epoch
    # 1 from its first batch, so the 2 pending micro-batches are seen again:
    # the restored window is discarded, and the run is plain Keras on the
    # big batch backed up after the same 7 updates and replaying epoch 1.
    accumulating, _ = twins()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_with_backup(accumulating, tmp_path / "a", MICRO, 6, InterruptAt(1, 15))
    resumed, _ = twins()
    fit_with_backup(resumed, tmp_path / "a", MICRO, 6)

    _, plain = twins()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_with_backup(plain, tmp_path / "p", MICRO * K, 1, InterruptAt(1, 2))
    _, plain_resumed = twins()
    fit_with_backup(plain_resumed, tmp_path / "p", MICRO * K, 1)
    assert updates(resumed) == updates(plain_resumed) == 11
    assert_same_training(resumed, plain_resumed)


def test_backup_and_restore_in_the_same_process_does_not_merge_the_interrupted_window(tmp_path):
    accumulating, _ = twins()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_with_backup(accumulating, tmp_path / "a", MICRO, 6, InterruptAt(1, 15))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pending in an open window.*")
        fit_with_backup(accumulating, tmp_path / "a", MICRO, 6)
    fresh, _ = twins()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_with_backup(fresh, tmp_path / "b", MICRO, 6, InterruptAt(1, 15))
    resumed, _ = twins()
    fit_with_backup(resumed, tmp_path / "b", MICRO, 6)
    assert_same_training(accumulating, resumed)


# -- load ----------------------------------------------------------------------------


def test_a_plain_keras_checkpoint_loads_into_a_model_with_an_open_window(tmp_path):
    x, y = regression_data()
    accumulating, plain = twins()
    plain.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(path)
    for index in range(3):
        accumulating.train_on_batch(*micro(x, y, index))
    accumulating.load_weights(path)
    assert accumulating.pending_micro_steps == 0
    assert max_relative_difference(accumulating.get_weights(), plain.get_weights()) == 0
    # Training goes on like plain Keras from the loaded weights and optimizer.
    for index in range(4):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 0, 4)
    assert_same_training(accumulating, plain)


def test_a_k1_checkpoint_loads_into_an_accumulating_model(tmp_path):
    x, y = regression_data()
    one, plain = twins(k=1)
    one.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    path = str(tmp_path / "k1.weights.h5")
    one.save_weights(path)
    accumulating, _ = twins()
    accumulating.train_on_batch(*micro(x, y, 0))
    accumulating.load_weights(path)
    assert accumulating.pending_micro_steps == 0
    for index in range(4):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 0, 4)
    assert_same_training(accumulating, plain)


# Keras says so too: the optimizer of another trainable set has other variables.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer:UserWarning")
def test_an_open_window_saved_with_another_trainable_set_starts_empty_with_one_warning(tmp_path):
    x, y = regression_data()
    staged, _ = twins()
    staged.layers[1].trainable = False  # stage 1 trains the head only
    staged.compile(keras.optimizers.Adam(0.01), loss="mse")
    for index in range(2):
        staged.train_on_batch(*micro(x, y, index))
    path = str(tmp_path / "stage1.weights.h5")
    staged.save_weights(path)

    full, _ = twins()
    full.train_on_batch(*micro(x, y, 0))
    with pytest.warns(UserWarning, match="window starts empty") as record:
        full.load_weights(path)
    assert len([w for w in record if "window starts empty" in str(w.message)]) == 1
    assert full.pending_micro_steps == 0
    assert max_relative_difference(full.get_weights(), staged.get_weights()) == 0


# -- compile and freeze --------------------------------------------------------------


def test_a_refused_compile_changes_nothing():
    x, y = regression_data()
    accumulating, plain = twins()
    for index in range(2):
        accumulating.train_on_batch(*micro(x, y, index))
    optimizer = accumulating.optimizer
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        accumulating.compile(keras.optimizers.SGD(gradient_accumulation_steps=4), loss="mse")
    assert accumulating.optimizer is optimizer
    assert accumulating.pending_micro_steps == 2
    for index in range(2, 4):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 0, 4)
    assert_same_training(accumulating, plain)


def test_freezing_a_layer_and_recompiling_applies_the_window_with_the_variables_that_opened_it():
    x, y = regression_data()
    accumulating, plain = twins()
    for index in range(2):
        accumulating.train_on_batch(*micro(x, y, index))
    accumulating.layers[1].trainable = False
    accumulating.compile(keras.optimizers.SGD(0.05), loss="mse")
    assert accumulating.pending_micro_steps == 0
    apply_big_batch(plain, x, y, 0, 2)  # the old window, hidden layer still trainable
    plain.layers[1].trainable = False
    plain.compile(keras.optimizers.SGD(0.05), loss="mse")
    for index in range(2, 6):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 2, 4)
    assert_same_training(accumulating, plain)


# -- counters ------------------------------------------------------------------------


def test_samples_are_counted_exactly_past_2_to_the_53():
    x, y = regression_data(samples=10)
    model = accum_keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)], accumulation_steps=2)
    model.compile("sgd", loss="mse")
    model.train_on_batch(x[:5], y[:5])
    state = model._accumulation_state
    start = 2**53 - 3
    block = 2**30
    state.samples_seen.assign(start % block)
    state.samples_seen_blocks.assign(start // block)
    assert state.total_samples_seen() == start
    model.train_on_batch(x[:5], y[:5])
    model.train_on_batch(x[5:], y[5:])
    assert state.total_samples_seen() == start + 10
    assert int(keras.ops.convert_to_numpy(state.last_update_samples)) == 10


def test_accumulation_steps_beyond_int32_are_refused():
    with pytest.raises(ValueError, match="`accumulation_steps` must be at most 2147483647"):
        accum_keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], accumulation_steps=2**31)
    model = accum_keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1)], accumulation_steps=2**31 - 1
    )
    assert model.accumulation_steps == 2**31 - 1
    assert np.int64(2**31 - 1) == model.accumulation_steps


# -- non-finite gradients ----------------------------------------------------------------


def test_skip_nonfinite_updates_drops_a_window_with_a_nan_gradient_and_counts_it():
    x, y = regression_data()
    x = x.copy()
    x[5 * MICRO] = np.nan  # in micro-batch 5, window 1
    keras.utils.set_random_seed(0)
    inputs, outputs = small_regression_layers()()
    accumulating = accum_keras.Model(
        inputs, outputs, accumulation_steps=K, skip_nonfinite_updates=True
    )
    _, plain = twins()
    plain.set_weights(accumulating.get_weights())
    accumulating.compile(keras.optimizers.Adam(0.01), loss="mse")
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    apply_big_batch(plain, x, y, 0, 4)
    apply_big_batch(plain, x, y, 8, 4)
    apply_big_batch(plain, x, y, 12, 4)
    assert_same_training(accumulating, plain)
    assert int(keras.ops.convert_to_numpy(accumulating._accumulation_state.skipped_updates)) == 1
    assert accumulating.get_config()["skip_nonfinite_updates"] is True


def test_without_skip_nonfinite_updates_a_nan_reaches_the_weights_as_in_plain_keras():
    x, y = regression_data()
    x = x.copy()
    x[5 * MICRO] = np.nan
    accumulating, _ = twins()
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert np.isnan(accumulating.get_weights()[0]).any()


def test_skip_nonfinite_updates_must_be_a_bool():
    with pytest.raises(TypeError, match="`skip_nonfinite_updates` must be True or False"):
        accum_keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(1)],
            accumulation_steps=2,
            skip_nonfinite_updates=1,
        )


@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "compiled"])
def test_freezing_between_steps_applies_the_window_with_the_variables_that_opened_it(run_eagerly):
    # Where Keras reads the trainable variables at every step (PyTorch,
    # run_eagerly=True on TensorFlow), a layer frozen without compile() counts
    # at once: the open window is applied first, nothing of the frozen
    # layer's part is lost.
    if keras.backend.backend() == "jax":
        pytest.skip("Keras' JAX optimizer refuses a new trainable set until compile()")
    if keras.backend.backend() == "tensorflow" and not run_eagerly:
        pytest.skip("compiled TensorFlow steps keep their variables until compile(), as in Keras")
    x, y = regression_data()
    accumulating, plain = twins(optimizer=lambda: keras.optimizers.SGD(0.05))
    for model in (accumulating, plain):
        model.compile(keras.optimizers.SGD(0.05), loss="mse", run_eagerly=run_eagerly)
    for index in range(2):
        accumulating.train_on_batch(*micro(x, y, index))
    accumulating.layers[1].trainable = False
    accumulating.train_on_batch(*micro(x, y, 2))
    apply_big_batch(plain, x, y, 0, 2)
    plain.layers[1].trainable = False
    assert updates(accumulating) == 1
    assert accumulating.pending_micro_steps == 1
    for index in range(3, 6):
        accumulating.train_on_batch(*micro(x, y, index))
    apply_big_batch(plain, x, y, 2, 4)
    assert_same_training(accumulating, plain)
