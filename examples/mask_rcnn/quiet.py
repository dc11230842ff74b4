"""Moved to :mod:`examples.quiet`, shared by every example; kept so old imports work."""

from examples.quiet import import_tensorflow, tf_logs_wanted  # noqa: F401
