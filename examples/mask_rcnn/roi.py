"""Second stage plumbing: ROI sampling with targets, and multi-level ROIAlign."""

import collections

import tensorflow as tf

from examples.mask_rcnn import boxes as box_ops
from examples.mask_rcnn.sampling import per_image_uniform, random_subset

# Regression targets of the box head are scaled as in Detectron.
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

SampledRois = collections.namedtuple(
    "SampledRois", ["boxes", "valid", "labels", "box_targets", "matched_gt"]
)


def sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, seeds, config):
    """Pick ``rois_per_image`` training ROIs per image and their targets.

    The ground-truth boxes are added to the candidates (a standard trick that
    guarantees positives early in training). At most
    ``positive_rois_per_image`` positives (IoU >= 0.5 with a ground-truth box)
    are chosen at random, the rest are random negatives. Positives always
    come first, so ``boxes[:, :positive_rois_per_image]`` holds every
    positive ROI; the mask head only looks at those slots.
    """
    candidates = tf.concat([proposals, gt_boxes], axis=1)
    candidate_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    iou = box_ops.pairwise_iou(candidates, gt_boxes)
    iou = tf.where(gt_valid[:, None, :], iou, -1.0)
    max_iou = tf.reduce_max(iou, axis=2)
    matched = tf.argmax(iou, axis=2, output_type=tf.int32)
    foreground = candidate_valid & (max_iou >= config.roi_positive_iou)
    background = candidate_valid & (max_iou < config.roi_positive_iou)

    noise = per_image_uniform(seeds, [2, candidates.shape[1]])
    chosen_fg = random_subset(foreground, config.positive_rois_per_image, noise[:, 0])
    # Rank: chosen positives (2..3), then random negatives (1..2), else invalid.
    priority = tf.where(chosen_fg, 2.0 + noise[:, 1], tf.where(background, 1.0 + noise[:, 1], -1.0))
    top = tf.math.top_k(priority, k=config.rois_per_image)
    valid = top.values >= 1.0
    is_fg = top.values >= 2.0

    rois = tf.gather(candidates, top.indices, batch_dims=1)
    matched_gt = tf.gather(matched, top.indices, batch_dims=1)
    labels = tf.where(is_fg, tf.gather(gt_classes, matched_gt, batch_dims=1), 0)
    targets = box_ops.encode(tf.gather(gt_boxes, matched_gt, batch_dims=1), rois, BOX_HEAD_WEIGHTS)
    return SampledRois(tf.stop_gradient(rois), valid, labels, targets, matched_gt)


def _bin_centre_boxes(boxes, stride, feature_size, output_size):
    """Normalized boxes for ``crop_and_resize`` that sample ROI bin centres.

    ``crop_and_resize`` samples an evenly spaced grid from the first to the
    last normalized coordinate, so shrinking the box by half a bin puts the
    samples at bin centres (ROIAlign with one sample per bin). Feature cell
    ``i`` of a map with ``stride`` has its centre at image pixel
    ``(i + 0.5) * stride``.
    """
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    half_h = 0.5 * (y2 - y1) / output_size
    half_w = 0.5 * (x2 - x1) / output_size

    def to_normalized(v):
        return (v / stride - 0.5) / float(feature_size - 1)

    return tf.stack(
        [
            to_normalized(y1 + half_h),
            to_normalized(x1 + half_w),
            to_normalized(y2 - half_h),
            to_normalized(x2 - half_w),
        ],
        axis=-1,
    )


def roi_align(features, boxes, output_size, config):
    """Pool ``[B, K, 4]`` boxes from the FPN level that suits their size.

    A box of side ``roi_canonical_size`` is pooled from P3; each factor of 2
    larger (smaller) moves one level up (down). Returns
    ``[B, K, output_size, output_size, channels]``.
    """
    batch, k = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat = tf.reshape(boxes, [-1, 4])
    box_indices = tf.repeat(tf.range(batch), k)
    side = tf.sqrt(tf.maximum(box_ops.box_area(flat), 1e-6))
    level = tf.floor(1.0 + tf.math.log(side / config.roi_canonical_size) / tf.math.log(2.0))
    level = tf.cast(tf.clip_by_value(level, 0, len(features) - 1), tf.int32)

    pooled = 0.0
    for i, (feature, stride) in enumerate(zip(features, config.anchor_strides)):
        crop = tf.image.crop_and_resize(
            feature,
            _bin_centre_boxes(flat, stride, feature.shape[1], output_size),
            box_indices,
            [output_size, output_size],
        )
        pooled += crop * tf.cast(level == i, crop.dtype)[:, None, None, None]
    channels = features[0].shape[-1]
    return tf.reshape(pooled, [batch, k, output_size, output_size, channels])


def mask_targets(gt_masks, rois, matched_gt, mask_size):
    """Ground-truth masks cropped to ``rois [B, K, 4]``: ``[B, K, S, S]`` in {0, 1}."""
    batch, num_gt = tf.shape(gt_masks)[0], tf.shape(gt_masks)[1]
    height = gt_masks.shape[2]
    masks = tf.cast(tf.reshape(gt_masks, [-1, height, gt_masks.shape[3], 1]), tf.float32)
    k = tf.shape(rois)[1]
    indices = tf.reshape(tf.range(batch)[:, None] * num_gt + matched_gt, [-1])
    crops = tf.image.crop_and_resize(
        masks,
        _bin_centre_boxes(tf.reshape(rois, [-1, 4]), 1, height, mask_size),
        indices,
        [mask_size, mask_size],
    )
    crops = tf.reshape(crops, [batch, k, mask_size, mask_size])
    return tf.stop_gradient(tf.cast(crops >= 0.5, tf.float32))
