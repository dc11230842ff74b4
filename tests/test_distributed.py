"""tf.distribute: accumulation on two replicas equals one device on the global big batch.

MirroredStrategy needs two logical CPU devices, which must be configured before
TensorFlow starts, so the cases run in their own process
(`tests/distributed/mirrored_worker.py`).
"""

import json
import os
import socket
import sys

import background
import numpy as np
import pytest
from helpers import RTOL
from watched import Watched, wait_watched

HERE = os.path.join(os.path.dirname(__file__), "distributed")
WORKER = os.path.join(HERE, "mirrored_worker.py")
MULTI_WORKER = os.path.join(HERE, "multi_worker_worker.py")


def background_jobs(scratch, items):
    """The mirrored worker, started when collection ends (tests/background.py)."""
    if any("mirrored_results" in getattr(item, "fixturenames", ()) for item in items):
        return {"mirrored_worker": ([sys.executable, WORKER], None)}
    return {}


@pytest.fixture(scope="module")
def mirrored_results():
    completed = background.result("mirrored_worker", [sys.executable, WORKER])
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["sgd_momentum", "adam", "adam_l2_equal_windows"])
def test_mirrored_strategy_matches_the_global_big_batch(mirrored_results, case):
    result = mirrored_results[case]
    assert result["replicas"] == 2
    assert result["updates"] == result["reference_updates"]
    assert result["difference"] <= RTOL


def test_mirrored_float8_values_are_each_replicas_window_maximum(mirrored_results):
    # Each replica keeps the window maximum of its own shares of the
    # micro-batches, never a sum; the variable keeps the first replica's, as
    # plain Keras under the strategy keeps the first replica's share of its
    # batch (docs/distributed.md). Weights: kernels to round-off, biases to
    # the bfloat16 rounding of their gradient that Keras' float8 Dense makes
    # (tests/test_float8.py).
    result = mirrored_results["float8_one_window"]
    assert result["updates"] == result["reference_updates"] == 1
    assert result["kernel_values_difference"] == 0
    assert result["inputs_amax"] == result["first_replica_inputs_amax"]
    assert result["optimized_difference"] <= 2**-6


def test_the_logged_effective_batch_size_is_global(mirrored_results):
    # 60 samples in windows of 32 and 28 (global micro-batch 8 = 2 x 4).
    assert mirrored_results["adam"]["effective_batch_size"] == [30.0, 30.0]
    assert mirrored_results["adam_l2_equal_windows"]["effective_batch_size"] == [32.0, 32.0]


def test_skip_nonfinite_updates_skips_a_window_on_every_replica_when_one_replica_sees_a_nan(
    mirrored_results,
):
    # Built and compiled in the scope, fit() outside it (docs/distributed.md)
    # for the first epoch and inside it for the second; equal to plain Keras on
    # the global big batch without the two poisoned windows of each epoch (one
    # closed inside the step, one at the epoch's end).
    result = mirrored_results["skip_nan_on_one_replica"]
    assert result["updates"] == result["reference_updates"] == 4
    assert result["difference"] <= RTOL
    assert result["skipped_updates"] == [2, 4]
    # Each applied update held a window of 32.
    assert result["effective_batch_size"] == [32.0, 32.0]


def test_a_window_opened_by_train_on_batch_and_closed_by_fit_is_the_global_big_batch(
    mirrored_results,
):
    # Found by the randomized test under the strategy: train_on_batch hands
    # every replica the whole batch, and its micro-batch counted twice in the
    # window (1.1e-2 relative from the reference).
    result = mirrored_results["train_on_batch_then_fit"]
    assert result["updates"] == result["reference_updates"] == 1
    assert result["difference"] <= RTOL


def test_a_mid_window_save_resumes_exactly_on_every_replica(mirrored_results):
    # Each replica rounds its own half-precision accumulator: the checkpoint
    # keeps every replica's share, not only their sum.
    result = mirrored_results["resume_bfloat16"]
    assert result["pending"] == 3
    assert result["updates"] == 2
    assert result["difference"] == 0.0


def test_micro_batch_size_under_mirrored_strategy_is_plain_keras_there(mirrored_results):
    result = mirrored_results["in_step_adam_l2"]
    assert result["replicas"] == 2
    assert result["updates"] == result["reference_updates"]
    assert result["difference"] <= RTOL
    for name, values in result["reference_history"].items():
        np.testing.assert_allclose(result["history"][name], values, rtol=1e-5, err_msg=name)


def test_random_configurations_and_window_events_match_the_reference_under_the_strategy(
    mirrored_results,
):
    """The randomized window test, drawn under MirroredStrategy on two logical CPUs.

    tests/distributed_state_machine.py runs the machine of
    tests/test_window_state_machine.py (model kind, BatchNormalization,
    skip_nonfinite_updates, streaming k or in-step micro_batch_size, the
    callback; train_on_batch, fits, apply, discard, save and load) with the
    models in the strategy's scope, against plain Keras on one device on the
    global big batch, compiled or eagerly. Budget: 12 examples of at most 8
    events, the same examples every run (``ACCUM_KERAS_STATE_MACHINE_EXPLORE=1``
    draws new ones, ``ACCUM_KERAS_DISTRIBUTED_STATE_MACHINE_EXAMPLES`` sets the
    count). How it was chosen: the target is under 60 CPU-s on the background
    lane; 12 examples took 30 CPU-s on the 2-core VM (compiled examples cost
    about twice the eager ones), and an eager draw of 15 found the
    train_on_batch bug fixed with it at its 9th example.
    """
    result = mirrored_results["randomized_state_machine"]
    assert result["failure"] is None, result["failure"]
    assert result["examples"] >= result["budget"]
    drawn = result["drawn"]
    # The budget does reach the axes that meet the strategy.
    assert {d["mode"] for d in drawn} == {"streaming", "in_step"}
    assert {d["batch_norm"] for d in drawn} >= {"plain", "accum"}
    assert {d["skip_nonfinite_updates"] for d in drawn} == {True, False}
    assert {d["run_eagerly"] for d in drawn} == {True, False}


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_multi_worker_mirrored_strategy_matches_the_global_big_batch():
    # Two worker processes on loopback ports, one replica each; 60 samples in
    # global micro-batches of 8 and windows of 4 (the last one short). Also
    # skip_nonfinite_updates with a NaN label on one worker, and the in-step
    # mode (micro_batch_size) on global batches of 16.
    cluster = {"worker": [f"127.0.0.1:{_free_loopback_port()}" for _ in range(2)]}
    workers = []
    try:
        for index in range(2):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = dict(os.environ, TF_CONFIG=json.dumps(config))
            workers.append(Watched([sys.executable, MULTI_WORKER], env=env))
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    for completed in wait_watched(workers):
        assert completed.returncode == 0, completed.stderr[-3000:]
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        assert result["workers"] == 2
        assert result["updates"] == result["reference_updates"] == 4
        assert result["difference"] <= RTOL
        # skip_nonfinite_updates, a NaN on one worker: its window is skipped
        # on both, as plain Keras without that window.
        assert (result["skip_updates"], result["skipped_updates"]) == (2, 2)
        assert result["skip_difference"] <= RTOL
        # micro_batch_size (each worker splits its per-replica batch, one not
        # divisible by it, and the epoch's short last batch) is plain Keras
        # on the global batch: 4 batches of 16 or 12 in each epoch.
        assert result["in_step_updates"] == result["in_step_reference_updates"] == 8
        assert result["in_step_difference"] <= RTOL
        for name, values in result["in_step_reference_history"].items():
            np.testing.assert_allclose(
                result["in_step_history"][name], values, rtol=1e-5, err_msg=name
            )
