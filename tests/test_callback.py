"""AccumulationCallback: learning rate for the effective batch, k schedules, logs."""

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


def compiled_twins(learning_rate=0.01, k=K):
    accumulating, plain = functional_twins(small_regression_layers(), k)
    for model in (accumulating, plain):
        model.compile(keras.optimizers.SGD(learning_rate, momentum=0.9), loss="mse")
    return accumulating, plain


@pytest.mark.parametrize("rule, factor", [("linear", K), ("sqrt", math.sqrt(K))])
def test_scaling_rules_match_the_big_batch_with_the_scaled_rate(rule, factor):
    x, y = regression_data(samples=64)
    accumulating, _ = compiled_twins(0.01)
    _, plain = compiled_twins(0.01 * factor)
    callback = accum_keras.AccumulationCallback(lr_scaling=rule)
    accumulating.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0, callbacks=[callback])
    plain.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)


def test_fitting_twice_does_not_scale_twice():
    x, y = regression_data(samples=64)
    model, _ = compiled_twins(0.01)
    for _ in range(2):
        model.fit(x, y, batch_size=MICRO, verbose=0, callbacks=[accum_keras.AccumulationCallback()])
    assert current_rate(model) == pytest.approx(0.01 * K)


def test_base_batch_size_scales_relative_to_it():
    x, y = regression_data(samples=64)
    model, _ = compiled_twins(0.01)
    callback = accum_keras.AccumulationCallback(lr_scaling="linear", base_batch_size=8)
    model.fit(x, y, batch_size=MICRO, verbose=0, callbacks=[callback])
    assert current_rate(model) == pytest.approx(0.01 * MICRO * K / 8)


def test_warmup_rises_linearly_over_updates():
    x, y = regression_data(samples=64)
    model, _ = compiled_twins(0.01)
    rates = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch % K == K - 1:
                rates.append(logs["learning_rate"])

    callback = accum_keras.AccumulationCallback(lr_scaling="linear", warmup_updates=4)
    model.fit(x, y, batch_size=MICRO, epochs=2, verbose=0, callbacks=[Record(), callback])
    expected = [0.01 * (1 + (K - 1) * min(1, t / 4)) for t in range(1, 9)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_warmup_epochs_counts_updates_per_epoch():
    x, y = regression_data(samples=64)
    model, _ = compiled_twins(0.01)
    callback = accum_keras.AccumulationCallback(warmup_epochs=2)
    model.fit(x, y, batch_size=MICRO, epochs=1, verbose=0, callbacks=[callback])
    assert model.optimizer._learning_rate.warmup_updates == 2 * 4


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
    # 60 samples per epoch in 4 updates (16, 16, 16 and a short 12).
    assert history["effective_batch_size"] == [15.0, 15.0]
    assert history["updates"] == [4, 8]
    assert history["accumulation_steps"] == [K, K]
    np.testing.assert_allclose(history["learning_rate"], [0.01, 0.01])
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["effective_batch_size"]) for r in rows] == [15.0, 15.0]
    assert any((tmp_path / "tb" / "train").iterdir())


def test_batch_logs_count_the_samples_of_the_last_update():
    x, y = regression_data(samples=60)
    model, _ = compiled_twins()
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs["effective_batch_size"])

    model.fit(
        x,
        y,
        batch_size=MICRO,
        verbose=0,
        callbacks=[Record(), accum_keras.AccumulationCallback(lr_scaling=None)],
    )
    assert seen[:3] == [0, 0, 0] and seen[3:15:4] == [16, 16, 16]


def test_the_scaled_rate_is_saved_with_the_model(tmp_path):
    x, y = regression_data(samples=32)
    model, _ = compiled_twins(0.01)
    model.fit(x, y, batch_size=MICRO, verbose=0, callbacks=[accum_keras.AccumulationCallback()])
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert current_rate(restored) == pytest.approx(0.01 * K)
    restored.fit(x, y, batch_size=MICRO, verbose=0, callbacks=[accum_keras.AccumulationCallback()])
    assert current_rate(restored) == pytest.approx(0.01 * K)


def test_callbacks_passed_positionally_are_reordered_too(tmp_path):
    x, y = regression_data(samples=32)
    model, _ = compiled_twins()
    csv_path = tmp_path / "log.csv"
    callbacks = [keras.callbacks.CSVLogger(str(csv_path)), accum_keras.AccumulationCallback(None)]
    model.fit(x, y, MICRO, 1, 0, callbacks)
    with open(csv_path) as f:
        assert float(next(csv.DictReader(f))["effective_batch_size"]) == 16.0
