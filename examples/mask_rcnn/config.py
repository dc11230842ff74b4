"""All sizes and hyper-parameters of the example in one place."""

import dataclasses

CLASS_NAMES = ("background", "square", "circle", "triangle")


@dataclasses.dataclass(frozen=True)
class Config:
    # Data.
    image_size: int = 64
    max_instances: int = 4  # ground truth is padded to this many per image
    num_classes: int = 3  # foreground classes; class 0 is background

    # Backbone (stem + three stages, strides 2, 4, 8, 16) and FPN.
    backbone_widths: tuple = (16, 32, 64, 128)
    fpn_channels: int = 32
    groups: int = 8  # GroupNormalization groups

    # Anchors: one size per FPN level (P2, P3, P4 at strides 4, 8, 16).
    anchor_strides: tuple = (4, 8, 16)
    anchor_sizes: tuple = (8, 16, 32)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)

    # RPN training targets.
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_samples_per_image: int = 64
    rpn_positive_fraction: float = 0.5

    # Proposals.
    pre_nms_top_k: int = 256
    rpn_nms_iou: float = 0.7
    train_proposals: int = 64
    test_proposals: int = 48

    # Second stage training targets.
    rois_per_image: int = 32
    roi_positive_fraction: float = 0.25
    roi_positive_iou: float = 0.5

    # Heads.
    box_pool_size: int = 7
    mask_pool_size: int = 14  # the mask head upsamples this 2x
    head_dim: int = 128
    mask_channels: int = 32
    mask_convs: int = 2
    roi_canonical_size: float = 16.0  # boxes of this size are pooled from P3

    # Detection (inference).
    max_detections: int = 16
    detection_nms_iou: float = 0.5
    detection_min_score: float = 0.05

    @property
    def num_anchors_per_location(self):
        return len(self.anchor_ratios)

    @property
    def positive_rois_per_image(self):
        return int(self.rois_per_image * self.roi_positive_fraction)

    @property
    def mask_size(self):
        return 2 * self.mask_pool_size

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# A deliberately tiny configuration for the tests.
TINY = Config(
    image_size=32,
    max_instances=3,
    backbone_widths=(8, 8, 16, 16),
    fpn_channels=16,
    groups=4,
    anchor_sizes=(6, 12, 24),
    rpn_samples_per_image=32,
    pre_nms_top_k=64,
    train_proposals=16,
    test_proposals=16,
    rois_per_image=16,
    box_pool_size=4,
    mask_pool_size=7,
    head_dim=32,
    mask_channels=8,
    mask_convs=1,
    roi_canonical_size=8.0,
    max_detections=8,
)
