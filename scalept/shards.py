"""Inference shard files: the planning of chunks, their HDF5 layout, writing and checking them.

Output layout, all under ``<run_dir>/infer/<fusion.name>/``::

    manifest.json                         the plan (rank 0): sequences, frames, chunk size, world
                                          size, owner rank of every chunk, checkpoint digest, fusion
    shard-<RRR>-<SS>-<first>-<stop>.h5    one per (rank, chunk of frames [first, stop) of sequence SS)
    shard-<RRR>.json                      index of rank RRR: its chunk files, counts and timings,
                                          written when the rank has finished all of them

Work is cut into chunks of ``infer.frames_per_chunk`` consecutive frames of one
sequence, independent of the world size; chunk i is done by rank i mod world
size (round-robin, every tile exactly once over the ranks). A chunk file is
written under a temporary name and renamed when its last tile is in, with
``complete=True`` set last, so a killed job loses at most the chunk in flight. A
rerun (with any world size) skips each chunk for which some complete
``shard-*-<SS>-<first>-<stop>.h5`` exists that was made with the same checkpoint
(SHA-1 of the file), fusion kind, pass count and tiles; anything else is redone.
Ranks need no process group: each reads its rank and world size from
:mod:`scalept.distributed` (Slurm, torchrun or a single process) and writes only
its own files. Results are appended to the open file batch by batch, so memory is bounded by
the batch, never by the sequence. Batches never cross chunks and the RNG is
re-seeded per chunk, so MC passes give the same chunk whatever rank computes it.

Chunk file (HDF5)::

    /frame_ids            (F,)      S32     frame stems of the chunk's frames
    /frame_tile_offsets   (F+1,)    int64   frame f's tiles are rows frame_tile_offsets[f]:[f+1] of tile_ids
    /tile_ids             (T,)      int64   tile index in the sequence's tile file
    /tile_offsets         (T+1,)    int64   tile t's points are rows tile_offsets[t]:[t+1] below
    /point_index          (P,)      int32   point index within its frame
    /logits               (P, C)    float16 (kind "logits")
    /probs                (P, C)    float16 mean probabilities (kinds "probs" and "mc")
    /entropy              (P,)      float32 predictive entropy (kind "mc")
    attrs: format_version, complete, kind, fusion, mc_passes, num_classes, sequence, frame_start,
           frame_stop, sampling, checkpoint (SHA-1), rank, world_size
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from omegaconf import DictConfig

from scalept.atomic import atomic_path, disk_full_error, ensure_free_space, is_disk_full
from scalept.data.dataset import split_sequences
from scalept.data.tiles import TileFile
from scalept.errors import ConfigError, ScalePTError

SHARD_FORMAT_VERSION = 1
FUSIONS = {"logit_average": "logits", "softmax_average": "probs", "mc_uncertainty": "mc"}
"""Known fusion names and the kind of shard each needs."""
_FRAME_ID = "S32"


class InferenceError(ScalePTError, RuntimeError):
    """Inference output is missing, incomplete or inconsistent; the message names it and the fix."""


def shard_kind(fusion_name: str) -> str:
    """'logits', 'probs' or 'mc'; an unknown ``fusion.name`` is a one-line config error."""
    if fusion_name not in FUSIONS:
        raise ConfigError(f"fusion.name={fusion_name!r} is unknown; choose one of {', '.join(FUSIONS)} "
                          "(conf/fusion/*.yaml)")
    return FUSIONS[fusion_name]


def tta_views(tta: Mapping) -> list[tuple[int, bool]]:
    """(z-rotation in degrees, mirrored in x) of every view ``infer.tta`` asks for, the plain view first."""
    flips = (False, True) if tta["flip"] else (False,)
    return [(int(rotation), flip) for flip in flips for rotation in tta["rotations"]]


def tta_label(tta: Mapping) -> str | None:
    """``"0,90,180,270+flip"``-style name of the views, or None without test-time augmentation."""
    if tta_views(tta) == [(0, False)]:
        return None
    return ",".join(str(int(r)) for r in tta["rotations"]) + ("+flip" if tta["flip"] else "")


def output_folder_name(fusion: Mapping, tta: Mapping) -> str:
    """``<fusion.name>[-tta<views>][-lowest]``: the folder below ``<run_dir>/infer/`` of a fusion's
    outputs. Test-time augmentation gets a folder of its own, so runs with and without it compare;
    the lowest-H variant of mc_uncertainty writes beside the shards it reuses."""
    label = tta_label(tta)
    name = str(fusion["name"]) + ("" if label is None else "-tta" + label.replace(",", "-").replace("+flip", "f"))
    return f"{name}-lowest" if fusion["name"] == "mc_uncertainty" and fusion.get("weighting") == "lowest" else name


def shard_dir(cfg: DictConfig) -> Path:
    """``<run_dir>/infer/<fusion.name>[-tta<views>]``: this fusion's shards (and, for most fusions, its
    fused outputs)."""
    shard_kind(str(cfg.fusion.name))
    return Path(cfg.run_dir) / "infer" / output_folder_name({"name": cfg.fusion.name}, cfg.infer.tta)


def fusion_output_dir(cfg: DictConfig) -> Path:
    """Where the fused outputs go: the shards' folder, or ``<name>-lowest`` for the lowest-H variant."""
    shard_kind(str(cfg.fusion.name))
    return Path(cfg.run_dir) / "infer" / output_folder_name(cfg.fusion, cfg.infer.tta)


def predicted_sequences(cfg: DictConfig) -> list[str]:
    """Sequences of the splits named in ``infer.splits``, each once, in order: what infer writes, fuse reads."""
    names = split_sequences(cfg.dataset.splits, cfg.infer.splits, "infer.splits")
    if not names:
        raise ConfigError(f"infer.splits={list(cfg.infer.splits)} holds no sequence; nothing to predict")
    return names


def values_name(kind: str) -> str:
    """The per-point dataset of a shard kind: ``logits`` or ``probs``."""
    return "logits" if kind == "logits" else "probs"


# --------------------------------------------------------------------------- planning and sharding


@dataclass(frozen=True)
class Chunk:
    """Frames ``[start, stop)`` of one sequence: the unit of inference output."""

    sequence: str
    start: int
    stop: int

    def file_name(self, rank: int) -> str:
        return f"shard-{rank:03d}-{self.sequence}-{self.start:06d}-{self.stop:06d}.h5"

    @property
    def pattern(self) -> str:
        """Glob matching this chunk's file whatever rank wrote it."""
        return f"shard-[0-9][0-9][0-9]-{self.sequence}-{self.start:06d}-{self.stop:06d}.h5"

    def __str__(self) -> str:
        return f"sequence {self.sequence} frames {self.start}-{self.stop - 1}"


def plan_chunks(frame_counts: Mapping[str, int], frames_per_chunk: int) -> list[Chunk]:
    """Every chunk of every sequence, in a stable order independent of the world size."""
    if int(frames_per_chunk) < 1:
        raise ConfigError(f"infer.frames_per_chunk={frames_per_chunk} must be >= 1")
    return [Chunk(str(s), lo, min(int(n), lo + int(frames_per_chunk)))
            for s, n in frame_counts.items() for lo in range(0, int(n), int(frames_per_chunk))]


def chunk_owner(index: int, world_size: int) -> int:
    """Round-robin: chunk ``index`` of the plan belongs to rank ``index mod world_size``."""
    return index % world_size


def shard_chunks(chunks: Sequence[Chunk], rank: int, world_size: int) -> list[Chunk]:
    """The chunks of ``rank``: every chunk belongs to exactly one rank of ``world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return [c for i, c in enumerate(chunks) if chunk_owner(i, world_size) == rank]


def chunk_tiles(tile_file: TileFile, chunk: Chunk) -> range:
    """Indices (in the tile file) of the tiles of the chunk's frames."""
    return range(int(tile_file.frame_tile_offsets[chunk.start]), int(tile_file.frame_tile_offsets[chunk.stop]))


def shard_tiles(tile_files: Mapping[str, TileFile], chunks: Sequence[Chunk], rank: int,
                world_size: int) -> list[tuple[str, int]]:
    """(sequence, tile) pairs that ``rank`` predicts: the tiles of its chunks."""
    return [(c.sequence, t) for c in shard_chunks(chunks, rank, world_size) for t in chunk_tiles(tile_files[c.sequence], c)]


# --------------------------------------------------------------------------- shard files


class ChunkWriter:
    """Appends one chunk's tiles batch by batch into a temporary HDF5 file; ``close`` publishes it."""

    def __init__(self, path: Path, chunk: Chunk, tile_file: TileFile, kind: str, num_classes: int, attrs: dict):
        self.path, self.chunk, self.tile_file, self.kind = path, chunk, tile_file, kind
        tiles = chunk_tiles(tile_file, chunk)
        rows_needed = int(tile_file.tile_offsets[tiles.stop] - tile_file.tile_offsets[tiles.start])
        ensure_free_space(path, rows_needed * (2 * num_classes + 8) + (1 << 20))  # values, index, entropy
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self.h5 = h5py.File(self._tmp, "w")
        rows = 1 << 15
        self.h5.create_dataset("point_index", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(rows,))
        name = values_name(kind)
        self.values = self.h5.create_dataset(name, shape=(0, num_classes), maxshape=(None, num_classes),
                                             dtype=np.float16, chunks=(rows, num_classes))
        if kind == "mc":
            self.h5.create_dataset("entropy", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(rows,))
        self.attrs = attrs
        self.tile_ids: list[int] = []
        self.tile_points: list[int] = []
        self.points = 0
        self._open = True

    @contextlib.contextmanager
    def _writing(self):
        """The shard's HDF5 writes: a full disk becomes one line, and the temporary is dropped."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if isinstance(err, ScalePTError) or not is_disk_full(err, self.path.parent):
                raise
            self.abort()
            raise disk_full_error(self.path) from None

    def append(self, tiles: Sequence[int], point_counts: Sequence[int], point_index: np.ndarray,
               values: np.ndarray, entropy: np.ndarray | None) -> None:
        n = len(point_index)
        with self._writing():
            for name, data in (("point_index", point_index), (values_name(self.kind), values),
                               ("entropy", entropy)):
                if data is None:
                    continue
                ds = self.h5[name]
                ds.resize(self.points + n, axis=0)
                ds[self.points:] = data
        self.points += n
        self.tile_ids += [int(t) for t in tiles]
        self.tile_points += [int(c) for c in point_counts]

    def close(self) -> None:
        expected = list(chunk_tiles(self.tile_file, self.chunk))
        if self.tile_ids != expected:
            self.abort()
            raise InferenceError(f"{self.path}: predicted tiles {self.tile_ids[:5]}... differ from the chunk's "
                                 f"tiles {expected[:5]}...; this is a bug")
        h5 = self.h5
        ft = self.tile_file.frame_tile_offsets[self.chunk.start : self.chunk.stop + 1]
        with self._writing():
            h5.create_dataset("frame_ids", data=np.array(
                self.tile_file.frame_ids[self.chunk.start : self.chunk.stop], dtype=_FRAME_ID))
            h5.create_dataset("frame_tile_offsets", data=(ft - ft[0]).astype(np.int64))
            h5.create_dataset("tile_ids", data=np.asarray(self.tile_ids, dtype=np.int64))
            h5.create_dataset("tile_offsets", data=np.r_[0, np.cumsum(self.tile_points, dtype=np.int64)])
            for key, value in self.attrs.items():
                h5.attrs[key] = value
            h5.attrs["format_version"] = SHARD_FORMAT_VERSION
            h5.attrs["complete"] = True
            h5.close()
        self._open = False
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the temporary file (idempotent; a no-op after ``close``)."""
        if not self._open:
            return
        self._open = False
        try:
            with contextlib.suppress(OSError, RuntimeError):  # a file being dropped may fail to flush
                self.h5.close()
        finally:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def read_shard_meta(path: Path) -> dict | None:
    """Attributes and tile bookkeeping of a complete chunk file (None if unreadable or unfinished)."""
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
            if not attrs.get("complete") or attrs.get("format_version") != SHARD_FORMAT_VERSION:
                return None
            return {
                "path": path, "attrs": attrs,
                "frame_ids": [s.decode() for s in h5["frame_ids"][:]],
                "frame_tile_offsets": h5["frame_tile_offsets"][:],
                "tile_ids": h5["tile_ids"][:],
                "tile_offsets": h5["tile_offsets"][:],
            }
    except (OSError, KeyError):
        return None


def shard_problem(meta: dict | None, chunk: Chunk, tile_file: TileFile, expect: Mapping) -> str | None:
    """Why a chunk file cannot be used for ``chunk`` (None when it can)."""
    if meta is None:
        return "incomplete or unreadable"
    attrs = meta["attrs"]
    for key, value in expect.items():
        if attrs.get(key) != value:
            return f"made with {key}={attrs.get(key)!r}, now {value!r}"
    if meta["frame_ids"] != tile_file.frame_ids[chunk.start : chunk.stop]:
        return "its frames differ from the tile file's (re-tiled since?)"
    expected = np.asarray(chunk_tiles(tile_file, chunk), dtype=np.int64)
    if not np.array_equal(meta["tile_ids"], expected):
        missing = np.setdiff1d(expected, meta["tile_ids"])
        if len(missing):
            frames = np.unique(tile_file.tile_frame[missing])
            names = ", ".join(f"{chunk.sequence}/{tile_file.frame_ids[f]}" for f in frames[:3])
            return f"lacks {len(missing)} tile(s) (e.g. tile {int(missing[0])}) of frame(s) {names}"
        return f"holds tiles {meta['tile_ids'][:5].tolist()}... that are not the chunk's"
    counts = np.diff(tile_file.tile_offsets[expected[0] : expected[-1] + 2]) if len(expected) else np.zeros(0)
    if not np.array_equal(np.diff(meta["tile_offsets"]), counts):
        bad = int(np.flatnonzero(np.diff(meta["tile_offsets"]) != counts)[0])
        return f"tile {int(expected[bad])} has another number of points than in the tile file"
    return None


def find_chunk_files(out_dir: Path, chunk: Chunk) -> list[Path]:
    """Chunk files of ``chunk`` written by any rank, newest first."""
    return sorted(out_dir.glob(chunk.pattern), key=lambda p: p.stat().st_mtime, reverse=True)


def usable_chunk_file(out_dir: Path, chunk: Chunk, tile_file: TileFile, expect: Mapping) -> tuple[Path | None, str]:
    """A usable finished file of ``chunk``, or None and why not."""
    why = "not found"
    for path in find_chunk_files(out_dir, chunk):
        problem = shard_problem(read_shard_meta(path), chunk, tile_file, expect)
        if problem is None:
            return path, ""
        why = f"{path.name}: {problem}"
    return None, why
