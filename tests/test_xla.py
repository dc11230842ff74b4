"""TensorFlow with XLA (``jit_compile=True``, Keras' default on a GPU).

The whole specification runs with XLA when ``ACCUM_KERAS_TEST_XLA=1`` (see
tests/conftest.py); the default run keeps a quick XLA pass over its key
exactness tests here, plus the structure that keeps the XLA step fast: the
micro-batches that cannot close a window run a program without the optimizer.
"""

import keras
import pytest
import tensorflow as tf
import test_exactness
import test_state_and_saving
from helpers import (
    assert_same_training,
    functional_twins,
    regression_data,
    small_regression_layers,
    xla_by_default,
)

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="XLA programs of the TensorFlow train step"
)

MICRO, K = 4, 4


@pytest.fixture
def xla():
    with xla_by_default():
        yield


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "no_xla"])
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_micro_batches_that_cannot_close_a_window_run_no_optimizer(
    jit_compile, steps_per_execution
):
    # 16 micro-batches per epoch, 4 windows of 4: no short window.
    x, y = regression_data(samples=16 * MICRO)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    accumulating.compile(
        keras.optimizers.Adam(0.01),
        loss="mse",
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    plain.compile(keras.optimizers.Adam(0.01), loss="mse")

    # Where the optimizer's update is traced: the name of the function graph.
    traced_in = []
    optimizer = accumulating.optimizer
    apply = optimizer.apply

    def spying_apply(*args, **kwargs):
        traced_in.append(tf.compat.v1.get_default_graph().name)
        return apply(*args, **kwargs)

    optimizer.apply = spying_apply
    accumulating.make_train_function()
    function = accumulating.train_function
    calls = {"accumulate": 0, "accumulate_and_apply": 0}
    for name in calls:
        program = getattr(function, name)

        def counted(iterator, name=name, program=program):
            calls[name] += 1
            return program(iterator)

        setattr(function, name, counted)

    accumulating.fit(x, y, batch_size=MICRO, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=MICRO * K, epochs=2, shuffle=False, verbose=0)
    assert_same_training(accumulating, plain)

    # The update is traced once, in its own function, never in the
    # accumulation's (which is what the micro-batches that cannot close a
    # window run).
    assert len(traced_in) == 1 and "update_step" in traced_in[0], traced_in
    if steps_per_execution == 1:
        # 3 of every 4 micro-batches cannot close their window.
        assert calls == {"accumulate": 24, "accumulate_and_apply": 8}
    else:
        # Calls of 3 micro-batches starting at window positions 0, 3, 2, 1,
        # 0 and 3 (the last one runs the epoch's 16th micro-batch alone):
        # only those starting at 0 cannot reach a window's end.
        assert calls == {"accumulate": 4, "accumulate_and_apply": 8}


def test_train_on_batch_counts_its_micro_batches_with_steps_per_execution(xla):
    # train_on_batch runs one micro-batch even when steps_per_execution > 1.
    x, y = regression_data(samples=6 * MICRO)
    accumulating, plain = functional_twins(small_regression_layers(), K)
    accumulating.compile(keras.optimizers.Adam(0.01), loss="mse", steps_per_execution=3)
    plain.compile(keras.optimizers.Adam(0.01), loss="mse")
    for start in range(0, 4 * MICRO, MICRO):
        accumulating.train_on_batch(x[start : start + MICRO], y[start : start + MICRO])
    plain.train_on_batch(x[: 4 * MICRO], y[: 4 * MICRO])
    assert_same_training(accumulating, plain)
    assert accumulating.pending_micro_steps == 0


@pytest.mark.parametrize("name", ["adam", "ema"])
def test_optimizers_match_the_big_batch(xla, name):
    test_exactness.test_every_optimizer_and_option_matches_the_big_batch(name)


def test_steps_per_execution_closing_two_windows_per_call(xla):
    # 60 samples: windows of 4, 4, 4 and a short one of 3 micro-batches.
    test_exactness.test_execution_modes({"steps_per_execution": 9})


def test_masked_per_token_loss(xla):
    test_exactness.test_masked_per_token_loss_is_normalized_over_the_window("sum_over_batch_size")


def test_sparse_embedding_gradients(xla):
    test_exactness.test_sparse_embedding_gradients_with_a_linear_optimizer()


def test_save_mid_window_and_resume(xla, tmp_path):
    test_state_and_saving.test_save_mid_window_and_resume_exactly(tmp_path)
