"""Cross-entropy + Lovász-softmax: ignored labels left out, Lovász exact on hand-computed cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalept.losses import lovasz_softmax, segmentation_loss


def test_lovasz_is_zero_for_perfect_predictions():
    labels = torch.tensor([0, 2, 1, 2, 0])
    probs = F.one_hot(labels, 4).float()
    assert lovasz_softmax(probs, labels).item() == 0.0


def test_lovasz_matches_a_hand_computed_case():
    # Two points, two classes; p(class 0) = 0.8 and 0.4, labels (0, 1).
    # Class 0: errors |1-0.8| = 0.2 (fg), |0-0.4| = 0.4 (bg); sorted: 0.4 (bg), 0.2 (fg).
    #   Jaccard loss after k points: k=1: 1 - 1/2 = 0.5; k=2: 1 - 0/2 = 1 -> grads 0.5, 0.5
    #   loss_0 = 0.4 * 0.5 + 0.2 * 0.5 = 0.3
    # Class 1: p = 0.2, 0.6; errors |0-0.2| = 0.2 (bg), |1-0.6| = 0.4 (fg); sorted: 0.4 (fg), 0.2 (bg).
    #   k=1: 1 - 0/1 = 1; k=2: 1 - 0/2 = 1 -> grads 1, 0 -> loss_1 = 0.4
    # mean over present classes = 0.35
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    labels = torch.tensor([0, 1])
    assert lovasz_softmax(probs, labels).item() == pytest.approx(0.35)
    # A class absent from the labels does not count: only class 0 present -> errors 0.2, 0.6
    # (both fg); sorted 0.6, 0.2; Jaccard: k=1: 1 - 1/2 = 0.5, k=2: 1 -> grads 0.5, 0.5 -> 0.4
    assert lovasz_softmax(probs, torch.tensor([0, 0])).item() == pytest.approx(0.4)


def test_ignored_labels_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(50, 19)
    labels = torch.randint(0, 19, (50,))
    ignored = torch.rand(50) < 0.3
    masked = labels.clone()
    masked[ignored] = -1
    full_loss, parts = segmentation_loss(logits, masked)
    kept = ~ignored
    expected_ce = F.cross_entropy(logits[kept], labels[kept])
    expected_lovasz = lovasz_softmax(logits[kept].softmax(1), labels[kept])
    assert parts["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert parts["lovasz"].item() == pytest.approx(expected_lovasz.item(), rel=1e-6)
    assert full_loss.item() == pytest.approx((expected_ce + expected_lovasz).item(), rel=1e-6)
    # the ignored rows get no gradient at all
    logits.requires_grad_(True)
    segmentation_loss(logits, masked)[0].backward()
    assert logits.grad[ignored].abs().max().item() == 0.0
    assert logits.grad[kept].abs().max().item() > 0.0
    # and the labelled rows get the gradient of the loss over the labelled rows alone
    selected = logits.detach()[kept].clone().requires_grad_(True)
    (F.cross_entropy(selected, labels[kept]) + lovasz_softmax(selected.softmax(1), labels[kept])).backward()
    torch.testing.assert_close(logits.grad[kept], selected.grad, rtol=1e-5, atol=1e-7)


def test_all_ignored_gives_a_zero_loss_that_backpropagates():
    logits = torch.randn(7, 19, requires_grad=True)
    loss, _ = segmentation_loss(logits, torch.full((7,), -1))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_lovasz_weight_zero_is_plain_cross_entropy():
    logits, labels = torch.randn(20, 5), torch.randint(0, 5, (20,))
    loss, parts = segmentation_loss(logits, labels, lovasz_weight=0.0)
    assert "lovasz" not in parts
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item())
