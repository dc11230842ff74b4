"""COCO-style evaluation (box and mask AP) with pycocotools, in memory."""

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from examples.mask_rcnn import shapes
from examples.mask_rcnn.config import CLASS_NAMES

METRIC_NAMES = ("AP", "AP50", "AP75")


def encode_mask(mask):
    """COCO compressed RLE (JSON-ready) of a binary ``[H, W]`` mask."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def xywh(box):
    """``[y1, x1, y2, x2]`` -> COCO ``[x, y, width, height]``."""
    y1, x1, y2, x2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def shapes_annotations(data):
    """COCO annotations (RLE masks, original-pixel boxes) of a data set from ``shapes.py``."""
    annotations = []
    for i, image_id in enumerate(data["image_id"]):
        for k in np.flatnonzero(data["gt_valid"][i]):
            mask = data["gt_masks"][i, k]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": int(data["gt_classes"][i, k]),
                    "bbox": xywh(data["gt_boxes"][i, k]),
                    "segmentation": encode_mask(mask),
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    return annotations


def coco_ground_truth(data, class_names=CLASS_NAMES):
    """A pycocotools ``COCO`` object for a data set from ``shapes.py``."""
    size = data["images"].shape[1]
    annotations = shapes_annotations(data)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": int(i), "height": size, "width": size} for i in data["image_id"]],
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in enumerate(class_names) if c > 0],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def paste_mask(mask, box, image_size, threshold=0.5):
    """Resize a ``[S, S]`` mask (probabilities over ``box``) into the image.

    Bilinear interpolation at every pixel centre inside the box; zero outside.
    ``image_size`` is the side of a square image or ``(height, width)``.
    """
    s = mask.shape[0]
    height, width = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
    y1, x1, y2, x2 = (float(v) for v in box)
    out = np.zeros((height, width), np.uint8)
    if y2 - y1 < 1e-3 or x2 - x1 < 1e-3:
        return out
    rows = np.arange(max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height))
    cols = np.arange(max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width))
    if len(rows) == 0 or len(cols) == 0:
        return out

    def weights(pixels, lo, hi):
        u = np.clip((pixels + 0.5 - lo) / (hi - lo) * s - 0.5, 0, s - 1)
        i0 = np.floor(u).astype(int)
        return i0, np.minimum(i0 + 1, s - 1), u - i0

    r0, r1, wr = weights(rows, y1, y2)
    c0, c1, wc = weights(cols, x1, x2)
    m = (1 - wr)[:, None] * mask[r0] + wr[:, None] * mask[r1]
    m = (1 - wc)[None, :] * m[:, c0] + wc[None, :] * m[:, c1]
    inside_rows = (rows + 0.5 >= y1) & (rows + 0.5 <= y2)
    inside_cols = (cols + 0.5 >= x1) & (cols + 0.5 <= x2)
    m *= inside_rows[:, None] & inside_cols[None, :]
    out[np.ix_(rows, cols)] = m >= threshold
    return out


def detections_to_coco(detections, image_ids, image_size):
    """Model outputs (``predict`` dict of arrays) -> COCO result dicts."""
    results = []
    for i, image_id in enumerate(image_ids):
        for k in np.flatnonzero(detections["valid"][i]):
            box = detections["boxes"][i, k]
            mask = paste_mask(detections["masks"][i, k], box, image_size)
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(detections["classes"][i, k]),
                    "bbox": xywh(box),
                    "score": float(detections["scores"][i, k]),
                    "segmentation": encode_mask(mask),
                }
            )
    return results


def coco_metrics(coco_gt, results):
    """``{"box_AP", "box_AP50", "box_AP75", "mask_AP", ...}`` in [0, 1]."""
    metrics = {f"{kind}_{name}": 0.0 for kind in ("box", "mask") for name in METRIC_NAMES}
    if not results:
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            for name, value in zip(METRIC_NAMES, evaluator.stats[:3]):
                # pycocotools reports -1 when a metric is undefined.
                metrics[f"{kind}_{name}"] = max(float(value), 0.0)
    return metrics


def evaluate_coco(model, data, image_size, batch_size=8, num_visualize=0):
    """Box and mask AP of ``model`` on a COCO data set, against its original JSON.

    Args:
        model: a ``MaskRCNN``.
        data: a ``coco.CocoData`` (the validation set).
        image_size: the model's input size.
        batch_size: images per prediction batch.
        num_visualize: also return the model-space detections of the first
            this many images (for ``visualize.py``).

    Returns:
        ``(metrics, results, first_detections)``: the metrics dict, the COCO
        results (original image ids, category ids and coordinates) and the
        detections of the first ``num_visualize`` images.
    """
    from examples.mask_rcnn import coco

    dataset = coco.make_dataset(data, image_size, 1, batch_size, training=False)
    results, first = [], []
    start = 0
    for batch in dataset:
        detections = {k: np.asarray(v) for k, v in model.predict_on_batch(batch).items()}
        count = len(detections["valid"])
        results += coco.detections_to_results(
            detections, data, range(start, start + count), image_size
        )
        if start < num_visualize:
            first.append(detections)
        start += count
    first = (
        {k: np.concatenate([d[k] for d in first])[:num_visualize] for k in first[0]}
        if first
        else None
    )
    return coco_metrics(coco.ground_truth(data), results), results, first


def predict(model, data, batch_size=8):
    """Run detection on a data set; returns a dict of numpy arrays."""
    return model.predict(shapes.inference_inputs(data), batch_size=batch_size, verbose=0)


def evaluate(model, data, batch_size=8, coco_gt=None, detections=None):
    """Box and mask AP of ``model`` on ``data`` (a dict from ``shapes.py``)."""
    coco_gt = coco_gt or coco_ground_truth(data)
    if detections is None:
        detections = predict(model, data, batch_size)
    results = detections_to_coco(detections, data["image_id"], data["images"].shape[1])
    return coco_metrics(coco_gt, results)
