"""The other backends' suites, run alongside: progress that never goes quiet, hangs that end.

The README's test command runs the suite on JAX and PyTorch in subprocesses
while this process runs its own tests (tests/background.py). Their progress
must reach the terminal at least every ``PROGRESS_PERIOD`` seconds, a failure
at once, and a suite that prints nothing for the idle limit is killed.
"""

from __future__ import annotations

import sys
import time

import pytest
from background import Heartbeat, Jobs, Relay, durations_section, summary_line
from watched import Hung

# A child that starts a test, is silent for a while inside it, then ends it,
# as ``pytest -v`` prints.
_ONE_SLOW_TEST = (
    "import sys, time\n"
    "print('tests/test_a.py::test_fast PASSED [ 50%]', flush=True)\n"
    "sys.stdout.write('tests/test_a.py::test_slow '); sys.stdout.flush()\n"
    "time.sleep({seconds})\n"
    "print('PASSED [100%]', flush=True)\n"
    "print('==== 2 passed in 1.00s ====', flush=True)\n"
)


def test_a_failure_is_shown_at_once_and_a_pass_only_in_the_next_progress_line():
    lines = []
    relay = Relay("jax", lines.append, period=3600)
    relay.feed("tests/test_a.py::test_one PASSED [ 33%]\ntests/test_a.py::test_two FAI")
    assert lines == []
    relay.feed("LED [ 66%]\ntests/test_a.py::test_three ")
    assert lines == ["[jax] tests/test_a.py::test_two FAILED"]
    assert (relay.done, relay.failed) == (2, ["tests/test_a.py::test_two"])


def test_a_long_test_is_named_in_every_progress_line_while_it_runs():
    lines = []
    relay = Relay("torch", lines.append, period=0)
    relay.feed("tests/test_a.py::test_one PASSED [ 50%]\ntests/test_a.py::test_long[x] ")
    relay.tick()
    assert lines[-1].startswith(
        "[torch] 1 tests done, 0 failed; running tests/test_a.py::test_long[x] for "
    )


def test_a_suite_silent_inside_one_test_still_shows_progress_every_period():
    lines = []
    command = [sys.executable, "-c", _ONE_SLOW_TEST.format(seconds=2)]
    jobs = Jobs({"jax": (command, None)}, write=lines.append, period=0.5)
    jobs.start()
    assert jobs.result("jax").returncode == 0
    assert any("running tests/test_a.py::test_slow for" in line for line in lines), lines
    assert lines[-1] == "[jax] finished: 2 passed in 1.00s"


def test_a_suite_that_prints_nothing_for_the_idle_limit_is_killed_as_hung():
    command = [sys.executable, "-c", _ONE_SLOW_TEST.format(seconds=120)]
    jobs = Jobs({"jax": (command, None)}, write=lambda line: None, idle_limit=1)
    jobs.start()
    with pytest.raises(Hung, match="no output for 1 s"):
        jobs.result("jax")


def test_a_test_waiting_for_a_running_job_runs_the_queued_ones_from_the_back_meanwhile():
    # The background thread takes "first" (2 s); the test that reads it runs
    # "third", then "second", instead of waiting idle: both cores stay busy.
    lines = []
    quick = [sys.executable, "-c", "print('done')"]
    slow = [sys.executable, "-c", "import time; time.sleep(2); print('done')"]
    jobs = Jobs(
        {"first": (slow, None), "second": (quick, None), "third": (quick, None)},
        write=lines.append,
    )
    jobs.start()
    while "[first] started in a subprocess" not in lines:
        time.sleep(0.05)
    assert jobs.result("first").returncode == 0
    started = [line.split("]")[0][1:] for line in lines if line.endswith("started in a subprocess")]
    assert started == ["first", "third", "second"], lines
    assert jobs.result("second").returncode == jobs.result("third").returncode == 0


def test_the_summary_and_the_slowest_tests_are_read_from_the_output():
    stdout = (
        "tests/test_a.py::test_one PASSED\n"
        "============ slowest 2 durations ============\n"
        "3.00s call     tests/test_a.py::test_one\n"
        "1.00s setup    tests/test_a.py::test_two\n"
        "============ 2 passed, 1 skipped in 4.12s ============\n"
    )
    assert summary_line(stdout) == "2 passed, 1 skipped in 4.12s"
    assert durations_section(stdout) == [
        "3.00s call     tests/test_a.py::test_one",
        "1.00s setup    tests/test_a.py::test_two",
    ]


def test_a_long_test_of_this_process_is_named_on_the_terminal_while_it_runs():
    lines = []
    heartbeat = Heartbeat(lines.append, period=0.2)
    heartbeat.test_started("tests/test_a.py::test_long")
    time.sleep(1.0)
    heartbeat.test_finished()
    heartbeat.stop()
    assert lines and lines[0].startswith("[still running tests/test_a.py::test_long: "), lines


def test_no_heartbeat_while_the_terminal_gets_other_progress_lines():
    lines = []
    heartbeat = Heartbeat(lines.append, period=0.5, last_line=time.monotonic)
    heartbeat.test_started("tests/test_a.py::test_waiting_for_a_job")
    time.sleep(1.0)
    heartbeat.stop()
    assert lines == []
