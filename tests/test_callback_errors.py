"""AccumulationCallback refuses bad arguments at construction, naming them."""

import numpy as np
import pytest

import accum_keras


@pytest.mark.parametrize("value", [2.5, 2.0, float("inf"), float("nan"), -1, True, "3", None])
def test_warmup_updates_must_be_a_non_negative_int(value):
    with pytest.raises(ValueError, match=r"`warmup_updates` must be an int >= 0"):
        accum_keras.AccumulationCallback(warmup_updates=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.5, True, "1"])
def test_warmup_epochs_must_be_a_finite_non_negative_number(value):
    with pytest.raises(ValueError, match=r"`warmup_epochs` must be a finite number >= 0"):
        accum_keras.AccumulationCallback(warmup_epochs=value)


def test_integer_and_fractional_warmups_of_numpy_types_are_accepted():
    assert accum_keras.AccumulationCallback(warmup_updates=np.int64(3)).warmup_updates == 3
    assert accum_keras.AccumulationCallback(warmup_epochs=np.float32(0.5)).warmup_epochs == 0.5


def test_only_one_warmup_may_be_set():
    with pytest.raises(ValueError, match="at most one of `warmup_updates` and `warmup_epochs`"):
        accum_keras.AccumulationCallback(warmup_updates=2, warmup_epochs=1)


@pytest.mark.parametrize("warmup", [{"warmup_updates": 5}, {"warmup_epochs": 0.5}])
def test_a_warmup_needs_a_scaling_rule(warmup):
    with pytest.raises(ValueError, match="with lr_scaling=None there is nothing to warm up"):
        accum_keras.AccumulationCallback(lr_scaling=None, **warmup)


@pytest.mark.parametrize("value", [0, -8, 8.0, True, "8"])
def test_base_batch_size_is_a_batch_size_in_samples(value):
    with pytest.raises(ValueError, match="`base_batch_size` must be an int >= 1") as error:
        accum_keras.AccumulationCallback(base_batch_size=value)
    assert "in samples" in str(error.value)
    assert "micro-batches" not in str(error.value)


def test_numpy_integer_epochs_are_schedule_keys():
    callback = accum_keras.AccumulationCallback(
        accumulation_schedule={np.int64(0): 2, np.int32(3): np.int64(8)}
    )
    assert callback.accumulation_schedule == {0: 2, 3: 8}
    assert all(type(epoch) is int for epoch in callback.accumulation_schedule)


@pytest.mark.parametrize("key", [True, 1.0, -1, "1"])
def test_schedule_keys_must_be_epoch_indices(key):
    with pytest.raises(ValueError, match="keys must be epoch indices"):
        accum_keras.AccumulationCallback(accumulation_schedule={key: 2})


def test_schedule_values_must_be_accumulation_steps():
    with pytest.raises(ValueError, match=r"`accumulation_schedule\[2\]` must be an int >= 1"):
        accum_keras.AccumulationCallback(accumulation_schedule={2: 0})
