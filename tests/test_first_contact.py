"""What a user meets first: a test run that shows its progress, quiet examples,
no alarming TensorFlow messages, and warnings where results deviate."""

from __future__ import annotations

import sys
import time

import pytest
from watched import Hung, run_watched

# A child that prints one line every `period` seconds, `count` times.
_TICKS = "import sys, time\nfor i in range({count}):\n    print(i, flush=True)\n    time.sleep({period})\n"


def test_a_silent_subprocess_is_killed_after_the_idle_limit_with_a_clear_message():
    started = time.monotonic()
    with pytest.raises(Hung, match=r"(?s)no output for 1 s from .*killed as hung") as caught:
        run_watched([sys.executable, "-c", _TICKS.format(count=2, period=60)], idle_limit=1)
    # Killed soon after the limit, not when the child would have finished.
    assert time.monotonic() - started < 10
    # The message shows what it printed last.
    assert caught.value.args[0].rstrip().endswith("0")


def test_a_subprocess_that_keeps_printing_runs_longer_than_the_idle_limit():
    started = time.monotonic()
    seen = []
    completed = run_watched(
        [sys.executable, "-c", _TICKS.format(count=12, period=0.25)],
        idle_limit=1,
        echo=lambda text: seen.append((time.monotonic(), text)),
    )
    finished = time.monotonic()
    assert finished - started > 2.5  # three times the idle limit
    assert completed.returncode == 0
    assert completed.stdout.split() == [str(i) for i in range(12)]
    # Relayed as it came (streamed), not all at the end.
    assert seen and seen[0][0] < finished - 2
    assert "".join(text for _, text in seen).split() == completed.stdout.split()
