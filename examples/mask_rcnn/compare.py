"""Compare three ways to train at equal numbers of images seen.

    python examples/mask_rcnn/compare.py --quick   # in-memory shapes, short version
    python examples/mask_rcnn/compare.py           # in-memory shapes
    python examples/mask_rcnn/compare.py --coco DIR [--quick]   # COCO-format files

Arms (same initial weights, same images in the same order, same optimizer):

* ``batch 2``       micro-batch 2, no accumulation (8x more, noisier updates)
* ``2 x 8 accum``   micro-batch 2, accumulation_steps 8 (accum_keras)
* ``batch 16``      true batch 16

The data is either the synthetic shapes, generated in memory, or (``--coco
DIR``) a COCO instances data set on disk in the layout ``train.py
--export-coco DIR`` writes (``DIR/annotations/instances_{train,val}.json``,
``DIR/train``, ``DIR/val``): then every image goes through the file
pipeline of ``coco.py`` and AP is computed by pycocotools against the val
JSON, as ``train.py`` does on your data.

Each arm runs in its own Python process so that its peak memory can be
measured on its own (peak RSS growth during training on CPU; peak allocator
memory on a GPU). Writes per-arm JSON, ``loss_vs_images.png``,
``ap_vs_images.png``, ``memory.png`` and ``comparison.md`` to ``--output-dir``.
Measured durations are in README.md, with the machine they were measured on.
"""

import argparse
import dataclasses
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
# With --coco the data set fixes the images (all of its train and val images).
COCO_SETTINGS = {
    "smoke": {"chunk": 16, "chunks": 2, "eval_every": 2},  # the tests: tiny model, SGD
    "quick": {"chunk": 256, "chunks": 8, "eval_every": 4},
    "full": {"chunk": 512, "chunks": 12, "eval_every": 4},
}
LARGEST_BATCH = max(a["micro_batch"] * a["accumulation_steps"] for a in ARMS.values())
LEARNING_RATE = 2e-3
SMOKE_LEARNING_RATE = 1e-2
SEED = 0


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclasses.dataclass
class Source:
    """The data of a comparison: how to train on some images, how to evaluate."""

    config: object  # the model's Config
    num_train: int  # distinct training images
    chunk_dataset: object  # (image indices, micro-batch) -> tf.data.Dataset
    evaluate: object  # model -> metrics dict
    description: str


def shapes_source(mode):
    """The synthetic shapes, generated in memory."""
    from examples.mask_rcnn import evaluate, shapes, train

    s = SETTINGS[mode]
    config = train.PRESETS["quick"].model
    data = shapes.generate_shapes(s["num_train"], SEED, config.image_size, config.max_instances)
    val = shapes.generate_shapes(
        s["num_val"], train.VALIDATION_SEED, config.image_size, config.max_instances, 1_000_000
    )
    coco_gt = evaluate.coco_ground_truth(val)
    return Source(
        config=config,
        num_train=s["num_train"],
        chunk_dataset=lambda idx, batch: shapes.make_dataset(
            {k: v[idx] for k, v in data.items()}, batch
        ),
        evaluate=lambda model: evaluate.evaluate(model, val, coco_gt=coco_gt),
        description=f"synthetic shapes {config.image_size}x{config.image_size} in memory",
    )


def coco_paths(directory):
    """``(train json, train images, val json, val images)`` of ``--export-coco``'s layout."""
    d = Path(directory)
    return (
        d / "annotations" / "instances_train.json",
        d / "train",
        d / "annotations" / "instances_val.json",
        d / "val",
    )


def coco_source(directory, mode, image_size=None):
    """A COCO instances data set on disk, read through ``coco.py``'s file pipeline."""
    from examples.mask_rcnn import coco, evaluate, train
    from examples.mask_rcnn.config import TINY, configure

    train_json, train_images, val_json, val_images = coco_paths(directory)
    train_set = coco.load(train_json, train_images)
    val_set = coco.load(
        val_json, val_images, categories=(train_set.category_ids, train_set.category_names)
    )
    max_instances = min(max(train_set.max_instances, 1), train.MAX_INSTANCES_CAP)
    coco.keep_largest(train_set, max_instances)
    base = TINY if mode == "smoke" else train.PRESETS["quick"].model
    config = configure(
        base, image_size=image_size, num_classes=train_set.num_classes, max_instances=max_instances
    )
    return Source(
        config=config,
        num_train=len(train_set),
        chunk_dataset=lambda idx, batch: coco.make_dataset(
            train_set.select(idx), config.image_size, config.max_instances, batch
        ),
        evaluate=lambda model: evaluate.evaluate_coco(model, val_set, config.image_size)[0],
        description=(
            f"COCO-format files in {directory} ({len(train_set)} train, {len(val_set)} val "
            f"images), {config.image_size}x{config.image_size}"
        ),
    )


def chunk_plan(mode, coco_dir):
    """``{"chunk", "chunks", "eval_every"}`` of a mode."""
    return (COCO_SETTINGS if coco_dir else SETTINGS)[mode]


def make_optimizer(mode):
    import keras

    if mode == "smoke":  # plain SGD traces much faster (the tests)
        return keras.optimizers.SGD(SMOKE_LEARNING_RATE)
    return keras.optimizers.Adam(LEARNING_RATE, global_clipnorm=10.0)


def run_arm(name, mode, out_path, coco_dir=None, image_size=None):
    """Train one arm; write its record as JSON."""
    from examples import quiet

    quiet.import_tensorflow()
    import keras
    import tensorflow as tf

    import accum_keras
    from examples.mask_rcnn.model import LOSS_NAMES, MaskRCNN

    arm, s = ARMS[name], chunk_plan(mode, coco_dir)
    from examples.mask_rcnn.coco import CocoFormatError

    try:
        source = coco_source(coco_dir, mode, image_size) if coco_dir else shapes_source(mode)
    except CocoFormatError as error:  # bad data: the message says where, no traceback
        sys.exit(f"error: {error}")
    keras.utils.set_random_seed(SEED)
    model = MaskRCNN(source.config, accumulation_steps=arm["accumulation_steps"])
    model.compile(optimizer=make_optimizer(mode), jit_compile=False)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")

    # The same image order for every arm: one fixed permutation per pass.
    order = np.concatenate(
        [
            np.random.default_rng([SEED, p]).permutation(source.num_train)
            for p in range(-(-s["chunk"] * s["chunks"] // source.num_train))
        ]
    )
    baseline_rss = _rss_mb()
    record = {
        "arm": name, **arm, "mode": mode, "data": source.description,
        "chunk_images": s["chunk"], "chunks": [],
    }  # fmt: skip
    snapshots = {}
    for i in range(s["chunks"]):
        idx = order[i * s["chunk"] : (i + 1) * s["chunk"]]
        ds = source.chunk_dataset(idx, arm["micro_batch"])
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
    record["seconds_per_image"] = float(np.mean(times[1:] or times)) / s["chunk"]  # 1st traces
    record["seconds_per_image_incl_tracing"] = sum(times) / (s["chunk"] * len(times))

    # Evaluate the snapshots after training, so evaluation is not in the memory peak.
    record["evaluations"] = []
    for images, weights in snapshots.items():
        model.set_weights(weights)
        record["evaluations"].append({"images": images, **source.evaluate(model)})
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
    parser.add_argument("--quick", action="store_true", help="fewer images (see README.md)")
    parser.add_argument(
        "--coco", metavar="DIR",
        help="a COCO data set in the layout `train.py --export-coco DIR` writes, instead of "
        "the in-memory shapes",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="with --coco: short run of a tiny model with SGD (used by the tests)",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", type=int, help="with --coco: side of the square model input (64)"
    )
    parser.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM",
        help=f"which arms to run (default all: {', '.join(repr(a) for a in ARMS)})",
    )  # fmt: skip
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the arms in this process (faster start; memory is then not per arm)",
    )  # fmt: skip
    parser.add_argument("--output-dir")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--arm-output", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="re-plot saved arm JSON")
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke exclude each other")
    if (args.smoke or args.image_size is not None) and not args.coco:
        parser.error("--smoke and --image-size need --coco DIR")
    if args.coco:
        missing = [str(p) for p in coco_paths(args.coco) if not p.exists()]
        if missing:
            parser.error(
                f"--coco {args.coco}: not found: {', '.join(missing)} (write such a folder with "
                "`python examples/mask_rcnn/train.py --export-coco DIR`)"
            )
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    data_args = ["--coco", args.coco] if args.coco else []
    if args.image_size is not None:
        data_args += ["--image-size", str(args.image_size)]
    if args.arm:
        run_arm(args.arm, mode, args.arm_output, args.coco, args.image_size)
        return
    kind = "compare_coco" if args.coco else "compare"
    out = Path(args.output_dir or Path(__file__).resolve().parent / "runs" / f"{kind}_{mode}")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.arms:
        path = out / f"arm_{name.replace(' ', '_')}.json"
        if args.plot_only:
            pass
        elif args.in_process:
            run_arm(name, mode, path, args.coco, args.image_size)
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", name,
                   "--arm-output", str(path), *data_args]  # fmt: skip
            cmd += {"quick": ["--quick"], "smoke": ["--smoke"]}.get(mode, [])
            code = subprocess.run(cmd).returncode
            if code:
                sys.exit(code)  # the arm printed why
        records.append(json.loads(path.read_text()))
        if args.in_process:
            records[-1]["memory_kind"] += " (arms in one process: not per arm)"
    s = chunk_plan(mode, args.coco)
    optimizer = (
        f"SGD lr {SMOKE_LEARNING_RATE:g}" if mode == "smoke" else f"Adam lr {LEARNING_RATE:g}"
    )
    title = (
        f"Mask R-CNN, {records[0]['data']}, from scratch\n"
        f"{s['chunk'] * s['chunks']} training images per arm, {optimizer}"
    )
    plot(records, out, title)
    text = f"{title}\n\n{table(records)}\n"
    (out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
