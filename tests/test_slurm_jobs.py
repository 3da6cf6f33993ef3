"""scalept.slurm_jobs without a cluster: which jobs the PrepareSweep callback would submit, and their order.

A recording executor stands in for submitit's; tests/slurm/ submits the same jobs to a real cluster.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from preprocessing.preprocess import frame_count, run
from scalept import slurm_jobs
from scalept.launch import CONF_DIR
from scalept.slurm_jobs import PrepareSweep, sweep_points


def test_sweep_points_are_the_cartesian_product_of_the_sweeps():
    points = sweep_points(["sampling=block,hilbert", "fusion=logit_average,mc_uncertainty", "seed=3", "nodes=2"])
    assert points == [
        ["sampling=block", "fusion=logit_average", "seed=3", "nodes=2"],
        ["sampling=block", "fusion=mc_uncertainty", "seed=3", "nodes=2"],
        ["sampling=hilbert", "fusion=logit_average", "seed=3", "nodes=2"],
        ["sampling=hilbert", "fusion=mc_uncertainty", "seed=3", "nodes=2"],
    ]
    assert sweep_points(["seed=range(0,2)", "sampling=knn"]) == [["seed=0", "sampling=knn"], ["seed=1", "sampling=knn"]]
    with pytest.raises(ValueError, match="interval"):
        sweep_points(["lr=interval(0,1)"])


@dataclass
class RecordingExecutor:
    """Records what would be submitted: (job name, dependency, number of array tasks, task ids)."""

    name: str
    dependency: str | None
    submitted: list = field(default_factory=list)
    array_parallelism: int | None = None

    def update_parameters(self, array_parallelism: int) -> None:
        self.array_parallelism = array_parallelism

    def submit(self, fn, cfg):
        self.submitted.append((fn.__name__, None))
        return _Job(str(99 + len(SUBMITTED)))  # job ids 100, 101, ... in order of submission

    def map_array(self, fn, cfgs, task_ids):
        self.submitted.append((fn.__name__, list(task_ids)))
        array_id = 99 + len(SUBMITTED)
        return [_Job(f"{array_id}_{i}") for i in task_ids]


@dataclass
class _Job:
    job_id: str


SUBMITTED: list[RecordingExecutor] = []


@pytest.fixture
def recording(monkeypatch):
    SUBMITTED.clear()

    def fake_executor(launcher, job_name, dependency=None, **resources):
        SUBMITTED.append(RecordingExecutor(job_name, dependency))
        return SUBMITTED[-1]

    monkeypatch.setattr(slurm_jobs, "executor", fake_executor)
    return SUBMITTED


def multirun_config(*overrides: str):
    """The launching process's config of `python -m scalept.launch -m <overrides> cluster=slurm`.

    compose() cannot compose in multirun mode: the first sweep point stands in for the base
    config; the callback reads only the launcher settings and the sweep's overrides.
    """
    first = sweep_points([*overrides, "cluster=slurm"])[0]
    cfg = compose(config_name="config", overrides=first, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [*overrides, "cluster=slurm"]
    return cfg


def test_missing_tiles_are_tiled_by_arrays_after_one_synth_job(recording, tmp_path):
    sweep = ["sampling=block,hilbert", f"data_dir={tmp_path}", "dataset.synthetic.frames_per_sequence=5",
             "preprocess.frames_per_task=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = multirun_config(*sweep)
        assert "prepare_sweep" in cfg.hydra.callbacks
        PrepareSweep().on_multirun_start(config=cfg, config_name="config")
    # one synth job for the shared dataset, then one array per strategy: 7 sequences x 3 chunks of <= 2 frames
    assert [(e.name, e.dependency, e.submitted) for e in recording] == [
        ("scalept-synth", None, [("synth_task", None)]),
        ("scalept-preprocess-block", "afterok:100", [("preprocess_task", list(range(21)))]),
        ("scalept-preprocess-hilbert", "afterok:100", [("preprocess_task", list(range(21)))]),
    ]
    assert recording[1].array_parallelism == 32
    extra = cfg.hydra.launcher.additional_parameters
    assert (extra.dependency, extra.kill_on_invalid_dep) == ("afterok:100:101:102", "yes")


def test_nothing_is_submitted_when_tiles_exist_or_no_training_follows(recording, compose_cfg, synthetic_root,
                                                                     tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    data = [f"data_dir={tmp_path}", f"dataset.root={synthetic_root}", 'dataset.splits.train=["00"]',
            "dataset.synthetic.frames_per_sequence=2"]  # what synthetic_root has: no synth job
    run(compose_cfg("stage=preprocess", "sampling=knn", *data))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for sweep in (["sampling=knn", *data],  # tiles complete
                      ["stage=preprocess", "sampling=block,hilbert", *data]):  # the sweep's jobs tile themselves
            cfg = multirun_config(*sweep)
            PrepareSweep().on_multirun_start(config=cfg, config_name="config")
            assert recording == [] and "dependency" not in cfg.hydra.launcher.additional_parameters
        cfg = multirun_config("sampling=knn,block", *data)  # block is missing: its array only, no synth job
        PrepareSweep().on_multirun_start(config=cfg, config_name="config")
    assert [(e.name, e.dependency, e.submitted) for e in recording] == [
        ("scalept-preprocess-block", None, [("preprocess_task", [0, 1])])]  # 00 and 08, 100 frames per task


def test_frame_count_of_a_synthetic_sequence_not_generated_yet(compose_cfg, synthetic_root, tmp_path):
    assert frame_count(compose_cfg(f"dataset.root={tmp_path}", "dataset.synthetic.frames_per_sequence=4"), "00") == 4
    assert frame_count(compose_cfg(f"dataset.root={synthetic_root}"), "00") == 3  # on disk: what is there


@pytest.mark.parametrize("overrides, message", [
    (["sampling=knn", "nodes=1,2"], r"nodes is swept \(1, 2\): .* one multirun per node count"),
    (["sampling=knn", "nodes=two"], r"nodes='two': .* whole number >= 1"),
    (["sampling=knn", "nodes=0"], r"nodes=0: "),
])
def test_bad_node_counts_stop_the_launch_with_one_line(recording, overrides, message, caplog):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = multirun_config(*overrides)
        with pytest.raises(SystemExit) as stop:
            PrepareSweep().on_multirun_start(config=cfg, config_name="config")
    assert stop.value.code == 2 and recording == []  # 2: a configuration error
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert re.search(message, error) and "\n" not in error


def test_job_watcher_reports_new_jobs_their_changes_and_departures():
    answers = iter([
        {"7": ("scalept-pipeline", "RUNNING", "3:00"), "12": ("scalept-preprocess-hilbert", "PENDING", "0:00")},
        {"7": ("scalept-pipeline", "RUNNING", "3:30"), "12": ("scalept-preprocess-hilbert", "RUNNING", "0:05"),
         "13_[0-1]": ("scalept-pipeline", "PENDING", "0:00")},
        {"13_[0-1]": ("scalept-pipeline", "PENDING", "0:00"), "13_2": ("scalept-fuse", "PENDING", "0:00")},
    ])
    states = slurm_jobs.JobStates(lambda: next(answers), before={"7"})  # job 7 is another multirun's
    assert states.changes() == ["job 12 (tiling array hilbert): PENDING, 0:00 elapsed"]
    assert states.changes() == ["job 12 (tiling array hilbert): RUNNING, 0:05 elapsed",
                                "job 13_[0-1] (sweep: train + infer): PENDING, 0:00 elapsed"]
    assert states.changes() == ["job 13_2 (fusion and scores): PENDING, 0:00 elapsed",
                                "job 12 (tiling array hilbert): left the queue"]
    assert sorted(states.current) == ["13_2", "13_[0-1]"]


def test_without_squeue_the_watcher_sees_no_jobs(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm_jobs.squeue_jobs() == {}
