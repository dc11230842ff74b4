"""tf.distribute: accumulation on two replicas equals one device on the global big batch.

MirroredStrategy needs two logical CPU devices, which must be configured before
TensorFlow starts, so the cases run in their own process
(`tests/distributed/mirrored_worker.py`).
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import RTOL

WORKER = os.path.join(os.path.dirname(__file__), "distributed", "mirrored_worker.py")


@pytest.fixture(scope="module")
def mirrored_results():
    completed = subprocess.run(
        [sys.executable, WORKER], capture_output=True, text=True, timeout=600, check=False
    )
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
