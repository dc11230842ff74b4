"""Plain JAX, no Keras: the gradient of a small CNN summed over micro-batches in a ``lax.scan``.

Why it exists: on a CPU, ``benchmarks/in_step.py time`` measured the JAX in-step
mode (a ``lax.scan`` over micro-batches) at several times the streaming mode.
This script asks whether XLA itself is slower in that situation, with no
accum_keras and no Keras involved. It compiles and times these functions on the
same weights and batch (64 images, 32x32, four 3x3 convolutions):

- ``big``: the gradient on the whole batch;
- ``scanned``: the sum of the gradients of 8 micro-batches of 8 in a ``lax.scan``;
- ``scanned_unroll4``: the same scan with ``unroll=4`` (still a loop, of 2 trips);
- ``scanned_unroll_full``: the same scan with ``unroll=True`` (no loop left);
- ``unrolled``: the same sum in a Python loop, unrolled into one program;
- ``chained``: unrolled, each micro-batch read at an index that XLA cannot
  compute before the previous micro-batches' gradient sum, so their
  activations cannot be live at once;
- ``one``: the gradient of one micro-batch of 8 (times 8 is the work of the others).

It prints the median of 5 calls of each, in seconds, the compile time and
the compiled program's temporary buffers (``memory_analysis()``), in bytes.
``--memory-scheduler`` compiles with XLA's memory-optimized CPU scheduler
(``xla_cpu_scheduler_type``) instead of the default.

Why a scan is slow on a CPU: XLA's CPU compiler rewrites a convolution whose
dimension order its Eigen kernels do not take (the gradient convolutions)
only in the program's top-level computation (its ``ConvCanonicalization``
pass visits the entry computation alone); inside the scan's loop body they
are emitted as generic loops. Compare the ``convolution(`` lines of
``scanned.lower(...).compile().as_text()``: in the loop body they keep
``dim_labels`` such as ``f01b_i01o->01bf``; unrolled, every one is
``b01f_01io->b01f``.

Usage::

    JAX_PLATFORMS=cpu python benchmarks/jax_scan_conv.py [--memory-scheduler]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

MICRO_BATCHES = 8


def loss(weights, images):
    hidden = images
    for kernel in weights:
        hidden = jax.lax.conv_general_dilated(
            hidden, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        hidden = jax.nn.relu(hidden)
    return jnp.mean(hidden**2)


gradient = jax.grad(loss)


def split(images):
    return images.reshape(MICRO_BATCHES, -1, *images.shape[1:])


@jax.jit
def big(weights, images):
    return gradient(weights, images)


@jax.jit
def scanned(weights, images):
    def body(total, micro):
        return [t + g for t, g in zip(total, gradient(weights, micro))], None

    start = [jnp.zeros_like(w) for w in weights]
    return jax.lax.scan(body, start, split(images))[0]


@jax.jit
def unrolled(weights, images):
    total = [jnp.zeros_like(w) for w in weights]
    for micro in split(images):
        total = [t + g for t, g in zip(total, gradient(weights, micro))]
    return total


@jax.jit
def scanned_unroll4(weights, images):
    def body(total, micro):
        return [t + g for t, g in zip(total, gradient(weights, micro))], None

    start = [jnp.zeros_like(w) for w in weights]
    return jax.lax.scan(body, start, split(images), unroll=4)[0]


@jax.jit
def scanned_unroll_full(weights, images):
    def body(total, micro):
        return [t + g for t, g in zip(total, gradient(weights, micro))], None

    start = [jnp.zeros_like(w) for w in weights]
    return jax.lax.scan(body, start, split(images), unroll=True)[0]


def after(total):
    """An int32 zero computed from ``total`` (XLA cannot fold it; non-finite sums give 0)."""
    first = sum(jnp.ravel(t)[0] for t in total)
    return jnp.where(jnp.isfinite(first), first * 0.0, 0.0).astype(jnp.int32)


@jax.jit
def chained(weights, images):
    # XLA's CPU compiler drops `lax.optimization_barrier`, so the order is
    # forced by data: micro-batch i is read at index i + after(total).
    total = [jnp.zeros_like(w) for w in weights]
    stacked = split(images)
    for index in range(MICRO_BATCHES):
        micro = jax.lax.dynamic_index_in_dim(stacked, index + after(total), keepdims=False)
        total = [t + g for t, g in zip(total, gradient(weights, micro))]
    return total


@jax.jit
def one(weights, images):
    return gradient(weights, images)


def median_seconds(function, *args, calls: int = 5) -> float:
    jax.block_until_ready(function(*args))  # compiles, or warms up a compiled one
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(function, options, *args) -> str:
    start = time.perf_counter()
    compiled = function.lower(*args).compile(compiler_options=options)
    compile_seconds = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    return (
        f"{function.__name__}: {median_seconds(compiled, *args):.4f} s, "
        f"compile {compile_seconds:.2f} s, temp {temp} B"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--memory-scheduler",
        action="store_true",
        help="compile with xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    )
    args = parser.parse_args()
    options = (
        {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
        if args.memory_scheduler
        else None
    )
    key = jax.random.PRNGKey(0)
    channels = [(3, 8), (8, 8), (8, 16), (16, 16)]
    weights = [jax.random.normal(key, (3, 3, i, o)) * 0.1 for i, o in channels]
    images = jax.random.normal(key, (64, 32, 32, 3))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    functions = (big, scanned, scanned_unroll4, scanned_unroll_full, unrolled, chained)
    for function in functions:
        print(measure(function, options, weights, images), flush=True)
    print(f"{measure(one, options, weights, images[:8])} (x {MICRO_BATCHES})")


if __name__ == "__main__":
    main()
