"""Which accum_keras a benchmark ran: shared by the benchmark scripts."""

from __future__ import annotations

import importlib.util
import os
import subprocess


def library_revision() -> str:
    """The git commit of the accum_keras checkout, and whether its files are modified.

    Finds the package without importing it (so without importing a backend).
    """
    spec = importlib.util.find_spec("accum_keras")
    if spec is None or spec.origin is None:
        return "accum_keras not found"
    package = os.path.dirname(spec.origin)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", package, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"git {commit}" + (", with uncommitted changes" if changed else "")
