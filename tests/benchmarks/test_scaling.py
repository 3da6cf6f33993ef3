"""The scaling benchmark (scalept.benchmarks.scaling): a real 1- and 2-rank gloo run on tiny data, and its arithmetic."""
from __future__ import annotations

import json
import math
import os

import pytest

from scalept.benchmarks import scaling, scaling_rank

# ptv3_tiny on tiles of at most 2,500 points, micro-batches of 4,500 voxels per rank
TINY = ["dataset.synthetic.azimuth_steps=200", "sampling.max_points=2500", "sampling.overlap=500"]


@pytest.fixture
def no_job(monkeypatch):
    """No job variables of the test's own environment, NVLink multicast variables unset."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
                 *scaling.NO_MULTICAST):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One benchmark run: training at 1 and 2 ranks, inference at 1 and 2, and the loss comparison."""
    work = tmp_path_factory.mktemp("scaling")
    with pytest.MonkeyPatch.context() as env:
        for name in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS", *scaling.NO_MULTICAST):
            env.delenv(name, raising=False)
        result = scaling.main(["--work", str(work / "work"), "--world-sizes", "1,2", "--steps", "6", "--window", "2",
                               "--batch-voxels", "4500", "--synthetic-sequences", "2", "--synthetic-frames", "4",
                               "--compare-loss", "--json", str(work / "scaling.json"), *TINY])
        environment = {k: os.environ.get(k) for k in scaling.NO_MULTICAST}
    return result, json.loads((work / "scaling.json").read_text()), environment


@pytest.mark.slow
def test_the_json_is_what_main_returns_and_multicast_is_off(report):
    result, written, environment = report
    assert written == json.loads(json.dumps(result))
    assert environment == scaling.NO_MULTICAST == written["environment"]
    assert written["backend"] == "gloo" and written["world_sizes"] == [1, 2]


@pytest.mark.slow
def test_training_rows_are_consistent(report):
    one, two = report[1]["train"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for row in (one, two):
        assert row["steps"] == 6  # every optimizer step asked for ran
        assert row["warmup_steps"] == 2 and row["steady_steps"] == 4  # windows of 1, 1, 2, 2 steps
        assert row["steps_per_s"] * row["ms_per_step"] / 1e3 == pytest.approx(1.0)
        assert 0 < row["voxels_per_step_per_rank"] <= row["batch_voxels"] == 4500
        assert row["micro_batches_per_step"] == 1  # weak scaling: the same work per rank and step
        assert row["compute_ms_per_step"] == pytest.approx(row["ms_per_step"] - row["exposed_allreduce_ms_per_step"])
        assert len(row["peak_memory_gib_per_rank"]) == row["world_size"]
        assert all(0.05 < gib < 8 for gib in row["peak_memory_gib_per_rank"])
        assert math.isfinite(row["final_loss"])
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["voxels_per_s"] / (2 * one["voxels_per_s"]))
    assert two["steps_efficiency"] == pytest.approx(two["steps_per_s"] / one["steps_per_s"])
    # one rank has no all-reduce; two all-reduce every step, partly overlapped with backward
    assert one["allreduce_ms_per_step"] == one["exposed_allreduce_ms_per_step"] == one["buckets"] == 0
    assert one["ddp"] == {}
    assert two["buckets"] >= 1 and 0 < two["allreduce_share"] < 1
    for busy, exposed in zip(two["allreduce_ms_per_rank"], two["exposed_allreduce_ms_per_rank"], strict=True):
        assert 0 < exposed <= busy
    assert two["ddp"] == {"bucket_cap_mb": 25.0, "gradient_as_bucket_view": False, "static_graph": False,
                          "find_unused_parameters": False, "broadcast_buffers": True}


@pytest.mark.slow
def test_inference_shares_one_fixed_tile_set(report):
    one, two = report[1]["infer"]
    assert one["frames"] == two["frames"] == 8 and one["tiles"] == two["tiles"] > 0
    assert two["frames_per_rank"] == [4, 4]  # one frame per chunk, chunks dealt round-robin
    assert two["efficiency"] == pytest.approx(two["frames_per_s"] / (2 * one["frames_per_s"]))
    for row in (one, two):
        assert row["seconds"] < row["seconds_end_to_end"]  # start-up left out of the steady figure
        assert row["frames_per_s"] == pytest.approx(row["frames"] / row["seconds"])


@pytest.mark.slow
def test_one_and_two_ranks_on_the_same_global_step_give_close_losses(report):
    compare = report[1]["compare_loss"]
    assert compare["step_voxels"] == 9000 and compare["batch_voxels"] == 4500
    one, two = compare["curves"]["1"], compare["curves"]["2"]
    assert len(one["losses"]) == len(two["losses"]) == 6
    assert (one["micro_batches_per_step"], two["micro_batches_per_step"]) == (2, 1)  # 1 rank accumulates
    assert one["lr"] == pytest.approx(two["lr"], rel=0.1)  # scaled from nearly the same voxels per step
    assert compare["final_loss_relative_difference"] < 0.1


def test_rank_environment_is_torchrun_like_with_multicast_off(no_job, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    env = scaling.rank_env(1, 4, 12345, threads=2)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345"}
    assert all(env[k] == v for k, v in scaling.NO_MULTICAST.items())
    assert env["OMP_NUM_THREADS"] == "2" and "SLURM_PROCID" not in env
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's settings win
    assert scaling.rank_env(0, 1, 1, threads=2)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_threads_per_rank_default_to_the_cores_of_the_largest_world(no_job, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert scaling.parse_args(["--world-sizes", "1,2,4", "--work", str(tmp_path)]).threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert scaling.parse_args(["--world-sizes", "1,2", "--work", str(tmp_path)]).threads == 3
    assert scaling.parse_args(["--threads", "1", "--work", str(tmp_path)]).threads == 1
    with pytest.raises(SystemExit):
        scaling.parse_args(["--world-sizes", "2,4", "--work", str(tmp_path)])  # no 1-rank baseline


def test_allreduce_time_is_the_union_of_bucket_intervals_and_exposed_the_tail():
    timer = scaling_rank.AllreduceTimer()
    timer.current = [[10.000, 10.004], [10.002, 10.006], [10.010, 10.011]]  # seconds: buckets 1, 2 overlap
    timer.end_step(1)
    timer.end_step(2)  # a step without an all-reduce (accumulation) is left out
    [(step, busy, exposed, buckets)] = timer.per_step()
    assert (step, buckets) == (1, 3)
    assert busy == pytest.approx(7.0) and exposed == pytest.approx(1.0)


def test_steady_state_leaves_out_whole_warm_up_windows():
    windows = [(1, 100, 1.0, 0), (2, 200, 0.4, 0), (2, 200, 0.4, 0)]
    assert scaling.steady_windows(windows, 2) == (3, windows[2:])
    assert scaling.steady_windows(windows, 0) == (0, windows)
    with pytest.raises(SystemExit, match="no steady state"):
        scaling.steady_windows(windows, 5)
