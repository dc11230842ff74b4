"""What a user meets first: a test run that shows its progress, quiet examples,
no alarming TensorFlow messages, and warnings where results deviate."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings

import keras
import numpy as np
import pytest
from helpers import (
    RTOL,
    assert_same_training,
    max_relative_difference,
    train_step_applying_its_gradients,
)
from watched import Hung, run_watched

import accum_keras
from examples import quiet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that prints one line every `period` seconds, `count` times.
_TICKS = "import sys, time\nfor i in range({count}):\n    print(i, flush=True)\n    time.sleep({period})\n"


def test_a_silent_subprocess_is_killed_after_the_idle_limit_with_a_clear_message():
    started = time.monotonic()
    with pytest.raises(Hung, match=r"(?s)no output for 2 s from .*killed as hung") as caught:
        run_watched([sys.executable, "-c", _TICKS.format(count=2, period=60)], idle_limit=2)
    # Killed soon after the limit, not when the child would have finished.
    assert time.monotonic() - started < 10
    # The message shows what it printed last.
    assert caught.value.args[0].rstrip().endswith("0")


def test_a_subprocess_that_keeps_printing_runs_longer_than_the_idle_limit():
    started = time.monotonic()
    seen = []
    completed = run_watched(
        [sys.executable, "-c", _TICKS.format(count=20, period=0.25)],
        idle_limit=2,
        echo=lambda text: seen.append((time.monotonic(), text)),
    )
    finished = time.monotonic()
    assert finished - started > 4.5  # more than twice the idle limit
    assert completed.returncode == 0
    assert completed.stdout.split() == [str(i) for i in range(20)]
    # Relayed as it came (streamed), not all at the end.
    assert seen and seen[0][0] < finished - 3
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
    # Only accum_keras' own functions count here: Keras' `multi_step_on_iterator`
    # (every model's train and test function shares its code) can warn too when
    # a process builds many models that each run a few steps, plain ones as well,
    # depending on what ran before in the process.
    ours = re.compile(r"accum_keras|apply_?pending", re.IGNORECASE)
    retraced = [m for m in records.messages if "retracing" in m and ours.search(m)]
    assert not retraced, retraced


# --- the sparse-update notice (accum_keras/_sparse.py) -------------------------


def _t5_like(optimizer):
    # T5's relative position bias is an Embedding looked up by bucket ids: a
    # user has no reason to think "embedding" when comparing with plain Keras.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    bias = keras.layers.Embedding(8, 4, name="relative_attention_bias")(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(bias))
    model = accum_keras.Model(inputs, outputs, accumulation_steps=2)
    model.compile(optimizer, "mse")
    return model


def _fits_and_notices(model, fits=2):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=(16, 6)).astype("int32")
    y = rng.normal(size=(16, 1)).astype("float32")
    notices = []
    for _ in range(fits):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        notices.append(
            [
                str(w.message)
                for w in caught
                if issubclass(w.category, accum_keras.SparseUpdateWarning)
            ]
        )
    return notices


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="sparse gradients are TF's")
def test_adamw_on_sparse_gradients_warns_once_per_fit_naming_the_variable():
    notices = _fits_and_notices(_t5_like(keras.optimizers.AdamW(1e-2)))
    assert [len(n) for n in notices] == [1, 1]
    for (message,) in notices:
        assert message.startswith("accum_keras: relative_attention_bias/embeddings get sparse")
        assert "AdamW" in message and "docs/compatibility.md" in message


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="sparse gradients are TF's")
def test_sgd_with_momentum_on_sparse_gradients_does_not_warn():
    # Linear in the gradient: the sparse big batch and the window's sum agree.
    notices = _fits_and_notices(_t5_like(keras.optimizers.SGD(1e-2, momentum=0.9)), fits=1)
    assert notices == [[]]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="sparse gradients are TF's")
def test_the_sparse_update_notice_can_be_silenced_by_its_category():
    model = _t5_like(keras.optimizers.Adam(1e-2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=accum_keras.SparseUpdateWarning)
        model.fit(np.zeros((8, 6), "int32"), np.zeros((8, 1), "float32"), batch_size=4, verbose=0)
    assert not [w for w in caught if "sparse" in str(w.message)]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="sparse gradients are TF's")
@pytest.mark.parametrize(
    ("name", "differs"),
    [
        ("SGD", False),
        ("Lion", False),
        ("Adam", True),
        ("AdamW", True),
        ("RMSprop", True),
        ("Adagrad", True),
        ("Adamax", True),
        ("Nadam", True),
        ("Adadelta", True),
        ("Ftrl", True),
    ],
)
def test_which_keras_optimizers_update_sparse_gradients_differently(name, differs):
    # The measurement behind the notice, against Keras' own two paths: plain
    # Keras' update from the per-occurrence rows vs from their sum.
    from accum_keras import _sparse

    assert _sparse.sparse_update_differs(getattr(keras.optimizers, name)()) is differs


# --- tf.data of unknown cardinality (docs/guarantees.md) ----------------------


def _cardinality_data(batch_size, known, static_batch=False):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]], "float32")).astype("float32")
    # 32 samples: `drop_remainder` drops nothing, it only makes the batch size static.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        batch_size, drop_remainder=static_batch
    )
    # `.filter` (like `from_generator`) hides how many batches there are.
    return dataset if known else dataset.filter(lambda *_: True)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras' TF epoch loop")
# Keras' notice when a data set of unknown length ends (the plain model's too).
@pytest.mark.filterwarnings("ignore:Your input ran out of data:UserWarning")
def test_unknown_cardinality_trains_like_the_known_cardinality_big_batch():
    import tensorflow as tf

    assert _cardinality_data(4, known=False).cardinality() == tf.data.UNKNOWN_CARDINALITY
    twins = {}
    for name, accumulation_steps in (("accum", 2), ("known", None), ("unknown", None)):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        outputs = keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(inputs))
        if accumulation_steps:
            model = accum_keras.Model(inputs, outputs, accumulation_steps=accumulation_steps)
        else:
            model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        twins[name] = model
    twins["known"].set_weights(twins["accum"].get_weights())
    twins["unknown"].set_weights(twins["accum"].get_weights())
    # 2 epochs of 32 samples: micro-batches of 4 in windows of 2 = batches of 8.
    # A static batch size is the harder case: no shape to wait for.
    twins["accum"].fit(
        _cardinality_data(4, known=False, static_batch=True), epochs=2, shuffle=False, verbose=0
    )
    twins["known"].fit(_cardinality_data(8, known=True), epochs=2, shuffle=False, verbose=0)
    twins["unknown"].fit(_cardinality_data(8, known=False), epochs=2, shuffle=False, verbose=0)
    assert_same_training(twins["accum"], twins["known"])
    assert int(twins["accum"].optimizer.iterations.numpy()) == 8
    # Plain Keras 3.15 counts one more update per epoch when it cannot know
    # the epoch's length (which moves Adam's bias correction): the difference
    # that docs/guarantees.md describes. If Keras changes, update the docs.
    assert int(twins["unknown"].optimizer.iterations.numpy()) == 10
    unknown, known = twins["unknown"].get_weights(), twins["known"].get_weights()
    assert max_relative_difference(unknown, known) > 100 * RTOL


class OwnStep(accum_keras.AccumulatingModel, keras.Model):
    """A model that writes its own ``train_step`` (mean-squared error by hand)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        return train_step_applying_its_gradients(self, data)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras' TF epoch loop")
# Keras' notice when a data set of unknown length ends (the plain model's too).
@pytest.mark.filterwarnings("ignore:Your input ran out of data:UserWarning")
def test_unknown_cardinality_with_a_user_written_train_step():
    keras.utils.set_random_seed(0)
    model = OwnStep(accumulation_steps=2)
    model(np.zeros((1, 3), "float32"))
    model.compile(keras.optimizers.Adam(1e-2))
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    plain = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    plain.set_weights(model.get_weights())
    plain.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(
        _cardinality_data(4, known=False, static_batch=True), epochs=2, shuffle=False, verbose=0
    )
    plain.fit(_cardinality_data(8, known=True), epochs=2, shuffle=False, verbose=0)
    assert_same_training(model, plain)
    assert int(model.optimizer.iterations.numpy()) == 8
