"""Peak training memory: accum_keras at micro-batch b vs plain Keras at b and at k*b.

What is measured
----------------
Three arms train the same CNN (moderate image size, so activations dominate)
with the same optimizer, each in a fresh Python process so that their peaks
do not mix:

- ``plain b``: a plain ``keras.Model``, ``fit(batch_size=b)``;
- ``plain k*b``: a plain ``keras.Model``, ``fit(batch_size=k*b)``, the big batch
  whose update accumulation reproduces;
- ``accum_keras b x k``: ``accum_keras.Model(accumulation_steps=k)``,
  ``fit(batch_size=b)``.

Every child imports TensorFlow, builds and compiles the model, creates its
(in-memory numpy) data and then reads its baseline. On CPU the baseline is the
resident set size (``VmRSS`` in ``/proc/self/status``); the child then resets
the peak (writing ``5`` to ``/proc/self/clear_refs``), trains for ``windows``
optimizer updates with ``fit`` and reads the peak resident set size
(``VmHWM``). Where the reset is not allowed it falls back to
``resource.getrusage(...).ru_maxrss``, which also holds the peak of the
import, and says so. On a GPU the child resets TensorFlow's memory statistics
instead and reports ``tf.config.experimental.get_memory_info('GPU:0')['peak']``
minus the memory in use at the baseline (``current``).

The reported number is peak - baseline in MiB: everything ``fit`` allocates,
i.e. activations kept for the backward pass, gradients, optimizer slots
(built on the first step), accum_keras' accumulators, tf.data buffers and
the traced graph. Each arm runs ``repeats`` times, interleaved; the table
shows the median and the range.

How to read it
--------------
The target is "accum_keras at b costs plain b plus one fp32 copy of the
trainable weights (the accumulators), plus noise", far below plain k*b. The
size of one fp32 copy of the weights and the accumulators actually created
are printed with the table; the noise level is the range across repeats.
On CPU the numbers also contain allocator effects (glibc arenas, TensorFlow's
CPU allocator), so differences of a few MiB are noise.

Usage::

    python benchmarks/memory.py          # quick (about 2.5 minutes on 2 busy CPU cores)
    python benchmarks/memory.py --full   # bigger images and batches, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

from _revision import library_revision
from _rss import read_status_kib, reset_peak_rss

if __name__ == "__main__" and "--child" not in sys.argv:
    # The command line first, before TensorFlow's start-up logs.
    print("$ " + shlex.join(sys.orig_argv), flush=True)

MIB = 1024 * 1024
ARMS = ("plain b", "plain k*b", "accum_keras b x k")
BUILTIN = "built-in b x k"
ONE_STEP = "one-step window k*b"
RESULT_TAG = "MEMORY_RESULT "


# -- child ------------------------------------------------------------------


def build_cnn(image_size: int, channels: int, head: int, classes: int = 10):
    import keras

    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for stage in range(3):
        for _ in range(2):
            x = keras.layers.Conv2D(channels * 2**stage, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(head, activation="relu")(x)
    outputs = keras.layers.Dense(classes)(x)
    return inputs, outputs


def one_step_window_model(inputs, outputs, accumulation_steps: int):
    """A prototype, not part of accum_keras: a whole window in one compiled step.

    ``fit(batch_size=k*b)`` hands the step the big batch; a ``tf.while_loop``
    runs its ``k`` micro-batches one after the other (``parallel_iterations=1``),
    each one's gradient summed in the loop carry, and the optimizer applies
    the mean once. Only the memory question is answered here: do the loop's
    activations stay at one micro-batch's? (Equal micro-batches and an
    unweighted mean loss, so the mean of the micro-batch gradients is the
    big batch's.)
    """
    import keras
    import tensorflow as tf

    k = accumulation_steps

    class OneStepWindow(keras.Model):
        def train_step(self, data):
            x, y = data
            b = tf.shape(x)[0] // k
            variables = self.trainable_variables

            def body(i, sums, loss_sum):
                xs, ys = x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]
                with tf.GradientTape() as tape:
                    loss = self.compute_loss(x=xs, y=ys, y_pred=self(xs, training=True))
                gradients = tape.gradient(loss, variables)
                sums = [s + g / k for s, g in zip(sums, gradients)]
                return i + 1, sums, loss_sum + loss / k

            start = (tf.constant(0), [tf.zeros_like(v) for v in variables], tf.constant(0.0))
            _, sums, loss = tf.while_loop(lambda i, *_: i < k, body, start, parallel_iterations=1)
            self.optimizer.apply(sums, variables)
            return {"loss": loss}

    return OneStepWindow(inputs, outputs)


def child(args) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import accum_keras

    keras.utils.set_random_seed(args.seed)
    k, b = args.k, args.batch_size
    inputs, outputs = build_cnn(args.image_size, args.channels, args.head)
    optimizer_kwargs = {}
    if args.child == "accum_keras b x k":
        model = accum_keras.Model(inputs, outputs, accumulation_steps=k)
        batch_size = b
    elif args.child == ONE_STEP:
        model = one_step_window_model(inputs, outputs, k)
        batch_size = k * b
    elif args.child == BUILTIN:
        model = keras.Model(inputs, outputs)
        batch_size = b
        optimizer_kwargs = {"gradient_accumulation_steps": k}
    else:
        model = keras.Model(inputs, outputs)
        batch_size = k * b if args.child == "plain k*b" else b
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4, **optimizer_kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    samples = args.windows * k * b
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(samples, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(samples,)).astype("int32")
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)

    gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
        baseline = tf.config.experimental.get_memory_info("GPU:0")["current"]
        method = "GPU:0 get_memory_info peak - current"
    else:
        baseline = read_status_kib("VmRSS") * 1024
        if reset_peak_rss():
            method = "VmHWM (reset via clear_refs) - VmRSS"
        else:
            method = "ru_maxrss - VmRSS (peak not reset: includes the import)"

    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start

    if gpu:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    elif method.startswith("VmHWM"):
        peak = read_status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    accumulator_bytes = 0
    if isinstance(model, accum_keras.AccumulatingModel):
        accumulator_bytes = sum(
            int(np.prod(g.shape)) * 4 for g in model._accumulation_state.gradients
        )
    result = {
        "arm": args.child,
        "device": "GPU:0" if gpu else "CPU",
        "method": method,
        "baseline": baseline,
        "peak": peak,
        "delta": peak - baseline,
        "weight_bytes": weight_bytes,
        "accumulator_bytes": accumulator_bytes,
        "updates": int(model.optimizer.iterations.numpy()),
        "fit_seconds": seconds,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- parent -----------------------------------------------------------------


def run_child(arm: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        arm,
        "--batch-size",
        str(args.batch_size),
        "-k",
        str(args.k),
        "--image-size",
        str(args.image_size),
        "--channels",
        str(args.channels),
        "--head",
        str(args.head),
        "--windows",
        str(args.windows),
        "--seed",
        str(args.seed),
    ]
    env = dict(os.environ)
    if not args.no_malloc_tuning:
        # Large blocks straight from mmap and back to the OS on free: the
        # resident set then follows live memory instead of glibc's caches.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"child {arm!r} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
    )


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def parent(args) -> None:
    start = time.perf_counter()
    print(f"accum_keras: {library_revision()}", flush=True)
    arms = (*ARMS, BUILTIN) if args.builtin else ARMS
    if args.one_step:
        arms = (*arms, ONE_STEP)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_ in range(args.repeats):
        shift = round_ % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            result = run_child(arm, args)
            results[arm].append(result)
            print(
                f"round {round_ + 1}, {arm}: peak - baseline {mib(result['delta'])} MiB "
                f"(baseline {mib(result['baseline'])} MiB, fit {result['fit_seconds']:.1f} s)",
                flush=True,
            )

    first = results[ARMS[0]][0]
    weight_bytes = first["weight_bytes"]
    medians = {arm: statistics.median(r["delta"] for r in rs) for arm, rs in results.items()}
    k, b = args.k, args.batch_size
    print(
        f"\nCNN {args.image_size}x{args.image_size}x3, channels {args.channels}/"
        f"{2 * args.channels}/{4 * args.channels}, dense head {args.head}, Adam; "
        f"{args.windows} optimizer updates per arm; device {first['device']}; "
        f"measure: {first['method']}; median (min..max) of {args.repeats} fresh processes\n"
    )
    print("| arm | batch per step | steps per update | peak - baseline MiB | vs plain b MiB |")
    print("|---|---:|---:|---:|---:|")
    batch = {"plain b": b, "plain k*b": k * b, "accum_keras b x k": b, BUILTIN: b, ONE_STEP: k * b}
    steps = {"plain b": 1, "plain k*b": 1, "accum_keras b x k": k, BUILTIN: k, ONE_STEP: 1}
    for arm in arms:
        deltas = [r["delta"] for r in results[arm]]
        spread = f" ({mib(min(deltas))}..{mib(max(deltas))})" if len(deltas) > 1 else ""
        versus = (medians[arm] - medians["plain b"]) / MIB
        print(
            f"| {arm} | {batch[arm]} | {steps[arm]} | {mib(medians[arm])}{spread} | {versus:+.1f} |"
        )
    accumulators = results["accum_keras b x k"][0]["accumulator_bytes"]
    extra = medians["accum_keras b x k"] - medians["plain b"]
    noise = max(
        max(r["delta"] for r in rs) - min(r["delta"] for r in rs) for rs in results.values()
    )
    print(
        f"\none fp32 copy of the trainable weights: {mib(weight_bytes)} MiB "
        f"(accum_keras' accumulators: {mib(accumulators)} MiB)"
    )
    print(
        f"accum_keras b x k - plain b = {mib(extra)} MiB; "
        f"plain k*b - plain b = {mib(medians['plain k*b'] - medians['plain b'])} MiB; "
        f"largest range across repeats = {mib(noise)} MiB"
    )
    print(
        "target (accum_keras b x k <= plain b + one weight copy + noise): "
        + ("met" if extra <= weight_bytes + noise else "NOT met")
    )
    updates = {arm: [r["updates"] for r in rs] for arm, rs in results.items()}
    print(f"optimizer updates per arm: {updates}")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="bigger images, 3 repeats")
    parser.add_argument("--batch-size", "-b", type=int, help="micro-batch size b")
    parser.add_argument("-k", type=int, default=4, help="accumulation steps k")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--channels", type=int, default=32, help="channels of the first stage")
    parser.add_argument("--head", type=int, default=256, help="width of the dense head")
    parser.add_argument("--windows", type=int, default=2, help="optimizer updates per arm")
    parser.add_argument("--repeats", type=int, help="fresh processes per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--builtin",
        action="store_true",
        help="add a fourth arm: Keras' built-in gradient_accumulation_steps=k at b "
        "(on by default with --full)",
    )
    parser.add_argument(
        "--one-step",
        action="store_true",
        help="add an arm: a prototype (not in accum_keras) that runs a whole window of k "
        "micro-batches in one compiled step (tf.while_loop) on fit(batch_size=k*b)",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc malloc's defaults in the children (noisier on CPU)",
    )
    parser.add_argument("--child", choices=(*ARMS, BUILTIN, ONE_STEP), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 16 if args.full else 8
    if args.image_size is None:
        args.image_size = 128 if args.full else 96
    if args.repeats is None:
        args.repeats = 3 if args.full else 2
    args.builtin = args.builtin or args.full
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
