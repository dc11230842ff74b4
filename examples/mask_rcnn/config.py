"""All sizes and hyper-parameters of the example in one place."""

import dataclasses

CLASS_NAMES = ("background", "square", "circle", "triangle")


@dataclasses.dataclass(frozen=True)
class Config:
    # Data.
    image_size: int = 64
    max_instances: int = 4  # ground truth is padded to this many per image
    num_classes: int = 3  # foreground classes; class 0 is background

    # Backbone and FPN. "small": stem + three stages with GroupNorm (strides
    # 2, 4, 8, 16; C2-C4). "resnet50": keras.applications.ResNet50 with frozen
    # BatchNorm (C2-C5), optionally initialized from ``backbone_weights``.
    backbone: str = "small"
    backbone_weights: str | None = None  # a Keras ResNet50 "notop" weights file
    backbone_widths: tuple = (16, 32, 64, 128)
    fpn_channels: int = 32
    groups: int = 8  # GroupNormalization groups

    # Anchors: one size per FPN level (P2, P3, P4 at strides 4, 8, 16); the
    # number of strides is the number of FPN levels.
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


# What ``--backbone resnet50`` changes: the sizes of the original Mask R-CNN
# (FPN with 256 channels, 2 x 1024 box head, 4-conv mask head, 256 anchors and
# 128 ROIs sampled per image, 100 detections for COCO evaluation), over P2-P5.
RESNET50_CHANGES = dict(
    backbone="resnet50",
    anchor_strides=(4, 8, 16, 32),
    fpn_channels=256,
    head_dim=1024,
    mask_channels=256,
    mask_convs=4,
    rpn_samples_per_image=256,
    rois_per_image=128,
    pre_nms_top_k=2000,
    train_proposals=512,
    test_proposals=300,
    max_detections=100,
)
BACKBONES = ("small", "resnet50")


def anchor_sizes_for(image_size, strides):
    """One anchor size per level, growing with the image size.

    ``2 x stride`` at 64 px (the shapes default), growing linearly with the
    image up to ``8 x stride`` (the FPN paper's 32, 64, ... px) at 256 px and
    above, so that anchors cover objects of a fixed fraction of the image.
    """
    factor = min(2.0 * image_size / 64.0, 8.0)
    return tuple(max(int(round(stride * factor)), 2) for stride in strides)


def configure(
    base, image_size=None, backbone=None, backbone_weights=None, num_classes=None,
    max_instances=None,
):  # fmt: skip
    """``base`` with the given changes, and whatever they imply.

    A new image size rescales the anchors and the ROI level assignment; the
    ResNet-50 backbone brings the sizes of the original Mask R-CNN. Raises
    ``ValueError`` naming the flag when a value cannot work.
    """
    config = base
    if backbone not in (None, *BACKBONES):
        raise ValueError(f"--backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone == "resnet50" and config.backbone != "resnet50":
        config = config.replace(**RESNET50_CHANGES)
    if backbone_weights is not None:
        if config.backbone != "resnet50":
            raise ValueError("--backbone-weights needs --backbone resnet50")
        config = config.replace(backbone_weights=str(backbone_weights))
    size = config.image_size if image_size is None else int(image_size)
    multiple = config.anchor_strides[-1]  # every FPN level exactly half the one below
    smallest = 64 if config.backbone == "resnet50" else 32
    if size < smallest or size % multiple:
        raise ValueError(
            f"--image-size must be a multiple of {multiple} and at least {smallest} for the "
            f"{config.backbone} backbone, got {size}"
        )
    if size != base.image_size or config.anchor_strides != base.anchor_strides:
        sizes = anchor_sizes_for(size, config.anchor_strides)
        config = config.replace(
            image_size=size, anchor_sizes=sizes, roi_canonical_size=2.0 * sizes[0]
        )
    if num_classes is not None:
        config = config.replace(num_classes=int(num_classes))
    if max_instances is not None:
        config = config.replace(max_instances=max(int(max_instances), 1))
    # Never ask for more candidates than there are anchors (tiny images).
    num_anchors = sum((size // s) ** 2 for s in config.anchor_strides) * len(config.anchor_ratios)
    top_k = min(config.pre_nms_top_k, num_anchors)
    return config.replace(
        pre_nms_top_k=top_k,
        train_proposals=min(config.train_proposals, top_k),
        test_proposals=min(config.test_proposals, top_k),
    )


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
