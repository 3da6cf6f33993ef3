"""Shared fixtures: Hydra composition of the real conf/, real scans, a small synthetic dataset."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from scalept.launch import CONF_DIR

REAL_DATA_ENV = "SCALEPT_REAL_DATA"


def compose_config(*overrides: str):
    """conf/config.yaml composed exactly as `python -m scalept.launch` would, with overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def compose_cfg():
    return compose_config


# The default pipeline made small: Hilbert windows (a few per tiny frame) and one inference view.
TINY_PIPELINE = [
    "dataset.synthetic.frames_per_sequence=2", "dataset.synthetic.azimuth_steps=256", 'dataset.splits.train=["00"]',
    "sampling=hilbert", "sampling.max_points=4000", "sampling.overlap=500", "train.max_steps=3", "train.val_every=0",
    "train.num_workers=0", "infer.num_workers=0", "infer.tta.rotations=[0]", "local_ranks=1",
]


@pytest.fixture
def tiny_pipeline(tmp_path) -> list[str]:
    """Overrides that shrink the default pipeline to seconds, with data and run dirs under tmp_path."""
    return [f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", *TINY_PIPELINE]


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real SemanticKITTI scans of ../shared (set by .ci/run); tests using them skip without it."""
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(f"{REAL_DATA_ENV} is not set: real-scan tests need ../shared/data/semantickitti-real")
    root = Path(value)
    if not (root / "sequences").is_dir():
        pytest.fail(f"{REAL_DATA_ENV}={value} has no sequences/ folder")
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (coarse azimuth steps, a few frames per sequence), made once per run."""
    from preprocessing.synthetic.generate import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    generate_dataset(root, {"00": 3, "08": 2}, seed=0, azimuth_steps=1024)
    return root


@pytest.fixture
def dead_pid():
    """Pids of processes that have exited (what ``kill -9`` leaves behind): ``dead_pid()`` makes one."""
    def make() -> int:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        return proc.pid

    return make
