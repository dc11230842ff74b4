"""COCO-format instance segmentation data: checking, input pipeline, export.

A data set is a COCO "instances" JSON file (``images``, ``annotations``,
``categories``) and a folder of images, as labelling tools export them and as
Detectron's ``register_coco_instances`` takes them. :func:`load` checks all
of it before training starts and raises :class:`CocoFormatError` naming the
file and the entry at fault. :func:`make_dataset` is the ``tf.data`` pipeline
(parallel decoding, prefetch) that turns it into the padded tensors of
``shapes.py``:

* images of any size and mode (PNG, JPEG, BMP, GIF; grayscale or RGB) are
  turned as their EXIF orientation tag says (as PIL's
  ``ImageOps.exif_transpose`` and COCO tools do: annotations are drawn on
  the displayed image), then scaled so that their longer side is
  ``image_size`` and padded with zeros at the bottom and right to
  ``image_size x image_size``; boxes and masks get exactly the same scaling;
* polygon, compressed and uncompressed RLE segmentations are decoded;
* category ids (any integers) are mapped to classes ``1..K`` in increasing
  id order, and mapped back for evaluation;
* ``iscrowd`` regions are left out of the training targets (as Detectron
  does); evaluation treats them as COCO does, as pycocotools reads them from
  the original JSON;
* images without objects are kept (they contribute negatives).

The integer ``image_id`` the model uses to seed its per-image sampling is the
COCO image id (modulo 2**31).
"""

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_util

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF")  # what tf.io.decode_image reads


class CocoFormatError(ValueError):
    """A data set that cannot be trained on; the message names file and entry."""


@dataclasses.dataclass
class CocoData:
    """A checked COCO instances data set (see :func:`load`).

    Attributes:
        json_path: the annotation file.
        image_dir: the folder the images' ``file_name`` are relative to.
        image_ids: original COCO image ids, ``[N]`` int64.
        paths: image file paths, ``[N]`` str.
        heights, widths: original image sizes from the JSON, ``[N]`` int, as
            displayed (after the EXIF orientation).
        orientations: EXIF orientation tag of every image file, ``[N]`` int
            in 1..8 (1, as stored, when the file has none or an invalid one).
        instances: per image, the training instances: a list of
            ``(class, [x, y, w, h] bbox, rle)`` with ``class`` in ``1..K``
            (crowd annotations are not included).
        category_ids: original category id of class ``k`` at ``[k - 1]``.
        category_names: their names.
        num_crowd: annotations with ``iscrowd=1`` (left out of training).
        max_instances: most training instances in one image.
    """

    json_path: Path
    image_dir: Path
    image_ids: np.ndarray
    paths: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    orientations: np.ndarray
    instances: list
    category_ids: tuple
    category_names: tuple
    num_crowd: int

    def __len__(self):
        return len(self.image_ids)

    @property
    def num_classes(self):
        return len(self.category_ids)

    @property
    def max_instances(self):
        return max((len(x) for x in self.instances), default=0)

    @property
    def class_names(self):
        """Indexed by class; index 0 is the background."""
        return ("background", *self.category_names)

    def subset(self, count):
        """The first ``count`` images (all of them when ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        return self.select(np.arange(count))

    def select(self, indices):
        """The images at ``indices`` (in that order; repeats allowed)."""
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(
            self,
            image_ids=self.image_ids[indices],
            paths=self.paths[indices],
            heights=self.heights[indices],
            widths=self.widths[indices],
            orientations=self.orientations[indices],
            instances=[self.instances[i] for i in indices],
        )

    def resized_shapes(self, image_size):
        """Height and width of every image once its longer side is ``image_size``."""
        scale = image_size / np.maximum(self.heights, self.widths)
        height = np.clip(np.round(self.heights * scale), 1, image_size).astype(np.int32)
        width = np.clip(np.round(self.widths * scale), 1, image_size).astype(np.int32)
        return height, width


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load(json_path, image_dir, categories=None):
    """Read and check a COCO instances data set.

    Every image file is opened once (see :func:`check_image_files`): that it
    exists, is readable, is a format the pipeline decodes and has the size
    the JSON says once turned by its EXIF orientation, which is read there.

    Args:
        json_path: the annotation JSON file.
        image_dir: folder that the images' ``file_name`` are relative to.
        categories: optional ``(ids, names)`` of another data set (the
            training set) that this one must use; by default its own.

    Returns:
        A :class:`CocoData`.

    Raises:
        CocoFormatError: naming the file and the entry, for a missing file, a
            JSON that is not COCO instances, an annotation pointing to an
            unknown image or category, a malformed segmentation, or an image
            that cannot be read.

    Example:
        >>> data = load("annotations/instances_train.json", "train/")
        >>> dataset = make_dataset(data, image_size=256, max_instances=data.max_instances,
        ...                        batch_size=2)
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise CocoFormatError(f"{json_path}: annotation file not found")
    if not image_dir.is_dir():
        raise CocoFormatError(f"{image_dir}: image folder not found (for {json_path})")
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{json_path}: not valid JSON ({error})") from None

    def fail(entry, problem):
        raise CocoFormatError(f"{json_path}: {entry}: {problem}")

    if not isinstance(coco, dict):
        raise CocoFormatError(
            f"{json_path}: not a COCO instances file (top level is a {type(coco).__name__}, "
            "expected an object with 'images', 'annotations', 'categories')"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            found = "missing" if key not in coco else f"a {type(coco[key]).__name__}"
            raise CocoFormatError(
                f"{json_path}: not a COCO instances file: '{key}' is {found}, expected a list "
                f"(top-level keys: {sorted(coco)})"
            )

    # Categories.
    own_ids, own_names = [], {}
    for i, cat in enumerate(coco["categories"]):
        entry = f"categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            fail(entry, "needs an integer 'id'")
        if cat["id"] in own_names:
            fail(entry, f"duplicate category id {cat['id']}")
        own_ids.append(cat["id"])
        own_names[cat["id"]] = str(cat.get("name", cat["id"]))
    if categories is None:
        category_ids = tuple(sorted(own_ids))
        category_names = tuple(own_names[c] for c in category_ids)
        if not category_ids:
            fail("categories", "is empty; an instances data set needs at least one category")
    else:
        category_ids, category_names = categories
        for c in own_ids:
            if c not in category_ids:
                fail(
                    f"categories (id {c})",
                    f"category not in the training set's categories {list(category_ids)}",
                )
    class_of = {c: k + 1 for k, c in enumerate(category_ids)}

    # Images.
    index_of, paths, heights, widths, ids = {}, [], [], [], []
    for i, image in enumerate(coco["images"]):
        entry = f"images[{i}]"
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            fail(entry, "needs an integer 'id'")
        entry = f"images[{i}] (id {image['id']})"
        if image["id"] in index_of:
            fail(entry, "duplicate image id")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            fail(entry, "needs a 'file_name'")
        for key in ("height", "width"):
            if not _is_int(image.get(key)) or image[key] <= 0:
                fail(entry, f"needs a positive integer '{key}', got {image.get(key)!r}")
        index_of[image["id"]] = len(ids)
        ids.append(image["id"])
        paths.append(str(image_dir / image["file_name"]))
        heights.append(image["height"])
        widths.append(image["width"])

    # Annotations.
    instances = [[] for _ in ids]
    num_crowd = 0
    for i, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            fail(f"annotations[{i}]", "is not an object")
        entry = f"annotations[{i}] (id {ann.get('id')})"
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in index_of:
            fail(entry, f"image_id {ann.get('image_id')!r} is not in 'images'")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in own_names:
            fail(entry, f"category_id {ann.get('category_id')!r} is not in 'categories'")
        n = index_of[ann["image_id"]]
        try:
            rle = _to_rle(ann.get("segmentation"), heights[n], widths[n])
        except _Malformed as problem:
            fail(entry, str(problem))
        bbox = ann.get("bbox")
        if bbox is None:
            bbox = [float(v) for v in mask_util.toBbox(rle)]
        elif (
            not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox))
            or min(bbox[2:]) < 0
        ):
            fail(
                entry, f"'bbox' must be [x, y, width, height] with width, height >= 0, got {bbox!r}"
            )
        if ann.get("iscrowd", 0) not in (0, 1):
            fail(entry, f"'iscrowd' must be 0 or 1, got {ann.get('iscrowd')!r}")
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        if bbox[2] * bbox[3] > 0:  # empty boxes teach nothing (Detectron drops them too)
            instances[n].append((class_of[ann["category_id"]], [float(v) for v in bbox], rle))

    data = CocoData(
        json_path=json_path,
        image_dir=image_dir,
        image_ids=np.array(ids, np.int64),
        paths=np.array(paths, dtype=str),
        heights=np.array(heights, np.int64),
        widths=np.array(widths, np.int64),
        orientations=np.ones(len(ids), np.int64),
        instances=instances,
        category_ids=tuple(category_ids),
        category_names=tuple(category_names),
        num_crowd=num_crowd,
    )
    data.orientations = check_image_files(data)
    return data


class _Malformed(Exception):
    pass


def _fail(problem):
    raise _Malformed(problem)


def _to_rle(segmentation, height, width):
    """A compressed RLE of a polygon list, compressed or uncompressed RLE."""
    fail = _fail
    if isinstance(segmentation, list):
        if not segmentation:
            fail("'segmentation' is an empty polygon list")
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(_is_number(v) for v in polygon)
            ):
                fail(
                    "'segmentation' polygons must be lists of at least 3 x, y pairs, "
                    f"got {str(polygon)[:80]}"
                )
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width]:
            fail(f"RLE 'size' {size!r} differs from the image's [height, width] {[height, width]}")
        if isinstance(counts, list):  # uncompressed RLE
            if sum(counts) != height * width or not all(_is_int(v) and v >= 0 for v in counts):
                fail(f"uncompressed RLE 'counts' must be non-negative and sum to {height * width}")
            return mask_util.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            rle = {"size": size, "counts": counts.encode("ascii")}
            try:
                area = int(mask_util.area(rle))
            except Exception as error:  # pycocotools raises plain exceptions
                fail(f"compressed RLE 'counts' cannot be decoded ({error})")
            if area > height * width:
                fail("compressed RLE 'counts' is not a valid encoding for the image size")
            return rle
        fail("RLE 'counts' must be a string (compressed) or a list of integers")
    fail(
        "needs a 'segmentation' (polygons or RLE) for instance segmentation, got "
        f"{type(segmentation).__name__}"
    )


EXIF_ORIENTATION = 0x0112  # the EXIF tag
SWAPS_AXES = (5, 6, 7, 8)  # orientations whose displayed image is the stored one transposed


def check_image_files(data):
    """Check every image file and read its EXIF orientation.

    Each image must exist, be readable, be in a format the pipeline decodes
    and, turned by its EXIF orientation, have the JSON's ``width`` and
    ``height`` (annotations are in that displayed frame).

    Args:
        data: a :class:`CocoData` (its ``orientations`` are not read).

    Returns:
        The EXIF orientation of every image, ``[N]`` int64 in 1..8.

    Raises:
        CocoFormatError: naming the file and its entry in the JSON.
    """
    from PIL import Image, UnidentifiedImageError

    orientations = np.ones(len(data), np.int64)
    for i, path in enumerate(data.paths):
        entry = f"images[{i}] (id {data.image_ids[i]}) in {data.json_path}"
        path = Path(path)
        if not path.is_file():
            raise CocoFormatError(f"{path}: image file not found ({entry})")
        try:
            with Image.open(path) as image:
                fmt, size = image.format, image.size
                image.verify()
            with Image.open(path) as image:  # verify() leaves the image unusable
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise CocoFormatError(f"{path}: unreadable image ({entry}): {error}") from None
        if fmt not in IMAGE_FORMATS:
            raise CocoFormatError(
                f"{path}: image format {fmt} is not supported ({entry}); use one of {IMAGE_FORMATS}"
            )
        # PIL's exif_transpose leaves an image with an invalid tag as stored.
        orientation = orientation if orientation in range(1, 9) else 1
        orientations[i] = orientation
        shown = size[::-1] if orientation in SWAPS_AXES else size
        if shown != (data.widths[i], data.heights[i]):
            turned = (
                f" as displayed (its EXIF orientation {orientation} turns the stored "
                f"{size[0]}x{size[1]}; COCO annotations are in the displayed frame)"
                if orientation in SWAPS_AXES
                else ""
            )
            raise CocoFormatError(
                f"{path}: image is {shown[0]}x{shown[1]} (width x height){turned} but the JSON "
                f"says {data.widths[i]}x{data.heights[i]} ({entry})"
            )
    return orientations


def _instance_arrays(data, max_instances):
    """``index -> (boxes [n, 4] yxyx, classes [n], masks [n, H, W])`` at the original size."""

    def instances(index):
        index = int(index)
        items = data.instances[index][:max_instances]
        h, w = int(data.heights[index]), int(data.widths[index])
        if not items:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros((0,), np.int32),
                np.zeros((0, h, w), np.uint8),
            )
        boxes = np.array([[y, x, y + bh, x + bw] for _, (x, y, bw, bh), _ in items], np.float32)
        classes = np.array([c for c, _, _ in items], np.int32)
        masks = mask_util.decode([rle for _, _, rle in items])  # [H, W, n], Fortran order
        return boxes, classes, np.ascontiguousarray(masks.transpose(2, 0, 1))

    return instances


def keep_largest(data, max_instances):
    """Keep the ``max_instances`` largest instances of every image; returns how many were cut."""
    cut = 0
    for n, items in enumerate(data.instances):
        if len(items) > max_instances:
            cut += len(items) - max_instances
            data.instances[n] = sorted(items, key=lambda x: -x[1][2] * x[1][3])[:max_instances]
    return cut


def exif_transpose(image, orientation):
    """``image [h, w, C]`` as displayed, for an EXIF ``orientation`` in 1..8.

    The same turns and flips as PIL's ``ImageOps.exif_transpose``, as
    TensorFlow ops (``tf.image.rot90`` turns counter-clockwise).
    """
    branches = [
        lambda: image,  # 1: as stored
        lambda: tf.image.flip_left_right(image),  # 2
        lambda: tf.image.rot90(image, 2),  # 3
        lambda: tf.image.flip_up_down(image),  # 4
        lambda: tf.image.transpose(image),  # 5
        lambda: tf.image.rot90(image, 3),  # 6: stored turned 90 degrees counter-clockwise
        lambda: tf.image.rot90(tf.image.transpose(image), 2),  # 7
        lambda: tf.image.rot90(image, 1),  # 8
    ]
    return tf.switch_case(tf.cast(orientation, tf.int32) - 1, branches)


def _resize_and_pad(image, height, width, image_size, method="bilinear"):
    """``image [..., h, w, C]`` -> scaled to ``height x width``, zero-padded to square."""
    resized = tf.image.resize(image, tf.stack([height, width]), method=method, antialias=True)
    return tf.image.pad_to_bounding_box(resized, 0, 0, image_size, image_size)


def make_dataset(
    data, image_size, max_instances, batch_size, shuffle_seed=None, training=True,
    drop_remainder=False,
):  # fmt: skip
    """The ``tf.data`` pipeline of a :class:`CocoData`.

    Images are read and decoded in parallel (``num_parallel_calls=AUTOTUNE``,
    deterministic order) and batches are prefetched, so that an accelerator
    does not wait for the input.

    Args:
        data: from :func:`load`.
        image_size: side of the square model input.
        max_instances: ground truth slots per image (more are cut off; use
            :func:`keep_largest` first to choose which).
        batch_size: images per (micro-)batch.
        shuffle_seed: shuffle the images (again every epoch) with this seed;
            ``None`` keeps the file order.
        training: also produce the ground truth (``gt_boxes``,
            ``gt_classes``, ``gt_masks``, ``gt_valid``); otherwise only
            ``images`` and ``image_id``.
        drop_remainder: drop a last incomplete batch. By default it is kept,
            so that every image is trained on: the model runs on any batch
            size, and ``accum_keras`` weights a short micro-batch by its
            images and applies a short last window at the epoch's end.

    Returns:
        A ``tf.data.Dataset`` of dicts as in ``shapes.py``.
    """
    height, width = data.resized_shapes(image_size)
    table = {
        "index": np.arange(len(data), dtype=np.int64),
        "path": data.paths,
        "image_id": (data.image_ids % 2**31).astype(np.int32),
        "orientation": data.orientations.astype(np.int32),
        "height": height,
        "width": width,
        "scale": np.stack([height / data.heights, width / data.widths], 1).astype(np.float32),
    }
    ds = tf.data.Dataset.from_tensor_slices(table)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(data), seed=shuffle_seed, reshuffle_each_iteration=True)
    instances = _instance_arrays(data, max_instances)
    m = max_instances

    def load_one(row):
        image = tf.io.decode_image(
            tf.io.read_file(row["path"]), channels=3, expand_animations=False
        )
        image = exif_transpose(image, row["orientation"])
        image = _resize_and_pad(image, row["height"], row["width"], image_size)
        out = {
            "images": tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
            "image_id": row["image_id"],
        }
        if not training:
            return out
        boxes, classes, masks = tf.numpy_function(
            instances, [row["index"]], [tf.float32, tf.int32, tf.uint8], stateful=False
        )
        masks.set_shape([None, None, None])  # numpy_function outputs have no static rank
        n = tf.shape(classes)[0]
        sy, sx = row["scale"][0], row["scale"][1]
        boxes = tf.reshape(boxes, [-1, 4]) * tf.stack([sy, sx, sy, sx])
        masks = tf.cast(masks[..., None], tf.float32)
        masks = _resize_and_pad(masks, row["height"], row["width"], image_size)[..., 0]
        out["gt_boxes"] = tf.pad(boxes, [[0, m - n], [0, 0]])
        out["gt_classes"] = tf.pad(tf.reshape(classes, [-1]), [[0, m - n]])
        out["gt_masks"] = tf.pad(tf.cast(masks >= 0.5, tf.uint8), [[0, m - n], [0, 0], [0, 0]])
        out["gt_valid"] = tf.range(m) < n
        for key, shape in (
            ("gt_boxes", [m, 4]),
            ("gt_classes", [m]),
            ("gt_masks", [m, image_size, image_size]),
            ("gt_valid", [m]),
        ):
            out[key] = tf.ensure_shape(out[key], shape)
        return out

    ds = ds.map(load_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def to_arrays(dataset):
    """All batches of a finite pipeline, concatenated into numpy arrays."""
    batches = list(dataset.as_numpy_iterator())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ------------------------------------------------------------------ evaluation
def detections_to_results(detections, data, indices, image_size):
    """Detections of images ``indices`` of ``data`` -> COCO results in original terms.

    Boxes are scaled back to the original image (and clipped to it), masks
    are pasted at the original resolution, classes become the original
    category ids and images their original ids.
    """
    from examples.mask_rcnn.evaluate import encode_mask, paste_mask, xywh

    height, width = data.resized_shapes(image_size)
    results = []
    for row, n in enumerate(indices):
        h, w = int(data.heights[n]), int(data.widths[n])
        scale = np.array([height[n] / h, width[n] / w] * 2, np.float32)
        limit = np.array([h, w, h, w], np.float32)
        for k in np.flatnonzero(detections["valid"][row]):
            box = np.clip(detections["boxes"][row, k] / scale, 0, limit)
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                continue  # entirely in the padding
            mask = paste_mask(detections["masks"][row, k], box, (h, w))
            results.append(
                {
                    "image_id": int(data.image_ids[n]),
                    "category_id": int(data.category_ids[detections["classes"][row, k] - 1]),
                    "bbox": xywh(box),
                    "score": float(detections["scores"][row, k]),
                    "segmentation": encode_mask(mask),
                }
            )
    return results


def ground_truth(data):
    """pycocotools ``COCO`` of the original JSON (original ids, crowd regions)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(data.json_path))


# ---------------------------------------------------------------------- export
def export_shapes(data, image_dir, json_path, class_names):
    """Write a data set from ``shapes.py`` as PNG files and a COCO instances JSON.

    Masks are written as compressed RLE (exact), boxes as the ``[x, y, w,
    h]`` of the padded tensors, image ids are the data's ``image_id``.
    """
    from PIL import Image

    from examples.mask_rcnn.evaluate import shapes_annotations

    image_dir, json_path = Path(image_dir), Path(json_path)
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    size = data["images"].shape[1]
    images = []
    for i, image_id in enumerate(data["image_id"]):
        file_name = f"{int(image_id):08d}.png"
        Image.fromarray(data["images"][i]).save(image_dir / file_name)
        images.append({"id": int(image_id), "file_name": file_name, "height": size, "width": size})
    annotations = shapes_annotations(data)
    categories = [{"id": c, "name": n} for c, n in enumerate(class_names) if c > 0]
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
