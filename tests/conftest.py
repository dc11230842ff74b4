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
import time

import background
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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # The tests that read background jobs (started when collection ends, see
    # tests/background.py) come last, in the order their module gives
    # (``reading_order``): this process takes the jobs the background thread
    # has not reached from the back of its queue while the thread works from
    # the front, and waits for the other backends' suites at the very end.
    def order(item):
        module = getattr(item, "module", None)
        if not hasattr(module, "background_jobs"):
            return 0
        reading_order = getattr(module, "reading_order", None)
        return 1 if reading_order is None else reading_order(item)

    items.sort(key=order)
    suites = sys.modules.get("test_backend_suites")
    if suites is not None:
        suites.offload(config, items)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    background.start_for(
        session.items, reporter, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )


def pytest_runtest_logstart(nodeid):
    if background.HEARTBEAT is not None:
        background.HEARTBEAT.test_started(nodeid)


def pytest_runtest_logfinish():
    if background.HEARTBEAT is not None:
        background.HEARTBEAT.test_finished()


def pytest_sessionfinish(session):
    background.stop()


@pytest.fixture
def progress(request):
    """``progress(text)`` shows that a long test is alive: a line on the terminal, past capture.

    At most one line every ``background.PROGRESS_PERIOD`` seconds is written;
    calls in between are dropped.
    """
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    started = last = time.monotonic()

    def write(text: str) -> None:
        nonlocal last
        now = time.monotonic()
        if reporter is None or now - last < background.PROGRESS_PERIOD:
            return
        last = now
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[{request.node.name}: {text}, {now - started:.0f} s]")

    return write


def pytest_terminal_summary(terminalreporter):
    """Shows what each other backend's suite (run in a subprocess) counted, and its slowest tests."""
    suites = sys.modules.get("test_backend_suites")
    results = getattr(suites, "BACKEND_RESULTS", None)
    if results:
        terminalreporter.section("the suite on the other backends")
        for backend, line in results.items():
            terminalreporter.write_line(f"{backend}: {line}")
            for duration in suites.BACKEND_DURATIONS.get(backend, []):
                terminalreporter.write_line(f"  {duration}")
