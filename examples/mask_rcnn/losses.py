"""Mask R-CNN losses, each returned PER IMAGE (shape ``[B]``).

Every loss is normalized inside its own image (by that image's number of
sampled anchors, sampled ROIs or positive ROIs) and only then averaged over
the images by the model. The usual alternative, normalizing by the count over
the whole batch, weights an image by how many samples the *other* images
contributed, so a sum of micro-batch gradients would not equal the big-batch
gradient. With a mean over images of a per-image loss it does exactly.
"""

import tensorflow as tf


def smooth_l1(x, beta):
    x = tf.abs(x)
    return tf.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def _per_image_mean(values, weights):
    return tf.reduce_sum(values * weights, axis=-1) / tf.maximum(
        tf.reduce_sum(weights, axis=-1), 1.0
    )


def rpn_class_loss(logits, labels, sampled):
    """Binary cross-entropy over the sampled anchors of each image."""
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    return _per_image_mean(ce, sampled)


def rpn_box_loss(deltas, targets, labels, sampled):
    """Smooth L1 on positive anchors, divided by the image's sampled anchors."""
    loss = tf.reduce_sum(smooth_l1(deltas - targets, 1.0 / 9.0), axis=-1) * labels
    return tf.reduce_sum(loss, axis=-1) / tf.maximum(tf.reduce_sum(sampled, axis=-1), 1.0)


def roi_class_loss(logits, labels, valid):
    """Softmax cross-entropy over the sampled ROIs of each image."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return _per_image_mean(ce, tf.cast(valid, tf.float32))


def select_class(values, labels):
    """Pick, along the last axis of ``values [B, K, ..., classes]``, the channel
    of each ROI's (1-based) class; background ROIs (label 0) get zeros."""
    one_hot = tf.one_hot(labels - 1, values.shape[-1], dtype=values.dtype)
    for _ in range(values.shape.rank - 3):
        one_hot = tf.expand_dims(one_hot, 2)
    return tf.reduce_sum(values * one_hot, axis=-1)


def roi_box_loss(deltas, labels, targets, valid):
    """Smooth L1 of the true class's deltas on positive ROIs, per sampled ROI."""
    chosen = select_class(tf.transpose(deltas, [0, 1, 3, 2]), labels)
    loss = tf.reduce_sum(smooth_l1(chosen - targets, 1.0), axis=-1)
    loss *= tf.cast(labels > 0, tf.float32)
    return tf.reduce_sum(loss, axis=-1) / tf.maximum(
        tf.reduce_sum(tf.cast(valid, tf.float32), axis=-1), 1.0
    )


def mask_loss(logits, labels, targets):
    """Per-pixel binary cross-entropy of the true class's mask, mean over
    the positive ROIs of each image (``labels > 0``)."""
    chosen = select_class(logits, labels)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=chosen)
    ce = tf.reduce_mean(ce, axis=[2, 3])
    return _per_image_mean(ce, tf.cast(labels > 0, tf.float32))
