"""The per-frame fusion reductions on hand-made tile predictions, and the nearest-neighbour fill."""
from __future__ import annotations

import numpy as np

from scalept import fusion_kernels


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x, axis=1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def entropy(p):
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


# Two tiles A and B; point 0 is in both, point 1 only in A, point 2 only in B (3 classes).
#   A(point 0) = [4, 0, 0]   -> argmax 0, a confident tile
#   B(point 0) = [-6, 1, 0]  -> argmax 1
# Mean logits: [(4 - 6) / 2, (0 + 1) / 2, 0] = [-1, 0.5, 0]            -> class 1
# Mean softmax: A = [e^4, 1, 1] / (e^4 + 2) = [0.9647, 0.0177, 0.0177],
#               B = [e^-6, e, 1] / (e^-6 + e + 1) = [0.0007, 0.7306, 0.2688]
#               mean = [0.4827, 0.3741, 0.1432]                         -> class 0
POINT_INDEX = np.array([0, 1, 0, 2])  # rows: A's points 0, 1, then B's points 0, 2
LOGITS = np.array([[4, 0, 0], [0, 0, 3], [-6, 1, 0], [0, 2, 0]], dtype=np.float16)


def test_logit_average_takes_the_argmax_of_the_mean_logits():
    fused = fusion_kernels.fuse_frame(4, POINT_INDEX, LOGITS, "logit_average")
    assert fused.pred.tolist() == [1, 2, 1, -1]  # point 3 is in no tile
    assert fused.covered.tolist() == [True, True, True, False]
    assert fused.entropy is None


def test_softmax_average_can_disagree_with_logit_average():
    probs = softmax(LOGITS.astype(np.float64))
    np.testing.assert_allclose(probs[[0, 2]].mean(0), [0.4827, 0.3741, 0.1432], atol=1e-4)
    fused = fusion_kernels.fuse_frame(4, POINT_INDEX, probs.astype(np.float16), "softmax_average")
    assert fused.pred.tolist() == [0, 2, 1, -1]


# mc_uncertainty, point 0 in three tiles: two unsure ones voting 0, one sure one voting 1.
#   A = C = [0.8, 0.2, 0]: H = -(0.8 ln 0.8 + 0.2 ln 0.2) = 0.5004
#   B = [0.05, 0.95, 0]:   H = -(0.05 ln 0.05 + 0.95 ln 0.95) = 0.1985
# Plain mean: [0.55, 0.45, 0] -> class 0.
# T = 0.1: w_A = w_C = exp(-5.004) = 0.00671, w_B = exp(-1.985) = 0.1374;
#   class 0: 2 * 0.00671 * 0.8 + 0.1374 * 0.05 = 0.0176, class 1: 2 * 0.00671 * 0.2 + 0.1374 * 0.95 = 0.1332 -> 1.
# T = 100: weights nearly equal -> the plain mean -> class 0.
# lowest: B has the lowest H -> class 1, fused entropy H_B.
MC_INDEX = np.array([0, 0, 0, 1])
MC_PROBS = np.array([[0.8, 0.2, 0.0], [0.05, 0.95, 0.0], [0.8, 0.2, 0.0], [0.1, 0.2, 0.7]])
MC_H = entropy(MC_PROBS)


def test_mc_entropy_weighting_prefers_the_confident_tile():
    np.testing.assert_allclose(MC_H[:2], [0.5004, 0.1985], atol=1e-4)
    fused = fusion_kernels.fuse_frame(3, MC_INDEX, MC_PROBS.astype(np.float16), "mc_uncertainty", MC_H.astype(np.float32),
                            weighting="entropy", temperature=0.1)
    assert fused.pred.tolist() == [1, 2, -1]
    w = np.exp(-MC_H[:3] / 0.1)
    np.testing.assert_allclose(w, [0.00671, 0.1374, 0.00671], rtol=1e-3)
    q = (w[:, None] * MC_PROBS[:3]).sum(0) / w.sum()
    np.testing.assert_allclose(fused.entropy[0], entropy(q[None])[0], rtol=2e-3)  # entropy of the weighted mean
    np.testing.assert_allclose(fused.entropy[1], MC_H[3], rtol=1e-6)  # one tile: its own entropy
    assert np.isnan(fused.entropy[2])
    flat = fusion_kernels.fuse_frame(3, MC_INDEX, MC_PROBS.astype(np.float16), "mc_uncertainty", MC_H.astype(np.float32),
                           weighting="entropy", temperature=100.0)
    assert flat.pred.tolist() == [0, 2, -1]


def test_mc_lowest_entropy_tile_wins():
    fused = fusion_kernels.fuse_frame(3, MC_INDEX, MC_PROBS.astype(np.float16), "mc_uncertainty", MC_H.astype(np.float32),
                            weighting="lowest")
    assert fused.pred.tolist() == [1, 2, -1]
    np.testing.assert_allclose(fused.entropy[:2], [MC_H[1], MC_H[3]], rtol=1e-6)
    # a tie in entropy: the first row of the point wins
    tie = fusion_kernels.fuse_frame(1, np.array([0, 0]), np.array([[0.3, 0.7], [0.7, 0.3]], dtype=np.float16), "mc_uncertainty",
                          np.array([0.5, 0.5], dtype=np.float32), weighting="lowest")
    assert tie.pred.tolist() == [1]


def test_uncovered_points_take_the_label_of_their_nearest_predicted_point():
    xyz = np.array([[0, 0, 0], [10, 0, 0], [4, 0, 0], [6, 0, 0], [20, 1, 0], [-3, 0, 0]], dtype=np.float32)
    logits = np.zeros((2, 19), dtype=np.float16)
    logits[0, 3] = logits[1, 7] = 1.0
    fused = fusion_kernels.fuse_frame(6, np.array([0, 1]), logits, "logit_average")
    assert fused.pred.tolist() == [3, 7, -1, -1, -1, -1]
    filled = fusion_kernels.fill_nearest(xyz, fused.covered, fused.pred)
    assert filled == 4
    assert fused.pred.tolist() == [3, 7, 3, 7, 7, 3]
    entropy_values = np.array([0.1, 0.2, np.nan, np.nan], dtype=np.float32)
    covered = np.array([True, True, False, False])
    fusion_kernels.fill_nearest(xyz[:4], covered, entropy_values)
    np.testing.assert_allclose(entropy_values, [0.1, 0.2, 0.1, 0.2])
