"""``micro_batch_size``: a train step's peak memory is one micro-batch's, not the fit batch's.

On a network whose activations dominate (`tests/in_step_memory.py`), one
step on a fit batch of 1024 rows is measured three ways: plain Keras at 1024,
the in-step mode at 1024 with micro-batches of 128 (k = 8), and plain Keras
at 128. Each backend's own count of the bytes the step allocates is used,
not the resident set, so the numbers repeat exactly: TensorFlow's CPU
allocator statistics (in a process of its own, which must start with them
on), JAX's compiled memory analysis, PyTorch's profiler allocation events.

How the margins were chosen: one micro-batch's activations are 1/8 of the
batch's, and the in-step step adds the carry (a copy of the 17 k weights) and
the split batch (70 kB). Measured (bytes, plain at 1024 / in-step / plain at
128): TensorFlow 25.2 M / 3.4-3.8 M / 3.35 M (its executor's order varies a
little between runs), with XLA 33.6 M / 4.26 M / 4.19 M; JAX 21.0 M / 2.70 M /
2.62 M; PyTorch 29.4 M / 3.81 M / 3.67 M: in-step / plain at 1024 = 0.13 to
0.15. The first bound (0.5) is about 4 times that,
and a step that holds the whole batch's activations measures 1.0 (the mode
turned off: ``python tests/in_step_memory.py --mode-off`` and the JAX and
PyTorch measure with ``micro_batch_size=None`` fail both tests). The second
bound allows a second micro-batch's activations alive at once, and the input
and a weight copy on top.
"""

from __future__ import annotations

import json
import os
import sys

import background
import in_step_memory
import keras
import pytest

ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
JOB = "in_step_memory_tensorflow"
JIT_CHOICES = ["False", "True"] if ON_TENSORFLOW else ["auto"]


def _tensorflow_command() -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", **in_step_memory.TF_ALLOCATOR_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return [sys.executable, os.path.join(TESTS, "in_step_memory.py")], env


def background_jobs(scratch, items):
    """TensorFlow's measure, started when collection ends (tests/background.py)."""
    if ON_TENSORFLOW and any("step_memory" in getattr(i, "fixturenames", ()) for i in items):
        return {JOB: _tensorflow_command()}
    return {}


@pytest.fixture(scope="module")
def step_memory() -> dict[str, dict[str, int]]:
    """Per ``jit_compile`` choice: the three arms' peak bytes, the input and weight bytes."""
    if not ON_TENSORFLOW:
        return {"auto": in_step_memory.measure()}
    command, env = _tensorflow_command()
    completed = background.result(JOB, command, env, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("jit_compile", JIT_CHOICES)
def test_the_in_step_mode_peaks_far_below_plain_keras_at_the_fit_batch(step_memory, jit_compile):
    memory = step_memory[jit_compile]
    assert memory["in_step"] < 0.5 * memory["plain_batch"], memory


@pytest.mark.parametrize("jit_compile", JIT_CHOICES)
def test_the_in_step_mode_peaks_at_about_one_micro_batch(step_memory, jit_compile):
    memory = step_memory[jit_compile]
    bound = 2 * memory["plain_micro"] + memory["input"] + memory["weights"]
    assert memory["in_step"] <= bound, memory
