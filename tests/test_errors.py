"""Bad input fails early, naming the argument and what is allowed."""

import keras
import pytest

import accum_keras


def dense_model(**kwargs):
    return accum_keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], **kwargs)


@pytest.mark.parametrize(
    "value, error",
    [(True, TypeError), (2.0, TypeError), ("4", TypeError), (0, ValueError), (-3, ValueError)],
)
def test_accumulation_steps_must_be_an_int_of_at_least_one(value, error):
    with pytest.raises(error, match=r"`accumulation_steps` must be an int >= 1"):
        dense_model(accumulation_steps=value)
    model = dense_model(accumulation_steps=2)
    with pytest.raises(error, match=r"`accumulation_steps` must be an int >= 1"):
        model.accumulation_steps = value
    assert model.accumulation_steps == 2


def test_numpy_integers_are_accepted():
    import numpy as np

    assert dense_model(accumulation_steps=np.int64(3)).accumulation_steps == 3


def test_optimizer_that_accumulates_itself_is_rejected():
    model = dense_model(accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        model.compile(keras.optimizers.SGD(gradient_accumulation_steps=4), loss="mse")


def test_unknown_scaling_rule_is_rejected():
    with pytest.raises(ValueError, match="`lr_scaling` must be one of"):
        accum_keras.AccumulationCallback(lr_scaling="quadratic")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"warmup_updates": -1}, "`warmup_updates` must be an int >= 0"),
        ({"warmup_updates": 5, "warmup_epochs": 1}, "at most one of"),
        ({"base_batch_size": 0}, "`base_batch_size` must be an int >= 1"),
        ({"accumulation_schedule": {0: 0}}, r"`accumulation_schedule\[0\]` must be an int >= 1"),
        ({"accumulation_schedule": {-1: 2}}, "keys must be epoch indices"),
        ({"accumulation_schedule": [2, 4]}, "must be a non-empty dict"),
    ],
)
def test_callback_arguments_are_checked(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        accum_keras.AccumulationCallback(**kwargs)


def test_callback_needs_an_accumulating_model():
    inputs = keras.Input((3,))
    plain = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    plain.compile("sgd", "mse")
    with pytest.raises(TypeError, match="inherits accum_keras.AccumulatingModel"):
        plain.fit(
            keras.ops.ones((4, 3)),
            keras.ops.ones((4, 1)),
            verbose=0,
            callbacks=[accum_keras.AccumulationCallback()],
        )


def test_warmup_epochs_needs_a_known_epoch_length():
    model = dense_model(accumulation_steps=2)
    model.compile("sgd", "mse")

    def forever():
        while True:
            yield keras.ops.ones((2, 3)), keras.ops.ones((2, 1))

    with pytest.raises(ValueError, match="`warmup_epochs` needs the number of steps"):
        model.fit(
            forever(),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[accum_keras.AccumulationCallback(warmup_epochs=1)],
        )
