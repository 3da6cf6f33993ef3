"""SemanticKITTI I/O: exact round trips, the learning map, and one-line errors on bad input."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from scalept.data import semantickitti as sk


def _write_sequence(root, name="00", n_frames=2, n_points=50, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    base = root / "sequences" / name
    for i in range(n_frames):
        points = rng.normal(size=(n_points, 4)).astype(np.float32)
        sk.write_points(base / "velodyne" / f"{i:06d}.bin", points)
        if labels:
            raw = rng.choice([10, 40, 48, 70, 0, 252], size=n_points).astype(np.uint32) | (7 << 16)
            sk.write_labels(base / "labels" / f"{i:06d}.label", raw)
    return base


def test_points_and_labels_round_trip_bit_exact(tmp_path):
    points = np.random.default_rng(1).normal(size=(1000, 4)).astype(np.float32)
    raw = np.random.default_rng(2).integers(0, 1 << 32, size=1000, dtype=np.uint64).astype(np.uint32)
    sk.write_points(tmp_path / "a.bin", points)
    sk.write_labels(tmp_path / "a.label", raw)
    assert (tmp_path / "a.bin").read_bytes() == points.tobytes()
    np.testing.assert_array_equal(sk.read_points(tmp_path / "a.bin"), points)
    np.testing.assert_array_equal(sk.read_labels(tmp_path / "a.label", 1000), raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.label"]  # no temporary files left


def test_poses_calib_times_round_trip_and_lidar_poses(tmp_path):
    base = _write_sequence(tmp_path, n_frames=3)
    rng = np.random.default_rng(3)
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, :3, 3] = rng.normal(size=(3, 3))
    tr = np.eye(4)
    tr[:3, :3] = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]
    tr[:3, 3] = [-0.004, -0.076, -0.27]
    sk.write_poses(base / "poses.txt", poses)
    sk.write_calib(base / "calib.txt", {"P0": np.eye(4), "Tr": tr})
    sk.write_times(base / "times.txt", np.array([0.0, 0.1, 0.2]))
    seq = sk.Sequence(tmp_path, "00")
    np.testing.assert_allclose(sk.read_poses(base / "poses.txt"), poses, atol=1e-12)
    np.testing.assert_allclose(seq.poses(), np.linalg.inv(tr) @ poses @ tr, atol=1e-12)
    np.testing.assert_allclose(seq.times(), [0.0, 0.1, 0.2])
    assert set(sk.read_calib(base / "calib.txt")) == {"P0", "Tr"}


def test_optional_files_may_be_absent(tmp_path):
    _write_sequence(tmp_path)
    seq = sk.Sequence(tmp_path, "00")
    assert seq.poses() is None and seq.times() is None
    assert seq.has_labels and len(seq) == 2 and seq.frame_ids() == ["000000", "000001"]


def test_learning_map_and_inverse():
    for cls, name in enumerate(sk.CLASS_NAMES):
        raw_ids = np.array(sk.CLASS_RAW_IDS[name], dtype=np.uint32)
        with_instance = raw_ids | (123 << 16)
        assert (sk.to_classes(with_instance) == cls).all(), name
    classes = np.arange(-1, sk.NUM_CLASSES)
    raw = sk.to_raw(classes)
    np.testing.assert_array_equal(sk.to_classes(raw), classes)
    assert raw[1] == 10 and raw[0] == 0  # car -> 10, ignored -> unlabeled
    assert (sk.to_classes(np.array([0, 1, 52, 99])) == sk.IGNORE_INDEX).all()
    with pytest.raises(ValueError):
        sk.to_raw(np.array([sk.NUM_CLASSES]))


def test_unknown_raw_ids_warn_once_and_are_ignored(caplog):
    raw = np.array([40, 4242, 4242, 70], dtype=np.uint32)
    with caplog.at_level(logging.WARNING):
        classes = sk.to_classes(raw, "x.label")
        sk.to_classes(raw, "y.label")
    assert classes.tolist() == [8, -1, -1, 14]
    warnings = [r for r in caplog.records if "4242" in r.getMessage()]
    assert len(warnings) == 1 and "x.label" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty scan"),
        (np.zeros(10, np.float32).tobytes() + b"\x00\x01", "not a multiple of 16"),
        (np.array([[0, 0, np.nan, 0]], np.float32).tobytes(), "NaN/inf"),
        (np.array([[np.inf, 0, 0, 0]], np.float32).tobytes(), "NaN/inf"),
    ],
)
def test_malformed_scans_name_the_file(tmp_path, content, fragment):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(sk.ScanError) as err:
        sk.read_points(path)
    message = str(err.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_label_count_mismatch_and_missing_files(tmp_path):
    base = _write_sequence(tmp_path, n_points=50)
    sk.write_labels(base / "labels" / "000001.label", np.zeros(49, np.uint32))
    seq = sk.Sequence(tmp_path, "00")
    seq.frame(0)
    with pytest.raises(sk.ScanError, match=r"000001\.label: 49 labels for a scan of 50 points"):
        seq.frame(1)
    with pytest.raises(sk.ScanError, match="sequence folder not found"):
        sk.Sequence(tmp_path, "05")
    (tmp_path / "sequences" / "07").mkdir()
    with pytest.raises(sk.ScanError, match="missing velodyne/"):
        sk.Sequence(tmp_path, "07")
    with pytest.raises(sk.ScanError, match="not found"):
        sk.read_points(tmp_path / "nope.bin")


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(ValueError):
        sk.write_points(path, np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError):
        sk.write_points(path, np.zeros((5, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_real_scans_read_through_the_same_code(real_root):
    assert sk.list_sequences(real_root) == ["00", "08"]
    seq = sk.Sequence(real_root, "08")
    assert seq.has_labels and len(seq) == 2
    for i in range(len(seq)):
        frame = seq.frame(i)
        assert frame.points.shape == (seq.scans[i].stat().st_size // 16, 4)
        assert 100_000 < len(frame.points) < 140_000
        valid = frame.labels[frame.labels >= 0]
        assert len(valid) > 0.5 * len(frame.labels)  # real ground truth is mostly labelled
        assert np.isin(np.unique(valid), [8, 10, 12, 14, 16]).sum() >= 4  # road, sidewalk, building, veg, terrain
    unlabelled = sk.Sequence(real_root, "00")
    assert not unlabelled.has_labels and unlabelled.frame(0).labels is None
