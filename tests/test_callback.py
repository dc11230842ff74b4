"""AccumulationCallback: learning rate for the effective batch, k schedules, logs.

The rule for the learning rate during a fit with scaling: reading
``optimizer.learning_rate`` gives the rate the next update applies; assigning
a float sets the rate applied now, by rescaling the optimizer's own rate, so
that scaling and warmup keep acting relative to it. After the fit the
optimizer has its own (unscaled) rate again. Expected rates are computed here
per update from that rule, and a plain Keras model on the big batch, driven by
a table of those rates, is the reference for the weights.
"""

import csv
import math

import keras
import numpy as np
import pytest
from helpers import assert_same_training, functional_twins, regression_data, small_regression_layers

import accum_keras

K, MICRO = 4, 4


def current_rate(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def compiled_twins(learning_rate=0.01, k=K, plain_rate=None):
    accumulating, plain = functional_twins(small_regression_layers(), k)
    accumulating.compile(keras.optimizers.SGD(learning_rate, momentum=0.9), loss="mse")
    plain_rate = learning_rate if plain_rate is None else plain_rate
    plain.compile(keras.optimizers.SGD(plain_rate, momentum=0.9), loss="mse")
    return accumulating, plain


class TableRate(keras.optimizers.schedules.LearningRateSchedule):
    """The rate of update ``t`` is ``rates[t]``: the plain model's reference schedule."""

    def __init__(self, rates):
        self.rates = np.asarray(rates, dtype="float32")

    def __call__(self, step):
        index = keras.ops.minimum(keras.ops.cast(step, "int32"), len(self.rates) - 1)
        return keras.ops.take(keras.ops.convert_to_tensor(self.rates), index)


def warmup_ramp(t, factor, warmup):
    """Goyal et al.'s gradual warmup, written out independently of the library."""
    return 1.0 + (factor - 1.0) * min(1.0, t / warmup) if warmup else factor


def table_twin(rates, k=K):
    accumulating, plain = functional_twins(small_regression_layers(), k)
    accumulating.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    plain.compile(keras.optimizers.SGD(TableRate(rates), momentum=0.9), loss="mse")
    return accumulating, plain


@pytest.mark.parametrize("rule, factor", [("linear", K), ("sqrt", math.sqrt(K))])
def test_scaling_rules_match_the_big_batch_with_the_scaled_rate(rule, factor):
    x, y = regression_data(samples=64)
    accumulating, plain = compiled_twins(0.01, plain_rate=0.01 * factor)
    callback = accum_keras.AccumulationCallback(lr_scaling=rule)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[callback])
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_fitting_twice_does_not_scale_twice_and_the_scaling_ends_with_the_fit():
    x, y = regression_data(samples=64)
    accumulating, plain = compiled_twins(0.01, plain_rate=0.01 * K)
    callback = accum_keras.AccumulationCallback()
    for _ in range(2):
        accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[callback])
        assert accumulating.history.history["learning_rate"] == pytest.approx([0.01 * K])
        assert current_rate(accumulating) == pytest.approx(0.01)
        plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_a_later_fit_without_scaling_trains_at_the_unscaled_rate():
    x, y = regression_data(samples=64)
    accumulating, plain = compiled_twins(0.01, plain_rate=0.01 * K)
    fit = {"x": x, "y": y, "batch_size": MICRO, "shuffle": False, "verbose": 0}
    accumulating.fit(**fit, callbacks=[accum_keras.AccumulationCallback("linear")])
    accumulating.fit(**fit)  # no AccumulationCallback at all
    accumulating.fit(**fit, callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)])
    assert accumulating.history.history["learning_rate"] == pytest.approx([0.01])
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    plain.optimizer.learning_rate = 0.01
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_a_fit_that_raised_does_not_make_the_next_one_scale_twice():
    # Keras skips on_train_end when fit() raises: the scaled rate is still in
    # place, and the next fit with the callback takes it out before scaling.
    x, y = regression_data(samples=64)
    accumulating, _ = compiled_twins(0.01)

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    fit = {"x": x, "y": y, "batch_size": MICRO, "shuffle": False, "verbose": 0}
    with pytest.raises(KeyboardInterrupt):
        accumulating.fit(**fit, callbacks=[Interrupt(), accum_keras.AccumulationCallback()])
    # The interrupted fit left its first micro-batch in an open window.
    with pytest.warns(UserWarning, match="1 micro-batch\\(es\\) pending in an open window"):
        accumulating.fit(**fit, callbacks=[accum_keras.AccumulationCallback()])
    assert accumulating.history.history["learning_rate"] == pytest.approx([0.01 * K])
    assert current_rate(accumulating) == pytest.approx(0.01)


def test_base_batch_size_scales_relative_to_it():
    x, y = regression_data(samples=64)
    # Effective batch 16 against a rate tuned for 8: twice the rate.
    accumulating, plain = compiled_twins(0.01, plain_rate=0.02)
    callback = accum_keras.AccumulationCallback(lr_scaling="linear", base_batch_size=8)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[callback])
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
    assert accumulating.history.history["learning_rate"] == pytest.approx([0.02])


def test_warmup_rises_linearly_over_updates():
    x, y = regression_data(samples=64)
    rates = [0.01 * warmup_ramp(t, K, 4) for t in range(8)]
    accumulating, plain = table_twin(rates)
    read = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch % K == K - 1:
                read.append(current_rate(self.model))

    callback = accum_keras.AccumulationCallback(lr_scaling="linear", warmup_updates=4)
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[Record(), callback]
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    # After update t, the rate of update t + 1 is read.
    np.testing.assert_allclose(read, rates[1:] + [0.01 * K], rtol=1e-6)
    assert_same_training(accumulating, plain)


def test_warmup_epochs_counts_short_last_windows_as_updates():
    # 60 samples in micro-batches of 4: 15 per epoch, windows 4+4+4+3, so an
    # epoch is 4 updates and 1.5 warmup epochs are 6 updates.
    x, y = regression_data(samples=60)
    rates = [0.01 * warmup_ramp(t, K, 6) for t in range(12)]
    accumulating, plain = table_twin(rates)
    callback = accum_keras.AccumulationCallback(lr_scaling="linear", warmup_epochs=1.5)
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=3, shuffle=False, verbose=0, callbacks=[callback]
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=3, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_reduce_lr_on_plateau_reduces_the_scaled_rate_once_during_warmup():
    # effective_batch_size never improves: with patience 1 the rate halves at
    # the end of epochs 2, 3 and 4 (after 8, 12 and 16 updates), while the
    # warmup (10 updates) is still rising at the first reduction.
    x, y = regression_data(samples=64)
    rates = [0.01 * warmup_ramp(t, K, 10) * 0.5 ** ((t >= 8) + (t >= 12)) for t in range(16)]
    accumulating, plain = table_twin(rates)
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(
            monitor="effective_batch_size", mode="min", factor=0.5, patience=1
        ),
        accum_keras.AccumulationCallback(lr_scaling="linear", warmup_updates=10),
    ]
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=4, shuffle=False, verbose=0, callbacks=callbacks
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=4, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
    # What the three reductions did stays, unscaled, after the fit.
    assert current_rate(accumulating) == pytest.approx(0.01 * 0.5**3)


def test_learning_rate_scheduler_receives_and_sets_the_applied_rate():
    x, y = regression_data(samples=64)
    rates = [0.01 * warmup_ramp(t, K, 10) * 0.5 ** (t // 4) for t in range(12)]
    accumulating, plain = table_twin(rates)
    received = []

    def halve_after_the_first_epoch(epoch, lr):
        received.append(lr)
        return lr if epoch == 0 else lr * 0.5

    callbacks = [
        keras.callbacks.LearningRateScheduler(halve_after_the_first_epoch),
        accum_keras.AccumulationCallback(lr_scaling="linear", warmup_updates=10),
    ]
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=3, shuffle=False, verbose=0, callbacks=callbacks
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=3, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
    # Epoch e starts at update 4e, before that epoch's halving.
    expected = [0.01 * warmup_ramp(4 * e, K, 10) * 0.5 ** max(e - 1, 0) for e in range(3)]
    np.testing.assert_allclose(received, expected, rtol=1e-6)


def test_an_absolute_learning_rate_schedule_sets_the_rate_applied_at_epoch_starts():
    # fn(epoch) = rate applied at the epoch's first update; the warmup keeps
    # rising relative to it.
    x, y = regression_data(samples=64)
    set_rates = [0.02, 0.01, 0.005]
    rates = [
        set_rates[t // 4] * warmup_ramp(t, K, 10) / warmup_ramp(4 * (t // 4), K, 10)
        for t in range(12)
    ]
    accumulating, plain = table_twin(rates)
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch: set_rates[epoch]),
        accum_keras.AccumulationCallback(lr_scaling="linear", warmup_updates=10),
    ]
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=3, shuffle=False, verbose=0, callbacks=callbacks
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=3, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_a_schedule_rate_stays_not_settable_as_in_keras():
    x, y = regression_data(samples=32)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    accumulating.compile(keras.optimizers.SGD(schedule), loss="mse")
    plain.compile(keras.optimizers.SGD(schedule), loss="mse")
    reduce = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    with pytest.raises(TypeError, match="not settable") as keras_error:
        plain.fit(x, y, batch_size=MICRO * K, verbose=0, callbacks=[reduce])
    with pytest.raises(TypeError, match="not settable") as our_error:
        accumulating.fit(
            x,
            y,
            batch_size=MICRO,
            verbose=0,
            callbacks=[reduce, accum_keras.AccumulationCallback()],
        )
    assert str(our_error.value) == str(keras_error.value)


def test_a_learning_rate_schedule_advances_once_per_update_and_is_scaled():
    x, y = regression_data(samples=60)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    scaled = keras.optimizers.schedules.ExponentialDecay(0.01 * K, decay_steps=2, decay_rate=0.5)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    accumulating.compile(keras.optimizers.SGD(schedule), loss="mse")
    plain.compile(keras.optimizers.SGD(scaled), loss="mse")
    accumulating.fit(
        x,
        y,
        batch_size=MICRO,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback("linear")],
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
    assert accumulating.optimizer._learning_rate is schedule


def test_accumulation_schedule_grows_the_batch_at_epoch_starts():
    x, y = regression_data(samples=64)
    accumulating, plain = compiled_twins(0.01, k=2)
    callback = accum_keras.AccumulationCallback(lr_scaling=None, accumulation_schedule={0: 2, 1: 8})
    accumulating.fit(
        x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0, callbacks=[callback]
    )
    plain.fit(x, y, batch_size=MICRO * 2, epochs=1, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * 8, epochs=1, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)
    assert accumulating.history.history["accumulation_steps"] == [2, 8]
    assert accumulating.history.history["effective_batch_size"] == [8, 32]


def test_logs_reach_history_csv_logger_and_tensorboard(tmp_path):
    x, y = regression_data(samples=60)
    model, _ = compiled_twins()
    csv_path = tmp_path / "log.csv"
    callbacks = [
        keras.callbacks.CSVLogger(str(csv_path)),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        accum_keras.AccumulationCallback(lr_scaling=None),  # moved first by fit
    ]
    model.fit(x, y, batch_size=MICRO, epochs=2, verbose=0, callbacks=callbacks)
    history = model.history.history
    # Only what varies: no accumulation_steps without a schedule, no
    # skipped_updates without a LossScaleOptimizer.
    assert set(history) == {"loss", "effective_batch_size", "learning_rate"}
    # 60 samples per epoch in 4 updates (16, 16, 16 and a short 12).
    assert history["effective_batch_size"] == [15.0, 15.0]
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.01])
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["effective_batch_size"]) for r in rows] == [15.0, 15.0]
    assert any((tmp_path / "tb" / "train").iterdir())


def test_batch_logs_count_the_samples_of_the_last_update_from_the_first_update_on():
    x, y = regression_data(samples=60)
    model, _ = compiled_twins()
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs.get("effective_batch_size"))

    model.fit(
        x,
        y,
        batch_size=MICRO,
        epochs=2,
        verbose=0,
        callbacks=[Record(), accum_keras.AccumulationCallback(lr_scaling=None)],
    )
    # No value before the first update; then the last update's samples. The
    # short last window (12 samples) is applied after the epoch's last batch.
    assert seen == [None] * 3 + [16] * 12 + [12] * 3 + [16] * 12


def test_with_one_micro_batch_per_update_the_effective_batch_is_the_batch():
    x, y = regression_data(samples=40)
    model, _ = compiled_twins(k=1)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs.get("effective_batch_size"))

    model.fit(
        x, y, batch_size=8, verbose=0, callbacks=[Record(), accum_keras.AccumulationCallback()]
    )
    assert seen == [8] * 5
    assert model.history.history["effective_batch_size"] == [8.0]
    assert model.history.history["learning_rate"] == pytest.approx([0.01])


def test_the_epochs_effective_batch_size_leaves_a_skipped_window_out():
    # 4 windows of 16, the second skipped: 3 updates of 16 samples each (the
    # epoch's 64 samples over its 3 updates would read 21.3).
    x, y = regression_data(samples=64)
    y[K * MICRO + 1] = np.nan
    keras.utils.set_random_seed(0)
    inputs, outputs = small_regression_layers()()
    model = accum_keras.Model(inputs, outputs, accumulation_steps=K, skip_nonfinite_updates=True)
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    callback = accum_keras.AccumulationCallback(lr_scaling=None)
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[callback])
    assert model.history.history["skipped_updates"] == [1]
    assert model.history.history["effective_batch_size"] == [16.0]


def test_the_epochs_effective_batch_size_counts_a_continued_windows_earlier_samples():
    # An interrupted fit leaves 2 micro-batches (8 samples) in the open window;
    # the next fit's 56 samples complete it and 3 more windows: 4 updates of
    # 16 samples each (its own 56 samples over 4 updates would read 14).
    x, y = regression_data(samples=56)
    model, _ = compiled_twins()

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt

    fit = {"x": x, "y": y, "batch_size": MICRO, "shuffle": False, "verbose": 0}
    with pytest.raises(KeyboardInterrupt):
        model.fit(**fit, callbacks=[Interrupt()])
    with pytest.warns(UserWarning, match="2 micro-batch\\(es\\) pending in an open window"):
        model.fit(**fit, callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4
    assert model.history.history["effective_batch_size"] == [16.0]


def test_the_progress_bar_shows_the_effective_batch_size_and_no_counters(capsys):
    x, y = regression_data(samples=64)
    model, _ = compiled_twins()
    model.fit(x, y, batch_size=MICRO, verbose=1, callbacks=[accum_keras.AccumulationCallback()])
    printed = capsys.readouterr().out
    assert "effective_batch_size: 16.0000" in printed
    assert "learning_rate: 0.0400" in printed
    for absent in ("updates", "accumulation_steps", "effective_batch_size: 0.0000"):
        assert absent not in printed


def test_saved_during_a_scaled_fit_loads_with_the_unscaled_rate(tmp_path):
    x, y = regression_data(samples=32)
    accumulating, plain = compiled_twins(0.01, plain_rate=0.01 * K)
    path = tmp_path / "m.keras"

    class Save(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.save(path)

    accumulating.fit(
        x,
        y,
        batch_size=MICRO,
        shuffle=False,
        verbose=0,
        callbacks=[Save(), accum_keras.AccumulationCallback()],
    )
    restored = keras.models.load_model(path)
    assert current_rate(restored) == pytest.approx(0.01)
    # The optimizer keeps Keras' variables (its rate variable included).
    assert len(restored.optimizer.variables) == len(plain.optimizer.variables) or (
        not plain.optimizer.built
    )
    restored.fit(
        x,
        y,
        batch_size=MICRO,
        shuffle=False,
        verbose=0,
        callbacks=[accum_keras.AccumulationCallback()],
    )
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert len(restored.optimizer.variables) == len(plain.optimizer.variables)
    assert_same_training(restored, plain)


def test_callbacks_passed_positionally_are_reordered_too(tmp_path):
    x, y = regression_data(samples=32)
    model, _ = compiled_twins()
    csv_path = tmp_path / "log.csv"
    callbacks = [keras.callbacks.CSVLogger(str(csv_path)), accum_keras.AccumulationCallback(None)]
    model.fit(x, y, MICRO, 1, 0, callbacks)
    with open(csv_path) as f:
        assert float(next(csv.DictReader(f))["effective_batch_size"]) == 16.0
