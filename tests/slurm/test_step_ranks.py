"""Several tasks of one Slurm job step running the launcher (no cluster needed: srun's variables by hand)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from preprocessing.preprocess import run
from scalept.data.tiles import TileFile, is_complete, tile_file_path


def test_array_index_of_the_hydra_launcher_is_not_a_unit(compose_cfg, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert compose_cfg("stage=preprocess").preprocess.task_id == 1  # slurm/preprocess.sbatch
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a cluster=slurm multirun: index = sweep point
    assert compose_cfg("stage=preprocess").preprocess.task_id is None


def test_two_ranks_split_the_units_and_both_return_every_file(compose_cfg, synthetic_root, tmp_path, monkeypatch):
    overrides = ["stage=preprocess", "sampling=knn", f"dataset.root={synthetic_root}", 'dataset.splits.train=["00"]',
                 "preprocess.frames_per_task=1"]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    local = compose_cfg(*overrides, f"data_dir={tmp_path / 'local'}")
    run(local)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    ranks = [subprocess.Popen([sys.executable, "-m", "scalept.launch", *overrides, f"data_dir={tmp_path / 'ranks'}",
                               f"hydra.run.dir={tmp_path / 'out' / str(rank)}"],
                              env={**env, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], logs
    assert "rank 0 of 2 tasks" in logs[0] and "rank 1 of 2 tasks" in logs[1]
    for log in logs:  # 5 units (00: 3 frames, 08: 2): 3 for rank 0, 2 for rank 1; both see all files
        assert "2 tile files complete" in log
    for name in ("00", "08"):
        a = TileFile(tile_file_path(local.tiles_dir, "knn", name))
        b_path = tile_file_path(str(tmp_path / "ranks" / "tiles" / "synthetic"), "knn", name)
        assert is_complete(b_path)
        b = TileFile(b_path)
        assert a.frame_ids == b.frame_ids
        for f in range(a.num_frames):
            assert all(np.array_equal(x, y) for x, y in zip(a.frame(f).tiles, b.frame(f).tiles))


def test_a_plain_srun_step_runs_the_steps_in_one_group_with_rank_0_alone_for_synth(tiny_pipeline, tmp_path):
    # what slurm/train.sbatch's one srun step does, by hand: launch.run takes the same multi-rank
    # path as a submitit job (one process group, a barrier between steps, rank 0 alone writes frames)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "RANK", "WORLD_SIZE"))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="77", SCALEPT_MASTER_ADDR="127.0.0.1",
               SCALEPT_MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-m", "scalept.launch", "stage=pipeline", "stage.steps=[synth,preprocess]",
                               *tiny_pipeline, f"hydra.run.dir={tmp_path / 'out' / str(rank)}"],
                              env={**env, "SLURM_PROCID": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], logs
    for rank, log in enumerate(logs):  # one world of 2, rendezvous on the master given
        assert f"scalept-launch: job 77, rank {rank} of 2" in log and f"master 127.0.0.1:{port}" in log, log
        assert "2 tile files complete" in log, log  # preprocessing ran on both, after the frames existed
    assert "synth: dataset ready" in logs[0] and "synth:" not in logs[1], logs
