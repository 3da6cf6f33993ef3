"""Training loss: cross-entropy + Lovász-softmax (PTv3's outdoor recipe), ignored points left out.

Ignored voxels (label ``IGNORE_INDEX`` = -1) are masked rather than selected:
cross-entropy skips them through ``ignore_index`` and the Lovász term gives them
zero error (see :func:`lovasz_softmax`), so the loss needs no host sync for the
number of labelled voxels and equals the loss over the labelled voxels alone.

Lovász-softmax (Berman, Rannen Triki and Blaschko, CVPR 2018) is the convex
Lovász extension of the Jaccard loss 1 - IoU_c, evaluated at the per-point
errors e_i = |[y_i = c] - p_ic|: sort the errors in decreasing order, take the
discrete derivative of the Jaccard loss along that order, and dot the two.
It is averaged over the classes present in the labelled points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scalept.data.semantickitti import IGNORE_INDEX


def lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Derivative of the Jaccard loss along the sorted order, one row per class.

    ``fg_sorted`` (C, N) is 1 where the point (in decreasing-error order of that
    row) belongs to the class. After the first k points, the Jaccard loss is
    1 - (|fg| - fg among the first k) / (|fg| + non-fg among the first k).
    """
    total = fg_sorted.sum(1, keepdim=True)
    fg_seen = fg_sorted.cumsum(1)
    positions = torch.arange(1, fg_sorted.shape[1] + 1, device=fg_sorted.device, dtype=fg_sorted.dtype)
    jaccard = 1.0 - (total - fg_seen) / (total + positions - fg_seen)  # non-fg seen = k - fg seen
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Lovász-softmax of (N, C) class probabilities against (N,) labels.

    Averaged over the classes present among the labelled points; 0 for no labelled
    point. Points outside ``labelled`` (a bool mask, default: all) get error 0: they
    sort behind every point with a positive error, so they change neither the terms
    nor the gradient, and no boolean selection (a host sync for its size) is needed.
    Works class-major ((C, N), contiguous rows), so the sort and the running sums run
    along memory.
    """
    num_classes = probs.shape[1]
    classes = torch.arange(num_classes, device=labels.device)
    fg = (labels.unsqueeze(0) == classes.unsqueeze(1)).to(probs.dtype)  # (C, N); ignored labels match no class
    errors = (fg - probs.t()).abs()
    if labelled is not None:
        errors = errors * labelled.to(errors.dtype)
    present = fg.sum(1) > 0
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    with torch.no_grad():
        grad = lovasz_grad(fg.gather(1, perm))
    per_class = (errors_sorted * grad).sum(1)
    return (per_class * present).sum() / present.sum().clamp(min=1)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, lovasz_weight: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``CE + lovasz_weight * Lovász`` over the labelled voxels; also returns the terms (detached).

    Computed in float32 whatever the autocast dtype of ``logits``, without a host
    sync (ignored voxels are masked, not selected). With no labelled voxel the loss
    is a zero that still depends on every logit, so a DDP backward sees the same
    graph on every rank.
    """
    logits = logits.float()
    labelled = labels != IGNORE_INDEX
    count = labelled.sum().clamp(min=1)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    loss = ce
    parts = {"ce": ce.detach()}
    if lovasz_weight:
        lovasz = lovasz_softmax(logits.softmax(dim=1), labels, labelled)
        loss = loss + lovasz_weight * lovasz
        parts["lovasz"] = lovasz.detach()
    return loss, parts
