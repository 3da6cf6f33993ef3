"""The preprocessing stage: tile files per (strategy, sequence), Slurm array units, atomic reruns."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from preprocessing import preprocess
from preprocessing.preprocess import crop_mask, plan_units, run
from scalept.data.semantickitti import Sequence
from scalept.data.tiles import TileFile, TileFileError, is_complete, tile_file_path
from scalept.errors import ConfigError
from scalept.launch import CONF_DIR


@pytest.fixture(autouse=True)
def no_slurm_array(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)


def real_cfg(compose_cfg, real_root, data_dir, *extra):
    return compose_cfg("stage=preprocess", "dataset=semantickitti", f"dataset.root={real_root}",
                       f"data_dir={data_dir}", 'dataset.splits.train=["00"]', 'dataset.splits.val=["08"]', *extra)


def tile_files(cfg):
    return {s: tile_file_path(cfg.tiles_dir, cfg.sampling.name, s) for s in ("00", "08")}


def assert_same_tiles(path_a, path_b):
    a, b = TileFile(path_a), TileFile(path_b)
    assert a.frame_ids == b.frame_ids and a.num_tiles == b.num_tiles
    for f in range(a.num_frames):
        fa, fb = a.frame(f), b.frame(f)
        np.testing.assert_array_equal(fa.points, fb.points)
        assert all((x == y).all() for x, y in zip(fa.tiles, fb.tiles))


def test_local_run_tiles_every_frame_of_real_scans(compose_cfg, real_root, tmp_path):
    cfg = real_cfg(compose_cfg, real_root, tmp_path, "sampling=block", "preprocess.frames_per_task=4")
    finished = run(cfg)
    files = tile_files(cfg)
    assert sorted(finished) == sorted(files.values())
    for name, path in files.items():
        sequence, tiles = Sequence(real_root, name), TileFile(path)
        assert tiles.frame_ids == sequence.frame_ids() and tiles.attrs["has_labels"] == sequence.has_labels
        assert tiles.attrs["sampling"]["name"] == "block" and tiles.attrs["crop"]["max_range"] == 60.0
        for f in range(len(sequence)):
            frame, stored = sequence.frame(f), tiles.frame(f)
            np.testing.assert_array_equal(stored.points, frame.points)  # every point, cropped ones too
            expected = frame.labels if frame.labels is not None else np.full(len(frame.points), -1)
            np.testing.assert_array_equal(stored.labels, expected)
            covered = np.zeros(len(frame.points), bool)
            for tile in stored.tiles:
                covered[tile] = True
                assert len(tile) <= cfg.sampling.max_points
            np.testing.assert_array_equal(covered, crop_mask(frame.points, cfg.preprocess.crop))
    assert not any(p.with_suffix(".parts").exists() for p in files.values())  # parts cleaned up


def test_array_tasks_give_the_same_files_as_a_local_run(compose_cfg, real_root, tmp_path):
    local = real_cfg(compose_cfg, real_root, tmp_path / "local", "sampling=knn", "preprocess.frames_per_task=2")
    run(local)
    array = real_cfg(compose_cfg, real_root, tmp_path / "array", "sampling=knn", "preprocess.frames_per_task=2")
    units = plan_units(array)
    assert [(u.sequence, u.start, u.stop) for u in units] == [("00", 0, 2), ("00", 2, 4), ("00", 4, 6), ("08", 0, 2)]
    for task in (3, 1, 0, 2):  # array tasks finish in any order
        array.preprocess.task_id = task
        run(array)
        done = is_complete(tile_files(array)["00"]) if tile_files(array)["00"].exists() else False
        assert done == (task == 2)  # merged by whichever task finished the sequence's last part
    for name in ("00", "08"):
        assert_same_tiles(tile_files(local)[name], tile_files(array)[name])


def test_task_id_comes_from_slurm(compose_cfg, real_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    cfg = real_cfg(compose_cfg, real_root, tmp_path, "preprocess.frames_per_task=2")
    assert cfg.preprocess.task_id == 3
    run(cfg)
    assert is_complete(tile_files(cfg)["08"]) and not tile_files(cfg)["00"].exists()
    cfg.preprocess.task_id = 4
    with pytest.raises(ConfigError, match=r"preprocess.task_id=4 .* outside the 4 units.*--array=0-3"):
        run(cfg)


def test_rerun_skips_finished_work(compose_cfg, real_root, tmp_path):
    cfg = real_cfg(compose_cfg, real_root, tmp_path)
    run(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in tile_files(cfg).values()}
    run(cfg)
    assert {p: p.stat().st_mtime_ns for p in tile_files(cfg).values()} == stamps
    changed = real_cfg(compose_cfg, real_root, tmp_path, "sampling.max_points=30000")
    with pytest.raises(TileFileError, match=r"built with sampling=.*delete the file or set another tiles_dir"):
        run(changed)


def test_interrupted_write_leaves_nothing_trusted(compose_cfg, real_root, tmp_path, monkeypatch):
    cfg = real_cfg(compose_cfg, real_root, tmp_path / "crash", "preprocess.frames_per_task=3")
    real_write = preprocess.write_tile_file
    calls = []

    def crash_on_second_part(path, frames, attrs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")  # like a Slurm time limit mid-stage
        real_write(path, frames, attrs)

    monkeypatch.setattr(preprocess, "write_tile_file", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    files = tile_files(cfg)
    assert not files["00"].exists()
    leftovers = [p for p in files["00"].parent.rglob("*") if p.is_file()]
    assert all(is_complete(p) for p in leftovers) and len(leftovers) == 1  # the first part, finished
    # A file a hard kill could leave at a final name (no completion flag) is not trusted either.
    files["08"].parent.mkdir(parents=True, exist_ok=True)
    files["08"].write_bytes(b"\x89HDF half-written")
    monkeypatch.setattr(preprocess, "write_tile_file", real_write)
    run(cfg)
    clean = real_cfg(compose_cfg, real_root, tmp_path / "clean", "preprocess.frames_per_task=3")
    run(clean)
    for name in ("00", "08"):
        assert_same_tiles(files[name], tile_files(clean)[name])


def test_bad_values_are_config_errors(compose_cfg, real_root, tmp_path):
    with pytest.raises(ConfigError, match="preprocess.splits names 'extra'"):
        run(real_cfg(compose_cfg, real_root, tmp_path, "preprocess.splits=[train,extra]"))
    with pytest.raises(ConfigError, match="preprocess.frames_per_task=0"):
        run(real_cfg(compose_cfg, real_root, tmp_path, "preprocess.frames_per_task=0"))


def test_cli_multirun_tiles_three_strategies(real_root, tmp_path):
    """`python -m scalept.launch -m sampling=block,hilbert,knn` with Hydra's default launcher."""
    args = [sys.executable, "-m", "scalept.launch", "-m", "sampling=block,hilbert,knn", "stage=preprocess",
            "dataset=semantickitti", f"dataset.root={real_root}", f"data_dir={tmp_path}",
            'dataset.splits.train=["08"]', "dataset.splits.val=[]", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("block", "hilbert", "knn"):
        assert TileFile(tmp_path / "tiles" / "semantickitti" / name / "08.h5").num_frames == 2


def test_cli_reports_bad_input_in_one_line(tmp_path):
    args = [sys.executable, "-m", "scalept.launch", "stage=preprocess", f"data_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "sequence folder not found" in errors[0] and "Traceback" not in done.stderr
    assert CONF_DIR.is_dir()


def test_dry_run_lists_units_and_writes_nothing(compose_cfg, real_root, tmp_path, capsys):
    cfg = real_cfg(compose_cfg, real_root, tmp_path, "preprocess.dry_run=true", "preprocess.frames_per_task=4")
    assert run(cfg) == []
    out = capsys.readouterr().out.splitlines()
    assert out == ["0\t00\t0\t4", "1\t00\t4\t6", "2\t08\t0\t2", "--array=0-2"]
    assert not (tmp_path / "tiles").exists()


def test_sbatch_script_runs_the_unit_of_its_array_task(real_root, tmp_path):
    """slurm/preprocess.sbatch as an array task: Slurm's SLURM_ARRAY_TASK_ID picks the unit."""
    script = CONF_DIR.parent / "slurm" / "preprocess.sbatch"
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77"}
    args = ["bash", str(script), "sampling=hilbert", "dataset=semantickitti", f"dataset.root={real_root}",
            f"data_dir={tmp_path}", 'dataset.splits.train=["00"]', 'dataset.splits.val=["08"]',
            "preprocess.frames_per_task=6"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert is_complete(tmp_path / "tiles" / "semantickitti" / "hilbert" / "08.h5")
    assert not (tmp_path / "tiles" / "semantickitti" / "hilbert" / "00.h5").exists()
    assert (tmp_path / "outputs" / "preprocess" / "77" / "1").is_dir()


def test_a_far_outlier_is_cropped_by_height_and_named_when_it_is_not(compose_cfg, real_root, tmp_path):
    from scalept.data.dataset import TileDataset
    from scalept.data.semantickitti import list_sequences

    labelled = next(s for s in list_sequences(real_root) if Sequence(real_root, s).has_labels)
    scan = sorted((real_root / "sequences" / labelled / "velodyne").glob("*.bin"))[0]
    points = np.fromfile(scan, dtype=np.float32).reshape(-1, 4)
    broken = np.vstack([points, [[5.0, 5.0, 1e9, 0.5]]]).astype(np.float32)  # a finite outlier, 7 m away
    folder = tmp_path / "dataset" / "sequences" / "00"
    (folder / "velodyne").mkdir(parents=True)
    (folder / "labels").mkdir()
    broken.tofile(folder / "velodyne" / scan.name)
    label = np.fromfile(scan.parent.parent / "labels" / f"{scan.stem}.label", dtype=np.uint32)
    np.append(label, np.uint32(0)).tofile(folder / "labels" / f"{scan.stem}.label")
    outlier = len(points)

    def tiled(data_dir, *crop):
        cfg = compose_cfg("stage=preprocess", "dataset=semantickitti", f"dataset.root={tmp_path / 'dataset'}",
                          f"data_dir={data_dir}", 'dataset.splits.train=["00"]', "dataset.splits.val=[]",
                          "sampling=block", *crop)
        run(cfg)
        return tile_file_path(cfg.tiles_dir, "block", "00")

    cropped = TileFile(tiled(tmp_path / "cropped"))  # the default crop: -20 m <= z <= 40 m
    assert all(outlier not in tile for tile in cropped.frame(0).tiles)
    assert outlier in cropped.fill(0)[:, 0]  # it takes a neighbour's prediction
    uncropped = tiled(tmp_path / "uncropped", "preprocess.crop.min_z=null", "preprocess.crop.max_z=null")
    dataset = TileDataset([uncropped], 0.05)
    holding = [i for i, (_, t) in enumerate(dataset.index) if outlier in TileFile(uncropped).tile(t)[2]]
    with pytest.raises(TileFileError) as err:
        dataset[holding[0]]
    message = str(err.value)
    assert f"00.h5 frame {scan.stem}" in message and "preprocess.crop (max_range, min_z, max_z)" in message
    assert "\n" not in message


def test_the_log_counts_only_frames_tiled_now(compose_cfg, real_root, tmp_path, caplog):
    cfg = real_cfg(compose_cfg, real_root, tmp_path, "sampling=block", "preprocess.frames_per_task=1",
                   "preprocess.splits=[val]")
    units = plan_units(cfg)
    assert len(units) >= 2  # one unit per frame of the labelled sequence
    run(real_cfg(compose_cfg, real_root, tmp_path, "sampling=block", "preprocess.frames_per_task=1",
                 "preprocess.splits=[val]", "preprocess.task_id=0"))  # an array task that finished alone
    caplog.clear()
    with caplog.at_level("INFO", logger="preprocessing.preprocess"):
        run(cfg)  # the rest: every unit but the first
    (summary,) = [r.getMessage() for r in caplog.records if " tiled " in r.getMessage()]
    assert f"tiled {len(units) - 1} frames" in summary


def test_a_concurrent_runs_half_written_part_survives_the_merge(compose_cfg, real_root, tmp_path):
    cfg = real_cfg(compose_cfg, real_root, tmp_path, "sampling=knn", "preprocess.frames_per_task=2",
                   "preprocess.splits=[train]")
    units = [u for u in plan_units(cfg) if u.sequence == "00"]
    assert len(units) >= 2
    parts = tile_files(cfg)["00"].with_suffix(".parts")
    for task in range(len(units) - 1):
        cfg.preprocess.task_id = task
        run(cfg)
    # a resubmitted array's task is still writing the last unit when this run's task finishes it
    foreign = parts / f".{units[-1].part_name}.tmp-othernode-4242"
    foreign.write_bytes(b"half a part")
    cfg.preprocess.task_id = len(units) - 1
    run(cfg)
    assert is_complete(tile_files(cfg)["00"])
    assert foreign.exists() and [p.name for p in parts.iterdir()] == [foreign.name]  # only ours were removed
    foreign.rename(parts / units[-1].part_name)  # the other task's atomic rename still has a folder
    assert preprocess.merge_if_complete(cfg, "00") and not parts.exists()  # its redundant part is cleaned up
