"""What a user meets first: a test run that shows its progress, quiet examples,
no alarming TensorFlow messages, and warnings where results deviate."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

import keras
import numpy as np
import pytest
from watched import Hung, run_watched

import accum_keras
from examples import quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# --- quiet examples (examples/quiet.py) ---------------------------------------

_STARTUP_NOISE = re.compile(
    r"cuInit|cuda|absl|oneDNN|cpu_feature_guard|TensorFlow binary|^[IWE]\d{4} ", re.M
)


@pytest.mark.parametrize(
    ("values", "wanted"),
    [
        ({}, False),
        ({"MASK_RCNN_TF_LOGS": "0"}, False),
        ({"MASK_RCNN_TF_LOGS": "false"}, False),
        ({"MASK_RCNN_TF_LOGS": ""}, False),
        ({"MASK_RCNN_TF_LOGS": "1"}, True),
        ({"MASK_RCNN_TF_LOGS": "True"}, True),
        ({"EXAMPLES_TF_LOGS": "1", "MASK_RCNN_TF_LOGS": "0"}, True),
    ],
)
def test_the_tf_logs_flag_reads_0_false_and_empty_as_off(values, wanted):
    assert quiet.tf_logs_wanted(values) is wanted


def test_the_tf_logs_flag_refuses_other_values_naming_the_variable():
    with pytest.raises(ValueError, match="MASK_RCNN_TF_LOGS='maybe': use 1 or true"):
        quiet.tf_logs_wanted({"MASK_RCNN_TF_LOGS": "maybe"})


def test_an_example_prints_no_tensorflow_start_up_lines():
    # What every example does first; MASK_RCNN_TF_LOGS=0 must keep it quiet.
    script = "from examples import quiet\nquiet.import_tensorflow()\nimport keras\nprint('ok')\n"
    env = dict(os.environ, MASK_RCNN_TF_LOGS="0", KERAS_BACKEND="tensorflow")
    env.pop("EXAMPLES_TF_LOGS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    completed = run_watched([sys.executable, "-c", script], env=env, cwd=ROOT, idle_limit=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "ok"
    assert not _STARTUP_NOISE.search(completed.stderr), completed.stderr


# --- no "retracing" warning from TensorFlow across models ----------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's tf.function")
def test_training_several_models_in_one_process_does_not_warn_of_retracing():
    # Five models, two fits each; every epoch ends with a short window, which
    # the epoch-end apply function applies. TensorFlow warns when 5 of the
    # last 10 calls of the "same" function traced.
    x = np.arange(9, dtype="float32").reshape(3, 3) / 10
    y = x[:, :1]
    records = _Records()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(records)
    try:
        for _ in range(5):
            inputs = keras.Input((3,))
            model = accum_keras.Model(inputs, keras.layers.Dense(1)(inputs), accumulation_steps=4)
            model.compile(keras.optimizers.SGD(0.1), "mse")
            for _ in range(2):
                model.fit(x, y, batch_size=1, epochs=1, verbose=0)
                assert int(model.optimizer.iterations.numpy()) in (1, 2)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "retracing" in m], records.messages
