"""Plain JAX, no Keras: the gradient of a small CNN summed over micro-batches in a ``lax.scan``.

Why it exists: on a CPU, ``benchmarks/in_step.py time`` measured the JAX in-step
mode (a ``lax.scan`` over micro-batches) at several times the streaming mode.
This script asks whether XLA itself is slower in that situation, with no
accum_keras and no Keras involved. It compiles and times four functions on the
same weights and batch (64 images, 32x32, four 3x3 convolutions):

- ``big``: the gradient on the whole batch;
- ``scanned``: the sum of the gradients of 8 micro-batches of 8 in a ``lax.scan``;
- ``unrolled``: the same sum in a Python loop, unrolled into one program;
- ``one``: the gradient of one micro-batch of 8 (times 8 is the work of the other three).

It prints the median of 5 calls of each, in seconds.

Usage::

    JAX_PLATFORMS=cpu python benchmarks/jax_scan_conv.py
"""

from __future__ import annotations

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
def one(weights, images):
    return gradient(weights, images)


def median_seconds(function, *args, calls: int = 5) -> float:
    jax.block_until_ready(function(*args))  # compiles
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    key = jax.random.PRNGKey(0)
    channels = [(3, 8), (8, 8), (8, 16), (16, 16)]
    weights = [jax.random.normal(key, (3, 3, i, o)) * 0.1 for i, o in channels]
    images = jax.random.normal(key, (64, 32, 32, 3))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for function in (big, scanned, unrolled):
        print(f"{function.__name__}: {median_seconds(function, weights, images):.4f} s")
    print(f"one: {median_seconds(one, weights, images[:8]):.4f} s (x {MICRO_BATCHES})")


if __name__ == "__main__":
    main()
