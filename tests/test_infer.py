"""Inference stage: sharding over ranks, skipping finished chunks, equality with whole-frame prediction,
checkpoint errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inference_helpers import base_overrides, compose, prepare_tiles, save_random_checkpoint
from scalept import fuse, infer, shards
from scalept.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from scalept.data.dataset import voxelize
from scalept.data.semantickitti import read_labels, to_raw
from scalept.data.tiles import TileFile, TileFileError, tile_file_path
from scalept.shards import shard_dir


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_chunks_cover_every_frame_exactly_once(world_size):
    counts = {"08": 7, "09": 3, "10": 1}
    chunks = shards.plan_chunks(counts, 2)
    seen = [(c.sequence, f) for r in range(world_size) for c in shards.shard_chunks(chunks, r, world_size)
            for f in range(c.start, c.stop)]
    assert sorted(seen) == sorted((s, f) for s, n in counts.items() for f in range(n))
    assert len(seen) == len(set(seen))


@pytest.fixture(scope="module")
def block_tiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer-block")
    cfg = compose(*base_overrides(root), "infer.frames_per_chunk=1")
    prepare_tiles(cfg)
    return root


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_tile_exactly_once(block_tiles, world_size):
    cfg = compose(*base_overrides(block_tiles))
    tile_file = TileFile(tile_file_path(cfg.tiles_dir, cfg.sampling.name, "08"))
    assert tile_file.num_tiles > tile_file.num_frames  # several tiles a frame
    chunks = shards.plan_chunks({"08": tile_file.num_frames}, 1)
    per_rank = [shards.shard_tiles({"08": tile_file}, chunks, r, world_size) for r in range(world_size)]
    every = [pair for shard in per_rank for pair in shard]
    assert sorted(every) == [("08", t) for t in range(tile_file.num_tiles)]
    assert len(every) == len(set(every))
    if world_size == 3:  # 3 frames, 3 ranks: one frame each
        assert all(len({tile_file.tile_frame[t] for _, t in shard}) == 1 for shard in per_rank)


@pytest.mark.slow
def test_rerun_skips_finished_chunks_whatever_the_world_size(block_tiles):
    cfg = compose(*base_overrides(block_tiles), "infer.frames_per_chunk=1")
    save_random_checkpoint(cfg)
    out = shard_dir(cfg)
    # two ranks of a world of 2, run one after the other in this process
    first = [infer.run(cfg, rank=r, world_size=2) for r in (0, 1)]
    assert [s["chunks_predicted"] for s in first] == [2, 1]
    files = sorted(out.glob("shard-*-08-*.h5"))
    assert [p.name for p in files] == ["shard-000-08-000000-000001.h5", "shard-000-08-000002-000003.h5",
                                       "shard-001-08-000001-000002.h5"]  # round-robin by chunk
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    # a rerun with another world size finds every chunk done
    again = infer.run(cfg, rank=0, world_size=1)
    assert again["chunks_predicted"] == 0 and again["chunks"] == 3
    # ... and leaves the timings of the run that predicted (the study's analysis reports them)
    assert json.loads((out / "shard-000.json").read_text())["chunks_predicted"] == 2
    # a crash lost one chunk: only that one is predicted again
    (out / "shard-001-08-000001-000002.h5").unlink()
    redo = infer.run(cfg, rank=0, world_size=1)
    assert redo["chunks_predicted"] == 1 and redo["frames_predicted"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-000-*.h5") if p.name in stamps} == \
        {k: v for k, v in stamps.items() if k.startswith("shard-000")}
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind
    # another checkpoint: every chunk is redone
    save_random_checkpoint(cfg, seed=1)
    assert infer.run(cfg, rank=0, world_size=1)["chunks_predicted"] == 3


def test_fused_labels_equal_whole_frame_prediction_with_sampling_none(tmp_path):
    cfg = compose(*base_overrides(tmp_path, "none"), "preprocess.crop.max_range=null", "infer.batch_points=1000000")
    prepare_tiles(cfg)
    save_random_checkpoint(cfg)
    infer.run(cfg)
    metrics = fuse.run(cfg)
    assert metrics["num_filled"] == 0  # no crop: the single tile is the whole frame

    from scalept.model import build_model

    state = load_checkpoint(checkpoint_path(cfg.run_dir, "best"))
    model = build_model(state["model_cfg"], state["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    tile_file = TileFile(tile_file_path(cfg.tiles_dir, "none", "08"))
    out = shard_dir(cfg) / "sequences" / "08" / "predictions"
    for f in range(tile_file.num_frames):
        points = tile_file.frame(f).points
        chosen, grid, inverse = voxelize(points[:, :3], state["grid_size"])
        feat = torch.from_numpy(np.concatenate([points[chosen, :3], points[chosen, 3:4]], axis=1))
        with torch.inference_mode():
            logits = model(feat, torch.from_numpy(grid), torch.tensor([len(chosen)]))[torch.from_numpy(inverse)]
        fused = read_labels(out / f"{tile_file.frame_ids[f]}.label")
        # inference stores float16 logits: the same rounding gives the same argmax, exactly
        np.testing.assert_array_equal(fused, to_raw(logits.half().float().argmax(1).numpy()))
        assert (fused == to_raw(logits.argmax(1).numpy())).mean() > 0.99  # near-ties of random weights


def _turn(xyz: np.ndarray, rotation: int, flip: bool) -> np.ndarray:
    angle = np.radians(rotation)
    c, s = np.round(np.cos(angle)), np.round(np.sin(angle))
    x, y = c * xyz[:, 0] - s * xyz[:, 1], s * xyz[:, 0] + c * xyz[:, 1]
    return np.stack([-x if flip else x, y, xyz[:, 2]], 1).astype(np.float32)


@pytest.mark.parametrize("rotation, flip", [(90, False), (180, False), (270, False), (0, True), (90, True)])
def test_a_turned_batch_is_the_voxelization_of_the_turned_points(block_tiles, rotation, flip):
    cfg = compose(*base_overrides(block_tiles))
    tile_file = TileFile(tile_file_path(cfg.tiles_dir, cfg.sampling.name, "08"))
    samples, turned = [], []
    for tile in (0, 1):  # two samples: each one's grid minimum goes back to 0 on its own
        xyz = tile_file.tile(tile)[0][:, :3]
        chosen, grid, _ = voxelize(xyz, 0.2)
        samples.append((chosen, grid, xyz[chosen]))
        turned.append(voxelize(_turn(xyz, rotation, flip), 0.2))
    offsets = torch.tensor(np.cumsum([len(c) for c, _, _ in samples]))
    feat = torch.from_numpy(np.concatenate([np.c_[x, np.zeros(len(x), np.float32)] for _, _, x in samples]))
    view_feat, view_grid = infer.view_of(feat, torch.from_numpy(np.concatenate([g for _, g, _ in samples])),
                                         offsets, rotation, flip)
    start = 0
    for (chosen, _, xyz), (want_chosen, want_grid, _) in zip(samples, turned):
        rows = slice(start, start + len(chosen))
        assert sorted(chosen) == sorted(want_chosen)  # the same voxels, the same representative points
        by_point = {int(p): i for i, p in enumerate(want_chosen)}
        order = [by_point[int(p)] for p in chosen]
        np.testing.assert_array_equal(view_grid[rows].numpy(), want_grid[order])
        np.testing.assert_array_equal(view_feat[rows, :3].numpy(), _turn(xyz, rotation, flip))
        start += len(chosen)


def test_test_time_augmentation_writes_its_own_shards_and_fuses(block_tiles, tmp_path):
    overrides = [*base_overrides(block_tiles), f"run_dir={tmp_path}/run", "infer.frames_per_chunk=3"]
    plain, tta = compose(*overrides), compose(*overrides, "infer.tta.rotations=[0,90,180,270]", "infer.tta.flip=true")
    save_random_checkpoint(plain)
    assert shard_dir(tta).name == "logit_average-tta0-90-180-270f" and shard_dir(plain).name == "logit_average"
    infer.run(plain)
    assert infer.run(tta)["chunks_predicted"] == 1 and infer.plan(tta).done
    plain_metrics, tta_metrics = fuse.run(plain), fuse.run(tta)
    assert tta_metrics["predictions"].startswith(str(shard_dir(tta)))
    assert plain_metrics["num_points"] == tta_metrics["num_points"]
    assert plain_metrics["confusion"] != tta_metrics["confusion"]  # 8 views of random weights do not all agree


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    cfg = compose(*base_overrides(tmp_path))
    with pytest.raises(CheckpointError) as err:
        infer.run(cfg)
    assert "checkpoint not found" in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_of_another_model_is_a_one_line_error(block_tiles, tmp_path):
    cfg = compose(*base_overrides(block_tiles), f"run_dir={tmp_path}/other")
    save_random_checkpoint(cfg, model_overrides={"enc_channels": [16, 16, 32, 32, 32]})
    with pytest.raises(CheckpointError) as err:
        infer.run(cfg)
    message = str(err.value)
    assert "another model configuration" in message and "enc_channels" in message and "\n" not in message


def test_a_checkpoint_file_given_by_path_needs_nothing_else(block_tiles, tmp_path, compose_cfg):
    """The file says which model it holds: a run whose config names another model still predicts with it."""
    other = compose(*base_overrides(block_tiles), f"run_dir={tmp_path}/trained", "train.grid_size=0.25")
    path = tmp_path / "model.pt"
    save_random_checkpoint(other, model_overrides={"enc_channels": [24, 24, 32, 32, 32]}).rename(path)
    cfg = compose(*base_overrides(block_tiles), f"run_dir={tmp_path}/new", f"infer.checkpoint={path}",
                  "infer.frames_per_chunk=3")
    model, grid, _ = infer.load_model(cfg, torch.device("cpu"))
    assert grid == 0.25 and model.stem_norm[0].num_features == 24  # the file's, not cfg.model's or cfg.train's
    summary = infer.run(cfg)
    assert summary["chunks_predicted"] == 1 and infer.plan(cfg).done


def test_the_checkpoint_s_monte_carlo_norm_statistics_reach_the_loaded_model(block_tiles, tmp_path):
    """Training saves BatchNorm statistics of drop-path on beside the weights; inference must load
    them, or mc_uncertainty normalises its stochastic passes with the deterministic ones."""
    from scalept.checkpoint import model_record, save_checkpoint
    from scalept.model import norm_statistics

    cfg = compose(*base_overrides(block_tiles), f"run_dir={tmp_path}", "fusion=mc_uncertainty")
    saved = load_checkpoint(save_random_checkpoint(cfg))
    model, _, _ = infer.load_model(cfg, torch.device("cpu"))
    assert model.stochastic_norm_stats is None  # a checkpoint without them: the model's own statistics
    model.stochastic_norm_stats = {k: (m + 0.5, v * 2.0) for k, (m, v) in norm_statistics(model).items()}
    save_checkpoint(checkpoint_path(tmp_path, "best"), {**saved, **model_record(model, saved["model_cfg"],
                                                        saved["class_names"], saved["grid_size"])})
    loaded, _, _ = infer.load_model(cfg, torch.device("cpu"))
    assert loaded.stochastic_norm_stats.keys() == model.stochastic_norm_stats.keys()
    for name, (mean, var) in model.stochastic_norm_stats.items():
        assert torch.equal(loaded.stochastic_norm_stats[name][0], mean)
        assert torch.equal(loaded.stochastic_norm_stats[name][1], var)


def test_a_checkpoint_without_its_description_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"model": {}, "signature": "{}"}, path)
    with pytest.raises(CheckpointError, match=r"bare.pt: not a self-describing ScalePT checkpoint \(it lacks "
                                              r"\['class_names', 'grid_size', 'model_cfg', 'num_classes'\]\)"):
        load_checkpoint(path)


@pytest.mark.slow
def test_point_budget_batches_keep_the_budget_and_change_no_prediction(block_tiles, tmp_path):
    cfg = compose(*base_overrides(block_tiles), "infer.frames_per_chunk=2")
    tile_file = TileFile(tile_file_path(cfg.tiles_dir, cfg.sampling.name, "08"))
    points = np.diff(tile_file.tile_offsets)
    chunks = shards.plan_chunks({"08": tile_file.num_frames}, 2)
    budget = int(np.percentile(points, 90) * 2)
    batches, per_chunk = infer._batches({"08": tile_file}, chunks, budget)
    assert [t for b in batches for t in b] == list(range(tile_file.num_tiles))  # every tile once, in order
    assert all(len(b) == 1 or points[b].sum() <= budget for b in batches)
    assert max(len(b) for b in batches) > 1  # small tiles share a forward pass
    bounds = np.cumsum([0, *per_chunk])
    for c, chunk in enumerate(chunks):  # no batch crosses a chunk
        tiles = [t for b in batches[bounds[c]:bounds[c + 1]] for t in b]
        assert tiles == list(shards.chunk_tiles(tile_file, chunk))
    # one tile per forward pass or many: the same fused labels
    save_random_checkpoint(cfg)
    labels = {}
    for name, budget_override in (("alone", "infer.batch_points=1"), ("packed", "infer.batch_points=1000000")):
        run_cfg = compose(*base_overrides(block_tiles), "infer.frames_per_chunk=2", budget_override)
        out = shard_dir(run_cfg)
        for shard in out.glob("shard-*.h5"):
            shard.unlink()
        infer.run(run_cfg, rank=0, world_size=1)
        fuse.run(run_cfg)
        files = sorted((out / "sequences" / "08" / "predictions").glob("*.label"))
        labels[name] = [np.fromfile(f, dtype=np.uint32) for f in files]
    assert labels["alone"] and all(np.array_equal(a, b) for a, b in zip(labels["alone"], labels["packed"]))


def test_tiles_of_other_settings_are_refused_before_predicting(block_tiles):
    cfg = compose(*base_overrides(block_tiles), "sampling.block_size=20.0")  # tiled at 40 m blocks
    save_random_checkpoint(cfg)
    with pytest.raises(TileFileError, match=r"08.h5: built with sampling=.*\"block_size\": 40.0"):
        infer.run(cfg, rank=0, world_size=1)
