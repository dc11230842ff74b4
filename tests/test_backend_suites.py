"""The test suite on the other Keras backends, each in its own process.

Keras fixes its backend at import, so this process runs the suite on one
backend (``KERAS_BACKEND``, TensorFlow by default) and this module runs it on
the others in subprocesses, failing if they fail and skipping, with the reason,
backends that are not installed. Every backend runs the same specification
(``SUITE``) plus its own specifics. Run one backend's suite directly with e.g.
``KERAS_BACKEND=jax python -m pytest tests``.

A subprocess's progress is relayed to the terminal as it comes, so a long
suite does not look hung, and it fails for time only when it stops printing
for ``watched.IDLE_LIMIT`` seconds (a hang), never because a machine is slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import keras
import pytest
from helpers import RTOL
from watched import run_watched

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# The specification every backend must pass (test_distributed and
# test_mask_rcnn are TensorFlow-only).
SUITE = [
    "tests/test_exactness.py",
    "tests/test_state_and_saving.py",
    "tests/test_callback.py",
    "tests/test_errors.py",
    "tests/test_any_backend.py",
    "tests/test_batch_norm.py",
    "tests/test_mixed_precision.py",
    "tests/test_window_life.py",
    "tests/test_window_state_machine.py",
    "tests/test_window_edges.py",
    "tests/test_custom_train_step.py",
    "tests/test_composition_apply.py",
    "tests/test_keras_internals.py",
    "tests/test_composition_config.py",
    "tests/test_accumulator_dtype.py",
    "tests/test_option_coverage.py",
]
SPECIFICS = {
    "tensorflow": [],
    "jax": ["tests/test_jax_backend.py"],
    "torch": ["tests/test_torch_backend.py"],
}


# The closing line of each backend's suite, printed at the end of the run by
# `conftest.pytest_terminal_summary` (the subprocess tests themselves show as
# one test each).
BACKEND_RESULTS: dict[str, str] = {}


def _summary_line(stdout: str) -> str:
    lines = [line.strip("= ") for line in stdout.splitlines() if " passed" in line]
    return lines[-1] if lines else "no summary (see the failure above)"


def _skip_unless_installed(backend: str) -> None:
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"{module} is not installed, so the suite does not run on the {backend} "
            f"backend (pip install -e '.[{backend},test]' to run it)"
        )


def _to_terminal(capsys, backend: str):
    """An ``echo`` that writes a subprocess's output to the terminal, past pytest's capture."""

    def echo(text: str) -> None:
        with capsys.disabled():
            sys.stdout.write(text)
            sys.stdout.flush()

    with capsys.disabled():
        sys.stdout.write(f"\n[the suite on {backend}, in a subprocess]\n")
    return echo


def _jax_compilation_cache(env: dict[str, str], directory) -> None:
    # The tests build the same small models again and again: within one run,
    # XLA executables are reused across tests (about a fifth of JAX's time).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(directory))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_the_suite_passes_on_the_backend(backend, tmp_path, capsys):
    if keras.backend.backend() == backend:
        pytest.skip(f"this process runs the suite on {backend} itself")
    _skip_unless_installed(backend)
    env = dict(os.environ, KERAS_BACKEND=backend)
    if backend == "jax":
        _jax_compilation_cache(env, tmp_path / "jax_cache")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    completed = run_watched(
        command + SUITE + SPECIFICS[backend], env=env, cwd=ROOT, echo=_to_terminal(capsys, backend)
    )
    BACKEND_RESULTS[backend] = _summary_line(completed.stdout)
    report = completed.stdout[-6000:] + completed.stderr[-2000:]
    assert completed.returncode == 0, f"the {backend} suite failed:\n{report}"
    assert " passed" in completed.stdout, report


def test_jax_data_parallel_on_two_devices_matches_one_device_on_the_big_batch(tmp_path):
    _skip_unless_installed("jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    _jax_compilation_cache(env, tmp_path / "jax_cache")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    worker = os.path.join(TESTS, "backends", "jax_data_parallel_worker.py")
    completed = run_watched([sys.executable, worker], env=env, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for case, result in results.items():
        assert result["devices"] == 2, case
        # Replicated weights and accumulators, batches split across devices.
        assert result["kernel_devices"] == result["accumulator_devices"] == 2, case
        assert result["updates"] == result["reference_updates"] == 4, case
        assert result["difference"] <= RTOL, (case, result["difference"])
        # 60 samples in global windows of 32 and 28, per epoch.
        assert result["effective_batch_size"] == [30.0, 30.0], case
