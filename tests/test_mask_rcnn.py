"""Tests of the Mask R-CNN example (examples/mask_rcnn)."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("pycocotools")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the Mask R-CNN example needs the TensorFlow backend", allow_module_level=True)

from examples.mask_rcnn import evaluate, shapes, train  # noqa: E402
from examples.mask_rcnn.config import TINY  # noqa: E402
from examples.mask_rcnn.model import MaskRCNN  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data():
    return shapes.generate_shapes(16, seed=3, image_size=TINY.image_size, max_instances=3)


def test_per_image_losses_do_not_depend_on_the_batch(tiny_data):
    """What makes accumulation exact: an image's losses (incl. its random
    anchor/ROI samples) are the same in a batch of 16 and in a batch of 2."""
    keras.utils.set_random_seed(1)
    model = MaskRCNN(TINY)
    inputs = {k: tf.constant(v) for k, v in tiny_data.items()}
    whole = model.per_image_losses(model(inputs, training=True))
    for start in range(0, 16, 2):
        part = {k: v[start : start + 2] for k, v in inputs.items()}
        losses = model.per_image_losses(model(part, training=True))
        for name, values in losses.items():
            np.testing.assert_allclose(
                values.numpy(), whole[name].numpy()[start : start + 2], rtol=1e-4, atol=1e-6
            )


@pytest.mark.parametrize("num_images", [16, 13], ids=["full-window", "short-window"])
def test_accumulated_update_equals_big_batch_update(tiny_data, num_images):
    """micro-batch 2 x accumulation_steps 8 == one step of batch 16.

    With 13 images (what train.py does with an epoch that does not divide):
    micro-batches 2, 2, 2, 2, 2, 2, 1, whose window the epoch's end applies,
    == one step of batch 13; the model runs on the short micro-batch and the
    image in it weighs what it weighs in the big batch."""
    data = {k: v[:num_images] for k, v in tiny_data.items()}
    keras.utils.set_random_seed(0)
    accumulating = MaskRCNN(TINY, accumulation_steps=8)
    big_batch = MaskRCNN(TINY, accumulation_steps=1)
    big_batch.set_weights(accumulating.get_weights())
    before = [v.numpy() for v in accumulating.trainable_variables]

    accumulating.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
    big_batch.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
    accumulating.fit(
        shapes.make_dataset(data, 2, drop_remainder=False), epochs=1, verbose=0, shuffle=False
    )
    big_batch.fit(shapes.make_dataset(data, num_images), epochs=1, verbose=0, shuffle=False)

    assert int(accumulating.optimizer.iterations.numpy()) == 1
    assert int(big_batch.optimizer.iterations.numpy()) == 1
    assert len(accumulating.trainable_variables) == len(big_batch.trainable_variables)
    largest_change = 0.0
    for v0, a, b in zip(before, accumulating.trainable_variables, big_batch.trainable_variables):
        a, b = a.numpy(), b.numpy()
        scale = max(np.abs(b).max(), 1e-3)
        if num_images == 16:
            assert np.abs(a - b).max() <= 1e-5 * scale, a.shape
        largest_change = max(largest_change, np.abs(b - v0).max() / scale)
    assert largest_change > 1e-2  # the update really moved the weights
    # The whole update. A batch of 1 runs other convolution kernels, whose
    # round-off can tip a near-tie in top-k or NMS, so single weights may
    # differ by more than round-off (once 1e-4 of the largest weight of a
    # first-layer kernel); training on 12 of the 13 images is 0.13 off.
    update_a, update_b = (
        np.concatenate([(v.numpy() - v0).ravel() for v0, v in zip(before, m.trainable_variables)])
        for m in (accumulating, big_batch)
    )
    relative = np.linalg.norm(update_a - update_b) / np.linalg.norm(update_b)
    assert relative < 1e-3, relative


def test_in_step_update_equals_big_batch_update(tiny_data):
    """micro_batch_size=2 on a fit() batch of 16 == one plain step of batch 16,
    and the model really runs on micro-batches of 2."""
    keras.utils.set_random_seed(0)
    in_step = MaskRCNN(TINY, micro_batch_size=2)
    big_batch = MaskRCNN(TINY, accumulation_steps=1)
    big_batch.set_weights(in_step.get_weights())
    before = [v.numpy() for v in in_step.trainable_variables]
    batch_sizes = []
    call = in_step.call

    def spy(inputs, *args, **kwargs):
        batch_sizes.append(inputs["images"].shape[0])
        return call(inputs, *args, **kwargs)

    in_step.call = spy
    for model in (in_step, big_batch):
        model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
        model.fit(shapes.make_dataset(tiny_data, 16), epochs=1, verbose=0, shuffle=False)

    assert 2 in batch_sizes and 16 not in batch_sizes, batch_sizes
    assert int(in_step.optimizer.iterations.numpy()) == 1
    update_a, update_b = (
        np.concatenate([(v.numpy() - v0).ravel() for v0, v in zip(before, m.trainable_variables)])
        for m in (in_step, big_batch)
    )
    relative = np.linalg.norm(update_a - update_b) / np.linalg.norm(update_b)
    assert relative < 1e-5, relative


def test_progress_estimate_leaves_out_the_tracing_window(capsys):
    """The time-left estimate uses only steps after the first window: its first
    step traces the accumulating step and its last one the update (here 50 s
    and 40 s), which would otherwise be counted as the pace of every step."""
    steps, window = 20, 4
    ends = [50.0, 51.0, 52.0, 92.0] + [92.0 + n for n in range(1, steps - window + 1)]
    clock = iter([0.0, *ends]).__next__
    progress = train.Progress(2, 39, warmup_steps=window, seconds=15.0, clock=clock)
    progress.set_params({"steps": steps})
    progress.on_epoch_begin(0)
    for batch in range(steps):
        progress.on_train_batch_end(batch, {"loss": 1.0})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # at 50 s, 92 s and 107 s
    assert all("time left known after the first window" in line for line in lines[:2])
    # At 107 s, step 19 of 20 is done and steps take 1 s: 1 s left, not 42/3 * 16.
    assert "38/39 images" in lines[2]
    assert "107 s, ~1 s left" in lines[2]


def test_train_smoke_staged(tmp_path):
    """The smoke preset: two stages (backbone frozen, then all), evaluation."""
    settings = train.PRESETS["smoke"]
    settings = dataclasses.replace(settings, output_dir=str(tmp_path))
    summary = train.train(settings, verbose=0)

    first, second = summary["history"]
    assert first["optimizer_updates"] == second["optimizer_updates"] == 32 // 8
    for stage in summary["history"]:
        assert all(math.isfinite(v) for v in stage["loss"])
        for name in ("rpn_class_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss"):
            assert all(math.isfinite(v) for v in stage[name])
    assert summary["effective_batch_size"] == 8
    assert set(summary["metrics"]) == {
        f"{kind}_{name}" for kind in ("box", "mask") for name in ("AP", "AP50", "AP75")
    }
    assert all(0.0 <= v <= 1.0 for v in summary["metrics"].values())
    assert (tmp_path / "predictions.png").stat().st_size > 1000
    assert (tmp_path / "summary.json").exists()


def test_train_smoke_in_step_mode(tmp_path):
    """`--mode in-step`: fit() gets batches of micro_batch x accumulation_steps,
    one update per step; the same number of updates as the streaming mode."""
    settings = train.settings_from_args(["--smoke", "--mode", "in-step", "--num-train", "16"])
    settings = dataclasses.replace(
        settings, stages=settings.stages[-1:], num_val=4, output_dir=str(tmp_path)
    )
    assert settings.fit_batch == 8
    summary = train.train(settings, verbose=0)

    (stage,) = summary["history"]
    assert stage["optimizer_updates"] == 16 // 8
    assert all(math.isfinite(v) for v in stage["loss"])
    assert summary["effective_batch_size"] == 8
    assert (tmp_path / "summary.json").exists()


def test_coco_evaluation_format(tiny_data):
    coco_gt = evaluate.coco_ground_truth(tiny_data)
    num_instances = int(tiny_data["gt_valid"].sum())
    assert len(coco_gt.getAnnIds()) == num_instances

    # Ground truth turned into "detections" must score a perfect AP.
    size, m = TINY.image_size, TINY.max_instances
    perfect = {
        "boxes": tiny_data["gt_boxes"],
        "classes": tiny_data["gt_classes"],
        "scores": np.where(tiny_data["gt_valid"], 0.9, 0.0).astype(np.float32),
        "valid": tiny_data["gt_valid"],
        "masks": tiny_data["gt_masks"].astype(np.float32),
    }
    # Masks are expected in box coordinates: crop each one to its box.
    crops = np.zeros((16, m, 28, 28), np.float32)
    for i in range(16):
        for k in np.flatnonzero(tiny_data["gt_valid"][i]):
            y1, x1, y2, x2 = tiny_data["gt_boxes"][i, k]
            ys = np.clip(y1 + (np.arange(28) + 0.5) * (y2 - y1) / 28, 0, size - 1).astype(int)
            xs = np.clip(x1 + (np.arange(28) + 0.5) * (x2 - x1) / 28, 0, size - 1).astype(int)
            crops[i, k] = tiny_data["gt_masks"][i, k][np.ix_(ys, xs)]
    perfect["masks"] = crops
    results = evaluate.detections_to_coco(perfect, tiny_data["image_id"], size)
    assert len(results) == num_instances
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    metrics = evaluate.coco_metrics(coco_gt, results)
    assert metrics["box_AP"] == pytest.approx(1.0)
    assert metrics["mask_AP50"] == pytest.approx(1.0)

    # An untrained model: finite numbers in [0, 1].
    keras.utils.set_random_seed(0)
    metrics = evaluate.evaluate(MaskRCNN(TINY), tiny_data, batch_size=8)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())
    assert evaluate.coco_metrics(coco_gt, []) == {k: 0.0 for k in metrics}
