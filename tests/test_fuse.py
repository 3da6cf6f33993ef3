"""The fusion stage on real shards: outputs, fill map, GPU path, reruns and its one-line errors."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from inference_helpers import base_overrides, compose, prepare_tiles, save_random_checkpoint
from scalept import fuse, fusion_kernels, infer
from scalept.data.semantickitti import NUM_CLASSES, read_labels
from scalept.data.tiles import TileFile, tile_file_path
from scalept.errors import ConfigError, ScalePTError
from scalept.shards import InferenceError, shard_dir


def test_unknown_fusion_and_weighting_are_one_line_config_errors(tmp_path):
    cfg = compose(*base_overrides(tmp_path), "fusion.name=foo")
    for stage in (infer.run, fuse.run):
        with pytest.raises(ConfigError) as err:
            stage(cfg)
        assert "fusion.name='foo'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="weighting"):
        fusion_kernels.fuse_frame(1, np.array([0]), np.ones((1, 2), np.float16), "mc_uncertainty",
                                  np.zeros(1, np.float32), weighting="median")


# --------------------------------------------------------------------------- the stage on real shards


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
    """Tiles of 3 frames (block sampling), a random checkpoint and logit_average + mc_uncertainty shards."""
    root = tmp_path_factory.mktemp("fuse")
    cfg = compose(*base_overrides(root))
    prepare_tiles(cfg)
    save_random_checkpoint(cfg)
    infer.run(cfg)
    mc = compose(*base_overrides(root), "fusion=mc_uncertainty", "fusion.mc_passes=2")
    infer.run(mc)
    return root


def _copy(inferred, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(inferred, root)
    return root


def test_fuse_writes_predictions_metrics_table_and_figure(inferred):
    cfg = compose(*base_overrides(inferred))
    metrics = fuse.run(cfg)
    out = inferred / "run" / "infer" / "logit_average"
    labels = sorted((out / "sequences" / "08" / "predictions").glob("*.label"))
    assert [p.stem for p in labels] == ["000000", "000001", "000002"]
    assert metrics["num_frames"] == 3 and metrics["num_fused"] + metrics["num_filled"] == metrics["num_points"]
    assert metrics["num_filled"] > 0  # the range crop (60 m) leaves points outside every tile
    assert sum(read_labels(p).size for p in labels) == metrics["num_points"]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["iou"]) >= {"car", "road"} and 0 <= saved["miou"] <= 1 and saved["sampling"] == "block"
    absent = sum(v is None for v in saved["iou"].values())
    # absent classes count 0 only in the official mean (the generator now often leaves none out)
    assert (saved["miou_present"] > saved["miou"]) == (absent > 0)
    assert saved["miou"] == pytest.approx(sum(v or 0.0 for v in saved["iou"].values()) / NUM_CLASSES)
    assert "| **mIoU** (all 19 classes, '-' counts 0) |" in (out / "iou.md").read_text()
    assert (out / "iou.md").read_text().count("\n") > NUM_CLASSES and (out / "confusion.png").stat().st_size > 0


def test_rerun_skips_fusion_until_an_input_or_an_output_changes(inferred, tmp_path):
    root = _copy(inferred, tmp_path)
    cfg = compose(*base_overrides(root))
    first = fuse.run(cfg)
    out = shard_dir(cfg)
    labels = sorted((out / "sequences" / "08" / "predictions").glob("*.label"))
    stamps = {p: p.stat().st_mtime_ns for p in [*labels, out / "metrics.json"]}
    assert fuse.run(cfg) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    labels[1].unlink()  # an output lost: fuse again
    assert fuse.run(cfg)["confusion"] == first["confusion"] and labels[1].is_file()
    shard = sorted(out.glob("shard-*.h5"))[0]
    with h5py.File(shard, "a") as h5:  # another prediction for the first tile point
        h5["logits"][0] = -h5["logits"][0]
    again = fuse.run(cfg)
    assert again["inputs_sha1"] != first["inputs_sha1"]
    assert (out / "metrics.json").stat().st_mtime_ns != stamps[out / "metrics.json"]


@pytest.mark.parametrize("fusion", ["logit_average", "mc_uncertainty"])
def test_fill_map_gives_what_the_nearest_neighbour_search_gives(inferred, tmp_path, fusion):
    root = _copy(inferred, tmp_path)
    overrides = [*base_overrides(root), f"fusion={fusion}"] + (["fusion.mc_passes=2"] if fusion != "logit_average" else [])
    cfg = compose(*overrides)
    tiles = tile_file_path(cfg.tiles_dir, cfg.sampling.name, "08")
    assert TileFile(tiles).has_fill_map  # written by the preprocessing stage
    out = shard_dir(cfg)

    def outputs():
        metrics = fuse.run(cfg)
        files = sorted((out / "sequences" / "08").glob("*/*"))
        return metrics, {p.relative_to(out): p.read_bytes() for p in files}

    gathered, gathered_files = outputs()
    with h5py.File(tiles, "a") as h5:  # a tile file from before fill maps
        del h5["fill"], h5["frame_fill_offsets"]
    assert not TileFile(tiles).has_fill_map
    searched, searched_files = outputs()
    assert gathered["num_filled"] > 0 and gathered["num_filled"] == searched["num_filled"]
    assert gathered_files == searched_files and gathered["miou"] == searched["miou"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("fusion", ["logit_average", "softmax_average", "mc_uncertainty"])
def test_fusion_on_the_gpu_writes_what_the_cpu_writes(inferred, tmp_path, fusion):
    root = _copy(inferred, tmp_path)
    extra = [f"fusion={fusion}"] + (["fusion.mc_passes=2"] if fusion == "mc_uncertainty" else [])
    if fusion == "softmax_average":
        infer.run(compose(*base_overrides(root), *extra))
    outputs = {}
    for device in ("cpu", "cuda"):
        cfg = compose(*base_overrides(root), *extra, f"fuse.device={device}")
        metrics = fuse.run(cfg)
        out = shard_dir(cfg) / "sequences" / "08"
        labels = {p.name: read_labels(p) for p in sorted(out.glob("predictions/*.label"))}
        entropy = {p.name: np.load(p) for p in sorted(out.glob("entropy/*.npy"))}
        outputs[device] = metrics, labels, entropy
    (cpu_metrics, cpu_labels, cpu_entropy), (gpu_metrics, gpu_labels, gpu_entropy) = outputs["cpu"], outputs["cuda"]
    assert cpu_labels.keys() == gpu_labels.keys() and len(cpu_labels) == 3
    for name in cpu_labels:
        np.testing.assert_array_equal(gpu_labels[name], cpu_labels[name])
    for name in cpu_entropy:  # float16 files: equal up to the last bit of a different summation order
        np.testing.assert_allclose(gpu_entropy[name], cpu_entropy[name], rtol=2e-3, atol=1e-4, equal_nan=True)
    assert gpu_metrics["confusion"] == cpu_metrics["confusion"] and gpu_metrics["miou"] == cpu_metrics["miou"]


def test_a_fill_map_that_disagrees_with_the_shards_is_a_one_line_error(inferred, tmp_path):
    root = _copy(inferred, tmp_path)
    cfg = compose(*base_overrides(root))
    tiles = tile_file_path(cfg.tiles_dir, cfg.sampling.name, "08")
    with h5py.File(tiles, "a") as h5:
        h5["fill"][0, 0] = h5["fill"][1, 0]  # an uncovered point missing from the map
    with pytest.raises(InferenceError, match="08.h5 frame 000000: the fill map does not match") as err:
        fuse.run(cfg)
    assert "\n" not in str(err.value)


def test_frames_with_no_point_inside_the_crop_count_as_misses_not_as_nothing(tmp_path):
    cfg = compose(*base_overrides(tmp_path, "block", "preprocess.crop.max_range=1.0"))  # no return that close
    prepare_tiles(cfg)
    save_random_checkpoint(cfg)
    infer.run(cfg)
    metrics = fuse.run(cfg)
    assert metrics["num_fused"] == 0 and metrics["num_unpredicted"] == metrics["num_scored"] > 0
    assert metrics["miou"] == 0.0 and metrics["accuracy"] == 0.0  # not a score over no points
    assert sum(metrics["missed_per_class"]) == metrics["num_unpredicted"]


@pytest.mark.parametrize("weighting", ["entropy", "lowest"])
def test_fuse_mc_uncertainty_keeps_the_fused_entropy(inferred, weighting):
    cfg = compose(*base_overrides(inferred), "fusion=mc_uncertainty", "fusion.mc_passes=2",
                  f"fusion.weighting={weighting}")
    metrics = fuse.run(cfg)
    out = inferred / "run" / "infer" / ("mc_uncertainty" if weighting == "entropy" else "mc_uncertainty-lowest")
    h = np.load(out / "sequences" / "08" / "entropy" / "000000.npy")
    assert h.dtype == np.float16 and np.isfinite(h).all() and (h >= 0).all() and (h <= np.log(NUM_CLASSES) + 1e-2).all()
    assert len(h) == read_labels(out / "sequences" / "08" / "predictions" / "000000.label").size
    assert metrics["weighting"] == weighting


def test_missing_shard_is_a_one_line_error_naming_it(inferred, tmp_path):
    root = _copy(inferred, tmp_path)
    cfg = compose(*base_overrides(root))
    (root / "run" / "infer" / "logit_average" / "shard-000-08-000002-000003.h5").unlink()
    with pytest.raises(InferenceError) as err:
        fuse.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "shard-000-08-000002-000003.h5" in message and "frames 2-2" in message


def test_missing_tile_is_a_one_line_error_naming_the_frame(inferred, tmp_path):
    root = _copy(inferred, tmp_path)
    cfg = compose(*base_overrides(root))
    path = root / "run" / "infer" / "logit_average" / "shard-000-08-000000-000002.h5"
    with h5py.File(path, "a") as h5:  # drop the chunk's last tile from its bookkeeping
        tile_ids, offsets = h5["tile_ids"][:-1], h5["tile_offsets"][:-1]
        del h5["tile_ids"], h5["tile_offsets"]
        h5["tile_ids"], h5["tile_offsets"] = tile_ids, offsets
    with pytest.raises(InferenceError) as err:
        fuse.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "lacks 1 tile(s)" in message and "08/000001" in message


def test_fuse_without_inference_is_a_one_line_error(tmp_path):
    cfg = compose(*base_overrides(tmp_path))
    with pytest.raises(ScalePTError) as err:
        fuse.run(cfg)
    assert "stage=infer" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("stage, key", [("infer", "infer.device"), ("fuse", "fuse.device")])
def test_a_cuda_device_without_cuda_is_a_one_line_error_naming_the_key(inferred, stage, key):
    cfg = compose(*base_overrides(inferred), f"{key}=cuda:0")
    with pytest.raises(ConfigError) as err:
        (infer.run if stage == "infer" else fuse.run)(cfg)
    assert str(err.value) == f"{key}=cuda:0 but no CUDA device is visible; use {key}=auto or cpu"
