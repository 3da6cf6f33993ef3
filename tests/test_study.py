"""The study (stage=study, scalept/study.py) and its comparison (scalept/study_report.py)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from scalept import study
from scalept.errors import ConfigError

TINY_STUDY = ["stage=study", "dataset.synthetic.frames_per_sequence=2", "dataset.synthetic.azimuth_steps=256",
              'dataset.splits.train=["00"]', "train.max_steps=3", "train.val_every=0", "train.num_workers=0",
              "infer.num_workers=0", "stage.samplings=[none,hilbert,knn]", "stage.max_points=4000",
              "stage.fusions=[logit_average,mc_uncertainty]", "stage.mc_passes=2"]


def test_the_study_trains_once_per_label_fraction_and_evaluates_every_combination(compose_cfg, tmp_path):
    cfg = compose_cfg(f"run_dir={tmp_path}", *TINY_STUDY, "stage.label_fractions=[1.0,0.5]")
    plan = study.runs(cfg)
    assert [steps for _, steps in plan[:3]] == [["synth"], study.TRAIN_STEPS, study.EVAL_STEPS]
    trainings = [c for c, steps in plan if steps == study.TRAIN_STEPS]
    assert [(c.train.label_fraction, c.sampling.name, c.run_dir) for c in trainings] == [
        (1.0, "hilbert", f"{tmp_path}/train-lf1"), (0.5, "hilbert", f"{tmp_path}/train-lf0.5")]
    evaluations = [c for c, steps in plan if steps == study.EVAL_STEPS]
    assert len(evaluations) == 2 * 3 * 2 * 2  # fractions x samplings x fusions x (without, with TTA)
    knn = [c for c in evaluations if c.sampling.name == "knn" and c.fusion.name == "mc_uncertainty"
           and c.infer.tta.rotations == [0, 90, 180, 270] and c.train.label_fraction == 0.5]
    assert len(knn) == 1 and knn[0].sampling.max_points == 4000 and knn[0].fusion.weighting == "entropy"
    assert knn[0].fusion.mc_passes == 2 and evaluations[0].fusion.mc_passes == 1  # logit_average keeps its own
    assert knn[0].infer.checkpoint == f"{tmp_path}/train-lf0.5/checkpoints/last.pt"
    assert knn[0].run_dir == f"{tmp_path}/train-lf0.5/eval/knn" and list(knn[0].preprocess.splits) == ["val"]


def test_a_study_naming_an_unknown_option_is_refused_before_any_work(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^stage.samplings names 'octree', which is not an option of "
                                          r"conf/sampling/; choose from block, fps_knn"):
        study.runs(compose_cfg(f"run_dir={tmp_path}", *TINY_STUDY, "stage.samplings=[none,octree]"))


@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end_and_compares_its_evaluations(tmp_path):
    command = [sys.executable, "-m", "scalept.launch", f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}",
               f"hydra.run.dir={tmp_path / 'hydra'}", *TINY_STUDY]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((tmp_path / "run" / "study.json").read_text())
    weights = hashlib.sha1((tmp_path / "run" / "train-lf1" / "checkpoints" / "last.pt").read_bytes()).hexdigest()
    for evaluation in index["evaluations"]:  # every combination fused, all with the one trained model
        assert json.loads(open(evaluation["metrics"]).read())["checkpoint_sha1"] == weights

    analysis = subprocess.run([sys.executable, "-m", "scalept.analysis", str(tmp_path / "run")], capture_output=True,
                              text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr
    report = (tmp_path / "run" / "analysis" / "study.md").read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| 1 | ") and line.count("|") == 10]
    assert len(rows) == 3 * 2 * 2
    assert all(r[5] == "+0.00" for r in rows if r[1] == "none")  # the whole frame is its own baseline
    assert all(r[4] != "—" for r in rows)
    assert all((tmp_path / "run" / "analysis" / name).stat().st_size > 10_000
               for name in ("study_miou.png", "study_delta.png", "study_iou.png"))

    again = subprocess.run(command + ["dry_run=true"], capture_output=True, text=True, timeout=300)
    heads = [line for line in again.stdout.splitlines() if not line.startswith(" ")]
    assert len(heads) == 1 + 2 + 3 * 2 * 2 * 3 and all(": done" in h for h in heads), again.stdout[-2000:]


def test_the_gpu_study_experiment_composes_and_plans(compose_cfg, tmp_path):
    cfg = compose_cfg("+experiment=study", f"data_dir={tmp_path}")
    assert (cfg.model.name, cfg.train.name, cfg.dataset.name) == ("ptv3", "outdoor", "synthetic_study")
    assert len(cfg.dataset.splits.train) >= 40 and len(cfg.dataset.splits.val) >= 4
    plan = study.runs(cfg)
    assert sum(steps == study.EVAL_STEPS for _, steps in plan) == 4 * 2 * 2
