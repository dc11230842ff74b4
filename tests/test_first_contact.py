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


# What every example does first, then an accumulating fit (which runs the
# kernels that log later, such as oneDNN's "supports DT_INT32 only on
# platforms with AVX-512" on CPUs without AVX-512).
_EXAMPLE_SCRIPT = """
import os
from examples import quiet
quiet.import_tensorflow()
import keras, numpy as np, accum_keras
inputs = keras.Input((3,))
model = accum_keras.Model(inputs, keras.layers.Dense(1)(inputs), accumulation_steps=2)
model.compile("sgd", "mse", jit_compile=False)
x = np.ones((8, 3), "float32")
model.fit(x, x[:, :1], batch_size=2, epochs=1, verbose=0)
print(os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""


def test_an_example_prints_no_tensorflow_line_at_start_up_or_while_training():
    # MASK_RCNN_TF_LOGS=0 must keep it quiet.
    env = dict(os.environ, MASK_RCNN_TF_LOGS="0", KERAS_BACKEND="tensorflow")
    env.pop("EXAMPLES_TF_LOGS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    completed = run_watched(
        [sys.executable, "-c", _EXAMPLE_SCRIPT], env=env, cwd=ROOT, idle_limit=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # C++ lines logged after start-up (none on a CPU with AVX-512) are
    # silenced by the level: ERROR lines too.
    assert completed.stdout.strip() == "3"
    assert not _STARTUP_NOISE.search(completed.stderr), completed.stderr
    assert not re.search(r"AutoGraph|WARNING", completed.stderr), completed.stderr


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


# --- a fit() prints nothing that plain Keras does not print --------------------


class LoggedTwoLayers(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


class AccumLoggedTwoLayers(accum_keras.AccumulatingModel, LoggedTwoLayers):
    pass


class LoggedOwnStep(LoggedTwoLayers):
    train_step = train_step_applying_its_gradients


class AccumLoggedOwnStep(accum_keras.AccumulatingModel, LoggedOwnStep):
    pass


def _functional(accumulating, k):
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(inputs))
    if accumulating:
        return accum_keras.Model(inputs, outputs, accumulation_steps=k)
    return keras.Model(inputs, outputs)


def _sequential(accumulating, k):
    layers = [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    return (
        accum_keras.Sequential(layers, accumulation_steps=k)
        if accumulating
        else keras.Sequential(layers)
    )


def _accumulate_twin(accumulating, k):
    model = _functional(False, k)
    return accum_keras.accumulate(model, k) if accumulating else model


# model kind -> (builder(accumulating, k), compile() arguments); each runs at
# k = 1 and k = 2.
_LOG_KINDS = {
    "functional": (_functional, {}),
    "functional_xla": (_functional, {"jit_compile": True}),
    "functional_steps_per_execution_2": (_functional, {"steps_per_execution": 2}),
    "sequential": (_sequential, {}),
    "subclassed": (
        lambda acc, k: AccumLoggedTwoLayers(accumulation_steps=k) if acc else LoggedTwoLayers(),
        {},
    ),
    "accumulate_twin": (_accumulate_twin, {}),
    "user_train_step": (
        lambda acc, k: AccumLoggedOwnStep(accumulation_steps=k) if acc else LoggedOwnStep(),
        {},
    ),
}


def _printed_lines(fit, capfd) -> list[str]:
    """What ``fit()`` logs through Python's logging (TensorFlow's, absl's) or writes.

    Addresses and numbers are masked, so that a line printed by both runs
    compares equal.
    """
    import tensorflow as tf

    records = _Records()
    loggers = {tf.get_logger(), logging.getLogger()}
    for logger in loggers:
        logger.addHandler(records)
    capfd.readouterr()
    try:
        fit()
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    out, err = capfd.readouterr()
    lines = "\n".join([*records.messages, out, err]).splitlines()
    return [re.sub(r"0x[0-9a-f]+|\d+", "N", line).strip() for line in lines if line.strip()]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's AutoGraph logs")
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", sorted(_LOG_KINDS))
def test_an_accumulating_fit_prints_no_line_plain_keras_does_not(kind, k, capfd):
    build, compile_arguments = _LOG_KINDS[kind]
    # 16 micro-batches: enough calls that the two programs of an accumulating
    # train function (two first traces) stay under TensorFlow's "retracing"
    # threshold (5 traces in the last 10 calls of Keras' shared step code).
    x = np.linspace(-1, 1, 96, dtype="float32").reshape(32, 3)
    y = x[:, :1]
    printed = {}
    # Plain Keras first: a line TensorFlow prints once per process (XLA's
    # "Compiled cluster") is printed by the plain run, not blamed on ours.
    for accumulating in (False, True):
        keras.utils.set_random_seed(0)
        model = build(accumulating, k)
        model(x[:1])  # built, as the user-step tests build theirs
        model.compile(keras.optimizers.SGD(0.1), "mse", **compile_arguments)
        printed[accumulating] = _printed_lines(
            lambda model=model: model.fit(x, y, batch_size=2, epochs=1, verbose=0), capfd
        )
    ours = [line for line in printed[True] if line not in printed[False]]
    assert not ours, "\n".join(ours)


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


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras' TF epoch loop")
@pytest.mark.parametrize("user_step", [False, True], ids=["built_in_step", "user_step"])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_unknown_cardinality_counts_each_sample_once(user_step, accumulation_steps):
    # Keras calls the step once more per epoch than there are batches, and
    # that call reads no data: it must count nothing (a static batch size
    # gives the counters a constant to count).
    keras.utils.set_random_seed(0)
    if user_step:
        model = OwnStep(accumulation_steps=accumulation_steps)
        model(np.zeros((1, 3), "float32"))
        model.compile(keras.optimizers.SGD(1e-2))
    else:
        inputs = keras.Input((3,))
        model = accum_keras.Model(
            inputs, keras.layers.Dense(1)(inputs), accumulation_steps=accumulation_steps
        )
        model.compile(keras.optimizers.SGD(1e-2), "mse")
    callback = accum_keras.AccumulationCallback(lr_scaling=None)
    data = _cardinality_data(4, known=False, static_batch=True)
    model.fit(data, epochs=2, verbose=0, callbacks=[callback])
    assert model._accumulation_state.total_samples_seen() == 2 * 32
    if accumulation_steps > 1:
        # At k = 1 the step is Keras' own, whose extra call counts an update
        # in `optimizer.iterations` (see above), which the epoch's value divides by.
        assert model.history.history["effective_batch_size"] == [4.0 * accumulation_steps] * 2
