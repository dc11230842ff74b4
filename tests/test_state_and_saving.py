"""Window state is training state: not weights, but saved, restored and resumed exactly."""

import keras
import numpy as np
import pytest
from helpers import assert_same_training, functional_twins, regression_data, small_regression_layers

import accum_keras

K, MICRO = 4, 4


def compiled_twins(k=K):
    accumulating, plain = functional_twins(small_regression_layers(), k)
    for model in (accumulating, plain):
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
    return accumulating, plain


def test_accumulators_are_not_weights_and_one_per_trainable_variable():
    x, y = regression_data(samples=60)
    accumulating, plain = compiled_twins()
    accumulating.fit(x, y, batch_size=MICRO, verbose=0)
    assert len(accumulating.weights) == len(plain.weights)
    plain.set_weights(accumulating.get_weights())  # a plain model accepts them
    state = accumulating._accumulation_state
    assert [a.shape for a in state.gradients] == [v.shape for v in plain.trainable_variables]
    assert all(a.dtype == "float32" for a in state.gradients)


def test_epoch_end_applies_the_short_window_before_validation():
    x, y = regression_data(samples=60)
    accumulating, plain = compiled_twins()
    seen = {}

    class WindowProbe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen["pending"] = self.model.pending_micro_steps
            seen["updates"] = int(self.model.optimizer.iterations.numpy())

    accumulating.fit(
        x,
        y,
        batch_size=MICRO,
        validation_data=(x, y),
        callbacks=[WindowProbe()],
        shuffle=False,
        verbose=0,
    )
    plain.fit(x, y, batch_size=MICRO * K, validation_data=(x, y), shuffle=False, verbose=0)
    assert seen == {"pending": 0, "updates": 4}
    # Validation ran after the short window was applied: same val_loss.
    np.testing.assert_allclose(
        accumulating.history.history["val_loss"], plain.history.history["val_loss"], rtol=1e-5
    )


def test_logged_loss_is_the_real_micro_batch_loss():
    x, y = regression_data(samples=64)
    accumulating, plain = compiled_twins()
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(logs["loss"])

    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, callbacks=[Record()], verbose=0)
    # The first window's weights are the initial ones: the running mean of
    # the micro-batch losses equals plain Keras' loss on the same micro-batches.
    initial = functional_twins(small_regression_layers(), 1)[1]
    initial.compile(loss="mse")
    expected = [
        initial.evaluate(x[: MICRO * (i + 1)], y[: MICRO * (i + 1)], verbose=0) for i in range(K)
    ]
    np.testing.assert_allclose(losses[:K], expected, rtol=1e-5)


def test_evaluate_and_predict_are_untouched():
    x, y = regression_data(samples=20)
    accumulating, plain = compiled_twins()
    assert accumulating.evaluate(x, y, verbose=0) == pytest.approx(plain.evaluate(x, y, verbose=0))
    np.testing.assert_array_equal(accumulating.predict(x, verbose=0), plain.predict(x, verbose=0))
    assert int(accumulating.optimizer.iterations.numpy()) == 0


def test_config_round_trip():
    model = accum_keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], accumulation_steps=6)
    assert accum_keras.Sequential.from_config(model.get_config()).accumulation_steps == 6
    inputs = keras.Input((3,))
    model = accum_keras.Model(inputs, keras.layers.Dense(2)(inputs), accumulation_steps=5)
    model.accumulation_steps = 7
    restored = accum_keras.Model.from_config(model.get_config())
    assert isinstance(restored, accum_keras.Model)
    assert restored.accumulation_steps == 7


def test_save_mid_window_and_resume_exactly(tmp_path):
    # 10 micro-batches then stop (mid-window: 2 of 4), save, load, finish the
    # epoch: the same as training without the interruption.
    x, y = regression_data(samples=64)
    uninterrupted, _ = compiled_twins()
    interrupted, _ = compiled_twins()
    uninterrupted.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)

    # Bare train steps, no epoch end (on every backend).
    for step in range(10):
        batch = slice(step * MICRO, (step + 1) * MICRO)
        interrupted.train_on_batch(x[batch], y[batch])
    assert interrupted.pending_micro_steps == 2
    path = tmp_path / "mid_window.keras"
    interrupted.save(path)

    resumed = keras.models.load_model(path)
    assert isinstance(resumed, accum_keras.Model)
    assert resumed.pending_micro_steps == 2
    assert resumed.accumulation_steps == K
    with pytest.warns(UserWarning, match="2 micro-batch\\(es\\) pending in an open window"):
        resumed.fit(x[40:], y[40:], batch_size=MICRO, shuffle=False, verbose=0)
    assert_same_training(resumed, uninterrupted)


def interrupt_at(update, batch):
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, index, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == update and index == batch:
                raise RuntimeError("interrupted")

    return Interrupt()


def fit_interrupted_and_resumed(make_model, backup_dir, batch_size, interrupt):
    x, y = regression_data(samples=64)
    model = make_model()
    backup = keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[backup, interrupt],
        )
    fresh = make_model()
    fresh.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, callbacks=[backup])
    return fresh


def test_backup_and_restore_resumes_like_plain_keras(tmp_path):
    # Keras restores the weights and optimizer and replays the interrupted
    # epoch from its first batch; interrupted after the 6th update, the
    # accumulating model and plain Keras on the big batch replay alike.
    accumulating = fit_interrupted_and_resumed(
        lambda: compiled_twins()[0], tmp_path / "accumulating", MICRO, interrupt_at(6, 7)
    )
    plain = fit_interrupted_and_resumed(
        lambda: compiled_twins()[1], tmp_path / "plain", MICRO * K, interrupt_at(6, 1)
    )
    assert_same_training(accumulating, plain)


def test_backup_and_restore_keeps_a_pending_window(tmp_path):
    x, y = regression_data(samples=64)
    model, _ = compiled_twins()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), save_freq=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=MICRO,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[backup, interrupt_at(6, 9)],
        )
    restored, _ = compiled_twins()
    restored.fit(x[:MICRO], y[:MICRO], epochs=0, verbose=0)  # build, no training
    restored.load_weights(str(tmp_path / "latest.weights.h5"))
    assert restored.pending_micro_steps == 2
    for saved, loaded in zip(
        model._accumulation_state.gradients, restored._accumulation_state.gradients
    ):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())


def test_accumulation_steps_can_change_between_fits_without_recompiling():
    x, y = regression_data(samples=64)
    accumulating, plain = compiled_twins(k=2)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * 2, shuffle=False, verbose=0)
    accumulating.accumulation_steps = 8
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * 8, shuffle=False, verbose=0)
    accumulating.accumulation_steps = 1
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
