"""Region proposal network: head, training targets and proposal generation."""

import keras
import tensorflow as tf
from keras import layers

from examples.mask_rcnn import boxes as box_ops
from examples.mask_rcnn.sampling import per_image_uniform, random_subset


class RPNHead(layers.Layer):
    """Objectness logit and box deltas for every anchor of every FPN level.

    The same small conv net runs on each level; the outputs are flattened and
    concatenated in the anchor order of :func:`boxes.generate_anchors`.
    """

    def __init__(self, channels, anchors_per_location, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = layers.Conv2D(
            channels, 3, padding="same", activation="relu", kernel_initializer=init
        )
        self.objectness = layers.Conv2D(anchors_per_location, 1, kernel_initializer=init)
        self.deltas = layers.Conv2D(4 * anchors_per_location, 1, kernel_initializer=init)

    def call(self, features):
        logits, deltas = [], []
        for p in features:
            x = self.conv(p)
            batch = tf.shape(x)[0]
            logits.append(tf.reshape(self.objectness(x), [batch, -1]))
            deltas.append(tf.reshape(self.deltas(x), [batch, -1, 4]))
        return tf.concat(logits, 1), tf.concat(deltas, 1)


def anchor_targets(anchors, gt_boxes, gt_valid, noise, config):
    """Label and sample anchors of each image for the RPN loss.

    Returns ``(labels, sampled, box_targets)``: ``labels`` 1.0 for positive
    anchors, ``sampled`` 1.0 for the anchors that enter the loss (at most
    ``rpn_samples_per_image``, at most half of them positive) and regression
    targets towards the matched ground-truth box.
    """
    iou = box_ops.pairwise_iou(anchors, gt_boxes)  # [B, N, M]
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    max_iou = tf.reduce_max(iou, axis=2)
    matched = tf.argmax(iou, axis=2, output_type=tf.int32)

    # Positive: high IoU, or the best anchor of some ground-truth box.
    best_for_gt = tf.reduce_max(iou, axis=1, keepdims=True)
    is_best = tf.reduce_any((iou == best_for_gt) & (iou > 0.0), axis=2)
    positive = (max_iou >= config.rpn_positive_iou) | is_best
    negative = (max_iou < config.rpn_negative_iou) & ~positive

    total = config.rpn_samples_per_image
    max_positive = int(total * config.rpn_positive_fraction)
    chosen_pos = random_subset(positive, max_positive, noise[:, 0])
    num_pos = tf.reduce_sum(tf.cast(chosen_pos, tf.int32), axis=1)
    chosen_neg = random_subset(negative, total, noise[:, 1], count=total - num_pos)

    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)
    box_targets = box_ops.encode(matched_boxes, anchors[None])
    labels = tf.cast(chosen_pos, tf.float32)
    sampled = tf.cast(chosen_pos | chosen_neg, tf.float32)
    return labels, sampled, box_targets


def rpn_noise(seeds, num_anchors):
    """Per-image noise for :func:`anchor_targets` (positives, negatives)."""
    return per_image_uniform(seeds, [2, num_anchors])


def generate_proposals(anchors, logits, deltas, count, config):
    """Top-scoring decoded anchors after per-image NMS.

    Returns ``(proposals [B, count, 4], valid [B, count])``. No gradient flows
    into the proposals (as in the original Mask R-CNN).
    """
    scores = tf.sigmoid(tf.stop_gradient(logits))
    boxes = box_ops.decode(tf.stop_gradient(deltas), anchors[None])
    boxes = box_ops.clip_to_image(boxes, config.image_size)
    # Degenerate boxes are dropped by NMS's score threshold below.
    too_small = (boxes[..., 2] - boxes[..., 0] < 1.0) | (boxes[..., 3] - boxes[..., 1] < 1.0)
    scores = tf.where(too_small, -1.0, scores)

    top = tf.math.top_k(scores, k=config.pre_nms_top_k)
    boxes = tf.gather(boxes, top.indices, batch_dims=1)

    def nms_one_image(args):
        image_boxes, image_scores = args
        keep = tf.image.non_max_suppression(
            image_boxes, image_scores, count, config.rpn_nms_iou, score_threshold=-0.5
        )
        n = tf.shape(keep)[0]
        keep = tf.pad(keep, [[0, count - n]])
        return tf.gather(image_boxes, keep), tf.range(count) < n

    proposals, valid = tf.map_fn(
        nms_one_image,
        (boxes, top.values),
        fn_output_signature=(
            tf.TensorSpec([count, 4], tf.float32),
            tf.TensorSpec([count], tf.bool),
        ),
    )
    return proposals, valid
