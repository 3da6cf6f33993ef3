"""kill -9 at random points of the whole pipeline, rerun, and every output equals a clean run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scalept.checkpoint import checkpoint_path, load_checkpoint
from scalept.data.tiles import TileFile
from tests.conftest import TINY_PIPELINE

pytestmark = pytest.mark.slow
# metrics that hold times or paths (the checkpoint's sha1 covers its config, which names the run's folders;
# its weights are compared instead; inputs_sha1 covers the inputs' paths and mtimes, their contents are compared)
VOLATILE = {"timings_s", "frames_per_s", "fusion_mpoints_per_s", "run_dir", "predictions", "seconds",
            "checkpoint_sha1", "inputs_sha1"}


def _launch(root: Path) -> list[str]:
    return [sys.executable, "-m", "scalept.launch", f"hydra.run.dir={root}/hydra", f"data_dir={root}/data",
            f"run_dir={root}/run", *TINY_PIPELINE]


def _outputs(root: Path) -> dict:
    """Every file the pipeline wrote, as comparable values (tile files by content, metrics without timings)."""
    out = {}
    for path in sorted((root / "data" / "tiles").rglob("*.h5")):
        tiles = TileFile(path)
        frames = [tiles.frame(f) for f in range(tiles.num_frames)]
        out[str(path.relative_to(root))] = [(f.frame_id, f.points.tobytes(), f.labels.tobytes(),
                                             [t.tobytes() for t in f.tiles]) for f in frames]
    for name in ("last", "best"):
        state = load_checkpoint(checkpoint_path(root / "run", name))
        out[f"{name}.pt"] = {k: v.numpy().tobytes() for k, v in state["model"].items()}
    fused = root / "run" / "infer" / "logit_average"
    for path in sorted((fused / "sequences").rglob("*.label")) + [fused / "iou.md"]:
        out[str(path.relative_to(root))] = path.read_bytes()
    metrics = json.loads((fused / "metrics.json").read_text())
    out["metrics.json"] = {k: v for k, v in metrics.items() if k not in VOLATILE}
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    started = time.monotonic()
    done = subprocess.run(_launch(root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _outputs(root), time.monotonic() - started


@pytest.mark.parametrize("seed", range(5))
def test_a_pipeline_killed_anywhere_and_rerun_gives_the_clean_runs_files(clean, tmp_path, seed):
    expected, seconds = clean
    kill_after = float(np.random.default_rng(seed).uniform(0.05, 0.95)) * seconds  # any stage, any moment
    run = subprocess.Popen(_launch(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        run.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the process and its loader workers, mid-write
        run.wait()
    rerun = subprocess.run(_launch(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    got = _outputs(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after a kill at {kill_after:.1f} s"
    leftovers = [p for folder in (tmp_path / "data" / "tiles", tmp_path / "run") for p in folder.rglob(".*.tmp-*")]
    assert not leftovers  # the rerun removed what the killed writers left
