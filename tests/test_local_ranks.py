"""cluster=local with local_ranks: the launcher runs train and infer as data-parallel ranks of this machine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scalept import local_ranks
from scalept.data.semantickitti import Sequence, read_labels
from scalept.errors import ScalePTError
from tests.conftest import TINY_PIPELINE


@pytest.mark.parametrize("setting, steps, cores, expected", [
    ("auto", ["synth", "preprocess", "train", "infer", "fuse"], 2, 2),  # one per core
    ("auto", ["train"], 16, local_ranks.MAX_CPU_RANKS),  # capped
    ("auto", ["synth", "preprocess", "fuse"], 16, 1),  # nothing worth a second process
    (3, ["infer"], 2, 3),  # the user's count, even above the cores
    (1, ["train"], 16, 1),
])
def test_rank_count_without_a_gpu(monkeypatch, setting, steps, cores, expected):
    monkeypatch.setattr(local_ranks.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(local_ranks, "available_cores", lambda: cores)  # the name local_ranks calls
    assert local_ranks.rank_count(setting, steps) == expected


def _launch(root: Path, *extra: str) -> list[str]:
    overrides = [o for o in TINY_PIPELINE if not o.startswith("local_ranks=")]
    return [sys.executable, "-m", "scalept.launch", f"hydra.run.dir={root}/hydra", f"data_dir={root}/data",
            f"run_dir={root}/run", *overrides, "local_ranks=2", *extra]


@pytest.mark.slow
def test_two_local_ranks_train_predict_and_fuse_every_point_and_a_rerun_skips_it_all(tmp_path):
    done = subprocess.run(_launch(tmp_path, "train.step_voxels=8000"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "local: 2 ranks on this machine (local_ranks=2), 1 thread(s) each" in done.stdout
    log = (tmp_path / "hydra" / "launch.log").read_text()
    assert "step 3/3" in log and "rank 0/2" in log  # rank 0 logs progress to Hydra's job log too
    train = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert train["world_size"] == 2 and train["steps"] == 3
    fused = tmp_path / "run" / "infer" / "logit_average"
    shards = [json.loads((fused / f"shard-{r:03d}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in shards] == [2, 2] and sum(s["chunks"] for s in shards) >= 1
    metrics = json.loads((fused / "metrics.json").read_text())
    assert metrics["num_fused"] + metrics["num_filled"] == metrics["num_points"] > 0
    val = Sequence(tmp_path / "data" / "synthetic" / "dataset", "08")
    for index, frame_id in enumerate(val.frame_ids()):
        labels = read_labels(fused / "sequences" / "08" / "predictions" / f"{frame_id}.label")
        assert len(labels) == len(val.frame(index).points)

    weights = (tmp_path / "run" / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = subprocess.run(_launch(tmp_path, "train.step_voxels=8000"), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").stat().st_mtime_ns == weights  # nothing retrained


@pytest.mark.slow
def test_an_error_in_a_rank_is_one_line_and_the_launchers_exit_code(tmp_path):
    done = subprocess.run(_launch(tmp_path, "stage=infer", f"infer.checkpoint={tmp_path}/missing.pt"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and "missing.pt" in errors[0], done.stderr[-3000:]


def _fails_on_rank_0_then_rank_1_sees_it(cfg) -> None:
    """Rank 0 meets a data error; rank 1, waiting on it, fails first with a plain error (as a
    barrier does when its peer's connection closes)."""
    if os.environ["RANK"] == "0":
        time.sleep(1.0)
        raise ScalePTError(f"{cfg.run_dir}/shard.h5: disk full")
    raise RuntimeError("Connection closed by peer")


def test_a_ranks_one_line_error_wins_over_the_plain_error_it_caused_in_another(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "local_ranks": 2})
    with pytest.raises(ScalePTError, match="shard.h5: disk full"):
        local_ranks.start(cfg, 2, _fails_on_rank_0_then_rank_1_sees_it)


def _rank_pids(launcher: int) -> list[int]:
    """The launcher's children that torch's spawn started (not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    return [pid for pid in pids if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]


def _running(pid: int) -> bool:
    """Alive, not a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ranks follow the launcher through prctl")
def test_ranks_end_when_the_launcher_is_killed_and_a_rerun_finishes(tmp_path):
    command = _launch(tmp_path, "train.max_steps=40", "train.checkpoint_every_min=null")
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    for line in run.stdout:  # until the ranks train
        if "step 1/40" in line:
            break
    ranks = _rank_pids(run.pid)
    assert len(ranks) == 2
    os.kill(run.pid, signal.SIGKILL)  # the launcher alone, not its process group
    run.wait()
    deadline = time.monotonic() + 120
    while any(_running(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [pid for pid in ranks if _running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "ranks outlived their launcher"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert 1 <= state["step"] < 40  # on SIGTERM the ranks checkpointed where they were
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["steps"] == 40
