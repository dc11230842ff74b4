"""Train Mask R-CNN with gradient accumulation, on synthetic shapes or your COCO data.

    python examples/mask_rcnn/train.py            # quick demo
    python examples/mask_rcnn/train.py --mode in-step   # the same, batches of 16 split in-step
    python examples/mask_rcnn/train.py --full     # staged training, more images and epochs
    python examples/mask_rcnn/train.py --train-json A.json --train-images DIR \
        --val-json B.json --val-images DIR --backbone resnet50 --image-size 512 \
        --micro-batch 2 --accumulation-steps 32

Micro-batches of 2 images, 8 micro-batches accumulated per update: every
optimizer step sees 16 images, as if trained with batch 16. Training is plain
``model.fit()``; ``accum_keras.AccumulatingModel`` does the accumulation, in
either mode: ``--mode streaming`` (the default) feeds ``fit()`` micro-batches
of 2 and applies an update every 8 steps (``accumulation_steps=8``);
``--mode in-step`` feeds batches of 16 and each step splits its batch into
micro-batches of 2 (``micro_batch_size=2``) and applies one update.
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

from examples import quiet

quiet.import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import accum_keras  # noqa: E402
from examples.mask_rcnn import coco, evaluate, shapes, visualize  # noqa: E402
from examples.mask_rcnn.config import CLASS_NAMES, TINY, Config, configure  # noqa: E402
from examples.mask_rcnn.model import MaskRCNN  # noqa: E402

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
    # "streaming": fit() gets micro-batches, an update every accumulation_steps
    # steps; "in-step": fit() gets micro_batch * accumulation_steps images per
    # step, split inside the step (micro_batch_size=micro_batch).
    mode: str = "streaming"
    stages: tuple = (Stage("all layers", 1, 2e-3),)
    final_learning_rate_factor: float = 1.0  # cosine decay in the last stage
    optimizer: str = "adam"  # or "sgd" (plain SGD: traces much faster, for tests)
    seed: int = 0
    output_dir: str = str(RUNS / "quick")
    # Model changes on top of ``model`` (None: as in ``model``), see config.configure.
    image_size: int | None = None
    backbone: str | None = None
    backbone_weights: str | None = None
    max_instances: int | None = None
    # A COCO instances data set instead of the shapes; num_train / num_val
    # then limit the images used (None: all).
    train_json: str | None = None
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    progress_seconds: float = 15.0  # progress line within an epoch at most this often

    @property
    def uses_coco(self):
        return self.train_json is not None

    @property
    def effective_batch(self):
        return self.micro_batch * self.accumulation_steps

    @property
    def fit_batch(self):
        """Images per ``fit()`` step: a micro-batch, or in the in-step mode the whole update's."""
        return self.effective_batch if self.mode == "in-step" else self.micro_batch

    @property
    def steps_per_update(self):
        return 1 if self.mode == "in-step" else self.accumulation_steps


PRESETS = {
    # One epoch of 3072 images (measured times: README.md, Results).
    "quick": Settings(),
    # Heads first with the backbone frozen, then all layers.
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


DEFAULT_COCO_IMAGE_SIZE = 256
MAX_INSTANCES_CAP = 100  # ground-truth slots per image at most, by default


def model_config(settings, **data_changes):
    """``settings.model`` with the command line's model changes applied."""
    data_changes.setdefault("max_instances", settings.max_instances)
    return configure(
        settings.model,
        image_size=settings.image_size,
        backbone=settings.backbone,
        backbone_weights=settings.backbone_weights,
        **data_changes,
    )


def make_data(settings, config=None):
    """The shapes training and held-out sets (dicts of arrays, see shapes.py)."""
    c = config or model_config(settings)
    train = shapes.generate_shapes(
        settings.num_train, settings.seed, c.image_size, c.max_instances, first_id=0
    )
    val = shapes.generate_shapes(
        settings.num_val, VALIDATION_SEED, c.image_size, c.max_instances, first_id=1_000_000
    )
    return train, val


@dataclasses.dataclass
class Data:
    """What training needs from a data source, shapes or COCO files."""

    config: Config
    train: object  # tf.data.Dataset of micro-batches
    num_train: int
    num_val: int
    class_names: tuple
    evaluate: object  # model -> (metrics, val arrays to draw, their detections)
    description: str


def load_data(settings, verbose=2):
    """Read (and for COCO data check) the data before any model is built."""
    if not settings.uses_coco:
        config = model_config(settings)
        train_data, val_data = make_data(settings, config)

        def evaluate_shapes(model):
            detections = evaluate.predict(model, val_data)
            metrics = evaluate.evaluate(model, val_data, detections=detections)
            return metrics, val_data, detections

        return Data(
            config=config,
            train=shapes.make_dataset(
                train_data,
                settings.fit_batch,
                shuffle_seed=settings.seed,
                drop_remainder=False,  # train on every image
            ),
            num_train=settings.num_train,
            num_val=settings.num_val,
            class_names=CLASS_NAMES,
            evaluate=evaluate_shapes,
            description="synthetic shapes",
        )

    start = time.perf_counter()
    train_set = coco.load(settings.train_json, settings.train_images)
    val_set = coco.load(
        settings.val_json,
        settings.val_images,
        categories=(train_set.category_ids, train_set.category_names),
    )
    train_set, val_set = train_set.subset(settings.num_train), val_set.subset(settings.num_val)
    max_instances = settings.max_instances or min(
        max(train_set.max_instances, 1), MAX_INSTANCES_CAP
    )
    cut = coco.keep_largest(train_set, max_instances)
    config = model_config(settings, num_classes=train_set.num_classes, max_instances=max_instances)
    if len(train_set) < settings.micro_batch:
        raise coco.CocoFormatError(
            f"{settings.train_json}: {len(train_set)} image(s), fewer than --micro-batch "
            f"{settings.micro_batch}"
        )
    if not len(val_set):
        raise coco.CocoFormatError(f"{settings.val_json}: no images to evaluate on")
    _log(
        verbose,
        f"checked {settings.train_json} ({len(train_set)} images, "
        f"{sum(map(len, train_set.instances))} instances, {train_set.num_crowd} crowd regions "
        f"left out of training) and {settings.val_json} ({len(val_set)} images) in "
        f"{time.perf_counter() - start:.1f} s; {train_set.num_classes} categories "
        f"(ids {list(train_set.category_ids)[:10]}{' ...' if train_set.num_classes > 10 else ''})",
    )
    if cut:
        _log(verbose, f"note: kept the {max_instances} largest instances per image ({cut} cut)")
    train_ds = coco.make_dataset(
        train_set, config.image_size, config.max_instances, settings.fit_batch,
        shuffle_seed=settings.seed,
    )  # fmt: skip
    num_draw = min(8, len(val_set))

    def evaluate_coco(model):
        metrics, results, detections = evaluate.evaluate_coco(
            model, val_set, config.image_size, num_visualize=num_draw
        )
        (Path(settings.output_dir) / "val_detections.json").write_text(json.dumps(results))
        draw = coco.to_arrays(
            coco.make_dataset(
                val_set.subset(num_draw),
                config.image_size,
                config.max_instances,
                num_draw,
                training=True,
                drop_remainder=False,
            )  # fmt: skip
        )
        return metrics, draw, detections

    return Data(
        config=config,
        train=train_ds,
        num_train=len(train_set),  # every image, the last micro-batch may be short
        num_val=len(val_set),
        class_names=train_set.class_names,
        evaluate=evaluate_coco,
        description=f"COCO data from {settings.train_json}",
    )


class Progress(keras.callbacks.Callback):
    """A line every ``seconds`` within an epoch: images done, running loss, time left.

    The time left is estimated from the steps after the epoch's first
    ``warmup_steps`` micro-batches: with accumulation the first window traces
    two programs (the first micro-batch traces the accumulating step, the
    one that closes the window traces the update), and tracing takes far
    longer than a step. Until then a line says no estimate.

    Args:
        micro_batch: images per step.
        num_images: images per epoch (the last micro-batch may be short).
        warmup_steps: steps not used for the estimate (``accumulation_steps``).
        seconds: a line at most this often.
        clock: returns seconds (for tests).
    """

    def __init__(
        self, micro_batch, num_images, warmup_steps=1, seconds=15.0, clock=time.perf_counter
    ):
        super().__init__()
        self.micro_batch, self.num_images = micro_batch, num_images
        self.warmup_steps, self.seconds, self.clock = max(warmup_steps, 1), seconds, clock

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.start = self.last = self.clock()
        self.origin = None  # (time, steps done) once the warm-up steps are done

    def on_train_batch_end(self, batch, logs=None):
        now, done = self.clock(), batch + 1
        if done == self.warmup_steps:
            self.origin = (now, done)
        if now - self.last < self.seconds:
            return
        self.last = now
        steps = self.params.get("steps")
        left = ""
        if steps and self.origin and done > self.origin[1]:
            per_step = (now - self.origin[0]) / (done - self.origin[1])
            left = f", ~{per_step * (steps - done):.0f} s left"
        elif steps:
            left = ", time left known after the first window (tracing)"
        loss = (logs or {}).get("loss")
        loss = f", loss {float(loss):.3f}" if loss is not None else ""
        images = min(done * self.micro_batch, self.num_images)
        print(
            f"  epoch {self.epoch + 1}: {images}/{self.num_images} images{loss}, "
            f"{now - self.start:.0f} s{left}",
            flush=True,
        )


def set_stage(model, stage):
    """Freeze or unfreeze the backbone. Takes effect at the next compile()."""
    model.backbone.trainable = stage.train_backbone


def compile_for_stage(model, stage, settings, is_last, num_train=None):
    # Every image is trained on: a short last micro-batch, a short last window.
    micro_batches = math.ceil((num_train or settings.num_train) / settings.micro_batch)
    updates_per_epoch = math.ceil(micro_batches / settings.accumulation_steps)
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
    data = load_data(settings, verbose)  # bad data fails here, before any training
    config = data.config
    model = build_model(config, settings)
    weights = f", weights {config.backbone_weights}" if config.backbone_weights else ""
    _log(
        verbose,
        f"Mask R-CNN, {config.backbone} backbone{weights} ({model.count_params():,} "
        f"parameters), {data.description}, images {config.image_size}x{config.image_size}, "
        f"{data.num_train} training images per epoch, {data.num_val} held out",
    )
    if settings.mode == "in-step":
        described = (
            f"in-step mode: fit() batches of {settings.fit_batch}, each split into "
            f"micro-batches of {settings.micro_batch} (micro_batch_size), one update per step"
        )
    else:
        described = (
            f"streaming mode: micro-batch {settings.micro_batch} x accumulation_steps "
            f"{settings.accumulation_steps} = effective batch {settings.effective_batch}"
        )
    _log(verbose, described)

    history = []
    for i, stage in enumerate(settings.stages):
        set_stage(model, stage)
        compile_for_stage(
            model, stage, settings, is_last=i == len(settings.stages) - 1, num_train=data.num_train
        )
        _log(
            verbose,
            f"\n== stage {i + 1}/{len(settings.stages)}: {stage.name}, {stage.epochs} epoch(s), "
            f"lr {stage.learning_rate:g}, {len(model.trainable_weights)} trainable tensors",
        )
        stage_start = time.perf_counter()
        callbacks = []
        if settings.mode == "streaming":
            # Logs the effective batch size; the in-step mode's is fit()'s batch.
            callbacks.append(accum_keras.AccumulationCallback(lr_scaling=None))
        if verbose:
            callbacks.append(
                Progress(
                    settings.fit_batch,
                    data.num_train,
                    warmup_steps=settings.steps_per_update,
                    seconds=settings.progress_seconds,
                )
            )
        result = model.fit(
            data.train,
            epochs=stage.epochs,
            verbose=verbose,
            callbacks=callbacks,
            shuffle=False,  # the tf.data pipeline shuffles
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
    metrics, draw_data, detections = data.evaluate(model)
    visualize.save_predictions(
        draw_data, detections, out / "predictions.png", class_names=data.class_names
    )
    weights_path = save_weights(model, out)

    images_seen = data.num_train * sum(s.epochs for s in settings.stages)
    summary = {
        "settings": _jsonable(dataclasses.asdict(settings)),
        "model": _jsonable(dataclasses.asdict(config)),
        "images_seen": images_seen,
        "optimizer_updates": sum(h["optimizer_updates"] for h in history),
        "effective_batch_size": history[-1].get("effective_batch_size", [settings.effective_batch])[
            -1
        ],
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


def build_model(config, settings):
    """The Mask R-CNN model, accumulating in ``settings.mode``."""
    if settings.mode == "in-step":
        return MaskRCNN(config, micro_batch_size=settings.micro_batch)
    return MaskRCNN(config, accumulation_steps=settings.accumulation_steps)


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
                f"{summary['optimizer_updates']}, effective batch size "
                f"{summary['effective_batch_size']}"
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
            f"wrote {out / 'predictions.png'}, {out / 'summary.json'}, {summary['weights']}"
            + (
                f", {out / 'val_detections.json'}" if (out / "val_detections.json").exists() else ""
            ),
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
    """The ``Settings`` of a command line."""
    return parse_args(argv)[0]


def parse_args(argv=None):
    """``(settings, export directory or None)`` of a command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--full", action="store_true", help="the staged run (7 epochs of 4096 images)"
    )
    mode.add_argument("--smoke", action="store_true", help="short run on tiny images (the tests)")
    parser.add_argument("--epochs", type=int, help="epochs of the last stage")
    parser.add_argument(
        "--num-train", type=int, help="training images per epoch (COCO data: the first N images)"
    )
    parser.add_argument("--num-val", type=int, help="held-out images (COCO data: the first N)")
    parser.add_argument("--micro-batch", type=int, help="images per forward/backward pass (2)")
    parser.add_argument(
        "--accumulation-steps", type=int, help="micro-batches per optimizer update (8)"
    )
    parser.add_argument(
        "--mode", choices=("streaming", "in-step"),
        help="streaming (default): fit() gets micro-batches and accumulation_steps of them make "
        "an update; in-step: fit() gets batches of micro-batch x accumulation-steps images, "
        "each split into micro-batches inside the step (micro_batch_size)",
    )  # fmt: skip
    parser.add_argument("--learning-rate", type=float, help="of every stage")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-dir")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--image-size", type=int,
        help=f"side of the square model input (shapes: 64; COCO data: {DEFAULT_COCO_IMAGE_SIZE}); "
        "images are scaled to fit and padded",
    )  # fmt: skip
    model.add_argument("--backbone", choices=("small", "resnet50"), help="default small")
    model.add_argument(
        "--backbone-weights", metavar="PATH",
        help="Keras ResNet50 weights without top (.h5), e.g. ImageNet; default random init",
    )  # fmt: skip
    model.add_argument("--max-instances", type=int, help="ground-truth slots per image")
    data = parser.add_argument_group("COCO data (instead of the synthetic shapes)")
    data.add_argument("--train-json", metavar="PATH", help="COCO instances JSON for training")
    data.add_argument("--train-images", metavar="DIR", help="folder of the training images")
    data.add_argument("--val-json", metavar="PATH", help="COCO instances JSON for evaluation")
    data.add_argument("--val-images", metavar="DIR", help="folder of the evaluation images")
    data.add_argument(
        "--export-coco", metavar="DIR",
        help="write the synthetic shapes (as --num-train/--num-val/--image-size would train on "
        "them) as a COCO data set in DIR and exit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    name = "full" if args.full else "smoke" if args.smoke else "quick"
    settings = PRESETS[name]
    uses_coco = args.train_json is not None
    changes = {
        k: v
        for k, v in {
            "num_train": args.num_train,
            "num_val": args.num_val,
            "micro_batch": args.micro_batch,
            "accumulation_steps": args.accumulation_steps,
            "mode": args.mode,
            "seed": args.seed,
            "output_dir": args.output_dir,
            "image_size": args.image_size,
            "backbone": args.backbone,
            "backbone_weights": args.backbone_weights,
            "max_instances": args.max_instances,
            "train_json": args.train_json,
            "train_images": args.train_images,
            "val_json": args.val_json,
            "val_images": args.val_images,
        }.items()
        if v is not None
    }
    coco_flags = ("train_json", "train_images", "val_json", "val_images")
    given = [f for f in coco_flags if getattr(args, f) is not None]
    if given and len(given) < 4:
        missing = ", ".join("--" + f.replace("_", "-") for f in coco_flags if f not in given)
        parser.error(
            f"COCO data needs all four of --train-json ... --val-images; missing {missing}"
        )
    if uses_coco:  # all images unless limited
        if args.image_size is None and not args.smoke:
            changes["image_size"] = DEFAULT_COCO_IMAGE_SIZE
        changes.setdefault("num_train", None)
        changes.setdefault("num_val", None)
        changes.setdefault("output_dir", str(RUNS / f"coco_{name}"))
    stages = settings.stages
    if args.learning_rate is not None:
        if not args.learning_rate > 0:
            parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
        stages = tuple(dataclasses.replace(s, learning_rate=args.learning_rate) for s in stages)
    if args.epochs is not None:
        stages = (*stages[:-1], dataclasses.replace(stages[-1], epochs=args.epochs))
    changes["stages"] = stages
    for flag in ("num_train", "num_val", "micro_batch", "accumulation_steps", "max_instances"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.backbone_weights is not None and not Path(args.backbone_weights).is_file():
        parser.error(f"--backbone-weights: file not found: {args.backbone_weights}")
    settings = dataclasses.replace(settings, **changes)
    try:
        model_config(settings)  # checks --image-size / --backbone early
    except ValueError as error:
        parser.error(str(error))
    return settings, args.export_coco


def export_coco(settings, directory, verbose=2):
    """Write the shapes that ``settings`` would train on as a COCO data set."""
    directory = Path(directory)
    train_data, val_data = make_data(settings)
    for split, data in (("train", train_data), ("val", val_data)):
        coco.export_shapes(
            data, directory / split, directory / "annotations" / f"instances_{split}.json",
            CLASS_NAMES,
        )  # fmt: skip
    d = directory
    _log(
        verbose,
        f"wrote {len(train_data['image_id'])} training and {len(val_data['image_id'])} "
        f"validation images to {d}; train on them with\n  python examples/mask_rcnn/train.py "
        f"--train-json {d}/annotations/instances_train.json --train-images {d}/train "
        f"--val-json {d}/annotations/instances_val.json --val-images {d}/val "
        f"--image-size {train_data['images'].shape[1]}",
    )


def main(argv=None):
    settings, export_dir = parse_args(argv)
    if export_dir:
        export_coco(settings, export_dir)
        return
    try:
        train(settings)
    except coco.CocoFormatError as error:  # bad data: the message says where, no traceback
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
