"""Synthetic "shapes" instance segmentation data set, and its tf.data pipeline.

Each image has a random background colour with a little noise and one to
``max_instances`` coloured squares, circles and triangles, which may partly
occlude each other. Everything is generated here with numpy; image ``i`` is a
pure function of ``(seed, image_id)``, so a data set is reproducible and any
one image does not depend on how many others were generated.

Ground truth is padded to ``max_instances`` per image:

* ``gt_boxes``   float32 ``[M, 4]``  ``[y1, x1, y2, x2]`` in pixels
* ``gt_classes`` int32   ``[M]``     1 square, 2 circle, 3 triangle, 0 padding
* ``gt_masks``   uint8   ``[M, H, W]`` visible instance masks
* ``gt_valid``   bool    ``[M]``     validity mask of the padded slots
* ``image_id``   int32   ``[]``      seeds the per-image sampling in the model
"""

import numpy as np
import tensorflow as tf

SQUARE, CIRCLE, TRIANGLE = 1, 2, 3


def _shape_mask(kind, cy, cx, radius, size):
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    if kind == SQUARE:
        return (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
    if kind == CIRCLE:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    # Upward pointing isosceles triangle inside the square of half-side radius.
    top, bottom = cy - radius, cy + radius
    half_width = radius * (yy - top) / (2 * radius)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def _distinct_colour(rng, avoid, min_distance=120):
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if all(np.abs(colour - a).sum() >= min_distance for a in avoid):
            return colour
    return 255 - avoid[0]


def generate_image(seed, image_id, image_size=64, max_instances=4):
    """One image and its (unpadded) instances; a pure function of its args."""
    rng = np.random.default_rng([seed, image_id])
    background = rng.integers(0, 256, 3)
    image = np.empty((image_size, image_size, 3), np.float32)
    image[:] = background
    image += rng.normal(0, 8, image.shape)

    masks, classes = [], []
    for _ in range(rng.integers(1, max_instances + 1)):
        kind = int(rng.integers(1, 4))
        radius = rng.uniform(0.08, 0.22) * image_size
        cy, cx = rng.uniform(radius, image_size - radius, 2)
        mask = _shape_mask(kind, cy, cx, radius, image_size)
        # Keep occlusion modest so that every instance stays clearly visible.
        if any((mask & m).sum() > 0.3 * min(mask.sum(), m.sum()) for m in masks):
            continue
        colour = _distinct_colour(rng, [background])
        image[mask] = colour + rng.normal(0, 4, (mask.sum(), 3))
        masks = [m & ~mask for m in masks]  # new shape occludes older ones
        masks.append(mask)
        classes.append(kind)

    keep = [i for i, m in enumerate(masks) if m.sum() >= 12]
    masks = np.array([masks[i] for i in keep], np.uint8)
    classes = np.array([classes[i] for i in keep], np.int32)
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
    return np.clip(image, 0, 255).astype(np.uint8), boxes, classes, masks


def generate_shapes(num_images, seed=0, image_size=64, max_instances=4, first_id=0):
    """``num_images`` images with ids ``first_id, first_id + 1, ...``, padded."""
    n, m, s = num_images, max_instances, image_size
    data = {
        "images": np.zeros((n, s, s, 3), np.uint8),
        "gt_boxes": np.zeros((n, m, 4), np.float32),
        "gt_classes": np.zeros((n, m), np.int32),
        "gt_masks": np.zeros((n, m, s, s), np.uint8),
        "gt_valid": np.zeros((n, m), bool),
        "image_id": np.arange(first_id, first_id + n, dtype=np.int32),
    }
    for i in range(n):
        image, boxes, classes, masks = generate_image(seed, first_id + i, image_size, max_instances)
        k = len(classes)
        data["images"][i] = image
        data["gt_boxes"][i, :k] = boxes
        data["gt_classes"][i, :k] = classes
        data["gt_masks"][i, :k] = masks
        data["gt_valid"][i, :k] = True
    return data


def make_dataset(data, batch_size, shuffle_seed=None, repeat=False, drop_remainder=True):
    """A ``tf.data`` pipeline of dicts; fit() receives them as ``x``.

    ``shuffle_seed`` fixes the order, so that arms of an experiment see the
    images in the same order. Batches are complete unless ``drop_remainder``
    is False (``train.py`` keeps every image; the last batch may be short).
    """
    ds = tf.data.Dataset.from_tensor_slices(data)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(data["image_id"]), seed=shuffle_seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def inference_inputs(data):
    """The part of the data the model needs at inference time."""
    return {"images": data["images"], "image_id": data["image_id"]}
