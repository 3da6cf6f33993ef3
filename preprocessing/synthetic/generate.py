"""Write synthetic sequences in the exact SemanticKITTI layout, through the same I/O module as real data.

``dataset/sequences/SS/velodyne/NNNNNN.bin``, ``labels/NNNNNN.label``, ``poses.txt``,
``calib.txt`` and ``times.txt``. Frames are rendered independently from (seed, sequence,
frame index), written atomically, and skipped when both files already exist, so an
interrupted or repeated run only fills in what is missing.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from scalept.data.semantickitti import write_calib, write_labels, write_points, write_poses, write_times

from .primitives import rng_for
from .scene import Scene
from .sensor import Sensor

log = logging.getLogger(__name__)

FRAME_PERIOD = 0.1   # s between sweeps (10 Hz)
_FRAME_STREAM = 2    # stream tag of per-frame noise (scene.py and street.py use 0 and 1)


def _kitti_tr() -> np.ndarray:
    """A KITTI-like velodyne → camera-0 transform: axes x fwd/y left/z up → x right/y down/z fwd, slightly off."""
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    a, b, c = np.radians([0.41, -0.46, 0.02])    # small mounting rotation about x, y, z
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    tr = np.eye(4)
    tr[:3, :3] = rx @ ry @ rz @ axes
    tr[:3, 3] = -0.012, -0.054, -0.292
    return tr


def calibration() -> dict[str, np.ndarray]:
    """P0..P3 (rectified camera projections of a KITTI-like rig) and Tr (velodyne → camera 0), as 4x4."""
    focal, cx, cy = 718.856, 607.1928, 185.2157
    calib = {}
    for name, tx in (("P0", 0.0), ("P1", -386.1448), ("P2", 45.38225), ("P3", -337.2877)):
        p = np.eye(4)
        p[:3, :3] = [[focal, 0, cx], [0, focal, cy], [0, 0, 1]]
        p[0, 3] = tx
        calib[name] = p
    calib["Tr"] = _kitti_tr()
    return calib


def lidar_poses(scene: Scene, frames: int) -> np.ndarray:
    """LiDAR poses (F, 4, 4) relative to the first frame's LiDAR pose, as Sequence.poses() returns them."""
    world = np.stack([scene.lidar_pose(i * FRAME_PERIOD) for i in range(frames)])
    return np.linalg.inv(world[0]) @ world


def render_frame(scene: Scene, sensor: Sensor, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 4) float32 and raw labels (N,) uint32 of frame ``index``; depends on nothing else."""
    rng = rng_for(scene.seed, scene.sequence, _FRAME_STREAM, index)
    return sensor.scan(scene, index * FRAME_PERIOD, rng)


def _sequence_name(name: str | int) -> str:
    return f"{int(name):02d}" if str(name).isdigit() else str(name)


def generate_sequence(path: Path, scene: Scene, sensor: Sensor, frames: int, overwrite: bool = False,
                      progress: bool = False) -> int:
    """Render the missing frames of one sequence, then its poses, calibration and times; returns frames written."""
    written, started = 0, time.perf_counter()
    for i in range(frames):
        scan, label = path / "velodyne" / f"{i:06d}.bin", path / "labels" / f"{i:06d}.label"
        if not overwrite and scan.is_file() and label.is_file():
            continue
        points, labels = render_frame(scene, sensor, i)
        write_points(scan, points)
        write_labels(label, labels)
        written += 1
        if progress and (written % 10 == 0 or i == frames - 1):
            rate = written / (time.perf_counter() - started)
            log.info("sequence %s: frame %d/%d (%d points, %.2f frames/s)", scene.sequence, i + 1, frames,
                     len(points), rate)
    calib = calibration()
    tr = calib["Tr"]
    camera = tr @ lidar_poses(scene, frames) @ np.linalg.inv(tr)   # so that Tr⁻¹·pose·Tr is the LiDAR pose
    write_poses(path / "poses.txt", camera)
    write_calib(path / "calib.txt", calib)
    write_times(path / "times.txt", np.arange(frames) * FRAME_PERIOD)
    return written


def generate_dataset(root: str | os.PathLike, sequences: dict[str, int], seed: int = 0, azimuth_steps: int = 2083,
                     beams: int = 64, overwrite: bool = False, progress: bool = False) -> list[Path]:
    """Generate synthetic SemanticKITTI sequences under ``root/sequences``; returns the sequence folders.

    ``root`` is the ``.../dataset`` folder and ``sequences`` maps a sequence name ("00") to its
    number of frames. Each sequence's street comes from (seed, name) alone, so generating "01"
    by itself gives the same files as generating "00" and "01" together. ``azimuth_steps`` is
    the size knob: 2083 columns (~0.17°) give ~120k points a frame, like real HDL-64E scans.
    """
    root = Path(root)
    sensor = Sensor(beams=beams, azimuth_steps=azimuth_steps)
    paths = []
    for name, frames in sequences.items():
        name = _sequence_name(name)
        if frames < 1:
            raise ValueError(f"sequence {name}: the number of frames must be at least 1, got {frames}")
        path = root / "sequences" / name
        written = generate_sequence(path, Scene(seed, name), sensor, int(frames), overwrite, progress)
        log.info("sequence %s: %d frames written, %d already there (%s)", name, written, frames - written, path)
        paths.append(path)
    return paths
