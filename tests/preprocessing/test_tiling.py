"""Tiling invariants for every strategy, on real scans and on synthetic ones.

The strategies' parameters come from conf/sampling/*.yaml through hydra.compose,
with max_points lowered so that even small synthetic frames need several tiles.
"""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from preprocessing.preprocess import crop_mask, frame_rng, tile_frame
from preprocessing.tiling import STRATEGIES, make_tiles
from scalept.data.semantickitti import Sequence
from scalept.errors import ConfigError

CROP = {"min_range": 0.0, "max_range": 60.0}


def sampling_cfg(compose_cfg, name: str, **overrides) -> dict:
    cfg = compose_cfg(f"sampling={name}", *[f"sampling.{k}={v}" for k, v in overrides.items()])
    return OmegaConf.to_container(cfg.sampling, resolve=True)


def check_invariants(points, cfg, seed=0):
    tiles = tile_frame(points, cfg, CROP, np.random.default_rng(seed))
    kept = crop_mask(points, CROP)
    count = np.zeros(len(points), dtype=np.int64)
    for tile in tiles:
        assert tile.dtype == np.int32 and (np.diff(tile) > 0).all()  # ascending, no duplicates
        count[tile] += 1
    assert (count[kept] >= 1).all(), "a point that survives the crop is in no tile"
    assert (count[~kept] == 0).all(), "a cropped point is in a tile"
    if cfg["name"] != "none":
        assert max(len(t) for t in tiles) <= cfg["max_points"]
    again = tile_frame(points, cfg, CROP, np.random.default_rng(seed))
    assert len(again) == len(tiles) and all((a == b).all() for a, b in zip(again, tiles))
    return tiles


@pytest.mark.parametrize("name", STRATEGIES)
def test_invariants_on_real_scans(compose_cfg, real_root, name):
    cfg = sampling_cfg(compose_cfg, name)
    for seq, frame in (("08", 0), ("08", 1), ("00", 3)):
        points = Sequence(real_root, seq).frame(frame).points
        tiles = check_invariants(points, cfg)
        if name != "none":
            assert len(tiles) >= 3  # ~120k points, 40k per tile


@pytest.mark.parametrize("name", STRATEGIES)
def test_invariants_on_synthetic_scans(compose_cfg, synthetic_root, name):
    seq = Sequence(synthetic_root, "00")
    overrides = {} if name == "none" else {"max_points": 6000}
    if name == "hilbert":
        overrides["overlap"] = 1000
    cfg = sampling_cfg(compose_cfg, name, **overrides)
    for index in range(len(seq)):
        points = seq.frame(index).points
        tiles = check_invariants(points, cfg)
        if name != "none":
            assert len(tiles) >= int(crop_mask(points, CROP).sum()) // 6000


@pytest.mark.parametrize("name", [s for s in STRATEGIES if s.endswith("knn")])
def test_knn_tiles_are_full_and_seed_dependent(compose_cfg, real_root, name):
    points = Sequence(real_root, "08").frame(0).points
    cfg = sampling_cfg(compose_cfg, name)
    tiles = tile_frame(points, cfg, CROP, np.random.default_rng(0))
    assert all(len(t) == cfg["max_points"] for t in tiles)  # k nearest neighbours, always k
    if name in ("knn", "fps_knn"):  # seeds drawn at random: another seed, other tiles
        other = tile_frame(points, cfg, CROP, np.random.default_rng(1))
        assert any(len(a) != len(b) or (a != b).any() for a, b in zip(tiles, other))


def test_frame_rng_depends_on_seed_sequence_and_frame_only():
    draw = lambda *key: frame_rng(*key).integers(1 << 30)  # noqa: E731
    assert draw(0, "00", "000001") == draw(0, "00", "000001")
    assert len({draw(0, "00", "000001"), draw(1, "00", "000001"), draw(0, "01", "000001"), draw(0, "00", "000002")}) == 4


def test_hilbert_windows_are_compact(compose_cfg, real_root):
    """Hilbert windows hold nearby points: each tile's extent is far below the frame's."""
    points = Sequence(real_root, "08").frame(0).points
    tiles = tile_frame(points, sampling_cfg(compose_cfg, "hilbert"), CROP, np.random.default_rng(0))
    frame_area = np.ptp(points[:, 0]) * np.ptp(points[:, 1])
    areas = [np.ptp(points[t, 0]) * np.ptp(points[t, 1]) for t in tiles]
    assert np.median(areas) < 0.5 * frame_area


def test_block_splits_a_dense_cluster_and_respects_max_points():
    rng = np.random.default_rng(0)
    dense = rng.normal(scale=0.05, size=(5000, 3))  # 5000 points within ~20 cm
    sparse = rng.uniform(-40, 40, size=(2000, 3))
    points = np.concatenate([dense, sparse])
    cfg = {"name": "block", "max_points": 500, "block_size": 30.0, "overlap": 1.0}
    tiles = make_tiles(points, cfg, rng)
    count = np.zeros(len(points), int)
    for t in tiles:
        count[t] += 1
    assert (count >= 1).all() and max(map(len, tiles)) <= 500


def test_knn_terminates_on_duplicate_points():
    points = np.zeros((3000, 3))
    points[1500:] = 1.0
    tiles = make_tiles(points, {"name": "fps_knn", "max_points": 1000}, np.random.default_rng(0))
    count = np.zeros(len(points), int)
    for t in tiles:
        count[t] += 1
    assert (count >= 1).all() and len(tiles) <= 6


def test_small_frame_is_one_tile():
    points = np.random.default_rng(0).normal(size=(100, 3))
    for name in STRATEGIES:
        tiles = make_tiles(points, {"name": name, "max_points": 1000}, np.random.default_rng(0))
        assert len(tiles) == 1 and (tiles[0] == np.arange(100)).all()


def test_bad_sampling_values_name_the_key():
    points = np.random.default_rng(0).normal(size=(5000, 3))
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="sampling.name='squares' is unknown"):
        make_tiles(points, {"name": "squares"}, rng)
    with pytest.raises(ConfigError, match="sampling.block_size is required"):
        make_tiles(points, {"name": "block", "max_points": 100, "overlap": 1.0}, rng)
    with pytest.raises(ConfigError, match=r"sampling.overlap=100 is out of range.*< 100"):
        make_tiles(points, {"name": "hilbert", "max_points": 100, "overlap": 100, "resolution": 0.1}, rng)
    with pytest.raises(ConfigError, match="sampling.max_points=0"):
        make_tiles(points, {"name": "knn", "max_points": 0}, rng)


def test_every_sampling_option_composes(compose_cfg):
    for name in STRATEGIES:
        assert sampling_cfg(compose_cfg, name)["name"] == name
