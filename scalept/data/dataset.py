"""Tiles as model inputs: voxelized (grid-sampled), augmented for training, batched with offsets.

Training, validation and inference all read tiles through :class:`TileDataset`,
so a tile is voxelized the same way everywhere; ``inverse`` maps every point of
the tile to its voxel, which is how per-voxel logits become per-point logits.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from scalept.data.tiles import TileFile, TileFileError
from scalept.serialization import MAX_DEPTH

MAX_CELLS = 1 << MAX_DEPTH  # cells per axis that the model's curve codes hold


def voxelize(xyz: np.ndarray, grid_size: float, rng: np.random.Generator | None = None):
    """One representative point per occupied ``grid_size`` cell.

    Returns (representatives, grid, inverse): indices of the chosen points, their
    integer cell coordinates (per-sample minimum at 0) and, for every input point,
    the index of its voxel. With ``rng`` the representative is a random point of
    its cell (training); without, the first one (deterministic inference).
    """
    cells = np.floor(xyz / grid_size).astype(np.int64)
    cells -= cells.min(axis=0)
    span = cells.max(axis=0) + 1
    keys = (cells[:, 0] * span[1] + cells[:, 1]) * span[2] + cells[:, 2]
    order = rng.permutation(len(keys)) if rng is not None else np.arange(len(keys))
    _, first, inverse = np.unique(keys[order], return_index=True, return_inverse=True)
    representatives = order[first]
    point_voxel = np.empty(len(keys), dtype=np.int64)
    point_voxel[order] = inverse.reshape(-1)
    return representatives, cells[representatives], point_voxel


def augment(xyz: np.ndarray, cfg: Mapping, rng: np.random.Generator) -> np.ndarray:
    """The recipe's train augmentations (docs/architecture.md): z-rotation, scaling, x/y flips, clipped jitter."""
    xyz = xyz.astype(np.float32, copy=True)
    if cfg["rotate_z"]:
        angle = rng.uniform(-np.pi, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        xyz[:, :2] = xyz[:, :2] @ np.array([[c, s], [-s, c]], dtype=np.float32)
    low, high = cfg["scale"]
    xyz *= np.float32(rng.uniform(low, high))
    for axis in (0, 1):
        if rng.random() < cfg["flip_p"]:
            xyz[:, axis] = -xyz[:, axis]
    sigma, clip = cfg["jitter_sigma"], cfg["jitter_clip"]
    if sigma > 0:
        xyz += np.clip(rng.normal(0.0, sigma, size=xyz.shape), -clip, clip).astype(np.float32)
    return xyz


class TileDataset(Dataset):
    """Every tile of the given tile files, in file order; ``index`` entries are (file, tile).

    ``tiles`` restricts the dataset to a subset of (file, tile) pairs (e.g. the
    label-efficient frame subset or one rank's inference shard). Files open
    lazily, so each DataLoader worker has its own HDF5 handles.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], grid_size: float, augmentation: Mapping | None = None,
                 tiles: Sequence[tuple[int, int]] | None = None, seed: int = 0):
        self.files = [TileFile(p) for p in paths]
        self.grid_size = float(grid_size)
        self.augmentation = augmentation
        self.seed = seed
        if tiles is None:
            tiles = [(f, t) for f, tile_file in enumerate(self.files) for t in range(tile_file.num_tiles)]
        self.index = list(tiles)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, np.ndarray | int]:
        """Sample ``key``: an item (epoch 0), or (item, epoch) from a batch sampler, so that persistent
        workers know the epoch. Augmentations are a function of (seed, epoch, item): a resumed run
        draws the same ones."""
        item, epoch = key if isinstance(key, tuple) else (key, 0)
        file_index, tile = self.index[item]
        points, labels, point_index = self.files[file_index].tile(tile)
        rng = None
        xyz = points[:, :3]
        if self.augmentation is not None:
            rng = np.random.default_rng([self.seed, epoch, item])
            xyz = augment(xyz, self.augmentation, rng)
        chosen, grid, inverse = voxelize(xyz, self.grid_size, rng)
        if len(grid) and grid.max() >= MAX_CELLS:
            tile_file = self.files[file_index]
            frame = tile_file.frame_ids[tile_file.tile_frame[tile]]
            span = (xyz.max(axis=0) - xyz.min(axis=0)).round(1).tolist()
            raise TileFileError(f"{tile_file.path} frame {frame} tile {tile}: spans {span} m, more than {MAX_CELLS} "
                                f"cells of {self.grid_size} m on an axis (an outlier point?); crop it with "
                                "preprocess.crop (max_range, min_z, max_z) and rerun stage=preprocess")
        feat = np.concatenate([xyz[chosen], points[chosen, 3:4]], axis=1).astype(np.float32)
        return {
            "feat": feat, "grid": grid, "label": labels[chosen].astype(np.int64), "inverse": inverse,
            "point_label": labels.astype(np.int64), "point_index": point_index.astype(np.int64),
            "file": file_index, "tile": tile,
        }


def collate(samples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Concatenate samples; ``offsets`` are cumulative voxel counts, ``point_offsets`` point counts,
    and ``inverse`` indexes the concatenated voxels."""
    voxels = np.cumsum([len(s["feat"]) for s in samples])
    points = np.cumsum([len(s["inverse"]) for s in samples])
    starts = np.r_[0, voxels[:-1]]
    batch = {
        "feat": torch.from_numpy(np.concatenate([s["feat"] for s in samples])),
        "grid": torch.from_numpy(np.concatenate([s["grid"] for s in samples])),
        "label": torch.from_numpy(np.concatenate([s["label"] for s in samples])),
        "inverse": torch.from_numpy(np.concatenate([s["inverse"] + o for s, o in zip(samples, starts)])),
        "point_label": torch.from_numpy(np.concatenate([s["point_label"] for s in samples])),
        "point_index": torch.from_numpy(np.concatenate([s["point_index"] for s in samples])),
        "offsets": torch.from_numpy(voxels.astype(np.int64)),
        "point_offsets": torch.from_numpy(points.astype(np.int64)),
        "file": torch.tensor([s["file"] for s in samples]),
        "tile": torch.tensor([s["tile"] for s in samples]),
    }
    return batch


def split_sequences(dataset_splits: Mapping, split_names: Sequence[str], key: str) -> list[str]:
    """Sequences of the named splits (``key`` is the config key that named them), each once, in order."""
    from scalept.errors import ConfigError

    names: list[str] = []
    for split in split_names:
        if split not in dataset_splits:
            raise ConfigError(f"{key} names {split!r}, but dataset.splits has only "
                              f"{', '.join(dataset_splits)}; fix one of the two")
        names += [str(s) for s in dataset_splits[split] if str(s) not in names]
    return names


def split_tile_files(tiles_dir: str | os.PathLike, sampling: str, sequences: Sequence[str]) -> list[Path]:
    """The tile files of a split's sequences, ``<tiles_dir>/<sampling>/<SS>.h5``."""
    from scalept.data.tiles import tile_file_path

    return [tile_file_path(tiles_dir, sampling, str(s)) for s in sequences]
