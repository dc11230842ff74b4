"""Session-wide test options.

``ACCUM_KERAS_TEST_XLA=1`` runs the whole specification with XLA on the
TensorFlow backend: every ``compile()`` that does not choose ``jit_compile``
itself gets ``jit_compile=True``, as Keras' ``"auto"`` would on a GPU::

    ACCUM_KERAS_TEST_XLA=1 python -m pytest tests/test_exactness.py

(JAX always compiles with XLA; the option changes nothing there or on
PyTorch.)
"""

import os
import sys

import keras
import pytest
from helpers import XLA_ENV, xla_by_default


@pytest.fixture(autouse=True, scope="session")
def _xla_when_asked():
    if os.environ.get(XLA_ENV) == "1" and keras.backend.backend() == "tensorflow":
        with xla_by_default():
            yield
    else:
        yield


def pytest_terminal_summary(terminalreporter):
    """Shows what each other backend's suite (run in a subprocess) counted."""
    suites = sys.modules.get("test_backend_suites")
    results = getattr(suites, "BACKEND_RESULTS", None)
    if results:
        terminalreporter.section("the suite on the other backends")
        for backend, line in results.items():
            terminalreporter.write_line(f"{backend}: {line}")
