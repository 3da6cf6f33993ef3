"""The SemanticKITTI on-disk format: scans, labels, poses, calibration, times.

Every reader validates what it reads and fails with one line that names the file,
what is wrong and what to do, so a bad scan deep inside an array job is easy to
find. Writers go through :func:`scalept.atomic.atomic_path`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalept.atomic import atomic_path
from scalept.errors import ScalePTError

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = -1
"""Class index of points that are not scored (unlabelled, outliers, other-structure, ...)."""

# Raw SemanticKITTI ids of each training class; the first id is the one written back.
CLASS_RAW_IDS = {
    "car": (10, 252), "bicycle": (11,), "motorcycle": (15,), "truck": (18, 258),
    "other-vehicle": (20, 13, 16, 256, 257, 259), "person": (30, 254), "bicyclist": (31, 253),
    "motorcyclist": (32, 255), "road": (40, 60), "parking": (44,), "sidewalk": (48,),
    "other-ground": (49,), "building": (50,), "fence": (51,), "vegetation": (70,),
    "trunk": (71,), "terrain": (72,), "pole": (80,), "traffic-sign": (81,),
}
# Raw ids that exist in SemanticKITTI but are not scored.
IGNORED_RAW_IDS = (0, 1, 52, 99)
KNOWN_RAW_IDS = frozenset(IGNORED_RAW_IDS).union(*CLASS_RAW_IDS.values())

_LEARNING_MAP = np.full(1 << 16, IGNORE_INDEX, dtype=np.int8)
for _cls, _ids in enumerate(CLASS_RAW_IDS.values()):
    _LEARNING_MAP[list(_ids)] = _cls
_KNOWN = np.zeros(1 << 16, dtype=bool)
_KNOWN[list(KNOWN_RAW_IDS)] = True
_INVERSE_MAP = np.array([ids[0] for ids in CLASS_RAW_IDS.values()], dtype=np.uint32)
_warned_raw_ids: set[int] = set()


class ScanError(ScalePTError, ValueError):
    """A file of the dataset is missing or malformed; the message names it and the fix."""


def to_classes(raw: np.ndarray, source: str | os.PathLike = "labels") -> np.ndarray:
    """Raw ``.label`` values (instance id in the high 16 bits) to class indices 0..18 or -1.

    Ids unknown to SemanticKITTI are treated as ignored, with one warning per id.
    """
    semantic = np.asarray(raw, dtype=np.uint32) & 0xFFFF
    unknown = np.unique(semantic[~_KNOWN[semantic]])
    new = [int(i) for i in unknown if int(i) not in _warned_raw_ids]
    if new:
        _warned_raw_ids.update(new)
        log.warning("%s: raw label ids %s are not SemanticKITTI ids; treating them as ignored", source, new)
    return _LEARNING_MAP[semantic].astype(np.int64)


def to_raw(classes: np.ndarray) -> np.ndarray:
    """Class indices 0..18 back to raw SemanticKITTI ids (the submission format); -1 becomes 0."""
    classes = np.asarray(classes)
    if classes.size and (classes.max() >= NUM_CLASSES or classes.min() < IGNORE_INDEX):
        raise ValueError(f"class indices must be in -1..{NUM_CLASSES - 1}, got {classes.min()}..{classes.max()}")
    return np.where(classes < 0, 0, _INVERSE_MAP[np.clip(classes, 0, None)]).astype(np.uint32)


def read_points(path: str | os.PathLike) -> np.ndarray:
    """An (N, 4) float32 array of x, y, z, remission from a ``.bin`` scan."""
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: scan file not found; check dataset.root and the sequence list")
    size = path.stat().st_size
    if size == 0:
        raise ScanError(f"{path}: empty scan (0 bytes); re-export or delete this frame")
    if size % 16:
        raise ScanError(
            f"{path}: size {size} bytes is not a multiple of 16 (float32 x, y, z, remission per point); "
            "the file is truncated or not a SemanticKITTI scan"
        )
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        raise ScanError(f"{path}: {bad} points have NaN/inf values; clean the scan (drop those rows)")
    return points


def read_labels(path: str | os.PathLike, num_points: int | None = None) -> np.ndarray:
    """Raw uint32 labels of a ``.label`` file, checked against the scan's point count."""
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: label file not found; every scan under velodyne/ needs one in labels/")
    size = path.stat().st_size
    if size % 4:
        raise ScanError(f"{path}: size {size} bytes is not a multiple of 4 (uint32 per point); the file is truncated")
    raw = np.fromfile(path, dtype=np.uint32)
    if num_points is not None and raw.shape[0] != num_points:
        raise ScanError(
            f"{path}: {raw.shape[0]} labels for a scan of {num_points} points; the label and scan files do not match"
        )
    return raw


def write_points(path: str | os.PathLike, points: np.ndarray) -> None:
    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 4 or points.shape[0] == 0:
        raise ValueError(f"{path}: points must be a non-empty (N, 4) array, got shape {points.shape}")
    with atomic_path(path) as tmp:
        points.tofile(tmp)


def write_labels(path: str | os.PathLike, raw: np.ndarray) -> None:
    """Write raw uint32 labels (use :func:`to_raw` on class predictions first)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint32)
    if raw.ndim != 1:
        raise ValueError(f"{path}: labels must be a 1-D array, got shape {raw.shape}")
    with atomic_path(path) as tmp:
        raw.tofile(tmp)


def _read_matrix_lines(path: Path, what: str) -> list[np.ndarray]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        values = line.split(":", 1)[-1].split()
        if not values:
            continue
        try:
            m = np.array([float(v) for v in values], dtype=np.float64)
        except ValueError:
            raise ScanError(f"{path}:{n}: not a row of numbers in a {what} file") from None
        if m.size != 12:
            raise ScanError(f"{path}:{n}: expected 12 numbers (a 3x4 matrix) in a {what} file, got {m.size}")
        rows.append(np.vstack([m.reshape(3, 4), [0, 0, 0, 1]]))
    return rows


def read_calib(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``calib.txt`` as 4x4 matrices by key (``P0`` ... ``Tr``)."""
    path = Path(path)
    keys = [line.split(":", 1)[0].strip() for line in path.read_text().splitlines() if line.strip()]
    return dict(zip(keys, _read_matrix_lines(path, "calib")))


def read_poses(path: str | os.PathLike) -> np.ndarray:
    """``poses.txt`` as (F, 4, 4) camera-0 poses."""
    path = Path(path)
    return np.stack(_read_matrix_lines(path, "poses")) if path.stat().st_size else np.zeros((0, 4, 4))


def read_times(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    try:
        return np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as err:
        raise ScanError(f"{path}: not one timestamp per line ({err})") from None


def _format_matrix(m: np.ndarray) -> str:
    return " ".join(f"{v:.12e}" for v in np.asarray(m)[:3, :4].ravel())


def write_calib(path: str | os.PathLike, calib: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{k}: {_format_matrix(m)}\n" for k, m in calib.items()))


def write_poses(path: str | os.PathLike, poses: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(_format_matrix(p) + "\n" for p in poses))


def write_times(path: str | os.PathLike, times: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{t:.6e}\n" for t in times))


@dataclass
class Frame:
    points: np.ndarray
    """(N, 4) float32 x, y, z, remission in the sensor frame."""
    labels: np.ndarray | None
    """(N,) int64 class indices (-1 ignored), or None for an unlabelled sequence."""


class Sequence:
    """One ``sequences/SS`` folder; frames are read on demand."""

    def __init__(self, root: str | os.PathLike, name: str):
        self.root = Path(root)
        self.name = f"{int(name):02d}" if str(name).isdigit() else str(name)
        self.path = self.root / "sequences" / self.name
        if not self.path.is_dir():
            raise ScanError(
                f"{self.path}: sequence folder not found; check dataset.root ({self.root}) and the sequence list"
            )
        velodyne = self.path / "velodyne"
        if not velodyne.is_dir():
            raise ScanError(f"{velodyne}: missing velodyne/ folder; each sequence needs velodyne/*.bin scans")
        self.scans = sorted(velodyne.glob("*.bin"))
        if not self.scans:
            raise ScanError(f"{velodyne}: no .bin scans in this folder")
        labels = self.path / "labels"
        self.has_labels = labels.is_dir() and any(labels.glob("*.label"))

    def __len__(self) -> int:
        return len(self.scans)

    def frame_ids(self) -> list[str]:
        return [p.stem for p in self.scans]

    def label_path(self, index: int) -> Path:
        return self.path / "labels" / (self.scans[index].stem + ".label")

    def frame(self, index: int) -> Frame:
        points = read_points(self.scans[index])
        labels = None
        if self.has_labels:
            path = self.label_path(index)
            labels = to_classes(read_labels(path, len(points)), path)
        return Frame(points, labels)

    def poses(self) -> np.ndarray | None:
        """LiDAR poses (F, 4, 4) in the first camera frame, or None if poses.txt is absent."""
        poses_path = self.path / "poses.txt"
        if not poses_path.is_file():
            return None
        poses = read_poses(poses_path)
        calib_path = self.path / "calib.txt"
        if calib_path.is_file():
            tr = read_calib(calib_path).get("Tr")
            if tr is not None:
                poses = np.linalg.inv(tr) @ poses @ tr
        return poses

    def times(self) -> np.ndarray | None:
        path = self.path / "times.txt"
        return read_times(path) if path.is_file() else None


def list_sequences(root: str | os.PathLike) -> list[str]:
    """Names of the sequences under ``root/sequences`` that have a velodyne folder."""
    base = Path(root) / "sequences"
    if not base.is_dir():
        raise ScanError(f"{base}: no sequences/ folder; dataset.root must point at .../dataset")
    return sorted(p.name for p in base.iterdir() if (p / "velodyne").is_dir())
