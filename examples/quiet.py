"""Import TensorFlow without its start-up noise (every example uses this).

TensorFlow's C++ runtime prints a dozen lines at start-up (CUDA probing on a
machine without a GPU, such as ``failed call to cuInit``, oneDNN notices, absl
logging warnings) that are no use to someone running an example, and
``TF_CPP_MIN_LOG_LEVEL`` does not silence all of them: the lines logged before
absl's logging is initialized ignore it. :func:`import_tensorflow` captures
what the import and device discovery write to the stderr file descriptor and
prints again every line except the known start-up notices, so real errors
still show. Later C++ log lines (while training, e.g. oneDNN's ``supports
DT_INT32 only on platforms with AVX-512`` on CPUs without AVX-512, logged at
ERROR level though TensorFlow falls back to its own kernels) are silenced by
``TF_CPP_MIN_LOG_LEVEL=3``, set unless the environment sets a level; errors
that stop a run still arrive as Python exceptions.

Set ``EXAMPLES_TF_LOGS=1`` (or ``MASK_RCNN_TF_LOGS=1``, the Mask R-CNN
example's name for it) to see everything; ``0``, ``false`` or empty keep the
example quiet.
"""

from __future__ import annotations

import os
import sys
import tempfile

LOG_VARIABLES = ("EXAMPLES_TF_LOGS", "MASK_RCNN_TF_LOGS")
_ON = ("1", "true", "yes", "on")
# TensorFlow's C++ log threshold: 3 hides INFO, WARNING and ERROR lines.
QUIET_CPP_LOG_LEVEL = "3"
_OFF = ("", "0", "false", "no", "off")

_NOISE = (
    "absl::InitializeLog",
    "cuda drivers",
    "cudart_stub",
    "cuInit",
    "cuda_platform",
    "cuda_executor",
    "Unable to register",
    "oneDNN custom operations",
    "This TensorFlow binary is optimized",
    "rebuild TensorFlow with the appropriate compiler flags",
    "computation placer already registered",
    "TF-TRT Warning",
    "Could not find TensorRT",
    "CUDA error",
)


def tf_logs_wanted(environ=None) -> bool:
    """Whether the user asked for TensorFlow's start-up logs.

    Args:
        environ: the environment to read (``os.environ`` by default).

    Returns:
        True if any of :data:`LOG_VARIABLES` is ``1``/``true``/``yes``/``on``
        (any case); False if all are unset, empty, ``0``, ``false``, ``no`` or
        ``off``.

    Raises:
        ValueError: a variable holds something else (named in the message).
    """
    environ = os.environ if environ is None else environ
    wanted = False
    for name in LOG_VARIABLES:
        value = environ.get(name, "").strip().lower()
        if value not in _ON + _OFF:
            raise ValueError(
                f"{name}={environ[name]!r}: use 1 or true to show TensorFlow's start-up "
                "logs, 0, false or empty to hide them"
            )
        wanted = wanted or value in _ON
    return wanted


def import_tensorflow() -> None:
    """Import TensorFlow (and find its devices) with the start-up notices filtered out.

    Call it before anything imports TensorFlow (``keras`` on the TensorFlow
    backend does); afterwards it changes nothing.

    Example:
        >>> from examples import quiet
        >>> quiet.import_tensorflow()
        >>> import keras
    """
    if tf_logs_wanted() or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_CPP_LOG_LEVEL)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # device discovery prints the CUDA lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    kept = [
        line for line in text.splitlines() if line.strip() and not any(n in line for n in _NOISE)
    ]
    if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)
