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


def test_the_logged_effective_batch_size_is_global(mirrored_results):
    # 60 samples in windows of 32 and 28 (global micro-batch 8 = 2 x 4).
    assert mirrored_results["adam"]["effective_batch_size"] == [30.0, 30.0]
    assert mirrored_results["adam_l2_equal_windows"]["effective_batch_size"] == [32.0, 32.0]


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_multi_worker_mirrored_strategy_matches_the_global_big_batch():
    # Two worker processes on loopback ports, one replica each; 60 samples in
    # global micro-batches of 8 and windows of 4 (the last one short).
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
