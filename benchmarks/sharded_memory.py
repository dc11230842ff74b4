"""Per-device bytes of weights, Adam's slots and accumulators under ModelParallel, 1 to 8 devices.

What is measured
----------------
An MLP of ``--layers`` square ``Dense`` layers of width ``--width`` is laid
out by a `keras.distribution.LayoutMap` (kernels ``(None, "model")``, biases
``("model",)``) on a ``(1, n)`` mesh named ``("batch", "model")``, for each
``n`` in ``--devices``. In each layout it trains one window (``k``
micro-batches) as plain Keras (``fit`` at the big batch) and as
``accum_keras.Model`` (``fit`` at the micro-batch), both with Adam, and
reads the bytes that device 0 holds of each array
(``value.addressable_shards[0].data.nbytes``): the trainable weights, Adam's
two slots, and the accumulators. With ``--accumulator-dtype bfloat16`` a
third arm sets that ``accumulator_dtype`` on the model, where this
accum_keras offers it (the column says so where it does not).

These are the bytes of the arrays the training state consists of, by
layout; they do not include activations, gradients in flight or XLA's
temporary buffers. On an accelerator the script also prints device 0's peak
bytes in use (``device.memory_stats()``), which does include them.

Each ``n`` runs in its own process: on CPU, JAX shows ``n`` host devices
only if ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` is set
before it starts. On a GPU or TPU the child uses the first ``n`` devices.

Usage::

    python benchmarks/sharded_memory.py                        # 1, 2, 4, 8 host devices
    python benchmarks/sharded_memory.py --accumulator-dtype bfloat16
    python benchmarks/sharded_memory.py --devices all          # 1, 2, 4, ... up to what is present
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MiB = 2**20


def _child(devices: int, args) -> dict:
    """Measures one layout; runs in its own process (see `_run_child`)."""
    import jax
    import keras
    import numpy as np

    import accum_keras

    present = jax.devices()
    if len(present) < devices:
        return {"devices": devices, "skipped": f"only {len(present)} present"}
    mesh = keras.distribution.DeviceMesh((1, devices), ("batch", "model"), present[:devices])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")
    layout_map[".*dense.*bias"] = ("model",)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

    rng = np.random.default_rng(0)
    samples = args.micro_batch * args.k
    x = rng.normal(size=(samples, args.width)).astype("float32")
    y = rng.normal(size=(samples, args.width)).astype("float32")

    def per_device(variables) -> int:
        return sum(int(v.value.addressable_shards[0].data.nbytes) for v in variables)

    def slots(model):
        return [v for v in model.optimizer.variables if v.path.endswith(("_momentum", "_velocity"))]

    def build(accumulating: dict | None):
        inputs = keras.Input((args.width,))
        outputs = inputs
        for _ in range(args.layers):
            outputs = keras.layers.Dense(args.width, activation="tanh")(outputs)
        if accumulating is None:
            return keras.Model(inputs, outputs)
        return accum_keras.Model(inputs, outputs, accumulation_steps=args.k, **accumulating)

    def peak() -> int | None:
        stats = present[0].memory_stats()  # None on CPU
        return None if not stats else int(stats.get("peak_bytes_in_use", 0))

    result = {"devices": devices, "platform": present[0].platform}
    # name, the accum_keras.Model arguments (None: a plain keras.Model)
    arms = [("plain", None), ("accum_keras", {})]
    if args.accumulator_dtype:
        arms.append(
            (f"accum_keras {args.accumulator_dtype}", {"accumulator_dtype": args.accumulator_dtype})
        )
    with distribution.scope():
        for name, accumulating in arms:
            keras.utils.set_random_seed(0)
            try:
                model = build(accumulating)
            except TypeError as error:
                # An accum_keras without `accumulator_dtype`.
                result[name] = {"unavailable": str(error).splitlines()[0]}
                continue
            model.compile(keras.optimizers.Adam(1e-3), loss="mse")
            batch = samples if accumulating is None else args.micro_batch
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
            arm = {
                "weights": per_device(model.trainable_variables),
                "slots": per_device(slots(model)),
                "peak": peak(),
            }
            if accumulating is not None:
                gradients = model._accumulation_state.gradients
                arm["accumulators"] = per_device(gradients)
                arm["accumulator_dtype"] = str(gradients[0].dtype)
                wanted = accumulating.get("accumulator_dtype", arm["accumulator_dtype"])
                if arm["accumulator_dtype"] != wanted:
                    arm = {"unavailable": f"accumulators are {arm['accumulator_dtype']}"}
            result[name] = arm
    return result


def _run_child(devices: int, argv: list[str]) -> dict:
    env = dict(os.environ, KERAS_BACKEND="jax")
    flags = env.get("XLA_FLAGS", "")
    # Only the CPU platform reads it; accelerators show what is present.
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    completed = subprocess.run(
        [sys.executable, __file__, "--child", str(devices), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the {devices}-device run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _device_counts(spec: str) -> list[int]:
    if spec != "all":
        return [int(n) for n in spec.split(",")]
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    present = jax.device_count()
    if jax.devices()[0].platform == "cpu":
        present = 8
    counts, n = [], 1
    while n <= present:
        counts.append(n)
        n *= 2
    return counts


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / MiB:.2f}"


def _table(results: list[dict], args) -> str:
    bf16 = f"accum_keras {args.accumulator_dtype}" if args.accumulator_dtype else None
    header = [
        "devices",
        "weights",
        "Adam slots",
        "accumulators",
        "accumulators / weights",
        "plain Keras state",
        "accum_keras state",
    ]
    if bf16:
        header += [
            f"{args.accumulator_dtype} accumulators",
            f"accum_keras state ({args.accumulator_dtype})",
        ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for result in results:
        if "skipped" in result:
            lines.append(f"| {result['devices']} | skipped: {result['skipped']} |")
            continue
        plain, accum = result["plain"], result["accum_keras"]
        plain_state = plain["weights"] + plain["slots"]
        accum_state = accum["weights"] + accum["slots"] + accum["accumulators"]
        row = [
            str(result["devices"]),
            _mib(plain["weights"]),
            _mib(plain["slots"]),
            _mib(accum["accumulators"]),
            f"{accum['accumulators'] / accum['weights']:.2f}",
            _mib(plain_state),
            _mib(accum_state),
        ]
        if bf16:
            arm = result.get(bf16, {})
            if "unavailable" in arm:
                row += ["not in this accum_keras", ""]
            else:
                state = arm["weights"] + arm["slots"] + arm["accumulators"]
                row += [_mib(arm["accumulators"]), _mib(state)]
        lines.append("| " + " | ".join(row) + " |")
    peaks = [r for r in results if r.get("plain", {}).get("peak") is not None]
    if peaks:
        lines += [
            "",
            "| devices | peak bytes in use, device 0: plain | accum_keras |",
            "|---:|---:|---:|",
        ]
        for result in peaks:
            lines.append(
                f"| {result['devices']} | {_mib(result['plain']['peak'])} "
                f"| {_mib(result['accum_keras']['peak'])} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8", help='comma-separated counts, or "all"')
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument(
        "--accumulator-dtype",
        default=None,
        help="also measure this accumulator_dtype (e.g. bfloat16), if accum_keras offers it",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args)))
        return
    forwarded = [
        f"--layers={args.layers}",
        f"--width={args.width}",
        f"--micro-batch={args.micro_batch}",
        f"-k={args.k}",
    ]
    if args.accumulator_dtype:
        forwarded.append(f"--accumulator-dtype={args.accumulator_dtype}")
    results = [_run_child(n, forwarded) for n in _device_counts(args.devices)]
    platform = next((r["platform"] for r in results if "platform" in r), "?")
    weights = args.layers * (args.width * args.width + args.width)
    print(
        f"MLP {args.layers} x Dense({args.width}), {weights:,} weights; ModelParallel, "
        f"mesh (1, n), kernels (None, 'model'), biases ('model',); Adam; k = {args.k}; "
        f"platform {platform}. MiB held by device 0.\n"
    )
    print(_table(results, args))


if __name__ == "__main__":
    main()
