"""Train Mask R-CNN on synthetic shapes with gradient accumulation.

    python examples/mask_rcnn/train.py            # quick demo, ~2 min on 2 CPU cores
    python examples/mask_rcnn/train.py --full     # ~10-15 min, staged training

Micro-batches of 2 images, 8 micro-batches accumulated per update: every
optimizer step sees 16 images, as if trained with batch 16. Training is plain
``model.fit()``; ``accum_keras.AccumulatingModel`` does the accumulation.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras
import numpy as np

import accum_keras
from examples.mask_rcnn import evaluate, shapes, visualize
from examples.mask_rcnn.config import TINY, Config
from examples.mask_rcnn.model import MaskRCNN

VALIDATION_SEED = 10_000  # the held-out set is the same whatever --seed is
RUNS = Path(__file__).resolve().parent / "runs"  # git-ignored


@dataclasses.dataclass
class Stage:
    name: str
    epochs: int
    learning_rate: float
    train_backbone: bool = True


@dataclasses.dataclass
class Settings:
    model: Config = dataclasses.field(default_factory=Config)
    num_train: int = 3072  # images per epoch
    num_val: int = 200
    micro_batch: int = 2
    accumulation_steps: int = 8
    stages: tuple = (Stage("all layers", 1, 2e-3),)
    final_learning_rate_factor: float = 1.0  # cosine decay in the last stage
    optimizer: str = "adam"  # or "sgd" (plain SGD: traces much faster, for tests)
    seed: int = 0
    output_dir: str = str(RUNS / "quick")

    @property
    def effective_batch(self):
        return self.micro_batch * self.accumulation_steps


PRESETS = {
    # End to end in about two minutes on two CPU cores.
    "quick": Settings(),
    # Heads first with the backbone frozen, then all layers (~12 min on 2 cores).
    "full": Settings(
        num_train=4096,
        num_val=400,
        stages=(
            Stage("heads (backbone frozen)", 1, 2e-3, train_backbone=False),
            Stage("all layers", 6, 2e-3),
        ),
        final_learning_rate_factor=0.05,
        output_dir=str(RUNS / "full"),
    ),
    # Seconds; used by the tests.
    "smoke": Settings(
        model=TINY,
        num_train=32,
        num_val=8,
        accumulation_steps=4,
        optimizer="sgd",
        stages=(
            Stage("heads (backbone frozen)", 1, 1e-2, train_backbone=False),
            Stage("all layers", 1, 1e-2),
        ),
        output_dir=str(RUNS / "smoke"),
    ),
}


def make_data(settings):
    c = settings.model
    train = shapes.generate_shapes(
        settings.num_train, settings.seed, c.image_size, c.max_instances, first_id=0
    )
    val = shapes.generate_shapes(
        settings.num_val, VALIDATION_SEED, c.image_size, c.max_instances, first_id=1_000_000
    )
    return train, val


def set_stage(model, stage):
    """Freeze or unfreeze the backbone. Takes effect at the next compile()."""
    model.backbone.trainable = stage.train_backbone


def compile_for_stage(model, stage, settings, is_last):
    updates_per_epoch = settings.num_train // settings.effective_batch
    learning_rate = stage.learning_rate
    if is_last and settings.final_learning_rate_factor != 1.0:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            stage.learning_rate,
            decay_steps=max(stage.epochs * updates_per_epoch, 1),
            alpha=settings.final_learning_rate_factor,
        )
    if settings.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate, global_clipnorm=10.0)
    else:
        optimizer = keras.optimizers.SGD(learning_rate)
    model.compile(
        optimizer=optimizer,
        jit_compile=False,  # NMS and the per-image map_fn's are not XLA-friendly
    )


def train(settings, verbose=2):
    """Train and evaluate according to ``settings``; returns a summary dict."""
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(settings.seed)
    start = time.perf_counter()
    train_data, val_data = make_data(settings)
    dataset = shapes.make_dataset(
        train_data, settings.micro_batch, shuffle_seed=settings.seed, repeat=False
    )
    model = MaskRCNN(settings.model, accumulation_steps=settings.accumulation_steps)
    _log(
        verbose,
        f"Mask R-CNN ({model.count_params():,} parameters), images "
        f"{settings.model.image_size}x{settings.model.image_size}, "
        f"{settings.num_train} training images per epoch, {settings.num_val} held out",
    )
    _log(
        verbose,
        f"micro-batch {settings.micro_batch} x accumulation_steps "
        f"{settings.accumulation_steps} = effective batch {settings.effective_batch}",
    )

    history = []
    for i, stage in enumerate(settings.stages):
        set_stage(model, stage)
        compile_for_stage(model, stage, settings, is_last=i == len(settings.stages) - 1)
        _log(
            verbose,
            f"\n== stage {i + 1}/{len(settings.stages)}: {stage.name}, {stage.epochs} epoch(s), "
            f"lr {stage.learning_rate:g}, {len(model.trainable_weights)} trainable tensors",
        )
        stage_start = time.perf_counter()
        result = model.fit(
            dataset,
            epochs=stage.epochs,
            verbose=verbose,
            callbacks=[accum_keras.AccumulationCallback(lr_scaling=None)],
        )
        history.append(
            {
                "stage": stage.name,
                "seconds": time.perf_counter() - stage_start,
                "optimizer_updates": int(model.optimizer.iterations.numpy()),
                **{k: [float(v) for v in vs] for k, vs in result.history.items()},
            }
        )
    train_seconds = time.perf_counter() - start

    eval_start = time.perf_counter()
    detections = evaluate.predict(model, val_data)
    metrics = evaluate.evaluate(model, val_data, detections=detections)
    visualize.save_predictions(val_data, detections, out / "predictions.png")
    weights_path = save_weights(model, out)

    images_seen = settings.num_train * sum(s.epochs for s in settings.stages)
    summary = {
        "settings": _jsonable(dataclasses.asdict(settings)),
        "images_seen": images_seen,
        "optimizer_updates": sum(h["optimizer_updates"] for h in history),
        "effective_batch_size": history[-1].get("effective_batch_size", [None])[-1],
        "final_loss": history[-1]["loss"][-1],
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "metrics": metrics,
        "weights": str(weights_path),
        "history": history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _log(verbose, "\n" + format_summary(summary, out))
    return summary


def save_weights(model, out):
    """``model.save_weights``, or a plain ``.npz`` of ``get_weights()`` if the
    installed accum_keras version cannot be serialized by Keras."""
    path = out / "model.weights.h5"
    try:
        model.save_weights(path)
    except ValueError as error:
        path = out / "model_weights.npz"
        np.savez(path, *model.get_weights())
        print(f"note: save_weights failed ({error}); wrote {path} instead")
    return path


def format_summary(summary, out):
    m = summary["metrics"]
    return "\n".join(
        [
            "== summary",
            (
                f"images seen {summary['images_seen']}, optimizer updates "
                f"{summary['optimizer_updates']}, effective batch size (from "
                f"AccumulationCallback) {summary['effective_batch_size']}"
            ),
            (
                f"final training loss {summary['final_loss']:.3f}, training "
                f"{summary['train_seconds']:.0f} s (incl. data generation and tracing), "
                f"evaluation {summary['eval_seconds']:.0f} s"
            ),
            (
                f"held-out COCO metrics: box AP {m['box_AP']:.3f}  AP50 {m['box_AP50']:.3f}  "
                f"| mask AP {m['mask_AP']:.3f}  AP50 {m['mask_AP50']:.3f}"
            ),
            f"wrote {out / 'predictions.png'}, {out / 'summary.json'}, {summary['weights']}",
        ]
    )


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _log(verbose, text):
    if verbose:
        print(text, flush=True)


def settings_from_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the ~10-15 min staged run")
    mode.add_argument("--smoke", action="store_true", help="seconds-long run on tiny images")
    parser.add_argument("--epochs", type=int, help="epochs of the last stage")
    parser.add_argument("--num-train", type=int, help="training images per epoch")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--accumulation-steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir")
    args = parser.parse_args(argv)
    name = "full" if args.full else "smoke" if args.smoke else "quick"
    settings = PRESETS[name]
    changes = {
        k: v
        for k, v in {
            "num_train": args.num_train,
            "micro_batch": args.micro_batch,
            "accumulation_steps": args.accumulation_steps,
            "seed": args.seed,
            "output_dir": args.output_dir,
        }.items()
        if v is not None
    }
    if args.epochs is not None:
        changes["stages"] = (
            *settings.stages[:-1],
            dataclasses.replace(settings.stages[-1], epochs=args.epochs),
        )
    return dataclasses.replace(settings, **changes)


if __name__ == "__main__":
    train(settings_from_args())
