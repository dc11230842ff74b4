"""Compare three ways to train at equal numbers of images seen.

    python examples/mask_rcnn/compare.py --quick   # ~4 min on 2 CPU cores
    python examples/mask_rcnn/compare.py           # ~15 min on 2 CPU cores

Arms (same initial weights, same images in the same order, same optimizer):

* ``batch 2``       micro-batch 2, no accumulation (8x more, noisier updates)
* ``2 x 8 accum``   micro-batch 2, accumulation_steps 8 (accum_keras)
* ``batch 16``      true batch 16

Each arm runs in its own Python process so that its peak memory can be
measured on its own (peak RSS growth during training on CPU; peak allocator
memory on a GPU). Writes per-arm JSON, ``loss_vs_images.png``,
``ap_vs_images.png``, ``memory.png`` and ``comparison.md`` to ``--output-dir``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

ARMS = {
    "batch 2": {"micro_batch": 2, "accumulation_steps": 1},
    "2 x 8 accum": {"micro_batch": 2, "accumulation_steps": 8},
    "batch 16": {"micro_batch": 16, "accumulation_steps": 1},
}
COLOURS = {"batch 2": "tab:gray", "2 x 8 accum": "tab:blue", "batch 16": "tab:orange"}
SETTINGS = {
    # images per chunk, chunks (one loss point each), evaluate every k chunks
    "quick": {"num_train": 1024, "chunk": 256, "chunks": 8, "eval_every": 4, "num_val": 96},
    "full": {"num_train": 4096, "chunk": 512, "chunks": 24, "eval_every": 4, "num_val": 200},
}
LEARNING_RATE = 2e-3
SEED = 0


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_arm(name, mode, out_path):
    """Train one arm; write its record as JSON."""
    from examples import quiet

    quiet.import_tensorflow()
    import keras
    import tensorflow as tf

    import accum_keras
    from examples.mask_rcnn import evaluate, shapes, train
    from examples.mask_rcnn.model import LOSS_NAMES, MaskRCNN

    arm, s = ARMS[name], SETTINGS[mode]
    config = train.PRESETS["quick"].model
    keras.utils.set_random_seed(SEED)
    data = shapes.generate_shapes(s["num_train"], SEED, config.image_size, config.max_instances)
    val = shapes.generate_shapes(
        s["num_val"], train.VALIDATION_SEED, config.image_size, config.max_instances, 1_000_000
    )
    model = MaskRCNN(config, accumulation_steps=arm["accumulation_steps"])
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE, global_clipnorm=10.0), jit_compile=False
    )
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")

    # The same image order for every arm: one fixed permutation per pass.
    order = np.concatenate(
        [
            np.random.default_rng([SEED, p]).permutation(s["num_train"])
            for p in range(-(-s["chunk"] * s["chunks"] // s["num_train"]))
        ]
    )
    baseline_rss = _rss_mb()
    record = {"arm": name, **arm, "mode": mode, "chunk_images": s["chunk"], "chunks": []}
    snapshots = {}
    for i in range(s["chunks"]):
        idx = order[i * s["chunk"] : (i + 1) * s["chunk"]]
        ds = shapes.make_dataset({k: v[idx] for k, v in data.items()}, arm["micro_batch"])
        start = time.perf_counter()
        history = model.fit(
            ds,
            epochs=1,
            verbose=0,
            shuffle=False,  # the order is fixed above
            callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)],
        ).history
        seconds = time.perf_counter() - start
        record["chunks"].append(
            {
                "images": (i + 1) * s["chunk"],
                "seconds": seconds,
                "updates": int(model.optimizer.iterations.numpy()),
                "effective_batch_size": float(history.get("effective_batch_size", [np.nan])[-1]),
                **{k: history[k][-1] for k in ("loss", *LOSS_NAMES)},
            }
        )
        print(f"[{name}] {record['chunks'][-1]}", flush=True)
        if (i + 1) % s["eval_every"] == 0:
            snapshots[(i + 1) * s["chunk"]] = model.get_weights()

    record["peak_memory_mb"] = _peak_rss_mb() - baseline_rss
    record["memory_kind"] = "peak RSS growth during training (CPU)"
    if gpus:
        record["peak_memory_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        record["memory_kind"] = "peak GPU allocator memory during training"
    times = [c["seconds"] for c in record["chunks"]]
    record["seconds_per_image"] = float(np.mean(times[1:])) / s["chunk"]  # first chunk traces
    record["seconds_per_image_incl_tracing"] = sum(times) / (s["chunk"] * len(times))

    # Evaluate the snapshots after training, so evaluation is not in the memory peak.
    coco_gt = evaluate.coco_ground_truth(val)
    record["evaluations"] = []
    for images, weights in snapshots.items():
        model.set_weights(weights)
        record["evaluations"].append(
            {"images": images, **evaluate.evaluate(model, val, coco_gt=coco_gt)}
        )
        print(f"[{name}] {record['evaluations'][-1]}", flush=True)
    Path(out_path).write_text(json.dumps(record, indent=1))


def plot(records, out_dir, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for r in records:
        x = [c["images"] for c in r["chunks"]]
        style = "--" if r["arm"] == "batch 16" else "-"
        ax.plot(x, [c["loss"] for c in r["chunks"]], style, color=COLOURS[r["arm"]], label=r["arm"])
    ax.set(xlabel="training images seen", ylabel="mean training loss per chunk")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_images.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in zip(axes, ("box_AP50", "mask_AP"), ("box AP50", "mask AP")):
        for r in records:
            x = [e["images"] for e in r["evaluations"]]
            style = "--o" if r["arm"] == "batch 16" else "-o"
            ax.plot(x, [e[key] for e in r["evaluations"]], style, ms=3,
                    color=COLOURS[r["arm"]], label=r["arm"])  # fmt: skip
        ax.set(xlabel="training images seen", ylabel=label, ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out_dir / "ap_vs_images.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    names = [r["arm"] for r in records]
    colours = [COLOURS[n] for n in names]
    axes[0].bar(names, [r["peak_memory_mb"] for r in records], color=colours)
    axes[0].set(ylabel="MB", title=records[0]["memory_kind"])
    axes[1].bar(names, [1000 * r["seconds_per_image"] for r in records], color=colours)
    axes[1].set(ylabel="ms", title="training time per image")
    for ax in axes:
        ax.title.set_fontsize(8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out_dir / "memory.png", dpi=90)
    plt.close(fig)


def table(records):
    rows = [
        (
            "| arm | micro-batch x steps | updates | final loss | box AP50 | box AP | "
            "mask AP50 | mask AP | ms / image | peak memory (MB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        e, c = r["evaluations"][-1], r["chunks"][-1]
        rows.append(
            f"| {r['arm']} | {r['micro_batch']} x {r['accumulation_steps']} | {c['updates']} | "
            f"{c['loss']:.3f} | {e['box_AP50']:.3f} | {e['box_AP']:.3f} | {e['mask_AP50']:.3f} | "
            f"{e['mask_AP']:.3f} | {1000 * r['seconds_per_image']:.1f} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--arm-output", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="re-plot saved arm JSON")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.arm:
        run_arm(args.arm, mode, args.arm_output)
        return
    out = Path(args.output_dir or Path(__file__).resolve().parent / "runs" / f"compare_{mode}")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in ARMS:
        path = out / f"arm_{name.replace(' ', '_')}.json"
        if not args.plot_only:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", name,
                   "--arm-output", str(path)] + (["--quick"] if args.quick else [])  # fmt: skip
            subprocess.run(cmd, check=True)
        records.append(json.loads(path.read_text()))
    s = SETTINGS[mode]
    title = (
        "Mask R-CNN, synthetic shapes 64x64, from scratch, CPU\n"
        f"{s['chunk'] * s['chunks']} training images per arm, Adam lr {LEARNING_RATE:g}"
    )
    plot(records, out, title)
    text = f"{title}\n\n{table(records)}\n"
    (out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
