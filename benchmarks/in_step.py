"""The in-step mode (``micro_batch_size``): peak memory and time per update, every backend.

What is compared
----------------
The same network (a CNN on 64x64 images whose activations dominate its
memory) trains on the fit batch ``B`` in these arms:

- ``plain B``: a plain ``keras.Model``, ``fit(batch_size=B)``;
- ``plain m``: a plain ``keras.Model`` at the micro-batch, ``fit(batch_size=m)``
  (memory only: the activations of one micro-batch);
- ``streaming m x k``: ``accum_keras.Model(accumulation_steps=k)``,
  ``fit(batch_size=m)``, k = B / m;
- ``in-step m``: ``accum_keras.Model(micro_batch_size=m)``, ``fit(batch_size=B)``;
- ``in-step m + remat``: the same, the layers built under
  ``keras.RematScope(mode="full")`` (memory only: the floor).

``memory`` runs each arm in a fresh subprocess, as ``benchmarks/memory.py``
does: after the model, its data and the compile, the child reads its baseline
and resets the peak, then trains ``--updates`` optimizer updates with ``fit``
and reports peak - baseline. On CPU that is the process' resident set
(``VmHWM`` after writing ``5`` to ``/proc/self/clear_refs``, minus ``VmRSS``),
the same on every backend; on a GPU each backend's own allocator statistics
(TensorFlow ``get_memory_info``, JAX ``memory_stats()['peak_bytes_in_use']``,
PyTorch ``torch.cuda.max_memory_allocated``). The target to check is

    in-step m  ~  plain m + the fit batch's input + one fp32 copy of the weights

(the carry of summed gradients), far below plain B.

``time`` runs the three training arms (plain B, streaming, in-step) side by
side in one process per backend: a first untimed ``fit`` of each traces (and
compiles) its step; then ``--rounds`` rounds, the arms' order rotated every
round, each arm training ``--updates`` updates per round. A callback
time-stamps the end of every optimizer update; an arm's round time is the
median of its update times, the first update of each ``fit`` (set-up) left
out. Ratios are paired by round and reported as the median with the
sign-test interval of ``benchmarks/overhead.py`` (at least 90 %).

Devices: ``--device auto`` (the default) uses what each backend finds (a GPU
or TPU when there is one), ``--device cpu`` hides accelerators from the
children. Every backend runs in its own subprocess, so the same command runs
unchanged on an accelerator machine.

Usage::

    python benchmarks/in_step.py memory                 # CPU: 27 min on 2 loaded cores
    python benchmarks/in_step.py memory --plot docs/images/in_step_memory.png
    python benchmarks/in_step.py time --rounds 5        # CPU: TF, JAX, torch; 15 min loaded
    python benchmarks/in_step.py time --device auto -B 256 -m 32 --image-size 128  # GPU/TPU
    python benchmarks/in_step.py memory --smoke         # tiny, TF only: does it run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from _revision import library_revision
from _rss import read_status_kib, reset_peak_rss

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024 * 1024
BACKENDS = ("tensorflow", "jax", "torch")
MEMORY_ARMS = ("plain B", "plain m", "streaming m x k", "in-step m", "in-step m + remat")
TIME_ARMS = ("plain B", "streaming m x k", "in-step m")
RATIOS = (("in-step m", "streaming m x k"), ("in-step m", "plain B"))
RESULT_TAG = "IN_STEP_RESULT "
UNAVAILABLE = "unavailable"


# -- child: one backend, in its own process ----------------------------------


class PeakMeter:
    """Peak memory since ``start()``, with each backend's own measure on an accelerator."""

    def __init__(self) -> None:
        import keras

        self.backend = keras.backend.backend()
        self.device = "CPU"
        if self.backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                self.device = "GPU:0"
        elif self.backend == "jax":
            import jax

            if jax.default_backend() != "cpu":
                self.device = jax.devices()[0].device_kind
        elif self.backend == "torch":
            import torch

            if torch.cuda.is_available():
                self.device = torch.cuda.get_device_name(0)

    def start(self) -> None:
        if self.device == "CPU":
            self.baseline = read_status_kib("VmRSS") * 1024
            self.method = "VmHWM (reset via clear_refs) - VmRSS"
            if not reset_peak_rss():
                self.method = "ru_maxrss - VmRSS (peak not reset: includes the import)"
        elif self.backend == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
            self.baseline = tf.config.experimental.get_memory_info("GPU:0")["current"]
            self.method = "get_memory_info('GPU:0') peak - current"
        elif self.backend == "jax":
            import jax

            # JAX cannot reset its peak: the baseline is taken after a first
            # fit, whose peak is the same program's.
            self.baseline = jax.devices()[0].memory_stats()["bytes_in_use"]
            self.method = "memory_stats() peak_bytes_in_use - bytes_in_use"
        else:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated - memory_allocated"

    def peak(self) -> int:
        import resource

        if self.device == "CPU":
            if self.method.startswith("VmHWM"):
                return read_status_kib("VmHWM") * 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.config.experimental.get_memory_info("GPU:0")["peak"]
        if self.backend == "jax":
            import jax

            return jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        import torch

        return torch.cuda.max_memory_allocated()


def in_step_available() -> bool:
    """Whether this backend's train step implements ``micro_batch_size`` yet."""
    import importlib
    import inspect

    import keras

    module = importlib.import_module(f"accum_keras._backends.{keras.backend.backend()}")
    return "micro_batch_size" in inspect.getsource(module)


def build_cnn(image_size: int, channels: int, remat: bool = False):
    """A CNN whose activations dominate: three stages of two 3x3 convolutions."""
    import keras

    def layers():
        inputs = keras.Input((image_size, image_size, 3))
        x = inputs
        for stage in range(3):
            for _ in range(2):
                x = keras.layers.Conv2D(channels * 2**stage, 3, padding="same", activation="relu")(
                    x
                )
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return inputs, keras.layers.Dense(10)(x)

    if remat:
        with keras.RematScope(mode="full"):
            return layers()
    return layers()


def build_arm(arm: str, args):
    """``(model, fit batch size, fit steps per update)`` of an arm."""
    import keras

    import accum_keras

    k = args.B // args.m
    inputs, outputs = build_cnn(args.image_size, args.channels, remat="remat" in arm)
    if arm.startswith("plain"):
        model = keras.Model(inputs, outputs)
        batch, steps = (args.B if arm == "plain B" else args.m), 1
    elif arm.startswith("streaming"):
        model = accum_keras.Model(inputs, outputs, accumulation_steps=k)
        batch, steps = args.m, k
    else:
        model = accum_keras.Model(inputs, outputs, micro_batch_size=args.m)
        batch, steps = args.B, 1
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.jit_compile,
    )
    return model, batch, steps


def make_data(args, updates: int):
    import numpy as np

    rng = np.random.default_rng(args.seed)
    samples = updates * args.B
    x = rng.normal(size=(samples, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(samples,)).astype("int32")
    return x, y


def weight_bytes(model) -> int:
    import numpy as np

    return sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)


def child_memory(args) -> dict:
    import keras

    keras.utils.set_random_seed(args.seed)
    if args.arm.startswith("in-step") and not in_step_available():
        return {"arm": args.arm, "status": UNAVAILABLE}
    try:
        model, batch, _ = build_arm(args.arm, args)
        x, y = make_data(args, args.updates)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return {"arm": args.arm, "status": f"failed: {type(error).__name__}"}
    meter = PeakMeter()
    if meter.device != "CPU" and meter.backend == "jax":
        # The baseline after one (untimed) fit: JAX keeps its peak forever.
        model.fit(x[: args.B], y[: args.B], batch_size=batch, epochs=1, verbose=0)
    meter.start()
    try:
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    except Exception as error:  # noqa: BLE001 - e.g. RematScope under a TF graph
        return {"arm": args.arm, "status": f"failed: {type(error).__name__}: {error}"[:300]}
    peak = meter.peak()
    return {
        "arm": args.arm,
        "status": "ok",
        "device": meter.device,
        "method": meter.method,
        "delta": peak - meter.baseline,
        "weight_bytes": weight_bytes(model),
        "input_bytes": args.B * args.image_size**2 * 3 * 4,
        "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    }


def child_time(args) -> dict:
    import keras

    keras.utils.set_random_seed(args.seed)
    arms = [a for a in TIME_ARMS if not a.startswith("in-step") or in_step_available()]
    x, y = make_data(args, args.updates)
    built = {arm: build_arm(arm, args) for arm in arms}

    class UpdateClock(keras.callbacks.Callback):
        def __init__(self, steps: int) -> None:
            super().__init__()
            self.steps, self.stamps = steps, []

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % self.steps == 0:
                self.stamps.append(time.perf_counter())

    def one_fit(arm: str) -> list[float]:
        model, batch, steps = built[arm]
        clock = UpdateClock(steps)
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
        return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]

    for arm in arms:  # traces and compiles; not timed
        one_fit(arm)
    per_round: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        shift = round_ % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            per_round[arm].append(statistics.median(one_fit(arm)))
    return {"arms": arms, "per_round": per_round, "device": PeakMeter().device}


# -- parent -------------------------------------------------------------------


def child_command(args, backend: str, extra: list[str]) -> tuple[list[str], dict]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        args.what,
        *("-B", str(args.B), "-m", str(args.m)),
        *("--image-size", str(args.image_size), "--channels", str(args.channels)),
        *("--updates", str(args.updates), "--rounds", str(args.rounds)),
        *("--seed", str(args.seed), "--jit", args.jit),
        "--child",
        *extra,
    ]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    # Large blocks straight from mmap and back to the OS on free: the resident
    # set then follows live memory instead of glibc's caches.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="-1", JAX_PLATFORMS="cpu")
    return command, env


def run_child(args, backend: str, extra: list[str]) -> dict:
    command, env = child_command(args, backend, extra)
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"{backend} child {extra} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
    )


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def describe(args) -> str:
    c = args.channels
    return (
        f"CNN {args.image_size}x{args.image_size}x3, 6 convolutions ({c}/{2 * c}/{4 * c} "
        f"channels), Adam; fit batch B = {args.B}, micro-batch m = {args.m} "
        f"(k = {args.B // args.m}); jit_compile={args.jit}"
    )


def parent_memory(args) -> None:
    results: dict[str, dict[str, list[dict]]] = {}
    for backend in args.backends:
        results[backend] = {arm: [] for arm in MEMORY_ARMS}
        for round_ in range(args.repeats):
            shift = round_ % len(MEMORY_ARMS)
            for arm in MEMORY_ARMS[shift:] + MEMORY_ARMS[:shift]:
                result = run_child(args, backend, ["--arm", arm])
                results[backend][arm].append(result)
                shown = (
                    mib(result["delta"]) + " MiB" if result["status"] == "ok" else result["status"]
                )
                print(f"{backend}, round {round_ + 1}, {arm}: {shown}", flush=True)
    print(f"\n{describe(args)}; {args.updates} updates per arm; median (min..max) of "
          f"{args.repeats} fresh processes; peak - baseline in MiB\n")  # fmt: skip
    print("| backend | device | " + " | ".join(MEMORY_ARMS) + " | target |")
    print("|---|---|" + "---:|" * (len(MEMORY_ARMS) + 1))
    table = {}
    for backend, arms in results.items():
        cells, medians, info = [], {}, None
        for arm in MEMORY_ARMS:
            ok = [r for r in arms[arm] if r["status"] == "ok"]
            if not ok:
                cells.append("n/a" if arms[arm][0]["status"] == UNAVAILABLE else "fails")
                continue
            info = ok[0]
            deltas = [r["delta"] for r in ok]
            medians[arm] = statistics.median(deltas)
            spread = f" ({mib(min(deltas))}..{mib(max(deltas))})" if len(deltas) > 1 else ""
            cells.append(mib(medians[arm]) + spread)
        target = None
        if "plain m" in medians:
            target = medians["plain m"] + info["input_bytes"] + info["weight_bytes"]
        table[backend] = {"medians": medians, "target": target}
        device = info["device"] if info else "?"
        shown = mib(target) if target is not None else "n/a"
        print(f"| {backend} | {device} | " + " | ".join(cells) + f" | {shown} |")
    if info:
        print(
            f"\ntarget = plain m + the fit batch's input ({mib(info['input_bytes'])} MiB) + one "
            f"fp32 copy of the trainable weights ({mib(info['weight_bytes'])} MiB); "
            f"measure: {info['method']}"
        )
    if args.plot:
        plot_memory(table, args)


def plot_memory(table: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(table)
    width = 0.8 / len(MEMORY_ARMS)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for i, arm in enumerate(MEMORY_ARMS):
        values = [table[b]["medians"].get(arm, float("nan")) / MIB for b in backends]
        positions = [j + (i - (len(MEMORY_ARMS) - 1) / 2) * width for j in range(len(backends))]
        axes.bar(positions, values, width, label=arm)
    for j, backend in enumerate(backends):
        target = table[backend]["target"]
        if target is not None:
            axes.hlines(target / MIB, j - 0.45, j + 0.45, colors="black", linestyles="dashed")
    axes.plot([], [], "k--", label="target: plain m + input B + weights")
    axes.set_xticks(range(len(backends)), backends)
    axes.set_ylabel("peak - baseline of one fit (MiB)")
    axes.set_title(f"B = {args.B}, m = {args.m}, CNN {args.image_size}x{args.image_size}, CPU")
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    figure.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


def parent_time(args) -> None:
    sys.path.insert(0, HERE)
    from overhead import paired_ratio

    rows = []
    for backend in args.backends:
        result = run_child(args, backend, [])
        rows.append((backend, result))
        print(f"{backend}: done", flush=True)
    print(f"\n{describe(args)}; ms per optimizer update (median over {args.rounds} rounds of "
          f"{args.updates} updates); ratios paired by round, median [90 % interval]\n")  # fmt: skip
    names = [f"{top} / {bottom}" for top, bottom in RATIOS]
    print("| backend | device | " + " | ".join(TIME_ARMS) + " | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * (len(TIME_ARMS) + len(RATIOS)))
    for backend, result in rows:
        per_round = result["per_round"]
        cells = [
            f"{statistics.median(per_round[a]) * 1e3:.0f}" if a in per_round else "n/a"
            for a in TIME_ARMS
        ]
        for top, bottom in RATIOS:
            if top in per_round and bottom in per_round:
                r = paired_ratio(per_round, top, bottom)
                cells.append(f"{r['median']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]")
            else:
                cells.append("n/a")
        print(f"| {backend} | {result['device']} | " + " | ".join(cells) + " |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("memory", "time"))
    parser.add_argument("-B", type=int, default=64, help="fit batch size B (64)")
    parser.add_argument("-m", type=int, default=8, help="micro-batch size m (8)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16, help="of the first stage (16)")
    parser.add_argument("--updates", type=int, help="optimizer updates per fit (memory 2, time 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="time: paired rounds (7)")
    parser.add_argument("--repeats", type=int, default=1, help="memory: processes per arm (1)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument(
        "--jit", choices=("auto", "false", "true"), default="auto", help="jit_compile (auto)"
    )
    parser.add_argument("--plot", metavar="PNG", help="memory: write a bar chart")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, TF only: checks that the script runs"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=MEMORY_ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.B, args.m, args.image_size, args.channels = 8, 4, 16, 4
        args.rounds, args.backends = 1, "tensorflow"
    if args.updates is None:
        args.updates = 2 if args.what == "memory" else 3
    if args.m < 1 or args.B < args.m or args.B % args.m:
        parser.error(f"-m must divide -B (got B={args.B}, m={args.m})")
    if args.what == "time" and args.updates < 2:
        parser.error("time needs --updates >= 2 (the first update of a fit is not timed)")
    args.jit_compile = {"auto": "auto", "false": False, "true": True}[args.jit]
    args.backends = args.backends.split(",")
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)}; allowed: {', '.join(BACKENDS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        result = child_memory(args) if args.what == "memory" else child_time(args)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    print("$ " + shlex.join(sys.orig_argv), flush=True)
    print(f"accum_keras: {library_revision()}", flush=True)
    start = time.perf_counter()
    parent_memory(args) if args.what == "memory" else parent_time(args)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
