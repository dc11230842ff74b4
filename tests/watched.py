"""Subprocesses that fail the test only when they hang, not when they are slow.

A wall-clock limit fails a slow machine although nothing is wrong; what a test
must catch is a process that stopped making progress. The helpers here read a
subprocess's output as it comes (optionally relaying it, e.g. to the terminal,
so a long suite does not look hung) and kill it only after ``idle_limit``
seconds without a single byte on stdout or stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

# No output for this long means the process hangs. The longest silence of a
# healthy run is one slow test of a backend suite, or a whole worker of
# tests/distributed (they print once, at the end).
IDLE_LIMIT = 600.0


class Hung(AssertionError):
    """A watched subprocess printed nothing for ``idle_limit`` seconds and was killed."""


class Watched:
    """A running subprocess whose stdout and stderr are read as they come.

    Args:
        command: the program and its arguments.
        env: its environment (``PYTHONUNBUFFERED=1`` is added so a Python
            child's output is not held back in a pipe buffer).
        cwd: its working directory.
        echo: called with every piece of text the child writes to stdout, as it
            comes (stderr, where TensorFlow's start-up lines go, is kept for the
            failure report but not relayed; it counts as output all the same).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        echo: Callable[[str], None] | None = None,
    ):
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.command = list(command)
        self.last_output = time.monotonic()
        self._echo = echo
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._lock = threading.Lock()
        # Its own process group, so that a kill also ends what it started.
        self.process = subprocess.Popen(
            self.command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(stream, name), daemon=True)
            for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr"))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        # read1 returns whatever is there (a pytest progress dot, a partial
        # line): any byte counts as a sign of life.
        while chunk := stream.read1(65536):
            with self._lock:
                self.last_output = time.monotonic()
                self._chunks[name].append(chunk)
            if self._echo is not None and name == "stdout":
                self._echo(chunk.decode(errors="replace"))

    def text(self, name: str) -> str:
        with self._lock:
            return b"".join(self._chunks[name]).decode(errors="replace")

    def idle_for(self) -> float:
        with self._lock:
            return time.monotonic() - self.last_output

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def result(self) -> subprocess.CompletedProcess:
        for reader in self._readers:
            reader.join()
        return subprocess.CompletedProcess(
            self.command, self.process.returncode, self.text("stdout"), self.text("stderr")
        )


def wait_watched(
    watched: Sequence[Watched], idle_limit: float = IDLE_LIMIT, poll: float = 0.2
) -> list[subprocess.CompletedProcess]:
    """Waits for every process; kills them all if one of them goes silent.

    Args:
        watched: processes started with :class:`Watched`.
        idle_limit: seconds without output after which a running process
            counts as hung.
        poll: how often to look, in seconds.

    Returns:
        One ``subprocess.CompletedProcess`` per process (text stdout/stderr).

    Raises:
        Hung: a process printed nothing for ``idle_limit`` seconds; all were
            killed, and the message names the command and its last output.
    """
    try:
        while any(w.process.poll() is None for w in watched):
            for w in watched:
                if w.process.poll() is None and w.idle_for() > idle_limit:
                    tail = (w.text("stdout")[-2000:] + w.text("stderr")[-2000:]).strip()
                    raise Hung(
                        f"no output for {idle_limit:g} s from {' '.join(w.command)}: killed "
                        f"as hung (a slow run keeps printing; this one stopped). Its last "
                        f"output:\n{tail or '(none)'}"
                    )
            time.sleep(poll)
    finally:
        for w in watched:
            w.kill()
    return [w.result() for w in watched]


def run_watched(
    command: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    echo: Callable[[str], None] | None = None,
    idle_limit: float = IDLE_LIMIT,
) -> subprocess.CompletedProcess:
    """Runs one command to its end unless it goes silent (see :func:`wait_watched`).

    Example:
        >>> completed = run_watched([sys.executable, "-c", "print(1)"], idle_limit=60)
        >>> completed.stdout
        '1\\n'
    """
    return wait_watched([Watched(command, env=env, cwd=cwd, echo=echo)], idle_limit)[0]
