"""The peak memory of one train step, measured by each backend's own deterministic count.

Used by `tests/test_micro_batch_memory.py`. The network's activations dominate
its memory: a ``Dense(1024)`` on 16 features, four element-wise activations of
its 1024 units and a ``Dense(1)`` (17 k weights, 4 MiB of activations per 1024
rows). Three arms train one step each with ``train_on_batch``:

- ``plain_batch``: plain Keras on the fit batch of ``BATCH`` rows;
- ``in_step``: ``accum_keras.Model(micro_batch_size=MICRO)`` on the same batch;
- ``plain_micro``: plain Keras on ``MICRO`` rows (one micro-batch).

What each backend counts (bytes allocated during the step, above what was
allocated before it; no resident-set noise):

- TensorFlow: the CPU allocator's peak, ``tf.config.experimental.get_memory_info``,
  which counts only when TensorFlow starts with ``TF_CPU_ALLOCATOR_USE_BFC=true``
  (so the measure runs in its own process: ``python tests/in_step_memory.py``);
- JAX: ``temp_size_in_bytes`` of the train step's compiled ``memory_analysis()``
  (XLA's buffer assignment: everything but the arguments and results);
- PyTorch: the largest ``total_allocated`` of the CPU allocator during the
  step, from the allocation events of ``torch.profiler`` with
  ``profile_memory=True``.
"""

from __future__ import annotations

import json
import os
import sys

FEATURES, UNITS, BATCH, MICRO = 16, 1024, 1024, 128
# Set before TensorFlow starts: its CPU allocator then keeps statistics.
TF_ALLOCATOR_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def build(micro_batch_size: int | None, jit_compile: bool | str = "auto"):
    """The network, compiled: in the in-step mode when ``micro_batch_size`` is given."""
    import keras

    import accum_keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(UNITS, activation="tanh")(inputs)
    for activation in ("sigmoid", "tanh", "sigmoid", "tanh"):
        x = keras.layers.Activation(activation)(x)
    outputs = keras.layers.Dense(1)(x)
    if micro_batch_size is None:
        model = keras.Model(inputs, outputs)
    else:
        model = accum_keras.Model(inputs, outputs, micro_batch_size=micro_batch_size)
    model.compile(keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit_compile)
    return model


def _data(rows: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, FEATURES)).astype("float32")
    y = rng.normal(size=(rows, 1)).astype("float32")
    return x, y


def _tensorflow_peak(model, data) -> int:
    import tensorflow as tf

    if os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true":
        raise RuntimeError("TensorFlow counts CPU memory only under TF_CPU_ALLOCATOR_USE_BFC=true")
    model.train_on_batch(*data)  # traces the step
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    model.train_on_batch(*data)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def _jax_backend():
    import importlib

    return importlib.import_module("accum_keras._backends.jax")


def _jax_peak(model, data) -> int:
    import jax

    # Builds the optimizer, metrics and accumulators (a small program).
    model.train_on_batch(*(leaf[:MICRO] for leaf in data))
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    # With the XLA options the in-step mode's train function compiles with.
    options_of = getattr(_jax_backend(), "_cpu_split_compiler_options", None)
    options = options_of() if options_of is not None and jax.default_backend() == "cpu" else None
    compiled = jax.jit(model.train_step, compiler_options=options).lower(state, data).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _torch_peak(model, data) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    model.train_on_batch(*(leaf[:MICRO] for leaf in data))  # builds the state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model.train_on_batch(*data)

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    # `total_allocated` counts from the profiler's start: what the step
    # allocated and still held at each allocation or free.
    events = profiler.profiler.kineto_results.experimental_event_tree()
    totals = [
        node.extra_fields.total_allocated
        for node in walk(events)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu"
    ]
    return max(totals, default=0)


def measure(
    in_step_micro_batch_size: int | None = MICRO, jit_compile: bool | str = "auto"
) -> dict[str, int]:
    """The three arms' peak bytes, and the fit batch's input and weight bytes.

    Args:
        in_step_micro_batch_size: the in-step arm's ``micro_batch_size``
            (`None` turns the mode off: the arm is then plain Keras at the
            fit batch, which the test must reject).
        jit_compile: ``compile()``'s argument, for every arm.

    Returns:
        ``{"plain_batch", "in_step", "plain_micro", "input", "weights"}``, in bytes.
    """
    import keras

    peak = {"tensorflow": _tensorflow_peak, "jax": _jax_peak, "torch": _torch_peak}[
        keras.backend.backend()
    ]
    batch = _data(BATCH)
    micro = tuple(leaf[:MICRO] for leaf in batch)
    in_step = build(in_step_micro_batch_size, jit_compile)
    return {
        "plain_micro": peak(build(None, jit_compile), micro),
        "in_step": peak(in_step, batch),
        "plain_batch": peak(build(None, jit_compile), batch),
        "input": sum(leaf.nbytes for leaf in batch),
        "weights": sum(int(w.size) * 4 for w in in_step.get_weights()),
    }


if __name__ == "__main__":
    for name, value in TF_ALLOCATOR_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # TensorFlow: without XLA (the default on a CPU) and with it (on a GPU).
    micro_batch_size = None if "--mode-off" in sys.argv[1:] else MICRO
    print(json.dumps({str(jit): measure(micro_batch_size, jit) for jit in (False, True)}))
