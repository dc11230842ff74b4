"""Import TensorFlow without its start-up noise (the example's scripts only).

TensorFlow's C++ runtime prints a dozen lines at start-up (CUDA probing on a
machine without a GPU, oneDNN notices, absl logging warnings) that are no use
to someone training a model. :func:`import_tensorflow` captures what the
import and device discovery write to the stderr file descriptor and prints
again every line except the known start-up notices, so real errors still
show. Set ``MASK_RCNN_TF_LOGS=1`` to see everything.
"""

import os
import sys
import tempfile

_NOISE = (
    "absl::InitializeLog",
    "cuda drivers",
    "cudart_stub",
    "cuInit",
    "cuda_platform",
    "Unable to register",
    "oneDNN custom operations",
    "This TensorFlow binary is optimized",
    "rebuild TensorFlow with the appropriate compiler flags",
    "computation placer already registered",
    "TF-TRT Warning",
    "Could not find TensorRT",
    "CUDA error",
)


def import_tensorflow():
    """Import TensorFlow (and find its devices) with the start-up notices filtered out."""
    if os.environ.get("MASK_RCNN_TF_LOGS") or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
