"""Helpers of the inference and fusion tests: tiny synthetic tiles and random-weight checkpoints."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from scalept.checkpoint import checkpoint_path, model_record, save_checkpoint
from scalept.data.semantickitti import CLASS_NAMES, NUM_CLASSES
from scalept.launch import CONF_DIR

FRAMES = 3          # frames of the val sequence 08
AZIMUTH_STEPS = 128  # ~7k points a frame


def compose(*overrides: str):
    """conf/config.yaml composed as `python -m scalept.launch` would (module-scoped fixtures can use it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def base_overrides(root: Path, sampling: str = "block", *extra: str) -> list[str]:
    """A small labelled val sequence, tiled into several overlapping tiles per frame."""
    overrides = [
        f"data_dir={root}", f"run_dir={root}/run", f"sampling={sampling}",
        f"dataset.synthetic.frames_per_sequence={FRAMES}", f"dataset.synthetic.azimuth_steps={AZIMUTH_STEPS}",
        "preprocess.splits=[val]", "infer.splits=[val]", "infer.frames_per_chunk=2", "infer.batch_points=40000",
        "infer.num_workers=0", "infer.tta.rotations=[0]",  # one view; the TTA tests ask for theirs
    ]
    if sampling == "block":
        overrides += ["sampling.max_points=3000", "sampling.block_size=40.0"]
    return overrides + list(extra)


def prepare_tiles(cfg) -> None:
    """Synthetic frames of the val sequence and their tile file (preprocessing stage)."""
    from preprocessing.preprocess import run
    from preprocessing.synthetic.generate import generate_dataset

    generate_dataset(cfg.dataset.root, {"08": FRAMES}, seed=0, azimuth_steps=AZIMUTH_STEPS)
    run(cfg)


def save_random_checkpoint(cfg, which: str = "best", seed: int = 0, model_overrides: dict | None = None) -> Path:
    """A ``ptv3_tiny`` checkpoint with random weights, saved the way train.py saves them."""
    from scalept.model import build_model

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(model_overrides or {})
    torch.manual_seed(seed)
    model = build_model(model_cfg, NUM_CLASSES)
    grid = float(cfg.train.grid_size)
    path = checkpoint_path(cfg.run_dir, which)
    save_checkpoint(path, {**model_record(model, model_cfg, CLASS_NAMES, grid), "epoch": 0, "step": 0})
    return path
