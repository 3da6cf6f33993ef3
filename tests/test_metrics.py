"""mIoU, IoU per class and accuracy against a confusion matrix worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scalept.metrics import accuracy, confusion_matrix, iou_per_class, mean_iou, mean_iou_present

# Nine points, three classes; the last two have ignored ground truth (-1) and are not counted.
TARGET = [0, 0, 0, 1, 1, 2, 2, -1, -1]
PRED = [0, 0, 1, 1, 2, 2, 2, 0, 1]
# Rows are ground truth, columns prediction:
#   gt 0: predicted 0, 0, 1  -> [2, 1, 0]
#   gt 1: predicted 1, 2     -> [0, 1, 1]
#   gt 2: predicted 2, 2     -> [0, 0, 2]
EXPECTED_CONFUSION = [[2, 1, 0],
                      [0, 1, 1],
                      [0, 0, 2]]
# IoU_c = TP / (TP + FP + FN), FP = column sum - TP, FN = row sum - TP:
#   class 0: TP 2, FP 0 (column 2 - 2), FN 1 (row 3 - 2) -> 2 / 3
#   class 1: TP 1, FP 1 (column 2 - 1), FN 1 (row 2 - 1) -> 1 / 3
#   class 2: TP 2, FP 1 (column 3 - 2), FN 0 (row 2 - 2) -> 2 / 3
EXPECTED_IOU = [2 / 3, 1 / 3, 2 / 3]
EXPECTED_MIOU = (2 / 3 + 1 / 3 + 2 / 3) / 3  # = 5 / 9 = 0.5556
EXPECTED_ACCURACY = (2 + 1 + 2) / 7  # trace / counted points = 5 / 7


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_confusion_matrix_and_scores_match_the_hand_computation(kind):
    if kind == "numpy":
        cm = confusion_matrix(np.array(PRED), np.array(TARGET), 3)
        assert isinstance(cm, np.ndarray)
    else:
        cm = confusion_matrix(torch.tensor(PRED), torch.tensor(TARGET), 3)
        assert isinstance(cm, torch.Tensor)
    assert np.asarray(cm).tolist() == EXPECTED_CONFUSION
    np.testing.assert_allclose(iou_per_class(cm), EXPECTED_IOU)
    assert mean_iou(cm) == pytest.approx(EXPECTED_MIOU)
    assert mean_iou(cm) == pytest.approx(5 / 9)
    assert accuracy(cm) == pytest.approx(EXPECTED_ACCURACY)


def test_an_absent_class_counts_zero_in_the_official_mean_and_is_left_out_of_the_present_one():
    # 4 classes: class 3 occurs in neither ground truth nor prediction -> NaN IoU.
    cm = confusion_matrix(np.array(PRED), np.array(TARGET), 4)
    iou = iou_per_class(cm)
    assert np.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((2 / 3 + 1 / 3 + 2 / 3 + 0) / 4)  # = 5 / 12, as semantic-kitti-api
    assert mean_iou_present(cm) == pytest.approx(5 / 9)
    # Class 2 present in the ground truth but never predicted: IoU 0 in both means.
    #   gt [0, 0, 2, 2], pred [0, 0, 0, 0]: class 0 TP 2, FP 2 -> 2/4; class 2 TP 0, FN 2 -> 0; class 1 absent.
    cm = confusion_matrix(np.array([0, 0, 0, 0]), np.array([0, 0, 2, 2]), 3)
    np.testing.assert_allclose(iou_per_class(cm), [0.5, np.nan, 0.0])
    assert mean_iou(cm) == pytest.approx(0.5 / 3) and mean_iou_present(cm) == pytest.approx(0.25)
    assert accuracy(cm) == pytest.approx(0.5)


def test_no_counted_point_gives_zero_scores():
    cm = confusion_matrix(np.array([1, 2]), np.array([-1, -1]), 3)
    assert cm.sum() == 0 and mean_iou(cm) == 0.0 and mean_iou_present(cm) == 0.0 and accuracy(cm) == 0.0


def test_points_without_a_prediction_count_as_misses_of_their_class():
    cm = confusion_matrix(np.array(PRED), np.array(TARGET), 3)
    missed = np.array([0, 2, 0])  # two class-1 points that no tile held
    # class 1: TP 1, FP 1, FN 1 + 2 missed -> 1 / 5; the others unchanged
    np.testing.assert_allclose(iou_per_class(cm, missed), [2 / 3, 1 / 5, 2 / 3])
    assert mean_iou(cm, missed) == pytest.approx((2 / 3 + 1 / 5 + 2 / 3) / 3)
    assert accuracy(cm, missed) == pytest.approx(5 / 9)  # 5 right of 7 + 2 labelled points
