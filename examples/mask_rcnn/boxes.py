"""Box utilities: anchors, IoU, delta encoding.

Convention used everywhere in this example: boxes are float32
``[y1, x1, y2, x2]`` in *pixel* coordinates of the input image (the
``tf.image`` order). COCO's ``[x, y, w, h]`` only appears in ``evaluate.py``.
"""

import math

import numpy as np
import tensorflow as tf

# Largest allowed log-scale change when decoding deltas (as in Detectron).
_MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def generate_anchors(image_size, strides, sizes, ratios):
    """All anchors of all FPN levels, as a ``[num_anchors, 4]`` numpy array.

    The order matches the flattened RPN outputs: level by level, then row,
    column, and aspect ratio (``ratio = height / width``) innermost.
    """
    all_anchors = []
    for stride, size in zip(strides, sizes):
        n = image_size // stride
        centers = (np.arange(n, dtype=np.float32) + 0.5) * stride
        cy, cx = np.meshgrid(centers, centers, indexing="ij")
        hs = np.array([size * math.sqrt(r) for r in ratios], np.float32)
        ws = np.array([size / math.sqrt(r) for r in ratios], np.float32)
        cy, cx = cy[..., None], cx[..., None]
        level = np.stack([cy - hs / 2, cx - ws / 2, cy + hs / 2, cx + ws / 2], -1)
        all_anchors.append(level.reshape(-1, 4))
    return np.concatenate(all_anchors, 0).astype(np.float32)


def box_area(boxes):
    return tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(
        boxes[..., 3] - boxes[..., 1], 0.0
    )


def pairwise_iou(a, b):
    """IoU between every box of ``a [..., N, 4]`` and ``b [..., M, 4]``.

    Leading dimensions broadcast, so ``a`` can be the shared anchors
    ``[N, 4]`` and ``b`` a batch of ground truth ``[B, M, 4]`` (-> ``[B, N, M]``).
    """
    a = a[..., :, None, :]
    b = b[..., None, :, :]
    y1 = tf.maximum(a[..., 0], b[..., 0])
    x1 = tf.maximum(a[..., 1], b[..., 1])
    y2 = tf.minimum(a[..., 2], b[..., 2])
    x2 = tf.minimum(a[..., 3], b[..., 3])
    inter = tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)
    union = box_area(a) + box_area(b) - inter
    return inter / tf.maximum(union, 1e-6)


def _center_size(boxes):
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def encode(boxes, reference, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets ``(dy, dx, dh, dw)`` of ``boxes`` w.r.t. ``reference``."""
    cy, cx, h, w = _center_size(boxes)
    rcy, rcx, rh, rw = _center_size(reference)
    h, w = tf.maximum(h, 1e-3), tf.maximum(w, 1e-3)
    rh, rw = tf.maximum(rh, 1e-3), tf.maximum(rw, 1e-3)
    deltas = tf.stack(
        [
            weights[0] * (cy - rcy) / rh,
            weights[1] * (cx - rcx) / rw,
            weights[2] * tf.math.log(h / rh),
            weights[3] * tf.math.log(w / rw),
        ],
        -1,
    )
    return tf.stop_gradient(deltas)


def decode(deltas, reference, weights=(1.0, 1.0, 1.0, 1.0)):
    """Inverse of :func:`encode`."""
    rcy, rcx, rh, rw = _center_size(reference)
    dy = deltas[..., 0] / weights[0]
    dx = deltas[..., 1] / weights[1]
    dh = tf.minimum(deltas[..., 2] / weights[2], _MAX_LOG_SCALE)
    dw = tf.minimum(deltas[..., 3] / weights[3], _MAX_LOG_SCALE)
    cy, cx = rcy + dy * rh, rcx + dx * rw
    h, w = rh * tf.exp(dh), rw * tf.exp(dw)
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], -1)


def clip_to_image(boxes, image_size):
    return tf.clip_by_value(boxes, 0.0, float(image_size))
