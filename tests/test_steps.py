"""The steps and their stages (scalept/steps.py): each stage plans its work from its files and runs it."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from tiny_training import compose_tiny

from scalept.errors import ConfigError
from scalept.steps import STAGES, check_steps, plan_step, run_step, stage_module


def test_synth_says_when_a_sequence_holds_more_frames_than_asked(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="scalept"):
        run_step("synth", compose_tiny(tmp_path, tmp_path / "run", "dataset.synthetic.frames_per_sequence=3",
                                       "dataset.synthetic.azimuth_steps=64"))
        assert not caplog.records
        run_step("synth", compose_tiny(tmp_path, tmp_path / "run", "dataset.synthetic.frames_per_sequence=2",
                                       "dataset.synthetic.azimuth_steps=64"))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3  # sequences 00, 01 and 08
    assert all("holds 3 frames, more than dataset.synthetic.frames_per_sequence=2" in w for w in warned), warned


def test_synth_gives_the_same_frames_on_one_process_or_several(tmp_path):
    def scans(workers: int) -> dict[str, bytes]:
        data = tmp_path / str(workers)
        run_step("synth", compose_tiny(data, tmp_path / "run", "dataset.synthetic.frames_per_sequence=2",
                                       "dataset.synthetic.azimuth_steps=64", f"dataset.synthetic.workers={workers}"))
        return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*.bin"))}

    one, three = scans(1), scans(3)
    assert len(one) == 6 and one == three


def test_every_step_names_a_stage_that_runs_and_plans():
    for step in STAGES:
        module = stage_module(step)
        assert callable(module.run) and callable(module.plan), step


def test_steps_out_of_order_or_unknown_are_one_line(compose_cfg):
    assert check_steps(compose_cfg().stage.steps) == list(STAGES)
    with pytest.raises(ConfigError, match=r"^stage.steps=\['fuse', 'infer'\] runs a step before .*\['infer', 'fuse'\]"):
        check_steps(["fuse", "infer"])
    with pytest.raises(ConfigError, match=r"^stage.steps names 'tile'; known steps: synth, preprocess"):
        check_steps(["tile"])


def test_each_stage_plans_what_is_left_and_is_done_after_running(compose_cfg, tiny_pipeline, tmp_path):
    cfg = compose_cfg(*tiny_pipeline)
    before = {step: plan_step(step, cfg) for step in STAGES}
    assert not any(p.done for p in before.values())
    assert before["synth"].todo == ["sequence 00: 0 of 2 frames", "sequence 08: 0 of 2 frames"]
    assert before["preprocess"].total == 2 and len(before["preprocess"].todo) == 2  # 2 sequences of 2 frames
    for step in STAGES:
        run_step(step, cfg)
        assert plan_step(step, cfg).done, step
    assert plan_step("infer", cfg).total == 1  # sequence 08's two frames: one chunk
    label = next((tmp_path / "run" / "infer" / "logit_average" / "sequences" / "08" / "predictions").glob("*.label"))
    label.unlink()  # a lost output: fusion has work again, the steps before it do not
    assert not plan_step("fuse", cfg).done and plan_step("infer", cfg).done
    (tmp_path / "data" / "tiles" / "synthetic" / "hilbert" / "08.h5").unlink()
    assert plan_step("preprocess", cfg).todo == ["task 1: sequence 08, frames 0-2"]


@pytest.mark.slow  # a fresh interpreter: ~6 s
def test_a_dry_run_prints_every_steps_plan_and_does_nothing(tiny_pipeline, tmp_path):
    done = subprocess.run([sys.executable, "-m", "scalept.launch", "dry_run=true", *tiny_pipeline,
                           f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    heads = [line for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == list(STAGES)
    assert heads[0].startswith("synth: 2 of 2 to do") and heads[1].startswith("preprocess: 2 of 2 to do")
    assert not (tmp_path / "data" / "synthetic").exists() and not (tmp_path / "run" / "checkpoints").exists()
