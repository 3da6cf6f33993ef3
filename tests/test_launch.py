"""The README's main job, shortened: `python -m scalept.launch` runs every stage end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scalept.data.semantickitti import Sequence, read_labels, to_classes


@pytest.mark.slow
def test_default_pipeline_end_to_end(tmp_path, tiny_pipeline):
    run_dir = tmp_path / "run"
    # the default's own tiling (kNN tiles, smaller) and test-time augmentation (four z-rotations)
    small = [o for o in tiny_pipeline if not o.startswith(("sampling=", "sampling.overlap=", "infer.tta."))]
    args = [sys.executable, "-m", "scalept.launch", f"hydra.run.dir={tmp_path}/hydra", *small]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| **mIoU** (all 19 classes" in done.stderr + done.stdout  # the per-class table is printed
    out = run_dir / "infer" / "logit_average-tta0-90-180-270"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sampling"] == "knn" and json.loads((out / "manifest.json").read_text())["tta"] == "0,90,180,270"
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["scored_sequences"] == ["08"]
    assert metrics["num_frames"] == 2 and metrics["num_fused"] + metrics["num_filled"] == metrics["num_points"]
    assert (out / "iou.md").is_file() and (out / "confusion.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.pt").is_file() and any((run_dir / "tb").iterdir())
    val = Sequence(tmp_path / "data" / "synthetic" / "dataset", "08")
    for index, frame_id in enumerate(val.frame_ids()):
        predicted = read_labels(out / "sequences" / "08" / "predictions" / f"{frame_id}.label")
        assert len(predicted) == len(val.frame(index).points)
        classes = to_classes(predicted)
        assert (classes >= 0).all()  # every point, cropped ones too, gets a real class
    assert np.isfinite(metrics["miou"])


def test_help_explains_the_groups_and_points_at_the_readme():
    done = subprocess.run([sys.executable, "-m", "scalept.launch", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for group in ("dataset", "sampling", "model", "train", "optim", "infer", "fusion", "stage", "cluster"):
        assert f"\n  {group} " in text and f"\n{group}: " in text  # described, and its options listed
    assert "sampling: block, fps_knn, hilbert" in text and "README.md" in text
    assert len(text.splitlines()) < 60  # a page, not the 178-line config dump


def test_a_forward_pass_prints_no_torch_deprecation_notice():
    code = ("import torch; from omegaconf import OmegaConf; from scalept.model import build_model; "
            "m = build_model(OmegaConf.load('conf/model/ptv3_tiny.yaml'), 19).eval(); "
            "g = torch.unique(torch.randint(0, 40, (400, 3)), dim=0).int(); "
            "m(torch.rand(len(g), 4), g, torch.tensor([len(g)])); print('ran')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr
    assert "is_fx_tracing" not in done.stderr and "Warning" not in done.stderr, done.stderr


@pytest.mark.parametrize("given, used", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_when_idle_unless_told_otherwise(given, used):
    """Set before torch loads OpenMP (it reads the variable once): spinning threads slow a shared machine."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    probe = "import os, sys, scalept.launch; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [used, "False"], done.stderr[-2000:]
