"""Same seed, same data, same machine: the same weights, predictions and scores (issue 13)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import TINY_PIPELINE


def weights_digest(checkpoint) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    digest = hashlib.sha1()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().numpy().tobytes())
    return digest.hexdigest()


def predictions_digest(folder) -> str:
    digest = hashlib.sha1()
    for path in sorted(folder.rglob("*.label")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_two_runs_at_once_give_identical_weights_predictions_and_metrics(tmp_path):
    """Both runs share the machine's cores, as a user's reruns do when other work is running:
    thread timing then differs between them, and the CPU kernels must not let it show."""
    common = [*TINY_PIPELINE, f"data_dir={tmp_path / 'data'}", "train.max_steps=20", "train.num_workers=1"]
    for stage in ("synth", "preprocess"):  # the data once; then both runs skip these steps
        done = subprocess.run([sys.executable, "-m", "scalept.launch", f"stage={stage}", *common,
                               f"hydra.run.dir={tmp_path / ('hydra-' + stage)}"], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = [subprocess.Popen([sys.executable, "-m", "scalept.launch", *common, f"run_dir={tmp_path / name}",
                              f"hydra.run.dir={tmp_path / ('hydra-' + name)}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
    a, b = tmp_path / "a", tmp_path / "b"
    assert weights_digest(a / "checkpoints" / "last.pt") == weights_digest(b / "checkpoints" / "last.pt")
    fused_a, fused_b = a / "infer" / "logit_average", b / "infer" / "logit_average"
    assert predictions_digest(fused_a) == predictions_digest(fused_b)
    metrics_a, metrics_b = (json.loads((f / "metrics.json").read_text()) for f in (fused_a, fused_b))
    for key in ("miou", "iou", "confusion", "missed_per_class"):
        assert metrics_a[key] == metrics_b[key], key
    losses = [json.loads((run / "train_metrics.json").read_text())["final_loss"] for run in (a, b)]
    assert losses[0] == losses[1]
