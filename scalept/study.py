"""The study ScalePT exists for (``stage=study``): which tiling x fusion keeps PTv3's accuracy, at what cost.

One model is trained per ``stage.label_fractions`` entry, on ``stage.train_sampling`` tiles, and
its last weights are then evaluated on every ``stage.samplings`` x ``stage.fusions`` x
``stage.tta`` combination of the val split: the same weights everywhere, so the differences are
the tiling's and the fusion's alone (``none``, the whole frame, is the baseline). Files::

    <run_dir>/train-lf<fraction>/                       checkpoints/, train_metrics.json, tb/
    <run_dir>/train-lf<fraction>/eval/<sampling>/infer/<fusion>[-tta...]/   shards, metrics.json
    <run_dir>/study.json                                the index python -m scalept.analysis reads

This module only plans: it turns the study config into (config, steps) runs that the launcher
executes like any stage's steps, so every run skips what is done and a killed study resumes.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from scalept.atomic import atomic_path
from scalept.config_check import CONF_DIR, check_config
from scalept.errors import ConfigError

STUDY_INDEX = "study.json"
TRAIN_STEPS = ["preprocess", "train"]
EVAL_STEPS = ["preprocess", "infer", "fuse"]


def _option(group: str, name: str, key: str) -> DictConfig:
    """conf/<group>/<name>.yaml as Hydra would compose it for ``<group>=<name>``."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(f"{key} names {name!r}, which is not an option of conf/{group}/; choose from {known}")
    return OmegaConf.load(path)


def train_dir(cfg: DictConfig, fraction: float) -> Path:
    return Path(cfg.run_dir) / f"train-lf{fraction:g}"


def _variant(base: DictConfig, **changes) -> DictConfig:
    """``base`` with whole groups swapped (sampling, fusion) and keys set, as command-line overrides would."""
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    with open_dict(cfg):
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _sampling(cfg: DictConfig, name: str, key: str) -> DictConfig:
    sampling = _option("sampling", name, key)
    if cfg.stage.max_points is not None and "max_points" in sampling:  # small frames: several tiles each
        sampling.max_points = int(cfg.stage.max_points)
        if "overlap" in sampling and name == "hilbert":
            sampling.overlap = int(cfg.stage.max_points) // 5
    return sampling


def _fusion(cfg: DictConfig, name: str) -> DictConfig:
    fusion = _option("fusion", name, "stage.fusions")
    if cfg.stage.mc_passes is not None and name == "mc_uncertainty":
        fusion.mc_passes = int(cfg.stage.mc_passes)
    return fusion


def _evaluation(cfg: DictConfig, trained: Path, fraction: float, sampling: str, fusion: str,
                tta: bool) -> DictConfig:
    """One evaluation's config: the training's last.pt on ``sampling`` tiles of the val split."""
    return _variant(cfg, sampling=_sampling(cfg, sampling, "stage.samplings"), fusion=_fusion(cfg, fusion),
                    run_dir=str(trained / "eval" / sampling), **{
                        "infer.checkpoint": str(trained / "checkpoints" / "last.pt"),
                        "infer.tta.rotations": list(cfg.stage.tta_rotations) if tta else [0],
                        "infer.tta.flip": False, "preprocess.splits": list(cfg.infer.splits),
                        "train.label_fraction": fraction})  # the training these weights come from


def runs(cfg: DictConfig) -> list[tuple[DictConfig, list[str]]]:
    """Every (config, steps) of the study, in order: synth, then per label fraction a training and its
    evaluations. Each config is checked here, before any work."""
    stage = cfg.stage
    plan = [(cfg, ["synth"])]
    for fraction in stage.label_fractions:
        trained = train_dir(cfg, fraction)
        plan.append((_variant(cfg, sampling=_sampling(cfg, stage.train_sampling, "stage.train_sampling"),
                              run_dir=str(trained), **{"train.label_fraction": fraction}), TRAIN_STEPS))
        for sampling in stage.samplings:
            for fusion, tta in itertools.product(stage.fusions, stage.tta):  # each preprocess after the first: a check
                plan.append((_evaluation(cfg, trained, fraction, sampling, fusion, tta), EVAL_STEPS))
    for run_cfg, _ in plan:
        check_config(run_cfg)
    return plan


def write_index(cfg: DictConfig, plan: list[tuple[DictConfig, list[str]]]) -> Path:
    """``study.json``: the study's settings and, per training and evaluation, where its results are."""
    from scalept.shards import fusion_output_dir, shard_dir

    trainings, evaluations = [], []
    for run_cfg, steps in plan:
        if steps == TRAIN_STEPS:
            trainings.append({"label_fraction": run_cfg.train.label_fraction, "sampling": run_cfg.sampling.name,
                              "run_dir": run_cfg.run_dir})
        elif steps == EVAL_STEPS:
            evaluations.append({
                "label_fraction": run_cfg.train.label_fraction, "sampling": run_cfg.sampling.name,
                "fusion": run_cfg.fusion.name, "tta": run_cfg.infer.tta.rotations != [0],
                "shards": str(shard_dir(run_cfg)), "metrics": str(fusion_output_dir(run_cfg) / "metrics.json")})
    index = {"model": cfg.model.name, "dataset": cfg.dataset.name, "train": cfg.train.name,
             "tta_rotations": list(cfg.stage.tta_rotations), "trainings": trainings, "evaluations": evaluations}
    path = Path(cfg.run_dir) / STUDY_INDEX
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return path
