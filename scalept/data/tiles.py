"""ScalePT's tile files: one HDF5 file per (sampling strategy, sequence).

Layout (flat arrays plus offsets, chunked, labels and indices compressed; docs/architecture.md):

    /frame_ids            (F,)    str   scan stem, e.g. "000042"
    /frame_offsets        (F+1,)  int64 frame f's points are points[frame_offsets[f]:frame_offsets[f+1]]
    /points               (P, 4)  float32 x, y, z, remission, every point of every frame
    /labels               (P,)    int8  class index 0..18, -1 ignored (all -1 when unlabelled)
    /frame_tile_offsets   (F+1,)  int64 frame f's tiles are tiles frame_tile_offsets[f]:...[f+1]
    /tile_offsets         (T+1,)  int64 tile t is tile_indices[tile_offsets[t]:tile_offsets[t+1]]
    /tile_indices         (I,)    int32 point index within its frame
    /tile_frame           (T,)    int32 frame of each tile
    /frame_fill_offsets   (F+1,)  int64 frame f's fill rows are fill[frame_fill_offsets[f]:...[f+1]]
    /fill                 (U, 2)  int32 (point in no tile, nearest point in a tile), within its frame

The fill map (the last two) lets fusion give range-cropped points the prediction of their
nearest tiled point by a gather instead of a nearest-neighbour search per frame; files
written before it existed lack it and fusion searches instead.

Attributes: ``sampling`` (JSON of the strategy and its parameters), ``crop``
(JSON), ``sequence``, ``has_labels``, ``format_version`` and ``complete``,
which is set last: a file without ``complete=True`` is never trusted.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial import cKDTree

from scalept.atomic import atomic_path, ensure_free_space
from scalept.errors import ScalePTError

FORMAT_VERSION = 1
_FRAME_ID = "S32"


class TileFileError(ScalePTError, RuntimeError):
    """A tile file is missing, incomplete or of another format; the message says how to rebuild it."""


@dataclass
class FrameTiles:
    """One frame's points and tiles, as written by the preprocessing stage."""

    frame_id: str
    points: np.ndarray  # (N, 4) float32
    labels: np.ndarray  # (N,) int8, -1 ignored
    tiles: list[np.ndarray]  # ascending int32 indices into points
    fill: np.ndarray | None = None  # (U, 2) int32 fill map of the frame (see fill_map), None: not stored


def _flat(arrays: Sequence[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
    return flat, offsets


# Filters per flat array, measured on real scans: float32 coordinates are noise to a
# compressor (lzf: 0.88 of the size at 15x the write time), so points are stored
# plain; labels shrink to 0.10 with lzf, ascending tile indices to 0.04 with
# shuffle + lzf, at 1-3 ms per frame. Every chunk carries HDF5's Fletcher-32
# checksum, checked on every read: damaged bytes are an error, never other points.
_FILTERS = {"points": {"fletcher32": True}, "labels": {"compression": "lzf", "fletcher32": True},
            "tile_indices": {"compression": "lzf", "shuffle": True, "fletcher32": True},
            "fill": {"compression": "lzf", "shuffle": True, "fletcher32": True}}
_DTYPES = {"points": np.float32, "labels": np.int8, "tile_indices": np.int32, "fill": np.int32}
_CHUNK_ROWS = {"points": 1 << 16, "labels": 1 << 17, "tile_indices": 1 << 17, "fill": 1 << 16}
_COLUMNS = {"points": 4, "fill": 2}


def nearest_covered(xyz: np.ndarray, covered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uncovered points, the nearest covered point of each); both empty when nothing or everything is covered."""
    missing = np.flatnonzero(~covered)
    if len(missing) == 0 or not covered.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    known = np.flatnonzero(covered)
    tree = cKDTree(xyz[known, :3], balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(xyz[missing, :3], k=1)
    return missing, known[nearest]


def fill_map(points: np.ndarray, tiles: Sequence[np.ndarray]) -> np.ndarray:
    """(U, 2) int32 rows (point in no tile, its nearest point in a tile) of one frame."""
    covered = np.zeros(len(points), dtype=bool)
    for tile in tiles:
        covered[tile] = True
    missing, source = nearest_covered(points, covered)
    return np.stack([missing, source], axis=1).astype(np.int32)


def _flat_dataset(h5: h5py.File, name: str, rows: int, data: np.ndarray | None = None) -> h5py.Dataset:
    shape = (rows, _COLUMNS[name]) if name in _COLUMNS else (rows,)
    if rows == 0:  # e.g. a fill map with nothing to fill: chunks and filters need at least one row
        return h5.create_dataset(name, shape=shape, dtype=_DTYPES[name])
    chunks = (min(_CHUNK_ROWS[name], max(1, rows)),) + shape[1:]
    return h5.create_dataset(name, shape=shape, dtype=_DTYPES[name], data=data, chunks=chunks, **_FILTERS[name])


def write_tile_file(path: str | os.PathLike, frames: Iterable[FrameTiles], attrs: dict) -> None:
    """Write frames and tiles atomically, then mark the file complete."""
    frames = list(frames)
    points, frame_offsets = _flat([f.points for f in frames], np.float32)
    labels, _ = _flat([f.labels for f in frames], np.int8)
    all_tiles = [t for f in frames for t in f.tiles]
    tile_indices, tile_offsets = _flat(all_tiles, np.int32)
    frame_tile_offsets = np.r_[0, np.cumsum([len(f.tiles) for f in frames])].astype(np.int64)
    tile_frame = np.repeat(np.arange(len(frames), dtype=np.int32), np.diff(frame_tile_offsets))
    has_fill = bool(frames) and all(f.fill is not None for f in frames)
    if has_fill:
        fill, frame_fill_offsets = _flat([f.fill for f in frames], np.int32)
    raw = points.nbytes + labels.nbytes + tile_indices.nbytes + (fill.nbytes if has_fill else 0)
    ensure_free_space(path, raw + (1 << 20))  # uncompressed: an upper bound
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("frame_ids", data=np.array([f.frame_id for f in frames], dtype=_FRAME_ID))
            h5.create_dataset("frame_offsets", data=frame_offsets)
            _flat_dataset(h5, "points", len(points), points.reshape(-1, 4))
            _flat_dataset(h5, "labels", len(labels), labels)
            h5.create_dataset("frame_tile_offsets", data=frame_tile_offsets)
            h5.create_dataset("tile_offsets", data=tile_offsets)
            _flat_dataset(h5, "tile_indices", len(tile_indices), tile_indices)
            h5.create_dataset("tile_frame", data=tile_frame)
            if has_fill:
                h5.create_dataset("frame_fill_offsets", data=frame_fill_offsets)
                _flat_dataset(h5, "fill", len(fill), fill.reshape(-1, 2))
            for key, value in attrs.items():
                h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["complete"] = True


def is_complete(path: str | os.PathLike) -> bool:
    """True for a tile file that was finished (a half-written or foreign file is not)."""
    try:
        with h5py.File(path, "r") as h5:
            return bool(h5.attrs.get("complete", False)) and h5.attrs.get("format_version") == FORMAT_VERSION
    except (OSError, KeyError):
        return False


class TileFile:
    """Read access to one tile file, opened lazily so each DataLoader worker gets its own handle."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TileFileError(f"{self.path}: tile file not found; run `python -m scalept.launch stage=preprocess` "
                                "with the same dataset and sampling first")
        if not is_complete(self.path):
            raise TileFileError(f"{self.path}: tile file is incomplete or of another format version; delete it and "
                                "rerun stage=preprocess")
        self._h5: h5py.File | None = None
        with h5py.File(self.path, "r") as h5:
            self.frame_ids = [s.decode() for s in h5["frame_ids"][:]]
            self.frame_offsets = h5["frame_offsets"][:]
            self.frame_tile_offsets = h5["frame_tile_offsets"][:]
            self.tile_offsets = h5["tile_offsets"][:]
            self.tile_frame = h5["tile_frame"][:]
            self.frame_fill_offsets = h5["frame_fill_offsets"][:] if "frame_fill_offsets" in h5 else None
            self.attrs = {k: _decode_attr(v) for k, v in h5.attrs.items()}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None  # h5py handles do not survive pickling into worker processes
        return state

    @property
    def h5(self) -> h5py.File:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)

    @property
    def num_tiles(self) -> int:
        return len(self.tile_frame)

    def read(self, name: str, rows: slice) -> np.ndarray:
        """Rows of one flat array; a chunk whose checksum fails (damaged bytes) is a one-line error."""
        try:
            return self.h5[name][rows]
        except OSError as err:
            raise TileFileError(f"{self.path}: {name} rows {rows.start}-{rows.stop} are damaged "
                                f"({str(err).splitlines()[0]}); delete the file and rerun stage=preprocess") from None

    def frame(self, f: int) -> FrameTiles:
        lo, hi = self.frame_offsets[f], self.frame_offsets[f + 1]
        t_lo, t_hi = self.frame_tile_offsets[f], self.frame_tile_offsets[f + 1]
        flat = self.read("tile_indices", slice(self.tile_offsets[t_lo], self.tile_offsets[t_hi]))
        bounds = self.tile_offsets[t_lo : t_hi + 1] - self.tile_offsets[t_lo]
        tiles = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        rows = slice(lo, hi)
        return FrameTiles(self.frame_ids[f], self.read("points", rows), self.read("labels", rows), tiles)

    @property
    def has_fill_map(self) -> bool:
        return self.frame_fill_offsets is not None

    def fill(self, f: int) -> np.ndarray:
        """Frame ``f``'s fill map: (U, 2) rows (point in no tile, nearest point in a tile)."""
        return self.read("fill", slice(self.frame_fill_offsets[f], self.frame_fill_offsets[f + 1]))

    def tile(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points, labels and frame indices of tile ``t`` (reads only the tile's frame span)."""
        f = self.tile_frame[t]
        indices = self.read("tile_indices", slice(self.tile_offsets[t], self.tile_offsets[t + 1]))
        lo = self.frame_offsets[f]
        span = slice(lo + int(indices.min()), lo + int(indices.max()) + 1)
        local = indices - indices.min()
        return self.read("points", span)[local], self.read("labels", span)[local], indices

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def _decode_attr(value):
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value.item() if isinstance(value, np.generic) else value


def check_tiling(tile_file: TileFile, sampling: dict, crop: dict) -> None:
    """Refuse a tile file built with other tiling parameters than the run's (``cfg.sampling``, ``preprocess.crop``).

    Without this a run with ``sampling.max_points=3000`` would train on the old 40k tiles without a word.
    """
    for key, wanted in (("sampling", sampling), ("crop", crop)):
        built = tile_file.attrs.get(key)
        if built != wanted:
            raise TileFileError(f"{tile_file.path}: built with {key}={json.dumps(built)}, but this run asks for "
                                f"{json.dumps(wanted)}; use the same settings, or delete the file or set another tiles_dir "
                                "and rerun stage=preprocess")


def open_checked(paths: Sequence[str | os.PathLike], cfg) -> list[TileFile]:
    """The tile files, each refused in one line when tiled otherwise than ``cfg.sampling`` and ``cfg.preprocess.crop``."""
    from omegaconf import OmegaConf

    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    crop = OmegaConf.to_container(cfg.preprocess.crop, resolve=True)
    files = [TileFile(p) for p in paths]
    for tile_file in files:
        check_tiling(tile_file, sampling, crop)
    return files


def tile_file_path(tiles_dir: str | os.PathLike, sampling: str, sequence: str) -> Path:
    """Where the tiles of one (strategy, sequence) live: ``<tiles_dir>/<sampling>/<SS>.h5``."""
    return Path(tiles_dir) / sampling / f"{sequence}.h5"


# offset array -> the array whose running count it holds
_OFFSETS = {"frame_offsets": "points", "frame_tile_offsets": "tile_frame", "tile_offsets": "tile_indices",
            "frame_fill_offsets": "fill"}


def merge_tile_files(parts: Sequence[str | os.PathLike], path: str | os.PathLike, attrs: dict) -> None:
    """Concatenate complete part files (consecutive frame chunks) into one tile file, atomically.

    Streams one part at a time, so memory stays bounded by the largest part and not
    by the sequence (a 4,000-frame sequence holds about 8 GB of points). The fill map is
    kept when every part has one.
    """
    sizes = {}
    with_fill = True
    for part in parts:
        if not is_complete(part):
            raise TileFileError(f"{part}: part file is incomplete; rerun its preprocessing array task")
        with h5py.File(part, "r") as h5:
            with_fill = with_fill and "fill" in h5
            for name in ("points", "labels", "tile_indices", "tile_frame", "frame_ids", "fill"):
                if name in h5:
                    sizes[name] = sizes.get(name, 0) + len(h5[name])
    ensure_free_space(path, sum(Path(p).stat().st_size for p in parts) + (1 << 20))
    flat = ["points", "labels", "tile_indices"] + (["fill"] if with_fill else [])
    offsets = {k: v for k, v in _OFFSETS.items() if with_fill or v != "fill"}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        out.create_dataset("frame_ids", shape=(sizes["frame_ids"],), dtype=_FRAME_ID)
        for name in flat:
            _flat_dataset(out, name, sizes[name])
        out.create_dataset("tile_frame", shape=(sizes["tile_frame"],), dtype=np.int32)
        for name in offsets:
            rows = sizes["frame_ids"] if name != "tile_offsets" else sizes["tile_frame"]
            out.create_dataset(name, shape=(rows + 1,), dtype=np.int64)
            out[name][0] = 0
        done = dict.fromkeys(["frame_ids", "tile_frame", *flat], 0)
        for part in parts:
            with h5py.File(part, "r") as h5:
                n_frames, n_tiles = len(h5["frame_ids"]), len(h5["tile_frame"])
                f0, t0 = done["frame_ids"], done["tile_frame"]
                out["frame_ids"][f0 : f0 + n_frames] = h5["frame_ids"][:]
                out["tile_frame"][t0 : t0 + n_tiles] = h5["tile_frame"][:] + f0
                for name, target in offsets.items():
                    start = f0 if name != "tile_offsets" else t0
                    out[name][start + 1 : start + len(h5[name])] = h5[name][1:] + done[target]
                for name in flat:
                    n = len(h5[name])
                    for lo in range(0, n, 1 << 22):  # bounded copies even for huge parts
                        hi = min(n, lo + (1 << 22))
                        out[name][done[name] + lo : done[name] + hi] = h5[name][lo:hi]
                for name in done:
                    done[name] += len(h5[name])
        for key, value in attrs.items():
            out.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        out.attrs["format_version"] = FORMAT_VERSION
        out.attrs["complete"] = True
