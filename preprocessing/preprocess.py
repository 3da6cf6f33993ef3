"""The preprocessing stage: tile every frame of the chosen splits into HDF5.

Work is cut into units of (sequence, chunk of frames). Inside a Slurm array job
(``SLURM_ARRAY_TASK_ID`` set, i.e. ``preprocess.task_id``) one process does one
unit; otherwise every unit runs here, or, when this process is one of several tasks
of an srun step (a multi-node job of the Hydra Slurm launcher), every n-th unit, and
the ranks wait for each other's tile files at the end. A unit writes a part file
``<tiles_dir>/<sampling>/<SS>.parts/<first>-<end>.h5``; whichever task finishes
the last part of a sequence merges the parts into ``<SS>.h5`` (two tasks racing
there both write the same bytes under private temporary names, and the rename
is atomic). The merge removes only the finished parts, so a concurrent run (a
resubmitted array while the first still runs) keeps its half-written part and its
folder. Every write is atomic and finished work is skipped, so a rerun or a
requeued task continues where the last one stopped.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from preprocessing.tiling import make_tiles
from scalept.distributed import resolve_env
from scalept.errors import ConfigError
from scalept.plan import Plan
from scalept.data.dataset import split_sequences
from scalept.atomic import remove_stale_temporaries
from scalept.data.semantickitti import IGNORE_INDEX, Sequence
from scalept.data.tiles import (FrameTiles, TileFile, TileFileError, check_tiling, fill_map, is_complete,
                                merge_tile_files, tile_file_path, write_tile_file)

log = logging.getLogger(__name__)

# The sub-configs this stage reads (scalept.steps hands it these and nothing else).
READS = ("dataset", "preprocess", "sampling", "tiles_dir")


@dataclass(frozen=True)
class Unit:
    """Frames ``[start, stop)`` of one sequence: the work of one array task."""

    sequence: str
    start: int
    stop: int

    @property
    def part_name(self) -> str:
        return f"{self.start:06d}-{self.stop:06d}.h5"


def sequences_of(cfg: DictConfig) -> list[str]:
    """Sequences of the splits named in ``preprocess.splits``, in a stable order."""
    return split_sequences(cfg.dataset.splits, cfg.preprocess.splits, "preprocess.splits")


def plan_units(cfg: DictConfig) -> list[Unit]:
    """Every (sequence, chunk) unit; array task i does unit i, so the order must be stable."""
    return [unit for name in sequences_of(cfg) for unit in sequence_units(cfg, name)]


def pending_sequences(cfg: DictConfig) -> list[str]:
    """Sequences of ``preprocess.splits`` without a complete tile file for ``sampling``."""
    return [s for s in sequences_of(cfg) if not is_complete(tile_file_path(cfg.tiles_dir, cfg.sampling.name, s))]


def plan(cfg: DictConfig) -> Plan:
    """The units of sequences whose tile file is missing or incomplete, numbered as array tasks."""
    units, pending = plan_units(cfg), set(pending_sequences(cfg))
    todo = [f"task {i}: sequence {u.sequence}, frames {u.start}-{u.stop}" for i, u in enumerate(units)
            if u.sequence in pending]
    return Plan("preprocess", len(units), todo, [str(Path(cfg.tiles_dir) / str(cfg.sampling.name))])


def sequence_units(cfg: DictConfig, sequence_name: str) -> list[Unit]:
    per_task = int(cfg.preprocess.frames_per_task)
    if per_task < 1:
        raise ConfigError(f"preprocess.frames_per_task={per_task} must be >= 1")
    n = frame_count(cfg, sequence_name)
    return [Unit(sequence_name, lo, min(n, lo + per_task)) for lo in range(0, n, per_task)]


def frame_count(cfg: DictConfig, sequence_name: str) -> int:
    """Frames of a sequence; for a synthetic sequence not generated yet, the frames stage=synth will write.

    So a preprocessing array can be planned before its synth job has run
    (scalept.slurm_jobs.PrepareSweep).
    """
    synthetic = cfg.dataset.get("synthetic")
    velodyne = Path(cfg.dataset.root) / "sequences" / sequence_name / "velodyne"
    if synthetic is not None and not (velodyne.is_dir() and any(velodyne.iterdir())):
        return int(synthetic.frames_per_sequence)
    return len(Sequence(cfg.dataset.root, sequence_name))


def _parts_dir(cfg: DictConfig, sequence: str) -> Path:
    final = tile_file_path(cfg.tiles_dir, cfg.sampling.name, sequence)
    return final.with_suffix(".parts")


def _attrs(cfg: DictConfig, sequence: str, has_labels: bool) -> dict:
    return {
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "crop": OmegaConf.to_container(cfg.preprocess.crop, resolve=True),
        "sequence": sequence,
        "dataset_root": str(Path(cfg.dataset.root).resolve()),
        "has_labels": has_labels,
    }


def _check_same_parameters(path: Path, attrs: dict) -> None:
    check_tiling(TileFile(path), attrs["sampling"], attrs["crop"])


def crop_mask(points: np.ndarray, crop: Mapping) -> np.ndarray:
    """Points kept for tiling: horizontal range within [min_range, max_range] and height within
    [min_z, max_z] (null: no bound)."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    squared = x * x + y * y  # compared with squared bounds: no square root per point
    keep = np.ones(len(points), dtype=bool)
    if crop.get("min_range") is not None:
        keep &= squared >= np.float32(crop["min_range"]) ** 2
    if crop.get("max_range") is not None:
        keep &= squared <= np.float32(crop["max_range"]) ** 2
    if crop.get("min_z") is not None:
        keep &= z >= np.float32(crop["min_z"])
    if crop.get("max_z") is not None:
        keep &= z <= np.float32(crop["max_z"])
    return keep


def frame_rng(seed: int, sequence: str, frame_id: str) -> np.random.Generator:
    """Per-frame generator: the same tiles whatever chunk or task the frame falls in."""
    return np.random.default_rng([int(seed), zlib.crc32(f"{sequence}/{frame_id}".encode())])


def tile_frame(points: np.ndarray, sampling: Mapping, crop: Mapping, rng: np.random.Generator) -> list[np.ndarray]:
    """Tiles (indices into ``points``) of the points that survive the range crop."""
    kept = np.flatnonzero(crop_mask(points, crop)).astype(np.int32)
    if len(kept) == len(points):
        return make_tiles(points[:, :3], sampling, rng)
    # np.take copies rows an order of magnitude faster than fancy indexing does.
    return [kept[t] for t in make_tiles(np.take(points, kept, axis=0)[:, :3], sampling, rng)]


def run_unit(cfg: DictConfig, unit: Unit) -> Path | None:
    """Tile one unit into its part file; returns the part written now, or None when the sequence's
    file or this unit's part was already there (a rerun)."""
    final = tile_file_path(cfg.tiles_dir, cfg.sampling.name, unit.sequence)
    sequence = Sequence(cfg.dataset.root, unit.sequence)
    attrs = _attrs(cfg, unit.sequence, sequence.has_labels)
    if final.exists() and is_complete(final):
        _check_same_parameters(final, attrs)
        return None
    part = _parts_dir(cfg, unit.sequence) / unit.part_name
    if part.exists() and is_complete(part):
        _check_same_parameters(part, attrs)
        return None
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    crop = attrs["crop"]
    frames = []
    for index in range(unit.start, unit.stop):
        frame = sequence.frame(index)
        frame_id = sequence.scans[index].stem
        labels = frame.labels if frame.labels is not None else np.full(len(frame.points), IGNORE_INDEX)
        tiles = tile_frame(frame.points, sampling, crop, frame_rng(sampling.get("seed", 0), unit.sequence, frame_id))
        frames.append(FrameTiles(frame_id, frame.points, labels, tiles, fill_map(frame.points, tiles)))
    write_tile_file(part, frames, attrs)
    return part


def _remove_parts(cfg: DictConfig, sequence_name: str) -> None:
    """Delete the sequence's finished part files, and their folder if nothing else is in it.

    Another task of a concurrent run (a resubmitted array while the first still runs) may be
    writing a part there: its temporary is left alone, and so is the folder holding it.
    """
    folder = _parts_dir(cfg, sequence_name)
    for unit in sequence_units(cfg, sequence_name):
        (folder / unit.part_name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()


def merge_if_complete(cfg: DictConfig, sequence_name: str) -> bool:
    """Merge the sequence's parts into its tile file once every part exists; True when it is done."""
    final = tile_file_path(cfg.tiles_dir, cfg.sampling.name, sequence_name)
    if final.exists() and is_complete(final):
        _remove_parts(cfg, sequence_name)  # parts a concurrent run finished after the merge
        return True
    parts = [_parts_dir(cfg, sequence_name) / u.part_name for u in sequence_units(cfg, sequence_name)]
    if not all(p.exists() and is_complete(p) for p in parts):
        return False
    try:
        if len(parts) == 1:  # nothing to concatenate: the part already is the sequence's file
            os.replace(parts[0], final)
        else:
            sequence = Sequence(cfg.dataset.root, sequence_name)
            merge_tile_files(parts, final, _attrs(cfg, sequence_name, sequence.has_labels))
    except (FileNotFoundError, TileFileError):
        if not (final.exists() and is_complete(final)):
            raise
        # another task merged and removed the parts first
    _remove_parts(cfg, sequence_name)
    return True


def run(cfg: DictConfig) -> list[Path]:
    """The stage: one unit when ``preprocess.task_id`` is set (array task), else all of them."""
    units = plan_units(cfg)
    if cfg.preprocess.get("dry_run"):
        for i, unit in enumerate(units):
            print(f"{i}\t{unit.sequence}\t{unit.start}\t{unit.stop}")
        print(f"--array=0-{len(units) - 1}")
        return []
    task_id = cfg.preprocess.get("task_id")
    if task_id is not None:
        task_id = int(task_id)
        if not 0 <= task_id < len(units):
            raise ConfigError(f"preprocess.task_id={task_id} (SLURM_ARRAY_TASK_ID) is outside the {len(units)} "
                             f"units of this configuration; submit the array as --array=0-{len(units) - 1}")
        todo = [units[task_id]]
    else:
        env = resolve_env()  # every task of an srun step tiles units rank, rank + world, ...
        rank, world = env.rank, env.world_size
        todo = units[rank::world]
        log.info("preprocess: %d units (sequence x %d frames); as a Slurm array: --array=0-%d",
                 len(units), cfg.preprocess.frames_per_task, len(units) - 1)
        if world > 1:
            log.info("preprocess: rank %d of %d tasks of this job step (node %s) tiles %d of them",
                     rank, world, os.environ.get("SLURMD_NODENAME", "?"), len(todo))
    remove_stale_temporaries(Path(cfg.tiles_dir) / str(cfg.sampling.name))
    started = time.perf_counter()
    frames = 0
    for unit in _progress(todo, cfg):
        if run_unit(cfg, unit) is not None:
            frames += unit.stop - unit.start
    finished = []
    for name in dict.fromkeys(u.sequence for u in todo):
        if merge_if_complete(cfg, name):
            finished.append(tile_file_path(cfg.tiles_dir, cfg.sampling.name, name))
    if task_id is None and world > 1:  # the later steps of this job read every tile file
        finished = wait_for_sequences(cfg, sequences_of(cfg))
    elapsed = time.perf_counter() - started
    log.info("preprocess: sampling=%s tiled %d frames in %.1f s; %d tile files complete under %s",
             cfg.sampling.name, frames, elapsed, len(finished), Path(cfg.tiles_dir) / cfg.sampling.name)
    return finished


def wait_for_sequences(cfg: DictConfig, names: list[str], poll_s: float = 1.0) -> list[Path]:
    """Wait until every sequence's tile file is complete (merged by whichever rank wrote its last part).

    No timeout of its own: a rank that fails ends the step (SLURM_KILL_BAD_EXIT in
    cluster/slurm.yaml), and the job's time limit bounds the rest.
    """
    paths = [tile_file_path(cfg.tiles_dir, cfg.sampling.name, name) for name in names]
    waiting_since = time.monotonic()
    reported = 0.0
    while True:
        missing = [p for p in paths if not (p.exists() and is_complete(p))]
        if not missing:
            return paths
        if time.monotonic() - waiting_since >= reported + 60:
            reported += 60
            log.info("preprocess: waiting for the other ranks: %d tile files left (%s, ...)", len(missing), missing[0])
        time.sleep(poll_s)


def _progress(units: list[Unit], cfg: DictConfig):
    if len(units) > 1 and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(units, desc=f"tiling ({cfg.sampling.name})", unit="chunk")
    return units
