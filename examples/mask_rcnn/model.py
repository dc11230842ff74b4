"""The Mask R-CNN model: stages wired together, losses, and detection.

Training goes through plain ``model.fit()``. The model overrides only
``call`` and ``compute_loss``; ``accum_keras.AccumulatingModel`` (first in
the bases) owns ``train_step`` and turns ``accumulation_steps`` micro-batches
into one optimizer update. That is exact because ``compute_loss`` returns the
mean over the images of a per-image loss and nothing an image computes
depends on the other images of its batch (see README.md).
"""

import keras
import tensorflow as tf

import accum_keras
from examples.mask_rcnn import boxes as box_ops
from examples.mask_rcnn import losses
from examples.mask_rcnn.backbone import FPN, Backbone, ResNet50Backbone
from examples.mask_rcnn.config import Config
from examples.mask_rcnn.heads import BoxHead, MaskHead
from examples.mask_rcnn.roi import BOX_HEAD_WEIGHTS, mask_targets, roi_align, sample_rois
from examples.mask_rcnn.rpn import RPNHead, anchor_targets, generate_proposals, rpn_noise
from examples.mask_rcnn.sampling import ROI_SALT, RPN_SALT, image_seeds

LOSS_NAMES = ("rpn_class_loss", "rpn_box_loss", "class_loss", "box_loss", "mask_loss")


class MaskRCNN(accum_keras.AccumulatingModel, keras.Model):
    """Mask R-CNN with FPN on a small GroupNorm backbone or a ResNet-50.

    ``inputs`` is a dict (see ``shapes.py``): ``images`` (uint8
    ``[B, H, W, 3]``) and ``image_id`` always; for training also the padded
    ground truth ``gt_boxes``, ``gt_classes``, ``gt_masks``, ``gt_valid``.

    ``call(training=True)`` returns predictions together with the targets
    they are trained towards (sampling needs the current proposals, so the
    targets are part of the forward pass); ``call(training=False)`` returns
    detections: ``boxes``, ``scores``, ``classes``, ``masks`` (probabilities
    in the box, ``[B, D, S, S]``) and ``valid``.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(**kwargs)
        self.config = c = config or Config()
        if c.backbone == "resnet50":
            self.backbone = ResNet50Backbone(c.image_size, c.backbone_weights, name="backbone")
        else:
            self.backbone = Backbone(c.backbone_widths, c.groups, name="backbone")
        self.fpn = FPN(c.fpn_channels, len(c.anchor_strides), name="fpn")
        self.rpn_head = RPNHead(c.fpn_channels, c.num_anchors_per_location, name="rpn")
        self.box_head = BoxHead(c.head_dim, c.num_classes, name="box_head")
        self.mask_head = MaskHead(c.mask_channels, c.mask_convs, c.num_classes, name="mask_head")
        self.anchors = tf.constant(
            box_ops.generate_anchors(
                c.image_size, c.anchor_strides, c.anchor_sizes, c.anchor_ratios
            )
        )
        self.loss_trackers = [keras.metrics.Mean(name) for name in LOSS_NAMES]
        self.build()

    def build(self, input_shape=None):
        """Create all weights by running detection on one blank image."""
        s = self.config.image_size
        blank = {"images": tf.zeros([1, s, s, 3], tf.uint8), "image_id": tf.zeros([1], tf.int32)}
        self.call(blank, training=False)
        self.built = True

    # ------------------------------------------------------------------ call
    def call(self, inputs, training=False):
        features = self.fpn(self.backbone(inputs["images"]))
        rpn_logits, rpn_deltas = self.rpn_head(features)
        if training:
            return self._training_outputs(inputs, features, rpn_logits, rpn_deltas)
        return self.detect(features, rpn_logits, rpn_deltas)

    def _sampling_step(self):
        # The optimizer step is the same for all micro-batches of one
        # accumulated update and for the equivalent big batch.
        if getattr(self, "optimizer", None) is None:
            return tf.constant(0)
        return self.optimizer.iterations

    def _training_outputs(self, inputs, features, rpn_logits, rpn_deltas):
        c = self.config
        gt_boxes, gt_classes = inputs["gt_boxes"], tf.cast(inputs["gt_classes"], tf.int32)
        gt_valid = tf.cast(inputs["gt_valid"], tf.bool)
        step = self._sampling_step()

        # RPN targets: per-image seeded anchor sampling.
        rpn_seeds = image_seeds(inputs["image_id"], step, RPN_SALT)
        rpn_labels, rpn_sampled, rpn_targets = anchor_targets(
            self.anchors, gt_boxes, gt_valid, rpn_noise(rpn_seeds, self.anchors.shape[0]), c
        )

        # Proposals, then per-image seeded ROI sampling.
        proposals, proposal_valid = generate_proposals(
            self.anchors, rpn_logits, rpn_deltas, c.train_proposals, c
        )
        roi_seeds = image_seeds(inputs["image_id"], step, ROI_SALT)
        rois = sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, roi_seeds, c)

        # Box head on all sampled ROIs, mask head on the positive slots only.
        class_logits, box_deltas = self.box_head(
            roi_align(features, rois.boxes, c.box_pool_size, c)
        )
        num_pos = c.positive_rois_per_image
        positive_rois = rois.boxes[:, :num_pos]
        mask_logits = self.mask_head(roi_align(features, positive_rois, c.mask_pool_size, c))
        return {
            "rpn_logits": rpn_logits,
            "rpn_deltas": rpn_deltas,
            "rpn_labels": rpn_labels,
            "rpn_sampled": rpn_sampled,
            "rpn_box_targets": rpn_targets,
            "class_logits": class_logits,
            "box_deltas": box_deltas,
            "roi_labels": rois.labels,
            "roi_valid": rois.valid,
            "roi_box_targets": rois.box_targets,
            "mask_logits": mask_logits,
            "mask_labels": rois.labels[:, :num_pos],
            "mask_targets": mask_targets(
                inputs["gt_masks"], positive_rois, rois.matched_gt[:, :num_pos], c.mask_size
            ),
        }

    # ------------------------------------------------------------------ loss
    def per_image_losses(self, out):
        """Dict of the five losses, each ``[B]`` (one value per image)."""
        return {
            "rpn_class_loss": losses.rpn_class_loss(
                out["rpn_logits"], out["rpn_labels"], out["rpn_sampled"]
            ),
            "rpn_box_loss": losses.rpn_box_loss(
                out["rpn_deltas"], out["rpn_box_targets"], out["rpn_labels"], out["rpn_sampled"]
            ),
            "class_loss": losses.roi_class_loss(
                out["class_logits"], out["roi_labels"], out["roi_valid"]
            ),
            "box_loss": losses.roi_box_loss(
                out["box_deltas"], out["roi_labels"], out["roi_box_targets"], out["roi_valid"]
            ),
            "mask_loss": losses.mask_loss(
                out["mask_logits"], out["mask_labels"], out["mask_targets"]
            ),
        }

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Mean over the images of the sum of the per-image losses."""
        if not isinstance(y_pred, dict) or "rpn_logits" not in y_pred:
            return tf.constant(0.0)  # inference outputs carry no targets
        per_image = self.per_image_losses(y_pred)
        for tracker in self.loss_trackers:
            tracker.update_state(per_image[tracker.name])
        return tf.reduce_mean(tf.add_n(list(per_image.values())))

    # ------------------------------------------------------------- inference
    def detect(self, features, rpn_logits, rpn_deltas):
        c = self.config
        proposals, valid = generate_proposals(
            self.anchors, rpn_logits, rpn_deltas, c.test_proposals, c
        )
        class_logits, box_deltas = self.box_head(roi_align(features, proposals, c.box_pool_size, c))
        probs = tf.nn.softmax(class_logits)[..., 1:] * tf.cast(valid, tf.float32)[..., None]
        boxes = box_ops.decode(box_deltas, proposals[:, :, None, :], BOX_HEAD_WEIGHTS)
        boxes = box_ops.clip_to_image(boxes, c.image_size)

        # Every (proposal, class) pair is a candidate; class-aware NMS per
        # image by shifting each class's boxes to a region of its own.
        batch = tf.shape(boxes)[0]
        boxes = tf.reshape(boxes, [batch, -1, 4])
        scores = tf.reshape(probs, [batch, -1])
        classes = tf.tile(tf.range(1, c.num_classes + 1), [c.test_proposals])
        shift = tf.cast(classes, tf.float32)[:, None] * (c.image_size + 1.0)
        d = c.max_detections

        def nms_one_image(args):
            image_boxes, image_scores = args
            keep = tf.image.non_max_suppression(
                image_boxes + shift,
                image_scores,
                d,
                c.detection_nms_iou,
                score_threshold=c.detection_min_score,
            )
            n = tf.shape(keep)[0]
            keep = tf.pad(keep, [[0, d - n]])
            return keep, tf.range(d) < n

        keep, det_valid = tf.map_fn(
            nms_one_image,
            (boxes, scores),
            fn_output_signature=(tf.TensorSpec([d], tf.int32), tf.TensorSpec([d], tf.bool)),
        )
        det_boxes = tf.gather(boxes, keep, batch_dims=1)
        det_scores = tf.gather(scores, keep, batch_dims=1) * tf.cast(det_valid, tf.float32)
        det_classes = tf.gather(classes, keep) * tf.cast(det_valid, tf.int32)

        mask_logits = self.mask_head(roi_align(features, det_boxes, c.mask_pool_size, c))
        masks = tf.sigmoid(losses.select_class(mask_logits, det_classes))
        return {
            "boxes": det_boxes,
            "scores": det_scores,
            "classes": det_classes,
            "masks": masks,
            "valid": det_valid,
        }
