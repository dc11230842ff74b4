"""The Mask R-CNN example on COCO-format files: reading, checking, training, evaluation."""

import dataclasses
import json
import math
import shutil
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
Image = pytest.importorskip("PIL.Image")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the Mask R-CNN example needs the TensorFlow backend", allow_module_level=True)

from pycocotools import mask as mask_util  # noqa: E402

from examples.mask_rcnn import coco, evaluate, roi, shapes, train  # noqa: E402
from examples.mask_rcnn.config import TINY, configure  # noqa: E402
from examples.mask_rcnn.model import MaskRCNN  # noqa: E402

SIZE = 32  # model input side in these tests
CATEGORIES = [{"id": 17, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 90, "name": "kite"}]
CLASS_OF = {5: 1, 17: 2, 90: 3}  # sorted ids -> 1..K


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _write_image(path, h, w, mode, objects, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    for mask, colour in objects:
        pixels[mask.astype(bool)] = colour
    image = Image.fromarray(pixels)
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path)


def write_dataset(folder):
    """Five images of different sizes and modes, non-contiguous category ids,
    polygons, compressed and uncompressed RLE, a crowd region, an empty image."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []

    def add(image_id, file_name, h, w, mode, objects):
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        painted = []
        for category, segmentation, mask, crowd in objects:
            annotations.append(
                {
                    "id": 1000 + len(annotations),
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segmentation,
                    "bbox": [
                        float(v)
                        for v in mask_util.toBbox(mask_util.encode(np.asfortranarray(mask)))
                    ],
                    "area": float(mask.sum()),
                    "iscrowd": crowd,
                }
            )
            painted.append((mask, (200, 40 + 50 * len(painted), 90)))
        _write_image(folder / "images" / file_name, h, w, mode, painted, image_id)

    # 80 x 60 RGB PNG: a polygon and a compressed-RLE disc.
    poly_mask = mask_util.decode(
        mask_util.merge(mask_util.frPyObjects([[8, 10, 40, 10, 40, 50, 8, 50]], 60, 80))
    )
    yy, xx = np.mgrid[:60, :80]
    disc = ((yy - 30) ** 2 + (xx - 60) ** 2 <= 12**2).astype(np.uint8)
    add(
        101,
        "a.png",
        60,
        80,
        "RGB",
        [(17, [[8, 10, 40, 10, 40, 50, 8, 50]], poly_mask, 0), (5, _compressed_rle(disc), disc, 0)],
    )
    # 50 wide x 100 high JPEG: uncompressed RLE, and a crowd region.
    box = _rect(100, 50, 20, 70, 5, 45)
    crowd = _rect(100, 50, 75, 95, 5, 45)
    add(
        205,
        "b.jpg",
        100,
        50,
        "RGB",
        [(90, _uncompressed_rle(box), box, 0), (5, _uncompressed_rle(crowd), crowd, 1)],
    )
    # 64 x 64 grayscale PNG: a triangle polygon.
    triangle = [10, 54, 32, 10, 54, 54]
    tri_mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects([triangle], 64, 64)))
    add(309, "c.png", 64, 64, "L", [(5, [triangle], tri_mask, 0)])
    # 40 x 40, no objects at all.
    add(412, "d.png", 40, 40, "RGB", [])
    # 48 wide x 32 high RGBA PNG.
    rect = [4, 4, 30, 4, 30, 28, 4, 28]
    rect_mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects([rect], 32, 48)))
    add(7, "e.png", 32, 48, "RGBA", [(17, [rect], rect_mask, 0)])

    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (folder / "instances.json").write_text(json.dumps(content))
    return folder / "instances.json", folder / "images", content


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("coco"))


def _arrays(data, max_instances=3, training=True):
    ds = coco.make_dataset(data, SIZE, max_instances, 8, training=training, drop_remainder=False)
    return coco.to_arrays(ds)


def test_export_and_read_back_gives_the_same_training_tensors(tmp_path):
    """--export-coco: the shapes written as PNG + COCO JSON and read back through
    the file pipeline are the very tensors the in-memory pipeline trains on."""
    settings = train.settings_from_args(["--smoke", "--num-train", "12", "--num-val", "4"])
    train.export_coco(settings, tmp_path, verbose=0)
    expected_train, expected_val = train.make_data(settings)
    c = train.model_config(settings)
    for split, expected in (("train", expected_train), ("val", expected_val)):
        data = coco.load(tmp_path / "annotations" / f"instances_{split}.json", tmp_path / split)
        got = _arrays(data, c.max_instances)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert got["gt_valid"].sum() > 0


def test_files_are_resized_padded_and_mapped_consistently(dataset):
    json_path, image_dir, content = dataset
    data = coco.load(json_path, image_dir)
    assert data.category_ids == (5, 17, 90) and data.class_names[1:] == ("dog", "cat", "kite")
    assert data.num_crowd == 1
    got = _arrays(data)
    np.testing.assert_array_equal(got["image_id"], [101, 205, 309, 412, 7])
    for i, image in enumerate(content["images"]):
        h, w = image["height"], image["width"]
        scale = SIZE / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
        anns = [
            a for a in content["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]
        ]
        # Crowd regions are not training targets; the empty image has no slots.
        assert got["gt_valid"][i].sum() == len(anns)
        # Padding (bottom/right) is zero in the image and in every mask.
        assert not got["images"][i, new_h:].any() and not got["images"][i, :, new_w:].any()
        assert (
            not got["gt_masks"][i, :, new_h:].any() and not got["gt_masks"][i, :, :, new_w:].any()
        )
        original = np.asarray(Image.open(image_dir / image["file_name"]).convert("RGB"))
        reference = np.asarray(
            Image.fromarray(original).resize((new_w, new_h), Image.BILINEAR), np.float32
        )
        assert np.abs(got["images"][i, :new_h, :new_w] - reference).mean() < 12
        if image["file_name"] == "c.png":  # grayscale -> three equal channels
            assert (got["images"][i, ..., 0] == got["images"][i, ..., 2]).all()
        for k, ann in enumerate(anns):
            assert got["gt_classes"][i, k] == CLASS_OF[ann["category_id"]]
            x, y, bw, bh = ann["bbox"]
            sy, sx = new_h / h, new_w / w
            np.testing.assert_allclose(
                got["gt_boxes"][i, k], [y * sy, x * sx, (y + bh) * sy, (x + bw) * sx], rtol=1e-5
            )
            # The mask, decoded independently and resized by PIL, agrees.
            mask = coco_mask(ann, h, w)
            small = np.asarray(Image.fromarray(mask * 255).resize((new_w, new_h), Image.BILINEAR))
            ours = got["gt_masks"][i, k, :new_h, :new_w].astype(bool)
            theirs = small >= 128
            assert (ours & theirs).sum() / (ours | theirs).sum() > 0.85


def coco_mask(ann, h, w):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, h, w)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
    return mask_util.decode(rle)


def test_ground_truth_as_detections_scores_ap_one_in_original_terms(dataset):
    """Detections are mapped back to the original images, category ids and
    image ids: the ground truth, fed through the model-side format and mapped
    back, is a perfect detector according to pycocotools and the original JSON."""
    json_path, image_dir, content = dataset
    data = coco.load(json_path, image_dir)
    got = _arrays(data)
    num_slots = got["gt_valid"].shape[1]
    crops = roi.mask_targets(
        tf.constant(got["gt_masks"]),
        tf.constant(got["gt_boxes"]),
        tf.tile(tf.range(num_slots)[None], [len(data), 1]),
        28,
    ).numpy()
    detections = {
        "boxes": got["gt_boxes"],
        "classes": got["gt_classes"],
        "scores": np.where(got["gt_valid"], 0.9, 0.0).astype(np.float32),
        "valid": got["gt_valid"],
        "masks": crops,
    }
    results = coco.detections_to_results(detections, data, range(len(data)), SIZE)
    assert {r["image_id"] for r in results} == {101, 205, 309, 7}
    assert {r["category_id"] for r in results} == {5, 17, 90}
    for r in results:  # boxes back in original pixels
        ann = next(
            a for a in content["annotations"]
            if a["image_id"] == r["image_id"] and a["category_id"] == r["category_id"]
            and not a["iscrowd"]
        )  # fmt: skip
        np.testing.assert_allclose(r["bbox"], ann["bbox"], atol=1e-3)
    metrics = evaluate.coco_metrics(coco.ground_truth(data), results)
    assert metrics["box_AP"] == pytest.approx(1.0)
    assert metrics["mask_AP50"] == pytest.approx(1.0)
    # A detection with a wrong (e.g. contiguous, unmapped) category id is not a match.
    wrong = [dict(r, category_id=CLASS_OF[r["category_id"]]) for r in results]
    assert evaluate.coco_metrics(coco.ground_truth(data), wrong)["box_AP"] < 0.5


def test_train_from_coco_files_and_evaluate(dataset, tmp_path):
    """The command line path: train a few steps from files on disk, evaluate
    with pycocotools against the val JSON, detections in original ids.

    Every image is trained on: 5 images in micro-batches of 2 end with a
    micro-batch of 1 image, and accumulation_steps 2 with a window of 1
    micro-batch, which the epoch's end applies."""
    json_path, image_dir, content = dataset
    args = ["--smoke", "--train-json", str(json_path), "--train-images", str(image_dir),
            "--val-json", str(json_path), "--val-images", str(image_dir), "--image-size", str(SIZE),
            "--accumulation-steps", "2", "--output-dir", str(tmp_path)]  # fmt: skip
    settings = train.settings_from_args(args)
    settings = dataclasses.replace(settings, stages=settings.stages[-1:])  # one stage: faster
    summary = train.train(settings, verbose=0)
    assert summary["model"]["num_classes"] == 3 and summary["model"]["image_size"] == SIZE
    stage = summary["history"][0]
    assert summary["images_seen"] == 5
    assert summary["optimizer_updates"] == stage["optimizer_updates"] == 2  # windows 2+2, 1
    # What the model counted (the callback's epoch log: images per update).
    assert stage["effective_batch_size"][-1] * stage["optimizer_updates"] == 5
    assert all(math.isfinite(v) for v in stage["loss"])
    assert all(0.0 <= v <= 1.0 for v in summary["metrics"].values())
    results = json.loads((tmp_path / "val_detections.json").read_text())
    assert {r["image_id"] for r in results} <= {101, 205, 309, 412, 7}
    assert {r["category_id"] for r in results} <= {5, 17, 90}
    assert (tmp_path / "predictions.png").stat().st_size > 1000


# PIL's ``exif_transpose`` turns a stored image by these; each one's inverse
# makes the stored image from the displayed one.
EXIF_TURNS = {
    1: (None, None),
    2: (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_LEFT_RIGHT),
    3: (Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_180),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.FLIP_TOP_BOTTOM),
    5: (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSPOSE),
    6: (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90),
    7: (Image.Transpose.TRANSVERSE, Image.Transpose.TRANSVERSE),
    8: (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270),
}


def _write_exif_dataset(folder, stored_size_in_json=False):
    """One displayed 40 x 24 image with a red rectangle, stored under each EXIF
    orientation (PNG; orientation 6, the usual phone photo, also as JPEG), with
    the annotation in the displayed frame as labelling tools write it."""
    from PIL import ImageOps

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    h, w = 24, 40
    pixels = np.random.default_rng(0).integers(0, 60, (h, w, 3)).astype(np.uint8)
    rect = [26, 4, 37, 4, 37, 13, 26, 13]  # x, y pairs: off-centre, so any turn shows
    mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects([rect], h, w)))
    pixels[mask.astype(bool)] = (230, 20, 20)
    displayed = Image.fromarray(pixels)
    images, annotations = [], []
    for image_id, (orientation, ext) in enumerate(
        [(o, "png") for o in EXIF_TURNS] + [(6, "jpg")], start=1
    ):
        undo = EXIF_TURNS[orientation][1]
        stored = displayed.transpose(undo) if undo is not None else displayed
        exif = Image.Exif()
        exif[coco.EXIF_ORIENTATION] = orientation
        file_name = f"o{orientation}.{ext}"
        stored.save(folder / "images" / file_name, exif=exif, quality=95)
        with Image.open(folder / "images" / file_name) as reread:  # the reference: PIL
            if ext == "png":
                np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(reread)), pixels)
        size_h, size_w = stored.height, stored.width  # what a tool ignoring EXIF writes
        if not stored_size_in_json:
            size_h, size_w = h, w
        images.append({"id": image_id, "file_name": file_name, "height": size_h, "width": size_w})
        annotations.append(
            {"id": image_id, "image_id": image_id, "category_id": 1, "segmentation": [rect],
             "bbox": [26.0, 4.0, 11.0, 9.0], "area": float(mask.sum()), "iscrowd": 0}
        )  # fmt: skip
    content = {"images": images, "annotations": annotations,
               "categories": [{"id": 1, "name": "box"}]}  # fmt: skip
    (folder / "instances.json").write_text(json.dumps(content))
    return folder / "instances.json", folder / "images", pixels, mask


def test_exif_orientation_is_applied_as_displayed(tmp_path):
    """A photo stored turned, with an EXIF orientation tag, is trained on as
    displayed (as PIL's ImageOps.exif_transpose shows it), where its
    annotation was drawn: image and mask agree for every orientation."""
    from PIL import ImageOps

    json_path, image_dir, pixels, mask = _write_exif_dataset(tmp_path)
    data = coco.load(json_path, image_dir)
    np.testing.assert_array_equal(data.orientations, [1, 2, 3, 4, 5, 6, 7, 8, 6])
    # Input size 40: the displayed image is not scaled, only padded.
    got = coco.to_arrays(coco.make_dataset(data, 40, 1, 4))
    red = mask.astype(bool)
    for i, file_name in enumerate(data.paths):
        image, gt_mask = got["images"][i, :24], got["gt_masks"][i, 0, :24]
        np.testing.assert_array_equal(gt_mask, mask, err_msg=file_name)
        assert not got["images"][i, 24:].any()
        if file_name.endswith(".png"):
            np.testing.assert_array_equal(image, pixels, err_msg=file_name)
        else:  # JPEG: as PIL decodes and turns it, up to decoder round-off
            with Image.open(file_name) as stored:
                reference = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"), int)
            assert np.abs(image - reference).mean() < 2, file_name
        # The annotated pixels are the red object, the others background.
        assert np.abs(image[red].mean(0) - (230, 20, 20)).max() < 30, file_name
        assert image[~red].mean() < 60, file_name


def test_exif_turned_image_with_the_stored_size_in_the_json_is_an_error(tmp_path):
    """A JSON that gives the stored (not the displayed) size of a turned image
    was not drawn on what a viewer shows: a clear error, not a silent mismatch."""
    json_path, image_dir, _, _ = _write_exif_dataset(tmp_path, stored_size_in_json=True)
    with pytest.raises(coco.CocoFormatError) as error:
        coco.load(json_path, image_dir)
    message = str(error.value)
    assert "o5.png" in message and "EXIF orientation 5" in message
    assert "displayed" in message and "JSON says 24x40" in message


def test_compare_on_exported_coco_files(tmp_path):
    """compare.py --coco on a data set written by --export-coco (the smoke
    mode of what README.md shows): through the file pipeline, 2 x 8
    accumulated trains as batch 16 does (the reference), chunk by chunk, and
    AP comes from pycocotools against the val JSON."""
    from examples.mask_rcnn import compare

    data_dir, out = tmp_path / "data", tmp_path / "out"
    export = ["--smoke", "--export-coco", str(data_dir), "--num-train", "32", "--num-val", "8"]
    train.main(export)
    compare.main(["--coco", str(data_dir), "--smoke", "--in-process", "--output-dir", str(out),
                  "--arms", "2 x 8 accum", "batch 16"])  # fmt: skip
    accumulated, big_batch = (
        json.loads((out / f"arm_{name}.json").read_text()) for name in ("2_x_8_accum", "batch_16")
    )
    assert "COCO-format files" in accumulated["data"]
    for record in (accumulated, big_batch):
        assert [c["images"] for c in record["chunks"]] == [16, 32]
        assert [c["updates"] for c in record["chunks"]] == [1, 2]
        assert all(c["effective_batch_size"] == 16 for c in record["chunks"])
        (evaluation,) = record["evaluations"]
        assert set(evaluation) >= {"images", "box_AP", "mask_AP"}
        assert all(0.0 <= evaluation[k] <= 1.0 for k in ("box_AP", "box_AP50", "mask_AP"))
    for a, b in zip(accumulated["chunks"], big_batch["chunks"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # the 2nd after one update
    for name in ("comparison.md", "loss_vs_images.png", "ap_vs_images.png", "memory.png"):
        assert (out / name).stat().st_size > 0
    assert "| 2 x 8 accum | 2 x 8 | 2 |" in (out / "comparison.md").read_text()


def _break(dataset, tmp_path, change):
    json_path, image_dir, content = dataset
    folder = tmp_path / "bad"
    shutil.copytree(image_dir, folder / "images")
    content = json.loads(json.dumps(content))
    result = change(content, folder / "images")
    path = folder / "instances.json"
    path.write_text(result if isinstance(result, str) else json.dumps(content))
    return path, folder / "images"


def _set(entry, **values):
    entry.update(values)


BAD_DATA = {
    "json not found": (lambda c, d: None, "annotation file not found", "instances.json"),
    "not json": (lambda c, d: "{'images': ", "not valid JSON", "instances.json"),
    "not instances": (
        lambda c, d: json.dumps({"images": [], "categories": []}),
        "not a COCO instances file: 'annotations' is missing",
        "instances.json",
    ),
    "unknown image": (
        lambda c, d: _set(c["annotations"][2], image_id=999),
        "annotations[2] (id 1002): image_id 999 is not in 'images'",
        "instances.json",
    ),
    "unknown category": (
        lambda c, d: _set(c["annotations"][0], category_id=6),
        "annotations[0] (id 1000): category_id 6 is not in 'categories'",
        "instances.json",
    ),
    "bad polygon": (
        lambda c, d: _set(c["annotations"][0], segmentation=[[1, 2, 3]]),
        "annotations[0] (id 1000): 'segmentation' polygons",
        "instances.json",
    ),
    "bad rle size": (
        lambda c, d: c["annotations"][2]["segmentation"].update(size=[10, 10]),
        "annotations[2] (id 1002): RLE 'size' [10, 10] differs",
        "instances.json",
    ),
    "missing image": (
        lambda c, d: (d / "c.png").unlink(),
        "image file not found (images[2] (id 309)",
        "c.png",
    ),
    "unreadable image": (
        lambda c, d: (d / "b.jpg").write_bytes(b"not an image at all"),
        "unreadable image (images[1] (id 205)",
        "b.jpg",
    ),
    "wrong size": (
        lambda c, d: _set(c["images"][2], width=65),
        "image is 64x64 (width x height) but the JSON says 65x64 (images[2] (id 309)",
        "c.png",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_reported_with_file_and_entry(dataset, tmp_path, case):
    change, message, file_name = BAD_DATA[case]
    json_path, image_dir = _break(dataset, tmp_path, change)
    if case == "json not found":
        json_path.unlink()
    with pytest.raises(coco.CocoFormatError) as error:
        coco.load(json_path, image_dir)
    assert message in str(error.value)
    assert file_name in str(error.value)


def test_bad_data_stops_the_command_before_training(dataset, tmp_path):
    json_path, image_dir = _break(
        dataset, tmp_path, lambda c, d: _set(c["annotations"][1], category_id=6)
    )
    good_json, good_images, _ = dataset
    args = ["--smoke", "--train-json", str(good_json), "--train-images", str(good_images),
            "--val-json", str(json_path), "--val-images", str(image_dir),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as error:
        train.main(args)
    assert "annotations[1] (id 1001): category_id 6" in str(error.value.code)
    assert not (tmp_path / "out" / "summary.json").exists()
    with pytest.raises(SystemExit):  # incomplete COCO flags: a usage error
        train.parse_args(["--train-json", str(json_path)])


def test_resnet50_backbone_keeps_batch_norm_frozen_and_batch_independent(tmp_path):
    """--backbone resnet50: BatchNorm uses its stored statistics and is not
    trained (also after the backbone is unfrozen again), so an image's losses
    do not depend on its batch; --backbone-weights loads a weights file."""
    resnet = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    resnet.save_weights(path)
    small_heads = dict(fpn_channels=16, head_dim=32, mask_channels=8, mask_convs=1,
                       rpn_samples_per_image=32, rois_per_image=16, train_proposals=16,
                       test_proposals=16, max_detections=8)  # fmt: skip
    config = configure(TINY, image_size=64, backbone="resnet50", backbone_weights=path)
    model = MaskRCNN(config.replace(**small_heads))
    for saved, loaded in zip(resnet.weights, model.backbone.network.weights):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())

    batch_norms = [
        layer
        for layer in model.backbone.network.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(batch_norms) == 53
    model.backbone.trainable = False
    model.backbone.trainable = True  # what the staged training does
    trainable = {id(v) for v in model.trainable_variables}
    assert not any(id(v) in trainable for layer in batch_norms for v in layer.weights)
    assert id(model.backbone.network.get_layer("conv1_conv").kernel) in trainable

    data = shapes.generate_shapes(4, seed=5, image_size=64, max_instances=config.max_instances)
    inputs = {k: tf.constant(v) for k, v in data.items()}
    moving_mean = batch_norms[0].moving_mean.numpy()
    with tf.GradientTape() as tape:
        whole = model.per_image_losses(model(inputs, training=True))
        loss = tf.reduce_mean(tf.add_n(list(whole.values())))
    gradients = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in gradients)
    np.testing.assert_array_equal(batch_norms[0].moving_mean.numpy(), moving_mean)
    for start in (0, 2):
        part = {k: v[start : start + 2] for k, v in inputs.items()}
        for name, values in model.per_image_losses(model(part, training=True)).items():
            np.testing.assert_allclose(
                values.numpy(), whole[name].numpy()[start : start + 2], rtol=1e-4, atol=1e-6
            )
