"""XLA's own cost model of each arm's compiled JAX step: plain, built-in, accum_keras.

Timing a compute-bound model on a shared CPU leaves intervals of a few
percent; this asks the compiler instead. Each arm's train step is compiled
with `jax.jit` on the same model, state and micro-batch (as Keras' JAX
trainer compiles it, the state donated), and its `cost_analysis()` is
printed: floating-point operations and bytes accessed, which do not depend
on the machine's load. accum_keras has two programs: the one that only
accumulates (every micro-batch that cannot close a window) and the one that
may close it (the update under `lax.cond`).

Usage::

    python benchmarks/jax_cost.py                 # the overhead benchmark's CNN
    python benchmarks/jax_cost.py --models cnn,mobilenet
"""

from __future__ import annotations

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
import overhead

from accum_keras._backends import jax as accum_jax

STATE = dict(
    trainable_variables=True,
    non_trainable_variables=True,
    optimizer_variables=True,
    metrics_variables=True,
)


def step_programs(arm: str, model) -> dict:
    """The compiled steps of one arm, by name."""
    if arm != "accum_keras":
        return {arm: model.train_step}
    return {
        "accum_keras, accumulate only": lambda state, data: accum_jax.train_step(
            model, state, data, may_apply=False
        ),
        "accum_keras, may close": lambda state, data: accum_jax.train_step(
            model, state, data, may_apply=True
        ),
    }


def costs(build, batch_size: int, k: int) -> list[tuple[str, float, float]]:
    _, _, input_shape, classes = build()
    rng = np.random.default_rng(0)
    samples = 2 * k * batch_size
    x = rng.normal(size=(samples, *input_shape)).astype("float32")
    y = rng.integers(0, classes, size=(samples,)).astype("int32")
    rows = []
    for arm in overhead.ARMS:
        model = overhead.build_arm(arm, build, k, "adam", "auto", 0)
        # Builds the optimizer's and the window's state.
        model.fit(x, y, batch_size=batch_size, verbose=0)
        state = model._get_jax_state(**STATE)
        for program, step in step_programs(arm, model).items():
            compiled = jax.jit(step, donate_argnums=0).lower(
                state, (x[:batch_size], y[:batch_size])
            )
            analysis = compiled.compile().cost_analysis()
            if isinstance(analysis, (list, tuple)):
                analysis = analysis[0]
            rows.append((program, analysis.get("flops", 0.0), analysis.get("bytes accessed", 0.0)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn", help="among cnn, mlp, mobilenet, tiny")
    parser.add_argument("--batch-size", "-b", type=int, default=16)
    parser.add_argument("-k", type=int, default=4)
    args = parser.parse_args(argv)
    builders = overhead.model_builders()
    print(f"jax {jax.__version__}, micro-batch {args.batch_size}, k = {args.k}, Adam\n")
    print("| model | program | GFLOP | MB accessed | vs plain (FLOP / bytes) |")
    print("|---|---|---:|---:|---:|")
    for key in args.models.split(","):
        label, build = builders[key]
        rows = costs(build, args.batch_size, args.k)
        _, plain_flops, plain_bytes = rows[0]
        for program, flops, accessed in rows:
            print(
                f"| {label} | {program} | {flops / 1e9:.3f} | {accessed / 1e6:.1f} "
                f"| {flops / plain_flops:.3f} / {accessed / plain_bytes:.3f} |"
            )


if __name__ == "__main__":
    main()
