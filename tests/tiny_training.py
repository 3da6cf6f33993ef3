"""A tiny synthetic training problem shared by the training tests (composed with Hydra like a real run).

Two short synthetic sequences at coarse azimuth steps, tiled with Hilbert windows
of a few thousand points: ptv3_tiny trains a step in a fraction of a second on a CPU.
"""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from scalept.launch import CONF_DIR

TRAIN_SEQUENCES = ("00", "01")
VAL_SEQUENCES = ("08",)


def data_overrides(data_dir: Path) -> list[str]:
    return [
        "dataset=synthetic", f"data_dir={data_dir}", "dataset.synthetic.frames_per_sequence=4",
        "dataset.synthetic.azimuth_steps=200", f"dataset.splits.train=[{','.join(TRAIN_SEQUENCES)}]",
        f"dataset.splits.val=[{','.join(VAL_SEQUENCES)}]", "sampling=hilbert", "sampling.max_points=2500",
        "sampling.overlap=500", "preprocess.frames_per_task=100",
    ]


def compose_tiny(data_dir: Path, run_dir: Path, *overrides: str):
    """conf/ composed for a tiny CPU training run in ``run_dir`` on the data of ``data_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[
            *data_overrides(data_dir), f"run_dir={run_dir}", "model=ptv3_tiny", "stage=train",
            "train.batch_voxels=4500", "train.step_voxels=null", "train.num_workers=0", "train.epochs=2",
            "train.val_every=1", "train.log_every=1", "train.grid_size=0.2", "optim.lr=0.01", "optim.lr_scaling=none", *overrides,
        ])


def make_tiny_data(data_dir: Path) -> Path:
    """Generate and tile the tiny dataset (through the synth and preprocess stages); returns data_dir."""
    from scalept.steps import run_step

    cfg = compose_tiny(data_dir, data_dir / "unused-run")
    run_step("synth", cfg)
    run_step("preprocess", cfg)
    return data_dir
