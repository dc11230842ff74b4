"""Peak memory of Mask R-CNN (ResNet-50 FPN) training: batch 2, 2 x 8 accumulated, batch 16.

    python examples/mask_rcnn/memory.py                      # 128, 256 and 384 px; minutes per run on a CPU
    python examples/mask_rcnn/memory.py --sizes 256 512 --arms 2 2x8 16 2x32 64

Every (image size, arm) runs in its own Python process that builds the
ResNet-50 model of ``--backbone resnet50`` at that size, compiles it with
train.py's optimizer (Adam) and trains one epoch of synthetic shapes at that
size: 16 images (64 for the 64-image arms), i.e. 8 updates for batch 2 and
one update for the others. Measured:

* on CPU: the process's peak resident memory (``ru_maxrss``), in total and
  its growth during ``fit()`` (over the memory of the built model);
* on a GPU: the TensorFlow allocator's peak during ``fit()`` as well.

Writes ``memory.json``, ``memory.md`` (the table) and ``memory.png`` (the
plot, with a least-squares fit ``a + b * pixels`` per arm extended to larger
images, marked as extrapolated) to ``--output-dir``, and says at which image
size the fit of batch 16 crosses ``--budget-gb``.
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

ARMS = {  # name: (micro-batch, accumulation steps)
    "2": (2, 1),
    "2x8": (2, 8),
    "16": (16, 1),
    "2x32": (2, 32),
    "64": (64, 1),
}
LABELS = {
    "2": "batch 2",
    "2x8": "2 x 8 accumulated",
    "16": "batch 16",
    "2x32": "2 x 32 accumulated",
    "64": "batch 64",
}
COLOURS = {"2": "tab:gray", "2x8": "tab:blue", "16": "tab:orange", "2x32": "tab:green",
           "64": "tab:red"}  # fmt: skip


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(size, arm):
    """Train one (size, arm) in this process; returns its record."""
    from examples import quiet

    quiet.import_tensorflow()
    import keras
    import tensorflow as tf

    import accum_keras
    from examples.mask_rcnn import shapes
    from examples.mask_rcnn.config import Config, configure
    from examples.mask_rcnn.model import MaskRCNN

    micro, steps = ARMS[arm]
    num_images = max(micro * steps, 16)
    config = configure(Config(), image_size=size, backbone="resnet50")
    keras.utils.set_random_seed(0)
    data = shapes.generate_shapes(num_images, 0, size, config.max_instances)
    model = MaskRCNN(config, accumulation_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(2e-3, global_clipnorm=10.0), jit_compile=False)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")
    before = _rss_mb()
    start = time.perf_counter()
    model.fit(
        shapes.make_dataset(data, micro),
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)],
    )
    record = {
        "image_size": size,
        "arm": arm,
        "micro_batch": micro,
        "accumulation_steps": steps,
        "images": num_images,
        "updates": int(model.optimizer.iterations.numpy()),
        "parameters": int(model.count_params()),
        "rss_before_fit_mb": before,
        "peak_rss_mb": _peak_rss_mb(),
        "seconds": time.perf_counter() - start,
        "device": "GPU" if gpus else "CPU",
    }
    record["peak_rss_growth_mb"] = record["peak_rss_mb"] - before
    if gpus:
        record["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return record


def fit_line(records, arm, key):
    """Least-squares ``memory = a + b * pixels`` of one arm; None under 2 sizes."""
    points = [(r["image_size"] ** 2, r[key]) for r in records if r["arm"] == arm]
    if len(points) < 2:
        return None
    x, y = np.array(points, float).T
    b, a = np.polyfit(x, y, 1)
    return a, b


def crossing(line, budget_mb):
    """Image side at which ``a + b * side**2`` reaches the budget."""
    a, b = line
    if b <= 0:
        return None
    return float(np.sqrt(max(budget_mb - a, 0.0) / b))


def report(records, budget_gb, key):
    budget_mb = budget_gb * 1024
    sizes = sorted({r["image_size"] for r in records})
    arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
    what = {
        "peak_rss_mb": "peak resident memory of the process (CPU), MB",
        "gpu_peak_mb": "peak GPU allocator memory during fit(), MB",
    }[key]
    note = "; in brackets its growth during fit() over the built model" * (key == "peak_rss_mb")
    rows = [what + note, ""]
    rows.append("| image size | " + " | ".join(LABELS[a] for a in arms) + " |")
    rows.append("|---" * (len(arms) + 1) + "|")
    for size in sizes:
        cells = []
        for arm in arms:
            r = next((r for r in records if r["arm"] == arm and r["image_size"] == size), None)
            if r is None:
                cells.append("-")
            elif key == "peak_rss_mb":
                cells.append(f"{r[key]:,.0f} (+{r['peak_rss_growth_mb']:,.0f})")
            else:
                cells.append(f"{r[key]:,.0f}")
        rows.append(f"| {size} x {size} | " + " | ".join(cells) + " |")
    rows.append("")
    for arm in arms:
        line = fit_line(records, arm, key)
        if line is None:
            continue
        side = crossing(line, budget_mb)
        if side is None:
            rows.append(f"* {LABELS[arm]}: no measurable growth with the image size (within noise)")
            continue
        measured = max(r[key] for r in records if r["arm"] == arm)
        where = "measured" if measured >= budget_mb else "extrapolated"
        rows.append(
            f"* {LABELS[arm]}: fit {line[0]:,.0f} MB + {line[1] * 1e3:.3f} MB per 1000 pixels; "
            f"reaches {budget_gb:g} GB at about {side:.0f} x {side:.0f} ({where})"
        )
    return "\n".join(rows)


def plot(records, out, budget_gb, key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["image_size"] for r in records})
    fig, ax = plt.subplots(figsize=(6, 3.8))
    far = max(max(sizes) * 1.6, 640)
    grid = np.linspace(min(sizes), far, 100)
    for arm in ARMS:
        pts = sorted((r["image_size"], r[key]) for r in records if r["arm"] == arm)
        if not pts:
            continue
        x, y = zip(*pts)
        ax.plot(x, np.array(y) / 1024, "o-", color=COLOURS[arm], label=f"{LABELS[arm]} (measured)")
        line = fit_line(records, arm, key)
        if line is not None:
            ext = grid[grid >= max(x)]
            ax.plot(ext, (line[0] + line[1] * ext**2) / 1024, ":", color=COLOURS[arm])
    ax.axhline(budget_gb, color="black", lw=0.8, ls="--", label=f"{budget_gb:g} GB budget")
    ax.set(xlabel="image size (pixels per side)", ylabel="GB")
    title = "peak process memory (CPU)" if key == "peak_rss_mb" else "peak GPU memory"
    ax.set_title(
        f"Mask R-CNN, ResNet-50 FPN training: {title}\n(dotted: extrapolated, a + b * pixels)",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["2", "2x8", "16"])
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument(
        "--output-dir", default=str(Path(__file__).resolve().parent / "runs" / "memory")
    )
    parser.add_argument("--report-only", action="store_true", help="re-plot the saved memory.json")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RECORD " + json.dumps(measure(int(args.one[0]), args.one[1])), flush=True)
        return
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.json"
    records = json.loads(path.read_text()) if path.exists() else []
    if not args.report_only:
        for size in args.sizes:
            for arm in args.arms:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(size), arm]
                done = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in done.stdout.splitlines() if x.startswith("RECORD ")]
                if done.returncode or not lines:
                    print(f"{size} px, {LABELS[arm]}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                record = json.loads(lines[-1][len("RECORD ") :])
                records = [r for r in records if (r["image_size"], r["arm"]) != (size, arm)]
                records.append(record)
                path.write_text(json.dumps(records, indent=1))
                print(
                    f"{size} px, {LABELS[arm]}: peak RSS {record['peak_rss_mb']:,.0f} MB "
                    f"(+{record['peak_rss_growth_mb']:,.0f} during fit), "
                    f"{record['seconds']:.0f} s",
                    flush=True,
                )
    key = "gpu_peak_mb" if records and all("gpu_peak_mb" in r for r in records) else "peak_rss_mb"
    text = report(records, args.budget_gb, key)
    (out / "memory.md").write_text(text + "\n")
    plot(records, out, args.budget_gb, key)
    print(text)


if __name__ == "__main__":
    main()
