"""Subprocesses that tests need, run on the second core alongside this process's tests.

Keras fixes its backend at import, so the suite on the other backends runs in
subprocesses (tests/test_backend_suites.py), and a few cases need a process
of their own (two TensorFlow replicas, eight JAX devices). Run when their
tests come, they add their minutes to this process's. Instead, when
collection ends, conftest starts them one after the other on a background
thread (``start_for``: what each test module's ``background_jobs`` declares),
and moves the tests that read them to the end of the run; a test that needs a
job the thread has not reached yet runs it itself.

Their progress is written to the terminal as it comes, past pytest's capture:
every failure at once, and otherwise a line per job at least every
``PROGRESS_PERIOD`` seconds (tests done, the test running now), so that a
long run never looks hung. A job that prints nothing at all for
``watched.IDLE_LIMIT`` seconds is killed as hung.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

from watched import IDLE_LIMIT, Hung, Watched, run_watched

# Seconds between two progress lines of a running job or a long test.
PROGRESS_PERIOD = 30.0
# "0" turns the heartbeat off (set for the suites run as jobs).
HEARTBEAT_ENV = "ACCUM_KERAS_TEST_HEARTBEAT"

# A finished test in ``pytest -v`` output: "tests/test_x.py::test_y PASSED [ 5%]".
_RESULT = re.compile(r"^(\S+::\S+(?: \S+)*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


class Terminal:
    """Writes whole lines to the terminal from any thread, past pytest's capture.

    pytest redirects file descriptor 1 while a test runs; a copy of it, taken
    when no test runs, still reaches the terminal.

    Args:
        reporter: pytest's terminal reporter (to start on a fresh line when
            its progress dots are mid-line), or None.
    """

    def __init__(self, reporter=None):
        self._file = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self._reporter = reporter
        self._lock = threading.Lock()
        self.last_line = time.monotonic()  # when a line was last written

    def write_line(self, line: str) -> None:
        writer = getattr(self._reporter, "_tw", None)
        with self._lock:
            if writer is not None and writer.width_of_current_line:
                self._file.write("\n")
                # The reporter's next dot then starts a new line, with its file.
                writer._current_line = ""
                self._reporter.currentfspath = None
            self._file.write(line + "\n")
            self._file.flush()
            self.last_line = time.monotonic()

    def close(self) -> None:
        self._file.close()


class Relay:
    """Turns a ``pytest -v`` subprocess's output into sparse progress lines.

    Args:
        name: the prefix of every line (e.g. the backend).
        write: called with each line to show.
        period: seconds between two progress lines.
    """

    def __init__(self, name: str, write: Callable[[str], None], period: float = PROGRESS_PERIOD):
        self.name = name
        self.done = 0
        self.failed: list[str] = []
        self._write = write
        self._period = period
        self._pending = ""
        self._last_written = time.monotonic()
        self._current_since = time.monotonic()
        self._lock = threading.Lock()

    def feed(self, text: str) -> None:
        """Takes a piece of the subprocess's stdout, as it comes."""
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            for line in lines:
                match = _RESULT.match(line.strip())
                if match is None:
                    continue
                self.done += 1
                self._current_since = time.monotonic()
                if match.group(2) in ("FAILED", "ERROR"):
                    self.failed.append(match.group(1))
                    self._say(f"{match.group(1)} {match.group(2)}")

    def tick(self) -> None:
        """Writes a progress line if none was written for ``period`` seconds."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_written < self._period:
                return
            current = self._pending.strip()
            running = (
                f"; running {current} for {now - self._current_since:.0f} s"
                if "::" in current
                else ""
            )
            if self.done or running:
                self._say(f"{self.done} tests done, {len(self.failed)} failed{running}")
            else:
                self._say(f"running for {now - self._current_since:.0f} s")

    def _say(self, message: str) -> None:
        self._last_written = time.monotonic()
        self._write(f"[{self.name}] {message}")


class Jobs:
    """Subprocesses run one after the other on a background thread, in order.

    A test that needs a job's result before the background thread reached it
    takes the job and runs it itself (so nothing waits on a busy queue).

    Args:
        commands: for each name, the command and its environment (None: this
            process's).
        write: where progress lines go (see :class:`Relay`).
        cwd: the working directory of every subprocess.
        idle_limit: seconds of silence after which a subprocess counts as hung.
        period: seconds between two progress lines.
    """

    def __init__(
        self,
        commands: dict[str, tuple[Sequence[str], dict[str, str] | None]],
        write: Callable[[str], None],
        cwd: str | None = None,
        idle_limit: float = IDLE_LIMIT,
        period: float = PROGRESS_PERIOD,
    ):
        self._commands = dict(commands)
        self._queue = list(commands)
        self._write = write
        self._cwd = cwd
        self._idle_limit = idle_limit
        self._period = period
        self._results: dict[str, subprocess.CompletedProcess | Exception] = {}
        self._finished = {name: threading.Event() for name in commands}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._running: list[Watched] = []
        self._thread = threading.Thread(target=self._run_queue, daemon=True)

    def __contains__(self, name: str) -> bool:
        return name in self._commands

    def start(self) -> None:
        self._thread.start()

    def _take(self, name: str | None = None, last: bool = False) -> str | None:
        with self._lock:
            if name is None:
                return self._queue.pop(-1 if last else 0) if self._queue else None
            if name in self._queue:
                self._queue.remove(name)
                return name
            return None

    def _run_queue(self) -> None:
        while not self._stopping.is_set() and (name := self._take()) is not None:
            self._run_and_record(name)

    def _run_and_record(self, name: str) -> None:
        try:
            self._results[name] = self._run(name, *self._commands[name])
        except Exception as error:  # raised again in the test that asks for it
            self._results[name] = error
        finally:
            self._finished[name].set()

    def _run(self, name, command, env) -> subprocess.CompletedProcess:
        relay = Relay(name, self._write, self._period)
        self._write(f"[{name}] started in a subprocess")
        watched = Watched(command, env=env, cwd=self._cwd, echo=relay.feed)
        self._running.append(watched)
        try:
            while watched.process.poll() is None:
                if self._stopping.is_set():
                    raise RuntimeError("the test session ended before it finished")
                if watched.idle_for() > self._idle_limit:
                    tail = (watched.text("stdout")[-2000:] + watched.text("stderr")[-2000:]).strip()
                    raise Hung(
                        f"no output for {self._idle_limit:g} s from {' '.join(command)}: killed "
                        f"as hung (a slow run keeps printing; this one stopped). Its last "
                        f"output:\n{tail or '(none)'}"
                    )
                relay.tick()
                time.sleep(0.2)
        finally:
            watched.kill()
            self._running.remove(watched)
        completed = watched.result()
        outcome = summary_line(completed.stdout) or f"exit status {completed.returncode}"
        self._write(f"[{name}] finished: {outcome}")
        return completed

    def result(self, name: str) -> subprocess.CompletedProcess:
        """The job's output: runs it here if it has not started, or waits for it.

        While it runs on the background thread, this thread runs the jobs
        still queued, from the back of the queue, instead of waiting idle.

        Raises:
            Hung: it printed nothing for ``idle_limit`` seconds (it was killed).
        """
        if self._take(name) is not None:
            self._run_and_record(name)
        while not self._finished[name].is_set() and (other := self._take(last=True)):
            self._run_and_record(other)
        self._finished[name].wait()
        outcome = self._results[name]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def stop(self) -> None:
        """Kills what still runs (the session ended early, e.g. ``-x``)."""
        self._stopping.set()
        for watched in list(self._running):
            watched.kill()
        self._thread.join(timeout=30)


class Heartbeat:
    """Names the test this process runs when it has run long without a line on the terminal.

    Args:
        write: where the line goes (a :class:`Terminal`'s ``write_line``).
        period: seconds of a test's run between two lines.
        last_line: when the terminal last got a line from elsewhere (a job's
            progress while the test waits for it), or None.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        period: float = PROGRESS_PERIOD,
        last_line: Callable[[], float] | None = None,
    ):
        self._write = write
        self._last_line = last_line or (lambda: 0.0)
        self._period = period
        self._test: str | None = None
        self._since = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def test_started(self, nodeid: str) -> None:
        with self._lock:
            self._test, self._since = nodeid, time.monotonic()
            self._last = self._since

    def test_finished(self) -> None:
        with self._lock:
            self._test = None

    def _beat(self) -> None:
        while not self._stopping.wait(min(1.0, self._period / 2)):
            with self._lock:
                now = time.monotonic()
                quiet_since = max(self._last, self._last_line())
                if self._test is None or now - quiet_since < self._period:
                    continue
                self._last = now
                line = f"[still running {self._test}: {now - self._since:.0f} s]"
            self._write(line)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)


# The jobs of this test session (`start_for`), None before collection ends.
_SESSION: Jobs | None = None
_SCRATCH: tempfile.TemporaryDirectory | None = None
HEARTBEAT: Heartbeat | None = None


def start_for(items, reporter=None, cwd: str | None = None) -> Jobs | None:
    """Starts, on a background thread, the subprocesses the collected tests need.

    Also starts the :class:`Heartbeat` of this process's tests.

    A test module declares them with ``background_jobs(scratch, items)``,
    returning ``{name: (command, env)}`` for the selected ``items`` (``scratch``:
    a directory that lives as long as the session).

    Args:
        items: the collected tests, in the order they will run.
        reporter: pytest's terminal reporter, for progress lines (or None).
        cwd: the working directory of the subprocesses.

    Returns:
        The started jobs, or None if no test needs one.
    """
    global _SESSION, _SCRATCH, HEARTBEAT
    terminal = Terminal(reporter)
    # A suite run as a job beats no heart of its own: its silence is how a hang shows.
    if os.environ.get(HEARTBEAT_ENV) != "0":
        HEARTBEAT = Heartbeat(terminal.write_line, last_line=lambda: terminal.last_line)
    modules = list(dict.fromkeys(item.module for item in items if hasattr(item, "module")))
    _SCRATCH = tempfile.TemporaryDirectory(prefix="accum_keras_jobs_")
    commands = {}
    for module in modules:
        declare = getattr(module, "background_jobs", None)
        if declare is not None:
            commands.update(declare(_SCRATCH.name, items))
    if not commands:
        return None
    _SESSION = Jobs(commands, write=terminal.write_line, cwd=cwd)
    _SESSION.start()
    return _SESSION


def result(name: str, command: Sequence[str], env: dict[str, str] | None = None, cwd=None):
    """A job's output: from the session's background jobs, or run here if it has none.

    Args:
        name: the job's name in ``background_jobs``.
        command, env, cwd: how to run it here when no session started it.

    Returns:
        A ``subprocess.CompletedProcess`` with text stdout and stderr.
    """
    if _SESSION is not None and name in _SESSION:
        return _SESSION.result(name)
    return run_watched(command, env=env, cwd=cwd)


def stop() -> None:
    """Kills the session's jobs that still run and removes their scratch directory."""
    if HEARTBEAT is not None:
        HEARTBEAT.stop()
    if _SESSION is not None:
        _SESSION.stop()
    if _SCRATCH is not None:
        _SCRATCH.cleanup()


def summary_line(stdout: str) -> str:
    """pytest's closing line ("233 passed, 2 skipped in 201.3s"), without the rules."""
    lines = [
        line.strip("= ")
        for line in stdout.splitlines()
        if re.search(r"\d+ (passed|failed|error)", line) and line.startswith("=")
    ]
    return lines[-1] if lines else ""


def durations_section(stdout: str) -> list[str]:
    """The "slowest durations" lines of a pytest run's output (empty if none)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if "slowest" in line and "durations" in line and line.startswith("="):
            section = []
            for following in lines[i + 1 :]:
                if following.startswith("=") or not following.strip():
                    break
                section.append(following)
            return section
    return []
