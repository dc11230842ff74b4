"""The in-step JAX step on `benchmarks/in_step.py`'s CNN: scanned vs unrolled, on a CPU.

For each ``k`` (fit batch ``B = m * k``) and each arm it compiles
``model.train_step`` as the in-step mode's train function does (XLA's
memory-optimized CPU scheduler, ``CPU_SPLIT_COMPILER_OPTIONS``;
``--default-scheduler``: XLA's default) and prints the compile time,
``memory_analysis().temp_size_in_bytes`` and the median time of one step.
Arms, by ``--limits`` (``accum_keras._backends.jax.CPU_UNROLL_LIMIT``): -1 is
plain Keras at the micro-batch, a limit below ``k`` the ``lax.scan``, one
at or above ``k`` the unrolled loop.

Usage::

    JAX_PLATFORMS=cpu python benchmarks/jax_unroll_cnn.py --k 8 --limits -1 0 64
"""

import argparse
import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, "benchmarks")
import in_step
import jax
import keras
import numpy as np

import accum_keras
from accum_keras._backends import jax as jb

p = argparse.ArgumentParser()
p.add_argument("--k", type=int, nargs="+", default=[8])
p.add_argument("-m", type=int, default=8)
p.add_argument("--image-size", type=int, default=64)
p.add_argument("--channels", type=int, default=16)
p.add_argument("--limits", type=int, nargs="+", default=[0, 64])
p.add_argument("--calls", type=int, default=3)
p.add_argument("--default-scheduler", action="store_true")
a = p.parse_args()
OPTS = None if a.default_scheduler else jb.CPU_SPLIT_COMPILER_OPTIONS


def state_of(model):
    return model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )


for k in a.k:
    B = a.m * k
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, a.image_size, a.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(B,)).astype("int32")
    for limit in a.limits:
        jb.CPU_UNROLL_LIMIT = limit
        keras.utils.set_random_seed(0)
        inputs, outputs = in_step.build_cnn(a.image_size, a.channels)
        if limit < 0:
            model = keras.Model(inputs, outputs)
            data = (x[: a.m], y[: a.m])
            name = "plain m"
        else:
            model = accum_keras.Model(inputs, outputs, micro_batch_size=a.m)
            data = (x, y)
            name = "scan" if limit < k else "unrolled"
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.train_on_batch(x[: a.m], y[: a.m])
        state = state_of(model)
        t0 = time.perf_counter()
        compiled = jax.jit(model.train_step, compiler_options=OPTS).lower(state, data).compile()
        ct = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        times = []
        for _ in range(a.calls):
            t1 = time.perf_counter()
            jax.block_until_ready(compiled(state, data))
            times.append(time.perf_counter() - t1)
        print(
            f"k={k} B={B} {name}: compile {ct:.1f} s, temp {temp} B ({temp / 2**20:.2f} MiB), step {statistics.median(times):.3f} s",
            flush=True,
        )
