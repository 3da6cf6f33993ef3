"""The steps a stage runs, by name, in the order ``conf/stage/pipeline.yaml`` lists them.

Each step hands the whole config to its stage module (which reads and writes the files of
docs/architecture.md). Both the launcher and the Slurm helpers run steps through
:data:`STEPS`; this module imports neither, so orchestration has no import cycle.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from scalept.errors import ConfigError

log = logging.getLogger("scalept")


def synth(cfg: DictConfig) -> None:
    """Generate the synthetic dataset (frames that already exist are kept)."""
    settings = cfg.dataset.get("synthetic")
    if settings is None:
        if cfg.stage.name == "synth":
            raise ConfigError(f"stage=synth needs dataset=synthetic; dataset={cfg.dataset.name} is real data")
        log.info("dataset=%s is real data: nothing to generate", cfg.dataset.name)
        return
    from preprocessing.synthetic.generate import generate_dataset

    from scalept.data.dataset import split_sequences

    frames = int(settings.frames_per_sequence)
    sequences = split_sequences(cfg.dataset.splits, list(cfg.dataset.splits), "dataset.splits")
    folders = generate_dataset(cfg.dataset.root, {s: frames for s in sequences}, seed=int(settings.seed),
                               azimuth_steps=int(settings.azimuth_steps), progress=sys.stderr.isatty())
    for folder in folders:
        found = len(list((folder / "velodyne").glob("*.bin")))
        if found > frames:  # the later stages read every frame of a sequence
            log.warning("synth: %s holds %d frames, more than dataset.synthetic.frames_per_sequence=%d, and every "
                        "one of them is used; delete the folder (or set another data_dir) to get %d", folder, found,
                        frames, frames)
    log.info("synth: dataset ready under %s", cfg.dataset.root)


def preprocess(cfg: DictConfig) -> None:
    from preprocessing.preprocess import run

    run(cfg)


def train(cfg: DictConfig) -> None:
    from scalept.train import run

    run(cfg)


def infer(cfg: DictConfig) -> None:
    from scalept.infer import run

    run(cfg)


def fuse(cfg: DictConfig) -> None:
    from scalept.fuse import run

    run(cfg)


STEPS: dict[str, Callable[[DictConfig], None]] = {
    "synth": synth, "preprocess": preprocess, "train": train, "infer": infer, "fuse": fuse,
}
