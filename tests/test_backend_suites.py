"""The test suite on the other Keras backends, each in its own process.

Keras fixes its backend at import, so this process runs the suite on one
backend (``KERAS_BACKEND``, TensorFlow by default) and this module runs it on
the others in subprocesses, failing if they fail and skipping, with the reason,
backends that are not installed. Every backend runs the same specification
(``SUITE``) plus its own specifics. Run one backend's suite directly with e.g.
``KERAS_BACKEND=jax python -m pytest tests``.

The suites start when collection ends and run alongside this process's tests
(``background_jobs``; tests/background.py), and the tests here, moved to the
end of the run, wait for their results. When they run, the longest tests of
this process's own suite (``OFFLOADED``) run in a subprocess of its backend
too, so that the two cores share the work. Their progress is
written to the terminal as it comes (failures at once, otherwise a line every
``background.PROGRESS_PERIOD`` seconds), so a long suite does not look hung,
and a suite fails for time only when it stops printing for
``watched.IDLE_LIMIT`` seconds (a hang), never because a machine is slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import background
import keras
import pytest
from helpers import RTOL

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
    "tests/test_float8.py",
    "tests/test_first_contact_errors.py",
    "tests/test_micro_batch_size.py",
    "tests/test_micro_batch_memory.py",
]
SPECIFICS = {
    "tensorflow": [],
    "jax": ["tests/test_jax_backend.py"],
    "torch": ["tests/test_torch_backend.py"],
}


# The closing line and the slowest tests of each backend's suite, printed at
# the end of the run by `conftest.pytest_terminal_summary` (the subprocess
# tests themselves show as one test each).
BACKEND_RESULTS: dict[str, str] = {}
BACKEND_DURATIONS: dict[str, list[str]] = {}


def _skip_unless_installed(backend: str) -> None:
    reason = _not_installed(backend)
    if reason:
        pytest.skip(reason)


def _not_installed(backend: str) -> str | None:
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    if importlib.util.find_spec(module) is None:
        return (
            f"{module} is not installed, so the suite does not run on the {backend} "
            f"backend (pip install -e '.[{backend},test]' to run it)"
        )
    return None


def jax_compilation_env(env: dict[str, str], directory) -> None:
    """Sets, in a JAX subprocess's ``env``, the run's compilation cache and compile options.

    Args:
        env: the environment, changed in place (values already set stay).
        directory: the compilation cache's directory.
    """
    # The tests build the same small models again and again: within one run,
    # XLA executables are reused across tests (about a fifth of JAX's time).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(directory))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # Most of the suite's time is compiling tiny programs that run a few
    # times. The backend's optimization level trades the speed of XLA's CPU
    # code for compile time; IEEE float arithmetic stays (no fast-math), and
    # every test compares programs compiled alike. Measured: a fifth less
    # CPU time for tests/test_exactness.py and test_micro_batch_size.py
    # (125 -> 101 s, loaded 2-core VM).
    flags = env.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


def suite_command(
    backend: str, directory: str, tests: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run the suite on ``backend``.

    Args:
        backend: a Keras backend name.
        directory: a scratch directory of the run (JAX's compilation cache).
        tests: the node ids to run instead of the whole suite.

    Returns:
        ``(command, env)`` for :class:`background.Suites`.
    """
    env = dict(os.environ, KERAS_BACKEND=backend, **{background.HEARTBEAT_ENV: "0"})
    if backend == "jax":
        jax_compilation_env(env, os.path.join(directory, "jax_cache"))
    # -v: one line per test, which the relay turns into progress lines.
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE"]
    return command + (tests or SUITE + SPECIFICS[backend]), env


# Tests of this process's own suite that run in subprocesses of its backend
# when the other backends' suites run too (the README's command), a job per
# group: the longest tests (the randomized test, the Mask R-CNN example, the
# documentation and third-party models) then run on the second core once the
# other backends' suites are done. A group the background thread has not
# started when this process reaches its test runs here instead
# (`background.result`), so the two cores end at about the same time on a
# fast or a slow machine alike; a group costs one more start of the backend
# (a few seconds), which is why there are few.
OFFLOADED = {
    "randomized": ["tests/test_window_state_machine.py"],
    "mask_rcnn": ["tests/test_mask_rcnn.py", "tests/test_mask_rcnn_coco.py"],
    "third_party": ["tests/test_docs.py", "tests/test_keras_hub.py", "tests/test_your_model.py"],
}
# The node ids `offload` moved to a subprocess in this session, by group.
_OFFLOADED_NOW: dict[str, list[str]] = {}


def _group_of(nodeid: str) -> str | None:
    path = nodeid.split("::")[0]
    return next((group for group, paths in OFFLOADED.items() if path in paths), None)


def offload(config, items) -> None:
    """Moves the ``OFFLOADED`` tests out of this process when the other backends' suites run.

    Called by conftest once the selection is final; the moved tests are
    reported as deselected here and run by ``test_the_offloaded_tests_pass``.
    """
    if config.option.collectonly:
        return
    own = keras.backend.backend()
    suites = {
        item.callspec.params["backend"]
        for item in items
        if item.module.__name__ == __name__
        and item.originalname == "test_the_suite_passes_on_the_backend"
    }
    if own not in suites or not any(b != own and not _not_installed(b) for b in suites):
        return
    moved = [item for item in items if _group_of(item.nodeid) is not None]
    if moved:
        config.hook.pytest_deselected(items=moved)
        items[:] = [item for item in items if _group_of(item.nodeid) is None]
        _OFFLOADED_NOW.clear()
        for item in moved:
            _OFFLOADED_NOW.setdefault(_group_of(item.nodeid), []).append(item.nodeid)


def _offloaded_job(group: str) -> str:
    return f"{keras.backend.backend()}_{group}"


def background_jobs(scratch: str, items) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The other backends' suites, the offloaded groups and the data-parallel worker.

    conftest starts them when collection ends (tests/background.py), so that
    they run while this process runs its own tests: the other backends'
    suites first (the longest), then this backend's offloaded groups.
    """
    selected = {item.originalname: item for item in items if item.module.__name__ == __name__}
    jobs = {}
    for item in items:
        if item.module.__name__ != __name__:
            continue
        if item.originalname == "test_the_suite_passes_on_the_backend":
            backend = item.callspec.params["backend"]
            if backend != keras.backend.backend() and not _not_installed(backend):
                jobs[backend] = suite_command(backend, scratch)
    if "test_the_offloaded_tests_pass" in selected:
        for group in OFFLOADED:  # the longest first
            if group in _OFFLOADED_NOW:
                command = suite_command(keras.backend.backend(), scratch, _OFFLOADED_NOW[group])
                jobs[_offloaded_job(group)] = command
    if (
        "test_jax_data_parallel_on_two_devices_matches_one_device_on_the_big_batch" in selected
        and not _not_installed("jax")
    ):
        jobs["jax_data_parallel"] = _data_parallel_command(scratch)
    return jobs


def reading_order(item) -> int:
    """Where conftest puts a test of this module among those that read background jobs.

    The data-parallel worker, queued last here, is read first (with the
    other modules' workers); the offloaded groups next, the last queued
    first; the other backends' suites, queued first, at the very end.
    """
    if item.originalname == "test_the_offloaded_tests_pass":
        return 2 + len(OFFLOADED) - list(OFFLOADED).index(item.callspec.params["group"])
    if item.originalname == "test_the_suite_passes_on_the_backend":
        return 3 + len(OFFLOADED)
    return 1


def _data_parallel_command(scratch: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, KERAS_BACKEND="jax")
    jax_compilation_env(env, os.path.join(scratch, "jax_cache_data_parallel"))
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    return [sys.executable, os.path.join(TESTS, "backends", "jax_data_parallel_worker.py")], env


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_the_suite_passes_on_the_backend(backend, tmp_path):
    if keras.backend.backend() == backend:
        pytest.skip(f"this process runs the suite on {backend} itself")
    _skip_unless_installed(backend)
    command, env = suite_command(backend, str(tmp_path))
    _check_suite(backend, background.result(backend, command, env, cwd=ROOT))


@pytest.mark.parametrize("group", list(OFFLOADED))
def test_the_offloaded_tests_pass(group, tmp_path):
    if group not in _OFFLOADED_NOW:
        pytest.skip(f"the {group} tests run in this process (or are not selected)")
    backend = keras.backend.backend()
    command, env = suite_command(backend, str(tmp_path), _OFFLOADED_NOW[group])
    completed = background.result(_offloaded_job(group), command, env, cwd=ROOT)
    _check_suite(f"{backend} {group}", completed)


def _check_suite(name: str, completed) -> None:
    BACKEND_RESULTS[name] = background.summary_line(completed.stdout)
    BACKEND_DURATIONS[name] = background.durations_section(completed.stdout)
    report = completed.stdout[-6000:] + completed.stderr[-2000:]
    assert completed.returncode == 0, f"the {name} tests failed:\n{report}"
    assert " passed" in completed.stdout, report


def test_jax_data_parallel_on_two_devices_matches_one_device_on_the_big_batch(tmp_path):
    _skip_unless_installed("jax")
    command, env = _data_parallel_command(str(tmp_path))
    completed = background.result("jax_data_parallel", command, env, cwd=ROOT)
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
