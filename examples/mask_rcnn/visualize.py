"""Draw predicted masks and boxes on validation images (matplotlib, Agg)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from examples.mask_rcnn.config import CLASS_NAMES
from examples.mask_rcnn.evaluate import paste_mask

COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200]]) / 255.0


def save_predictions(
    data, detections, path, num_images=8, min_score=0.5, columns=4, class_names=CLASS_NAMES
):
    """Ground truth (top row of each pair) and predictions side by side."""
    size = data["images"].shape[1]
    num_images = min(num_images, len(data["images"]))
    rows = 2 * int(np.ceil(num_images / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.1 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(num_images):
        r, c = 2 * (i // columns), i % columns
        gt = [
            (data["gt_boxes"][i, k], data["gt_classes"][i, k], data["gt_masks"][i, k], None)
            for k in np.flatnonzero(data["gt_valid"][i])
        ]
        pred = [
            (
                detections["boxes"][i, k],
                detections["classes"][i, k],
                paste_mask(detections["masks"][i, k], detections["boxes"][i, k], size),
                detections["scores"][i, k],
            )
            for k in np.flatnonzero(detections["valid"][i])
            if detections["scores"][i, k] >= min_score
        ]
        title = f"ground truth (image id {data['image_id'][i]})"
        _draw(axes[r, c], data["images"][i], gt, title, class_names)
        _draw(
            axes[r + 1, c], data["images"][i], pred, f"prediction (score>={min_score})", class_names
        )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _colour(cls):
    # The shapes' three colours, then a fixed pseudo-random colour per class.
    if cls < len(COLOURS):
        return COLOURS[cls]
    return np.random.default_rng(cls).uniform(0.2, 1.0, 3)


def _draw(ax, image, instances, title, class_names):
    overlay = image.astype(np.float32) / 255.0
    for _, cls, mask, _ in instances:
        m = mask.astype(bool)
        overlay[m] = 0.45 * overlay[m] + 0.55 * _colour(cls)
    ax.imshow(overlay, interpolation="nearest")
    for box, cls, _, score in instances:
        y1, x1, y2, x2 = box
        ax.add_patch(
            plt.Rectangle(
                (x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color=_colour(cls), lw=1.2
            )
        )
        name = class_names[cls] if cls < len(class_names) else str(cls)
        label = name if score is None else f"{name} {score:.2f}"
        ax.text(x1, y1 - 1, label, color="white", fontsize=5, backgroundcolor=_colour(cls))
    ax.set_title(title, fontsize=6)
