"""Time per micro-batch: plain Keras vs Keras' built-in accumulation vs accum_keras.

What is measured
----------------
Three arms train the same model at the same micro-batch size ``b``, side by
side in one process:

- ``plain``: a plain ``keras.Model`` (one optimizer update per micro-batch);
- ``built-in``: a plain ``keras.Model`` whose optimizer has
  ``gradient_accumulation_steps=k``;
- ``accum_keras``: ``accum_keras.Model(..., accumulation_steps=k)``.

Every arm trains with ``model.fit`` on in-memory numpy arrays, one epoch of
``steps`` micro-batches per call (``steps`` is a multiple of ``k``, so windows
never straddle two calls). A first short ``fit`` of every arm traces (and, with
XLA, compiles) the step and is not timed. Then the arms take turns, one epoch
each, ``repeats`` rounds, in an order rotated every round. A callback
time-stamps the end of every micro-batch; the time of a window runs from the
end of the previous window to the end of its own, so it holds exactly ``k``
micro-batches and one optimizer update (the same ``k`` micro-batches hold ``k``
updates in the plain arm). The first window of every epoch, which also holds
``fit()``'s set-up, is left out. The ms columns are the median over all
timed windows of an arm, divided by ``k``: milliseconds per micro-batch.

Ratios are paired by round: each round divides one arm's median window by
the other arm's median window *of the same round*, so drift of the machine
(other jobs, other virtual machines on the host) cancels as long as it is
slower than a round. Rounds are therefore short (by default an epoch is two
windows, one of them timed) and many. A ratio is the median of its per-round
values, with an interval of order statistics around it, ``[lo, hi]``, that
holds the true median ratio with at least 90 % probability (the sign-test
interval: it assumes nothing about the noise but independent rounds). A goal
such as "accum/built-in <= 0.98" is shown when ``hi`` <= 0.98, refuted when
``lo`` > 0.98, and undecided otherwise: then time more ``--repeats``. A second
table gives the same ratios in process CPU time (all threads).

Threads: by default (``--threads 1``) the process and its subprocesses are
pinned to one core and TensorFlow and PyTorch compute on one thread, so a
ratio compares the work each arm does. On a small shared machine thread
pools make the arms compete with each other's and other jobs' threads: with
TensorFlow's defaults the per-epoch times of the CNN spread by 20-50 % on a
2-core machine, with one thread by 4-8 %. They also change the ratios in
ways that are not about the work: on JAX the CNN's accumulating step used
more threads less well than the built-in's (same CPU time, 1.12x the wall
time) on two cores. ``--threads 0`` keeps each library's default.

The floor
---------
An accumulating micro-batch cannot cost less than

    forward + backward + one add per parameter (into the accumulator)
        + 1/k of an optimizer update (+ 1/k of zeroing the accumulators),

whereas a plain micro-batch costs forward + backward + one full optimizer
update. The ``floor`` column estimates it from the plain arm's time and two
small measurements on copies of the model's variables, timed in the same
rotation as the arms: the time of one optimizer update (``opt``, a compiled
``optimizer.apply`` on fixed gradients) and the time of one add of a gradient
into float32 accumulators (``add``):

    floor = plain - opt + opt / k + add

(this floor assumes the add and the update are not overlapped with the
backward pass). On a compute-bound model (the CNN) the three arms should be
within noise of each other; on a parameter-heavy model (the MLP) the per
parameter add is visible and accumulation can be *faster* than plain Keras
when the optimizer update costs more than an add (Adam touches three
variables per parameter). Keras' built-in accumulation adds per micro-batch
too, so accum_keras / built-in is the number to watch: about 1.0 means
accum_keras' exact window normalization costs nothing measurable.

XLA and backends
----------------
``--xla on`` compiles every arm with ``jit_compile=True`` (XLA, what Keras'
``"auto"`` picks on a GPU), ``--xla off`` with ``jit_compile=False``, and
``--xla both`` (the default) times both. On CPU-only machines Keras resolves
``jit_compile="auto"`` to ``False``, so ``--jit auto`` is reported as that
program instead of being timed twice. ``--backends`` (default
``tensorflow,jax,torch``) times the three arms on each backend, the ones
other than this process's in subprocesses (Keras fixes its backend at
import). JAX always compiles with XLA, so its row is XLA whatever ``--xla``
says; PyTorch runs eagerly (its ``jit_compile=True`` is ``torch.compile``,
opt-in, not timed here). The floor columns are measured with TensorFlow and
left empty on the other backends.

Usage::

    python benchmarks/overhead.py                      # quick: TF without and with XLA, JAX, torch
    python benchmarks/overhead.py --xla on --models mlp -b 32 -k 8
    python benchmarks/overhead.py --full               # bigger models, more rounds
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

if __name__ == "__main__":
    # The command line first, before TensorFlow's start-up logs.
    print("$ " + shlex.join(sys.orig_argv), flush=True)
    # `--threads 1` (the default): pin the process to one core before any
    # backend starts its thread pools, which inherit the pinning (XLA's
    # thread pools on CPU cannot be sized otherwise).
    _command = " ".join(sys.argv[1:]) + " "
    if "--threads 0 " not in _command and "--threads=0 " not in _command:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from _revision import library_revision

import accum_keras

ARMS = ("plain", "built-in", "accum_keras")
RATIOS = (("accum_keras", "built-in"), ("accum_keras", "plain"))
CONFIDENCE = 0.9


# -- statistics -------------------------------------------------------------


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """An interval of order statistics that holds the median with at least ``confidence``.

    The sign-test interval: with ``n`` independent values, the median lies
    between the ``j``-th smallest and the ``j``-th largest with probability
    1 - 2 P(Binomial(n, 1/2) < j). The largest ``j`` (the tightest interval)
    that keeps that probability at or above ``confidence`` is used. With
    fewer than 5 values even the range holds the median with less than 90 %
    probability; the range is returned then.
    """
    ordered = sorted(values)
    n = len(ordered)
    chosen = 1
    for j in range(1, n // 2 + 1):
        outside = 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
        if 1 - outside >= confidence:
            chosen = j
    return ordered[chosen - 1], ordered[n - chosen]


def paired_ratio(per_round: dict[str, list[float]], top: str, bottom: str) -> dict:
    """The median and interval of ``top / bottom`` over rounds, paired by round."""
    ratios = [a / b for a, b in zip(per_round[top], per_round[bottom])]
    lo, hi = median_interval(ratios)
    return {"median": statistics.median(ratios), "lo": lo, "hi": hi}


# -- models -----------------------------------------------------------------


def cnn_layers(image_size: int, channels: int, classes: int = 10):
    """A compute-bound small CNN: few parameters, most time in convolutions."""
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for width in (channels, channels, "pool", 2 * channels, 2 * channels, "pool"):
        if width == "pool":
            x = keras.layers.MaxPooling2D()(x)
        else:
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return inputs, outputs, (image_size, image_size, 3), classes


def mlp_layers(features: int, width: int, depth: int, classes: int = 10):
    """A parameter-heavy MLP: little compute per parameter at small batches."""
    inputs = keras.Input((features,))
    x = inputs
    for _ in range(depth):
        x = keras.layers.Dense(width, activation="relu")(x)
    outputs = keras.layers.Dense(classes)(x)
    return inputs, outputs, (features,), classes


def mobilenet_layers(image_size: int, classes: int = 10):
    """keras.applications' MobileNetV3Small (random weights): a real network with BatchNorm."""
    network = keras.applications.MobileNetV3Small(
        input_shape=(image_size, image_size, 3),
        weights=None,
        classes=classes,
        classifier_activation=None,
    )
    return network.input, network.output, (image_size, image_size, 3), classes


def model_builders(full: bool = False) -> dict:
    """``{name: (label, build)}`` of the benchmark's models; ``full``: the bigger ones."""
    return {
        "cnn": (
            "CNN 64px" if full else "CNN 32px",
            lambda: cnn_layers(64 if full else 32, 32),
        ),
        "mlp": (
            "MLP 4x2048" if full else "MLP 3x2048",
            lambda: mlp_layers(1024, 2048, 4 if full else 3),
        ),
        "mobilenet": ("MobileNetV3Small 64px", lambda: mobilenet_layers(64)),
        # Almost no compute: what is left is each arm's fixed cost per step.
        "tiny": ("MLP 2x16", lambda: mlp_layers(16, 16, 2)),
    }


def make_optimizer(name: str, accumulation_steps: int | None):
    kwargs = {"gradient_accumulation_steps": accumulation_steps} if accumulation_steps else {}
    if name == "adam":
        return keras.optimizers.Adam(1e-4, **kwargs)
    if name == "sgd":
        return keras.optimizers.SGD(1e-3, momentum=0.9, **kwargs)
    raise ValueError(name)


def build_arm(arm: str, build, k: int, optimizer: str, jit_compile, seed: int):
    """One compiled model of an arm; every arm starts from the same weights."""
    keras.utils.set_random_seed(seed)
    inputs, outputs, _, _ = build()
    if arm == "accum_keras":
        model = accum_keras.Model(inputs, outputs, accumulation_steps=k)
        opt = make_optimizer(optimizer, None)
    else:
        model = keras.Model(inputs, outputs)
        opt = make_optimizer(optimizer, k if arm == "built-in" else None)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


# -- timing -----------------------------------------------------------------


class BatchClock(keras.callbacks.Callback):
    """Wall-clock and process CPU-time stamps of the end of every training micro-batch."""

    def __init__(self):
        super().__init__()
        self.stamps: list[tuple[float, float]] = []

    def on_train_begin(self, logs=None):
        self.stamps = []

    def on_train_batch_end(self, batch, logs=None):
        # Wait for the step (JAX dispatches asynchronously), as a progress
        # bar would; every arm pays the same.
        float(keras.ops.convert_to_numpy(logs["loss"]))
        self.stamps.append((time.perf_counter(), time.process_time()))


def time_epoch(model, x, y, b: int, k: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per micro-batch of every whole window of one epoch but the first.

    A window's time runs from the end of the previous window's last micro-batch
    to the end of its own, so it holds exactly ``k`` micro-batches and one
    optimizer update; the first window, which also holds ``fit()``'s set-up,
    is left out.
    """
    clock = BatchClock()
    model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    ends = clock.stamps[k - 1 :: k]
    return [
        ((later[0] - earlier[0]) / k, (later[1] - earlier[1]) / k)
        for earlier, later in itertools.pairwise(ends)
    ]


class FloorParts:
    """Times one optimizer update and one accumulator add on copies of a model's variables."""

    def __init__(self, model, optimizer: str, jit_compile: bool):
        shapes = [v.shape for v in model.trainable_variables]
        self.variables = [tf.Variable(tf.random.normal(s, seed=i)) for i, s in enumerate(shapes)]
        self.accumulators = [tf.Variable(tf.zeros(s), trainable=False) for s in shapes]
        gradients = [tf.random.normal(s, stddev=1e-3, seed=i) for i, s in enumerate(shapes)]
        opt = make_optimizer(optimizer, None)
        opt.build(self.variables)

        @tf.function(jit_compile=jit_compile)
        def update():
            opt.apply(gradients, self.variables)

        @tf.function(jit_compile=jit_compile)
        def add():
            for accumulator, gradient in zip(self.accumulators, gradients):
                accumulator.assign_add(gradient)

        self.functions = {"opt": update, "add": add}
        for name in self.functions:  # trace
            self.time(name, 1)

    def time(self, name: str, repeats: int) -> list[float]:
        fn = self.functions[name]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            # Wait for the result before stopping the clock.
            _ = self.variables[0].numpy()
            _ = self.accumulators[0].numpy()
            times.append(time.perf_counter() - start)
        return times


def run_case(name, build, args, jit_label, jit_compile):
    _, _, input_shape, classes = build()
    rng = np.random.default_rng(args.seed)
    samples = args.steps * args.batch_size
    x = rng.normal(size=(samples, *input_shape)).astype("float32")
    y = rng.integers(0, classes, size=(samples,)).astype("int32")

    models = {
        arm: build_arm(arm, build, args.k, args.optimizer, jit_compile, args.seed) for arm in ARMS
    }
    resolved = bool(models["plain"].jit_compile)
    params = sum(int(np.prod(v.shape)) for v in models["plain"].trainable_variables)
    on_tensorflow = keras.backend.backend() == "tensorflow"
    floor_parts = FloorParts(models["plain"], args.optimizer, resolved) if on_tensorflow else None

    warm = 2 * args.k * args.batch_size
    for arm in ARMS:  # warm-up: tracing / XLA compilation, not timed
        time_epoch(models[arm], x[:warm], y[:warm], args.batch_size, args.k)

    # Each round runs every arm for one epoch and times the floor's parts, in
    # an order rotated every round.
    items = (*ARMS, "opt", "add") if floor_parts is not None else ARMS
    epochs: dict[str, list[list[tuple[float, float]]]] = {arm: [] for arm in ARMS}
    parts: dict[str, list[float]] = {"opt": [], "add": []}
    for round_ in range(args.repeats):
        shift = round_ % len(items)
        for item in items[shift:] + items[:shift]:
            if item in parts:
                parts[item] += floor_parts.time(item, args.micro_repeats)
            else:
                epochs[item].append(time_epoch(models[item], x, y, args.batch_size, args.k))

    # Per-window times pooled over the rounds; per-round medians for the
    # paired ratios.
    wall = {arm: [w for e in es for w, _ in e] for arm, es in epochs.items()}
    cpu = {arm: [c for e in es for _, c in e] for arm, es in epochs.items()}
    epoch_medians = {
        arm: [statistics.median(w for w, _ in e) for e in es] for arm, es in epochs.items()
    }
    epoch_cpu_medians = {
        arm: [statistics.median(c for _, c in e) for e in es] for arm, es in epochs.items()
    }
    medians = {arm: statistics.median(t) for arm, t in wall.items()}
    cpu_medians = {arm: statistics.median(t) for arm, t in cpu.items()}
    ratios = {f"{a}/{b}": paired_ratio(epoch_medians, a, b) for a, b in RATIOS}
    cpu_ratios = {f"{a}/{b}": paired_ratio(epoch_cpu_medians, a, b) for a, b in RATIOS}
    update_s = statistics.median(parts["opt"]) if parts["opt"] else None
    add_s = statistics.median(parts["add"]) if parts["add"] else None
    floor = None
    if update_s is not None:
        floor = medians["plain"] - update_s + update_s / args.k + add_s

    accumulating = models["accum_keras"]
    assert accumulating.pending_micro_steps == 0
    assert len(accumulating._accumulation_state.gradients) == len(accumulating.trainable_variables)
    jit = jit_label if str(resolved).lower() == jit_label else f"{jit_label} (={resolved})"
    return {
        "model": name,
        "backend": keras.backend.backend(),
        "jit": jit,
        "params": params,
        "medians": medians,
        "cpu_medians": cpu_medians,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "update_s": update_s,
        "add_s": add_s,
        "floor": floor,
    }


def ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def ratio(r: dict) -> str:
    return f"{r['median']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def print_table(rows, args):
    print(
        f"\nmicro-batch b={args.batch_size}, k={args.k}, optimizer={args.optimizer}, "
        f"{args.steps} micro-batches per epoch, {args.repeats} timed rounds (one epoch per "
        f"arm each), threads={args.threads or 'library default'}; ms per micro-batch = "
        "median over the timed windows / k (wall clock); ratios: median over rounds "
        f"[{CONFIDENCE:.0%} interval], paired by round\n"
    )
    print(
        "| model | backend | jit_compile | params | plain ms | built-in ms | accum_keras ms "
        "| accum/built-in | accum/plain | opt update ms | add ms | floor ms |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["medians"]
        print(
            f"| {r['model']} | {r['backend']} | {r['jit']} | {r['params'] / 1e6:.2f}M "
            f"| {ms(m['plain'])} | {ms(m['built-in'])} | {ms(m['accum_keras'])} "
            f"| {ratio(r['ratios']['accum_keras/built-in'])} "
            f"| {ratio(r['ratios']['accum_keras/plain'])} "
            f"| {ms(r['update_s'])} | {ms(r['add_s'])} | {ms(r['floor'])} |"
        )
    print(
        "\nThe same rounds in process CPU time (all threads; less sensitive to other "
        "jobs on a shared machine, but it counts thread pools' spin-waiting):\n"
    )
    print(
        "| model | backend | jit_compile | plain CPU ms | built-in CPU ms | accum_keras CPU ms "
        "| accum/built-in | accum/plain |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["cpu_medians"]
        print(
            f"| {r['model']} | {r['backend']} | {r['jit']} | {ms(c['plain'])} "
            f"| {ms(c['built-in'])} | {ms(c['accum_keras'])} "
            f"| {ratio(r['cpu_ratios']['accum_keras/built-in'])} "
            f"| {ratio(r['cpu_ratios']['accum_keras/plain'])} |"
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="bigger models, more rounds")
    parser.add_argument("--batch-size", "-b", type=int, default=16, help="micro-batch size b")
    parser.add_argument("-k", type=int, default=4, help="accumulation steps k")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--steps", type=int, help="micro-batches per timed epoch (multiple of k)")
    parser.add_argument("--repeats", type=int, help="timed rounds (one epoch per arm each)")
    parser.add_argument(
        "--xla",
        choices=("off", "on", "both"),
        default="both",
        help="TensorFlow: time without XLA (jit_compile=False), with it "
        "(jit_compile=True) or both (default)",
    )
    parser.add_argument(
        "--jit",
        help="comma-separated jit_compile modes among false, auto, true "
        "(overrides --xla; e.g. auto on a GPU)",
    )
    parser.add_argument(
        "--backends",
        default="tensorflow,jax,torch",
        help="comma-separated Keras backends among tensorflow, jax, torch "
        "(default all three; each other than this process's runs in a subprocess)",
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--models", default="cnn,mlp", help="comma-separated models among cnn, mlp, mobilenet, tiny"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        choices=(0, 1),
        help="1 (default): every backend computes on one thread; 0: each library's default",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.jit is None:
        args.jit = {"off": "false", "on": "true", "both": "false,true"}[args.xla]
    if args.steps is None:
        args.steps = 2 * args.k
    if args.repeats is None:
        args.repeats = 61 if args.full else 21
    args.micro_repeats = 5 if args.full else 3
    if args.steps % args.k or args.steps < 2 * args.k:
        parser.error("--steps must be a multiple of k and at least 2k")
    return args


def run_backend_subprocess(backend: str, argv: list[str]) -> list[dict]:
    """The rows of this benchmark on another Keras backend (its own process)."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--backends", backend, "--json"]
    env = dict(os.environ, KERAS_BACKEND=backend)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        print(f"{backend}: failed\n{completed.stderr[-3000:]}", file=sys.stderr)
        return []
    log, _, rows = completed.stdout.rpartition("ROWS\n")
    print(log, end="", flush=True)
    return json.loads(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    backends = args.backends.split(",")
    here = keras.backend.backend()
    others = [b for b in backends if b != here]
    if others:
        # Keras fixes its backend at import: the other backends run in
        # subprocesses (their rows are added to this table).
        forwarded = [a for a in argv if not a.startswith("--backends")]
        if "--backends" in argv:
            index = argv.index("--backends")
            forwarded = argv[:index] + argv[index + 2 :]
        rows = main_rows(args) if here in backends else []
        for backend in others:
            rows += run_backend_subprocess(backend, forwarded)
        print_table(rows, args)
        return
    rows = main_rows(args)
    if args.json:
        print("ROWS")
        print(json.dumps(rows))
    else:
        print_table(rows, args)


def use_one_thread() -> None:
    """One thread per op pool (TensorFlow's, torch's); the process is pinned to one core."""
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def main_rows(args) -> list[dict]:
    if args.threads == 1:
        use_one_thread()
    print(
        f"keras {keras.__version__} on {keras.backend.backend()}, tensorflow {tf.__version__}, "
        f"accum_keras {accum_keras.__version__} ({library_revision()}), devices: "
        + ", ".join(d.name for d in tf.config.list_physical_devices()),
        flush=True,
    )
    builders = model_builders(args.full)
    modes = {"false": False, "auto": "auto", "true": True}
    jit_labels = args.jit.split(",")
    if keras.backend.backend() == "jax":
        # JAX always compiles with XLA (jit_compile=False would run op by op).
        jit_labels = ["auto"]
    elif keras.backend.backend() == "torch":
        # torch.compile (jit_compile=True) is opt-in; users train eagerly.
        jit_labels = ["false"]
    rows = []
    start = time.perf_counter()
    for model_name in args.models.split(","):
        label, build = builders[model_name]
        done: dict[bool, str] = {}
        for jit_label in jit_labels:
            jit_compile = modes[jit_label]
            resolved = probe_jit(build, jit_compile)
            if resolved in done:
                print(
                    f"{label}: jit_compile={jit_label} resolves to {resolved}, the program "
                    f"already timed as jit_compile={done[resolved]}; not timed again."
                )
                continue
            done[resolved] = jit_label
            t0 = time.perf_counter()
            rows.append(run_case(label, build, args, jit_label, jit_compile))
            print(
                f"{label} on {keras.backend.backend()}, jit_compile={jit_label}: "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print(f"{keras.backend.backend()}: total wall time {time.perf_counter() - start:.0f} s")
    return rows


def probe_jit(build, jit_compile) -> bool:
    """What ``jit_compile`` resolves to for this model on this machine."""
    inputs, outputs, _, _ = build()
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    return bool(model.jit_compile)


if __name__ == "__main__":
    main()
