"""Pictures of a detector's predictions: boxes drawn over test images (``kdforge eval --checkpoint RUN --pictures N``
for detection and oriented-detection runs).

Pure drawing (:func:`draw_detections`, and :func:`draw_oriented_detections` for rotated boxes, drawn as their
4-corner polygons) on uint8 images, and :func:`detection_pictures`, which runs a network over the first images of a
loader, post-processes with the task and writes one PNG per image. Ground-truth boxes are drawn thin and white,
predictions in a colour per class with ``name score``; both in the coordinates of the image the network saw (for
``coco_det`` and ``dota``: the letterboxed image).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.errors import WriteError
from kdforge.ops.rotated import rbox_to_poly
from kdforge.tasks.detection import Detections, DetectionTask

#: one colour per class (cycled): the 10 of matplotlib's ``tab10``
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
GT_COLOUR = (255, 255, 255)


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised ``[B, 3, H, W]`` back to uint8 (the inverse of :func:`kdforge.data.augment.normalize`)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x.float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)


def draw_detections(
    image: Tensor,
    detections: Detections,
    classes: Sequence[str],
    gt_boxes: Tensor | None = None,
    score_threshold: float = 0.3,
    scale: int = 1,
) -> Image.Image:
    """Draws the detections scoring at least ``score_threshold`` (and the gt boxes) over ``image``.

    Args:
        image: uint8 ``[3, H, W]``.
        detections: boxes ``[K, 4]`` xyxy pixels of ``image``, scores ``[K]``, labels ``[K]``.
        classes: class names by label.
        gt_boxes: optional ``[G, 4]`` xyxy ground truth, drawn 1 px white.
        score_threshold: smallest drawn score.
        scale: the image is enlarged this many times (nearest) before drawing, so small canvases stay readable.

    Returns:
        An RGB image of ``scale·W × scale·H``.
    """
    arr = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.uint8)
    pic = Image.fromarray(arr, "RGB")
    if scale != 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    if gt_boxes is not None:
        for box in gt_boxes.detach().cpu().double().tolist():
            draw.rectangle([v * scale for v in box], outline=GT_COLOUR, width=1)
    keep = detections.scores >= score_threshold
    boxes = detections.boxes[keep].detach().cpu().double().tolist()
    scores = detections.scores[keep].detach().cpu().tolist()
    labels = detections.labels[keep].detach().cpu().tolist()
    for box, score, label in zip(boxes, scores, labels, strict=True):
        colour = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = classes[label] if label < len(classes) else str(label)
        draw.text((x1 + 2, y1 + 1), f"{name} {score:.2f}", fill=colour)
    return pic


def draw_oriented_detections(
    image: Tensor,
    detections: dict[str, Tensor],
    classes: Sequence[str],
    gt_rboxes: Tensor | None = None,
    score_threshold: float = 0.3,
    scale: int = 1,
) -> Image.Image:
    """Draws rotated detections scoring at least ``score_threshold`` (and the gt boxes) over ``image``, as closed
    polygons through the corners of :func:`kdforge.ops.rotated.rbox_to_poly`.

    Args:
        image: uint8 ``[3, H, W]``.
        detections: ``{"rboxes": [K, 5], "scores": [K], "labels": [K]}`` (pixels of ``image``), as
            :meth:`kdforge.tasks.oriented.OrientedDetectionTask.predict` gives.
        classes: class names by label.
        gt_rboxes: optional ``[G, 5]`` ground truth, drawn 1 px white.
        score_threshold: smallest drawn score.
        scale: the image is enlarged this many times (nearest) before drawing.

    Returns:
        An RGB image of ``scale·W × scale·H``.
    """
    arr = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.uint8)
    pic = Image.fromarray(arr, "RGB")
    if scale != 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pic)

    def corners(rboxes: Tensor) -> list[list[tuple[float, float]]]:
        polys = rbox_to_poly(rboxes.detach().cpu().double()) * scale
        return [[(float(x), float(y)) for x, y in poly] for poly in polys.tolist()]

    if gt_rboxes is not None:
        for poly in corners(gt_rboxes):
            draw.line([*poly, poly[0]], fill=GT_COLOUR, width=1)
    keep = detections["scores"] >= score_threshold
    scores = detections["scores"][keep].detach().cpu().tolist()
    labels = detections["labels"][keep].detach().cpu().tolist()
    for poly, score, label in zip(corners(detections["rboxes"][keep]), scores, labels, strict=True):
        colour = PALETTE[label % len(PALETTE)]
        draw.line([*poly, poly[0]], fill=colour, width=2)
        name = classes[label] if label < len(classes) else str(label)
        x0, y0 = min(p[0] for p in poly), min(p[1] for p in poly)
        draw.text((x0 + 2, y0 + 1), f"{name} {score:.2f}", fill=colour)
    return pic


@torch.no_grad()
def detection_pictures(
    model: nn.Module,
    task: DetectionTask,
    loader: Iterable[Batch],
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | Path,
    count: int,
    score_threshold: float = 0.3,
    scale: int = 4,
) -> list[Path]:
    """Writes ``out_dir/detection_<i>.png`` for the first ``count`` images of ``loader`` (in its order).

    Args:
        model: the detector (put in eval mode here).
        task: its task (post-processing); an oriented-detection task's predictions (dicts of rotated boxes) are
            drawn by :func:`draw_oriented_detections`.
        loader: an evaluation loader yielding batches with ``targets`` (``boxes``, ``labels``; letterboxed datasets:
            the boxes are drawn after multiplying by ``targets["scales"]``; oriented: ``rboxes``, ``labels``).
        classes: class names.
        mean, std: the loader's normalisation.
        out_dir: created if missing.
        count: how many pictures.
        score_threshold: smallest drawn score.
        scale: enlargement of each picture.

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"cannot create the picture folder {out} ({err}); choose a writable place") from None
    model.eval()
    device = next(model.parameters()).device
    written: list[Path] = []
    for batch in loader:
        if len(written) >= count:
            break
        x = batch.input.to(device)
        dets = task.predict(model(x))
        images = denormalize(x, mean, std)
        t = batch.targets if isinstance(batch.targets, dict) else {}
        for i, det in enumerate(dets):
            if len(written) >= count:
                break
            gt = None
            key = "rboxes" if isinstance(det, dict) else "boxes"
            if key in t:
                valid = t["labels"][i] >= 0
                gt = t[key][i][valid].float()
                if "scales" in t:
                    gt = gt * t["scales"][i]
            path = out / f"detection_{len(written):03d}.png"
            if isinstance(det, dict):
                pic = draw_oriented_detections(images[i], det, classes, gt, score_threshold, scale)
            else:
                pic = draw_detections(images[i], det, classes, gt, score_threshold, scale)
            try:
                pic.save(path)
            except OSError as err:
                raise WriteError(f"cannot write {path} ({err}); free space or choose another folder") from None
            written.append(path)
    return written


__all__ = [
    "GT_COLOUR",
    "PALETTE",
    "denormalize",
    "detection_pictures",
    "draw_detections",
    "draw_oriented_detections",
]
