"""Segmentation scores: one confusion matrix summed over a split, IoU per class, mIoU (docs/architecture.md),
and their report: the per-class table of iou.md and the confusion-matrix PNG."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from scalept.atomic import atomic_path
from scalept.data.semantickitti import CLASS_NAMES, IGNORE_INDEX


def confusion_matrix(pred, target, num_classes: int):
    """(C, C) counts, rows = ground truth, columns = prediction; ignored ground truth is not counted.

    Accepts numpy arrays or torch tensors (on any device) and returns the same kind,
    int64, so training can accumulate on the GPU and reduce across ranks.
    """
    if isinstance(pred, torch.Tensor):
        valid = target != IGNORE_INDEX
        index = target[valid].long() * num_classes + pred[valid].long()
        return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
    pred, target = np.asarray(pred), np.asarray(target)
    valid = target != IGNORE_INDEX
    index = target[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion, missed=None) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN); NaN for a class absent from both prediction and ground truth.

    ``missed`` (C,) counts labelled points that got no prediction at all (a frame with no point
    inside the range crop): false negatives of their class that no column of ``confusion`` holds.
    """
    cm = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    if missed is not None:
        union = union + np.asarray(missed, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion, missed=None) -> float:
    """The official mIoU (SemanticKITTI's evaluator, Pointcept): the mean over every class, a class
    that occurs in neither prediction nor ground truth counting 0."""
    iou = iou_per_class(confusion, missed)
    return float(np.nan_to_num(iou, nan=0.0).mean()) if np.isfinite(iou).any() else 0.0


def mean_iou_present(confusion, missed=None) -> float:
    """The mean IoU over the classes that occur in the prediction or the ground truth only: higher
    than :func:`mean_iou` when classes are absent (a small or synthetic split); reported beside it."""
    iou = iou_per_class(confusion, missed)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def accuracy(confusion, missed=None) -> float:
    cm = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion)
    total = cm.sum() + (0 if missed is None else int(np.sum(missed)))
    return float(np.trace(cm) / total) if total else 0.0


def iou_table(iou: np.ndarray, miou: float, acc: float, miou_present: float | None = None) -> str:
    """The per-class IoU as a markdown table (percent; '-' for a class absent from both sides)."""
    lines = ["| class | IoU (%) |", "|---|---:|"]
    lines += [f"| {name} | {'-' if np.isnan(v) else f'{100 * v:.2f}'} |" for name, v in zip(CLASS_NAMES, iou)]
    lines += [f"| **mIoU** (all {len(iou)} classes, '-' counts 0) | **{100 * miou:.2f}** |"]
    if miou_present is not None:
        lines += [f"| mIoU over the {int(np.isfinite(iou).sum())} classes present | {100 * miou_present:.2f} |"]
    lines += [f"| accuracy | {100 * acc:.2f} |"]
    return "\n".join(lines) + "\n"


def save_confusion_png(path: Path, confusion: np.ndarray, title: str) -> None:
    """Row-normalised confusion matrix (rows ground truth) as a PNG, with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=(9, 8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(normalised, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=90, fontsize=7)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the ground-truth row")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
