"""Atomic writes and the clean-up of temporaries that killed writers leave behind."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scalept.atomic import atomic_path, remove_stale_temporaries


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(target.parent.iterdir())
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_only_temporaries_of_gone_writers_on_this_host_are_removed(tmp_path, dead_pid):
    host = socket.gethostname()
    (tmp_path / "08.parts").mkdir()
    stale = [tmp_path / f".last.pt.tmp-{host}-{dead_pid()}",
             tmp_path / "08.parts" / f".000000-000100.h5.tmp-{host}-{dead_pid()}"]
    kept = [tmp_path / f".best.pt.tmp-{host}-{os.getpid()}",  # its writer runs: this very process
            tmp_path / f".08.h5.tmp-othernode-{dead_pid()}",  # another node's writer may be alive there
            tmp_path / "last.pt", tmp_path / ".hidden"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, tmp_path / "missing") == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few hundred kB: a real full disk (needs root and mount; skipped without them)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()

    def make(size: str) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk tests need root")
        return mount_point

    yield make
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalept.launch", *overrides], capture_output=True, text=True,
                          timeout=300)


def _error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "ERROR" in line]


@pytest.mark.slow
def test_a_full_disk_is_one_line_saying_disk_and_leaves_nothing_half_written(small_disk, tmp_path):
    from tiny_training import data_overrides, make_tiny_data

    data = make_tiny_data(tmp_path / "data")
    disk = small_disk("300k")
    common = [*data_overrides(data), f"hydra.run.dir={tmp_path}/hydra"]
    tiled = _launch("stage=preprocess", *common, f"tiles_dir={disk}/tiles")  # tiles need about 1 MB
    assert tiled.returncode == 1, tiled.stderr[-2000:]  # a data error, not a crash (it was a segfault)
    (error,) = _error_lines(tiled)
    assert "disk full" in error and f"{disk}/tiles" in error
    assert not [p for p in disk.rglob("*") if p.is_file()]  # no half-written tile file
    trained = _launch("stage=train", *common, "model=ptv3_tiny", f"run_dir={disk}/run", "train.max_steps=2",
                      "train.val_every=0", "train.num_workers=0")  # the checkpoint does not fit beside tb/
    assert trained.returncode == 1, trained.stderr[-2000:]
    (error,) = _error_lines(trained)
    assert "last.pt: disk full" in error and "rerun" in error
    assert not list((disk / "run" / "checkpoints").glob("*.pt")) and not list(disk.rglob(".*.tmp-*"))
    run = tmp_path / "run"  # trained on a roomy disk; its shards go to the full one
    trained = _launch("stage=train", *common, "model=ptv3_tiny", f"run_dir={run}", "train.max_steps=2",
                      "train.val_every=0", "train.num_workers=0")
    assert trained.returncode == 0, trained.stderr[-2000:]
    (disk / "infer").mkdir()
    (run / "infer").symlink_to(disk / "infer")
    predicted = _launch("stage=infer", *common, "model=ptv3_tiny", f"run_dir={run}", "infer.num_workers=0")
    assert predicted.returncode == 1, predicted.stderr[-2000:]
    (error,) = _error_lines(predicted)
    assert "disk full" in error and ".h5" in error
    assert not list((disk / "infer").rglob("shard-*.h5")) and not list(disk.rglob(".*.tmp-*"))
