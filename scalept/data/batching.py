"""Batches by voxel budget: a step holds as many tiles as fit ``train.batch_voxels`` voxels per rank.

Tiles differ in size (a block tile can hold 2k voxels, a whole frame 100k), so a fixed
tile count either wastes a big GPU or overflows a small one. Each tile's voxel count at
the training grid (before augmentation, which moves it by a few per cent) is computed
once and cached beside its tile file; an epoch's plan then packs the (seed, epoch)
permutation of the tiles into *micro-steps*: one list of tiles per rank, each list at
most ``batch_voxels`` voxels (a tile larger than that alone). Every tile is used once
per epoch; the last micro-step is completed with tiles from the start of the
permutation, as ``DistributedSampler`` pads, so every rank runs the same number of
micro-steps. The plan depends only on (voxel counts, budget, world size, seed, epoch):
a resumed run recomputes it and skips the micro-steps already done.
"""
from __future__ import annotations

import heapq
import logging
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from scalept.atomic import atomic_path
from scalept.data.tiles import TileFile

log = logging.getLogger(__name__)

FRAMES_PER_TASK = 16  # frames counted per worker task (small: a short val sequence still spreads over workers)


# ----------------------------------------------------------------------------- voxel counts


def _count_frames(path: str, grid_size: float, first: int, end: int) -> np.ndarray:
    """Voxels of every tile of frames [first, end) of one tile file, as ``TileDataset`` voxelizes them."""
    tile_file = TileFile(path)
    lo, hi = tile_file.frame_tile_offsets[first], tile_file.frame_tile_offsets[end]
    counts = np.empty(hi - lo, dtype=np.int64)
    for f in range(first, end):
        frame = tile_file.frame(f)
        if not frame.tiles:
            continue
        cells = np.floor(frame.points[:, :3] / grid_size).astype(np.int64)
        cells -= cells.min(axis=0)
        span = cells.max(axis=0) + 1
        keys = (cells[:, 0] * span[1] + cells[:, 1]) * span[2] + cells[:, 2]
        t0 = tile_file.frame_tile_offsets[f] - lo
        for i, indices in enumerate(frame.tiles):
            counts[t0 + i] = len(np.unique(keys[indices]))
    tile_file.close()
    return counts


def _cache_path(tile_path: Path, grid_size: float) -> Path:
    return tile_path.with_name(f"{tile_path.name}.voxels-{grid_size:g}m.npz")


def _stamp(tile_path: Path) -> np.ndarray:
    stat = tile_path.stat()
    return np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def _read_cache(tile_path: Path, grid_size: float, num_tiles: int) -> np.ndarray | None:
    cache = _cache_path(tile_path, grid_size)
    try:
        with np.load(cache) as saved:
            if np.array_equal(saved["stamp"], _stamp(tile_path)) and len(saved["counts"]) == num_tiles:
                return saved["counts"]
    except (OSError, KeyError, ValueError):
        pass
    return None


def tile_voxel_counts(paths: Sequence[str | os.PathLike], grid_size: float, workers: int = 0) -> list[np.ndarray]:
    """Per tile file, the voxel count of each tile at ``grid_size``; cached in ``<file>.voxels-<grid>m.npz``.

    A cache is trusted only while its tile file keeps the size and modification time it
    was computed from. Missing counts are computed by ``workers`` processes (0: here).
    """
    files = [TileFile(p) for p in paths]
    counts: list[np.ndarray | None] = [_read_cache(f.path, grid_size, f.num_tiles) for f in files]
    missing = [i for i, c in enumerate(counts) if c is None]
    if not missing:
        return counts
    tasks = [(str(files[i].path), grid_size, lo, min(lo + FRAMES_PER_TASK, files[i].num_frames))
             for i in missing for lo in range(0, files[i].num_frames, FRAMES_PER_TASK)]
    log.info("counting the voxels of the tiles of %d file(s) at %g m (cached for later runs)",
             len(missing), grid_size)
    if workers > 0 and len(tasks) > 1:
        with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
            parts = list(pool.map(_count_frames, *zip(*tasks)))
    else:
        parts = [_count_frames(*task) for task in tasks]
    for i in missing:
        mine = [p for p, t in zip(parts, tasks) if t[0] == str(files[i].path)]
        counts[i] = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
        try:
            with atomic_path(_cache_path(files[i].path, grid_size)) as tmp:
                with open(tmp, "wb") as out:
                    np.savez(out, counts=counts[i], stamp=_stamp(files[i].path))
        except OSError as err:  # a read-only tile folder: count again next time
            log.warning("could not cache voxel counts beside %s (%s)", files[i].path, err)
    return counts


# ----------------------------------------------------------------------------- the plan


def pack(voxels: np.ndarray, order: Sequence[int], budget: int, ranks: int) -> list[list[list[int]]]:
    """Micro-steps of ``ranks`` tile lists from ``order``, each list within ``budget`` voxels.

    Tiles are taken in order; each goes to the least-loaded rank of the current
    micro-step if it fits there (an empty list takes any tile), otherwise the
    micro-step is closed and a new one begun. Lists still empty at the end are
    filled with tiles from the start of ``order``.
    """
    order = [int(i) for i in order]
    if not order:
        return []
    steps: list[list[list[int]]] = []
    lists: list[list[int]] = [[] for _ in range(ranks)]
    heap = [(0, r) for r in range(ranks)]  # (load, rank): the least-loaded rank first
    for item in order:
        load, rank = heap[0]
        if lists[rank] and load + voxels[item] > budget:
            steps.append(lists)
            lists = [[] for _ in range(ranks)]
            heap = [(0, r) for r in range(ranks)]
            load, rank = heap[0]
        lists[rank].append(item)
        heapq.heapreplace(heap, (load + int(voxels[item]), rank))
    refill = iter(order * math.ceil(ranks / len(order)))
    for tiles in lists:
        if not tiles:
            tiles.append(next(refill))
    steps.append(lists)
    return steps


def epoch_order(num_tiles: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The tile order of an epoch: a permutation drawn from (seed, epoch) alone, as DistributedSampler draws it."""
    if not shuffle:
        return list(range(num_tiles))
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_tiles, generator=generator).tolist()


class VoxelBudgetBatches(Sampler):
    """This rank's micro-batches of an epoch's plan (a DataLoader ``batch_sampler``).

    Yields lists of ``(tile item, epoch)`` keys: the epoch travels with each item so
    that persistent loader workers draw that epoch's augmentations. ``skip`` drops
    the first micro-steps of the epoch (mid-epoch resume).
    """

    def __init__(self, voxels: np.ndarray, budget: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.voxels, self.budget, self.rank, self.world_size = np.asarray(voxels), int(budget), rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.skip = 0, 0
        self._plans: dict[int, list[list[list[int]]]] = {}

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Every rank's micro-batches of ``epoch`` (the last two epochs' plans are kept)."""
        if epoch not in self._plans:
            order = epoch_order(len(self.voxels), self.seed, epoch, self.shuffle)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = pack(self.voxels, order, self.budget, self.world_size)
        return self._plans[epoch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def micro_steps(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def step_voxels(self, epoch: int, accum: int) -> list[int]:
        """Voxels of every optimizer step of ``epoch`` summed over ranks (``accum`` micro-steps each)."""
        per_micro = [sum(int(self.voxels[i]) for tiles in step for i in tiles) for step in self.plan(epoch)]
        return [sum(per_micro[i : i + accum]) for i in range(0, len(per_micro), accum)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in self.plan(self.epoch)[self.skip :]:
            yield [(item, self.epoch) for item in step[self.rank]]

    def __len__(self) -> int:
        return self.micro_steps(self.epoch) - self.skip
