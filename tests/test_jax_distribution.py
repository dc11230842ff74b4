"""JAX's distribution API: sharded models on eight host devices, and two processes.

Both need JAX configured before it starts (eight CPU devices through
``XLA_FLAGS``; gloo collectives and `keras.distribution.initialize`), so the
cases run in their own processes (`tests/backends/jax_model_parallel_worker.py`,
`tests/backends/jax_multi_process_worker.py`), whatever backend this process
runs; these tests start them and check what they print.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import background
import numpy as np
import pytest
from helpers import RTOL
from test_backend_suites import jax_compilation_env

BACKENDS = os.path.join(os.path.dirname(__file__), "backends")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed (pip install -e '.[jax,test]' runs these tests)",
)


def _jax_env(tmp_path, **extra) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    # The suite's compilation cache and compile options (see there).
    jax_compilation_env(env, tmp_path / "jax_cache")
    return env


def _last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# -- ModelParallel on eight host devices -----------------------------------------


def _model_parallel_command(scratch) -> tuple[list[str], dict[str, str]]:
    env = _jax_env(scratch)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    command = [sys.executable, os.path.join(BACKENDS, "jax_model_parallel_worker.py")]
    if importlib.util.find_spec("keras_hub") is None:
        command.append("--no-keras-hub")
    return command, env


def background_jobs(scratch, items):
    """The eight-device worker, started when collection ends (tests/background.py)."""
    if importlib.util.find_spec("jax") is not None and any(
        "model_parallel" in getattr(item, "fixturenames", ()) for item in items
    ):
        return {"jax_model_parallel": _model_parallel_command(pathlib.Path(scratch))}
    return {}


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    command, env = _model_parallel_command(tmp_path_factory.mktemp("model_parallel"))
    completed = background.result("jax_model_parallel", command, env, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = _last_json_line(completed.stdout)
    assert results["devices"] == 8
    return results["cases"]


def _case(model_parallel, name):
    if name not in model_parallel:
        pytest.skip("keras-hub is not installed (pip install -e '.[hub]' installs it)")
    return model_parallel[name]


CASES = ["functional", "gemma", "gemma_lora"]


@pytest.mark.parametrize("name", CASES)
def test_every_accumulator_has_its_variables_layout(model_parallel, name):
    case = _case(model_parallel, name)
    assert case["variables"] == case["trainable"], "one accumulator per trainable variable"
    for path, expected, actual in zip(
        case["variables"], case["variable_specs"], case["accumulator_specs"], strict=True
    ):
        assert actual == expected, (path, actual, expected)
    if name != "gemma_lora":
        # The case does test sharded layouts (LoRA's factors are replicated).
        assert case["sharded_variables"] >= 4


@pytest.mark.parametrize("name", CASES)
def test_accumulators_take_no_more_memory_per_device_than_the_weights(model_parallel, name):
    case = _case(model_parallel, name)
    # As Keras' own slots: Adam keeps two per weight, each laid out like it.
    assert case["adam_slot_bytes"] == 2 * case["weight_bytes"]
    assert case["accumulator_bytes"] <= case["weight_bytes"]


@pytest.mark.parametrize("name", CASES)
def test_model_parallel_training_equals_plain_keras_on_the_big_batch(model_parallel, name):
    case = _case(model_parallel, name)
    assert case["updates"] == case["reference_updates"] == 4
    assert case["difference"] <= RTOL, case["difference"]


def test_lora_accumulates_only_the_lora_weights(model_parallel):
    case = _case(model_parallel, "gemma_lora")
    # `enable_lora` on the query and value projections of the one block:
    # two factors each, and nothing else trainable.
    assert case["lora_variables"] == len(case["variables"]) == 4


@pytest.mark.parametrize("key", ["broad", "narrow"])
def test_batch_norm_window_statistics_take_the_moving_statistics_layout(model_parallel, key):
    case = model_parallel[f"batch_norm_{key}"]
    assert "error" not in case, case.get("error")
    for specs in (case["specs"], case["converted_specs"]):
        # A scalar has no axis to shard: replicated, whatever the key matches.
        assert specs["window_count"] == []
        assert specs["window_mean"] == specs["moving_mean"] == ["model"]
        assert specs["window_m2"] == specs["moving_variance"]
        assert specs["moving_variance"] == (["model"] if key == "broad" else [None])


@pytest.mark.parametrize("key", ["broad", "narrow"])
def test_batch_norm_under_a_layout_map_stores_the_big_batch_statistics(model_parallel, key):
    case = model_parallel[f"batch_norm_{key}"]
    assert "error" not in case, case.get("error")
    assert case["moved"] > 1e-2  # the window did move the statistics
    assert case["difference"] <= 1e-5, case["difference"]


def test_random_configurations_and_window_events_match_the_reference_under_layouts(
    model_parallel,
):
    """The randomized window test, drawn under DataParallel and ModelParallel on 8 host devices.

    tests/distributed_state_machine.py runs the machine of
    tests/test_window_state_machine.py (model kind, BatchNormalization,
    skip_nonfinite_updates, streaming k or in-step micro_batch_size, the
    callback; train_on_batch, fits, apply, discard, save and load) under
    `DataParallel`, or `ModelParallel` on a (4, 2) mesh with a broad
    `LayoutMap` (every kernel, every BatchNormalization variable) or a narrow
    one (one variable's path), against plain Keras under the same
    distribution, with jitted steps. Budget: 12 examples of at most 8 events,
    the same examples every run (``ACCUM_KERAS_STATE_MACHINE_EXPLORE=1`` draws
    new ones, ``ACCUM_KERAS_DISTRIBUTED_STATE_MACHINE_EXAMPLES`` sets the
    count). How it was chosen: the target is under 60 CPU-s on the background
    lane; 12 examples took 44 CPU-s on the 2-core VM (run eagerly, 58-63:
    XLA compiles each eager operation again for each layout). An eager draw
    of 12 found a window applied right after loading that kept
    AccumBatchNormalization's pooled statistics (fixed with it, a JAX bug on
    one device too).
    """
    result = model_parallel["randomized_state_machine"]
    assert result["failure"] is None, result["failure"]
    assert result["examples"] >= result["budget"]
    drawn = result["drawn"]
    # The budget does reach the axes that meet the distribution.
    assert {d["distribution"] for d in drawn} == {"data_parallel", "model_parallel"}
    assert {d["layout"] for d in drawn} >= {"broad", "narrow"}
    assert {d["mode"] for d in drawn} == {"streaming", "in_step"}
    assert {d["batch_norm"] for d in drawn} >= {"plain", "accum"}


def _counts(collectives: list) -> collections.Counter:
    return collections.Counter(tuple(entry) for entry in collectives)


def test_the_compiled_steps_do_not_gather_the_accumulators(model_parallel):
    case = model_parallel["functional"]
    collectives = case["collectives"]
    plain = _counts(collectives["plain"])
    # The program that runs on the micro-batches that cannot close a window
    # communicates no more than Keras' own step (which gathers only the
    # activations its layout needs).
    assert not _counts(collectives["accumulate"]) - plain, collectives
    # Neither program gathers a sharded accumulator to its full shape.
    sharded = {
        shape
        for shape, spec in zip(case["accumulator_shapes"], case["accumulator_specs"])
        if any(axis is not None for axis in spec)
    }
    for program in ("accumulate", "apply"):
        extra = _counts(collectives[program]) - plain
        gathered = {shape for (shape, kind) in extra.elements() if kind == "all-gather"}
        assert not gathered & sharded, (program, gathered & sharded)


# -- DataParallel across two processes --------------------------------------------


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_two_processes(env, directory, timeout: float) -> list[tuple[int, str, str]]:
    """Starts both processes on a fresh coordinator port and waits for both.

    Bounded: the first failure or the deadline ends both (a process whose
    peer died would otherwise wait for it until JAX's own timeout).
    """
    port = _free_loopback_port()
    worker = os.path.join(BACKENDS, "jax_multi_process_worker.py")
    processes, logs = [], []
    try:
        for process_id in range(2):
            # Files, not pipes: nobody reads a pipe while we wait.
            out = open(directory / f"process_{process_id}.out", "w+")  # noqa: SIM115
            err = open(directory / f"process_{process_id}.err", "w+")  # noqa: SIM115
            logs.append((out, err))
            processes.append(
                subprocess.Popen(
                    [sys.executable, worker, str(port), str(process_id)],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=err,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in processes):
            if any(p.returncode not in (None, 0) for p in processes):
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(worker, timeout)
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    outputs = []
    for process, (out, err) in zip(processes, logs):
        out.seek(0)
        err.seek(0)
        outputs.append((process.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return outputs


def test_two_jax_processes_train_like_plain_keras_on_the_global_big_batch(tmp_path):
    env = _jax_env(tmp_path)
    # One CPU device per process.
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    try:
        outputs = _run_two_processes(env, tmp_path, timeout=300)
        if any(code != 0 and "in use" in stderr for code, _, stderr in outputs):
            # Another program took the probed port before the coordinator
            # bound it: once more on another one.
            outputs = _run_two_processes(env, tmp_path, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the two JAX processes did not finish within 300 s")
    results = []
    for code, stdout, stderr in outputs:
        assert code == 0, stderr[-3000:]
        results.append(_last_json_line(stdout))
    assert [r["process_id"] for r in results] == [0, 1]
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 2
        assert result["updates"] == result["reference_updates"] == 4
        assert result["difference"] <= RTOL, result["difference"]
        # 60 samples, global micro-batches of 8 (4 from each process) and
        # windows of 4: updates of 32 and 28 samples, in each epoch.
        assert result["effective_batch_size"] == [30.0, 30.0]
    for mine, theirs in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    # micro_batch_size=6 on global batches of 16 (8 from each process: two
    # micro-batches of 6 and a remainder of 4) and a short last one of 12:
    # plain Keras on one device on the global batches.
    for result in (r["in_step"] for r in results):
        assert result["updates"] == result["reference_updates"] == 8
        assert result["difference"] <= RTOL, result["difference"]
        for name, values in result["reference_history"].items():
            np.testing.assert_allclose(result["history"][name], values, rtol=1e-5, err_msg=name)
        # Each process keeps its share of every micro-batch: the compiled
        # step (batch 12, two micro-batches of 6; batch 16, the same and a
        # remainder of 4, 2 rows from each process) moves no input between
        # the processes' devices; it only all-reduces.
        assert {kind for _, kind in result["collectives"]} == {"all-reduce"}
        assert {kind for _, kind in result["remainder_collectives"]} == {"all-reduce"}
    mine, theirs = (r["in_step"]["weights"] for r in results)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


# -- micro_batch_size on eight host devices ----------------------------------------


@pytest.fixture(scope="module")
def in_step(tmp_path_factory):
    env = _jax_env(tmp_path_factory.mktemp("in_step"))
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    command = [sys.executable, os.path.join(BACKENDS, "jax_in_step_worker.py")]
    completed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = _last_json_line(completed.stdout)
    assert results["devices"] == 8
    return results["cases"]


# ``*_remainder``: micro_batch_size does not divide the fit batch, but the
# number of batch shards divides both (the split then follows the shards).
IN_STEP_CASES = [
    "data_parallel",
    "model_parallel",
    "data_parallel_remainder",
    "model_parallel_remainder",
]


@pytest.mark.parametrize("name", IN_STEP_CASES)
def test_micro_batch_size_under_a_distribution_is_plain_keras_there(in_step, name):
    case = in_step[name]
    assert case["updates"] == case["reference_updates"]
    assert case["difference"] <= RTOL
    np.testing.assert_allclose(case["loss"], case["reference_loss"], rtol=1e-5)


@pytest.mark.parametrize("name", IN_STEP_CASES)
def test_the_in_step_carry_keeps_the_variables_layout(in_step, name):
    case = in_step[name]
    assert case["accumulator_specs"] == case["variable_specs"]
    if name.startswith("model_parallel"):
        assert any(entry is not None for entry in sum(case["variable_specs"], []))


@pytest.mark.parametrize("name", IN_STEP_CASES)
def test_the_in_step_train_step_moves_no_input_between_devices(in_step, name):
    case = in_step[name]
    moving = ("all-gather", "all-to-all", "collective-permute")
    assert not [c for c in case["collectives"] if c[1] in ("all-to-all", "collective-permute")]
    # A gather of an input (or of micro-batches of it) ends in its features.
    gathered = [shape for shape, kind in case["collectives"] if kind in moving]
    input_features = {shape.split(",")[-1] for shape in case["input_shapes"]}
    assert not [shape for shape in gathered if shape.split(",")[-1] in input_features]
    # What the step gathers is what plain Keras' step gathers (the sharded
    # model's activations), for a micro-batch instead of the whole batch, and
    # again for the remainder micro-batch if there is one.
    batch, micro = (int(shape.split(",")[0]) for shape in case["input_shapes"][::2])
    sizes = [micro] + ([case["remainder"]] if case["remainder"] else [])

    def per_micro_batch(shape, size):
        rows, *rest = shape.split(",")
        return ",".join([str(int(rows) * size // batch), *rest])

    plain = [
        per_micro_batch(shape, size)
        for shape, kind in case["plain_collectives"]
        if kind in moving
        for size in sizes
    ]
    assert sorted(gathered) == sorted(plain)


def test_accum_batch_normalization_under_data_parallel_normalizes_the_documented_micro_batches(
    in_step,
):
    # Batches of 40 on 8 devices, micro-batches of 16 and a remainder of 8:
    # each micro-batch takes its rows from every device's own 5 rows.
    case = in_step["data_parallel_batch_norm"]
    assert case["updates"] == 2
    assert case["difference"] <= RTOL
    # The split is observable: the rule that ignores the shards trains otherwise.
    assert case["unsharded_rule_difference"] > 100 * RTOL
