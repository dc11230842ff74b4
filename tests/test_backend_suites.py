"""The test suite on the other Keras backends, each in its own process.

Keras fixes its backend at import, so this process runs the suite on one
backend (``KERAS_BACKEND``, TensorFlow by default) and this module runs it on
the others in subprocesses, failing if they fail and skipping, with the reason,
backends that are not installed. JAX compiles every ``fit()`` of every test,
which makes its full run slow on CPU, so it runs a representative selection
(``SELECTIONS``); PyTorch runs everything. Run one backend's suite in full
with e.g. ``KERAS_BACKEND=jax python -m pytest tests``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import keras
import pytest
from helpers import RTOL

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# The suites that every backend must pass (test_distributed and
# test_mask_rcnn are TensorFlow-only).
CORE = [
    "tests/test_exactness.py",
    "tests/test_state_and_saving.py",
    "tests/test_callback.py",
    "tests/test_errors.py",
    "tests/test_any_backend.py",
]

_EXACTNESS = "tests/test_exactness.py::"
_SAVING = "tests/test_state_and_saving.py::"
_CALLBACK = "tests/test_callback.py::"

SELECTIONS = {
    "tensorflow": CORE,
    "torch": [
        *CORE,
        "tests/test_batch_norm.py",
        "tests/test_mixed_precision.py",
        "tests/test_torch_backend.py",
    ],
    "jax": [
        # Optimizer options applied once per update, schedules, a user-written
        # optimizer; every case has a short last window per epoch.
        *(
            f"{_EXACTNESS}test_every_optimizer_and_option_matches_the_big_batch[{name}]"
            for name in (
                "adamw",
                "clipnorm",
                "ema",
                "exponential_decay",
                "user_written",
            )
        ),
        f"{_EXACTNESS}test_sample_weights_and_class_weights",
        f"{_EXACTNESS}test_every_loss_reduction[mean_with_sample_weight]",
        f"{_EXACTNESS}test_every_loss_reduction[sum]",
        f"{_EXACTNESS}test_masked_per_token_loss_is_normalized_over_the_window[sum_over_batch_size]",
        f"{_EXACTNESS}test_multi_output_with_loss_weights_regularizers_and_add_loss",
        f"{_EXACTNESS}test_every_input_type[pydataset]",
        f"{_EXACTNESS}test_execution_modes[steps_per_execution]",
        f"{_EXACTNESS}test_execution_modes[eager]",
        f"{_EXACTNESS}test_variables_without_gradient_are_left_alone",
        f"{_EXACTNESS}test_staged_training_follows_the_trainable_variables",
        f"{_EXACTNESS}test_one_accumulation_step_is_plain_keras",
        f"{_EXACTNESS}test_subclassed_model_with_its_own_compute_loss",
        f"{_SAVING}test_accumulators_are_not_weights_and_one_per_trainable_variable",
        f"{_SAVING}test_epoch_end_applies_the_short_window_before_validation",
        f"{_SAVING}test_config_round_trip",
        f"{_SAVING}test_save_mid_window_and_resume_exactly",
        f"{_SAVING}test_backup_and_restore_keeps_a_pending_window",
        f"{_SAVING}test_accumulation_steps_can_change_between_fits_without_recompiling",
        f"{_CALLBACK}test_scaling_rules_match_the_big_batch_with_the_scaled_rate",
        f"{_CALLBACK}test_logs_reach_history_csv_logger_and_tensorboard",
        "tests/test_errors.py",
        "tests/test_any_backend.py",
        "tests/test_batch_norm.py",
        "tests/test_mixed_precision.py",
        "tests/test_jax_backend.py",
    ],
}


def _skip_unless_installed(backend: str) -> None:
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"{module} is not installed, so the suite does not run on the {backend} "
            f"backend (pip install -e '.[{backend},test]' to run it)"
        )


def _run(command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _jax_compilation_cache(env: dict[str, str], directory) -> None:
    # The tests build the same small models again and again: within one run,
    # XLA executables are reused across tests (about a fifth of JAX's time).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(directory))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_the_suite_passes_on_the_backend(backend, tmp_path):
    if keras.backend.backend() == backend:
        pytest.skip(f"this process runs the suite on {backend} itself")
    _skip_unless_installed(backend)
    env = dict(os.environ, KERAS_BACKEND=backend)
    if backend == "jax":
        _jax_compilation_cache(env, tmp_path / "jax_cache")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    completed = _run(command + SELECTIONS[backend], env, timeout=900)
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
    completed = _run([sys.executable, worker], env, timeout=600)
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
