"""One check of the composed config before any work starts (``check_config``).

Every value that a stage reads is checked here, at launch: in the launching process
(on a Slurm login node, for every sweep point, before anything is submitted) and
again in every job. A bad value stops the run with one line naming the key, the
value and what would be right, instead of failing hours later in the fusion job or,
worse, running "successfully" on nonsense (``train.grid_size=0``). The YAML files
keep the defaults and their comments; this module holds no second copy of them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from scalept.errors import ConfigError

# The Hydra config folder (conf/ beside the package: installs are editable, as the README says).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# predicates: (test, what a right value looks like)
Rule = tuple[Callable[[object], bool], str]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE: Rule = (lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: _number(v) and v >= 0, "a number >= 0")
COUNT: Rule = (lambda v: _integer(v) and v >= 1, "an integer >= 1")
NON_NEGATIVE_INT: Rule = (lambda v: _integer(v) and v >= 0, "an integer >= 0")
INTEGER: Rule = (_integer, "an integer")
FLAG: Rule = (lambda v: isinstance(v, bool), "true or false")
SHARE: Rule = (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")
PROBABILITY: Rule = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")


def optional(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"null or {rule[1]}")


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices, "one of " + ", ".join(choices))


SEQUENCE_NAME = re.compile(r"^\d{2,}$")
SEQUENCES: Rule = (lambda v: isinstance(v, list) and all(isinstance(s, str) and SEQUENCE_NAME.match(s) for s in v),
                   'a list of zero-padded sequence names in quotes, e.g. ["08"]')
SCALE_RANGE: Rule = (lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) and x > 0 for x in v)
                     and v[0] <= v[1], "[low, high] with 0 < low <= high")
DEVICE: Rule = (lambda v: isinstance(v, str) and re.match(r"^(auto|cpu|cuda(:\d+)?)$", v) is not None,
                "auto, cpu, cuda or cuda:<index>")
COUNTS: Rule = (lambda v: isinstance(v, list) and len(v) > 0 and all(_integer(x) and x >= 1 for x in v),
                "a non-empty list of integers >= 1")
ORDER_NAMES = ("z", "z-trans", "hilbert", "hilbert-trans")  # scalept.serialization.ORDERS
ORDER_LIST: Rule = (lambda v: isinstance(v, list) and len(v) > 0 and all(o in ORDER_NAMES for o in v),
                    "a non-empty list of " + ", ".join(ORDER_NAMES))
TEXT: Rule = (lambda v: isinstance(v, str) and v != "", "a non-empty text")
NAMES: Rule = (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v),
               "a non-empty list of option names")
ROTATIONS: Rule = (lambda v: isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v)
                   and all(_integer(r) and r % 90 == 0 and 0 <= r < 360 for r in v),
                   "a list of distinct z-rotations from 0, 90, 180, 270, e.g. [0, 90, 180, 270]")

# a path's file may be written by an earlier step (a study's training): infer says so if it is missing
CHECKPOINT: Rule = (lambda v: v in ("best", "last") or (isinstance(v, str) and v.endswith(".pt")),
                    "best or last (of run_dir/checkpoints), or the path of a .pt checkpoint file")

RULES: dict[str, Rule] = {
    "seed": INTEGER, "nodes": COUNT, "dry_run": FLAG,
    "local_ranks": (lambda v: v == "auto" or COUNT[0](v), "auto or an integer >= 1"),
    "dataset.synthetic.seed": INTEGER, "dataset.synthetic.frames_per_sequence": COUNT,
    "dataset.synthetic.azimuth_steps": COUNT, "dataset.synthetic.workers": optional(COUNT),
    "preprocess.frames_per_task": COUNT, "preprocess.task_id": optional(NON_NEGATIVE_INT), "preprocess.dry_run": FLAG,
    "preprocess.crop.min_range": optional(NON_NEGATIVE), "preprocess.crop.max_range": optional(POSITIVE),
    "preprocess.crop.min_z": optional((_number, "a number")), "preprocess.crop.max_z": optional((_number, "a number")),
    "sampling.max_points": COUNT, "sampling.block_size": POSITIVE, "sampling.overlap": NON_NEGATIVE,
    "sampling.resolution": POSITIVE, "sampling.seed": INTEGER, "sampling.first_ring": POSITIVE,
    "sampling.ring_growth": NON_NEGATIVE, "sampling.azimuth_sectors": COUNT,
    "train.epochs": COUNT, "train.max_steps": optional(COUNT), "train.batch_voxels": COUNT,
    "train.step_voxels": optional(COUNT), "train.checkpoint_levels": optional(NON_NEGATIVE_INT),
    "train.grid_size": POSITIVE, "train.label_fraction": SHARE, "train.val_every": NON_NEGATIVE_INT,
    "train.num_workers": NON_NEGATIVE_INT, "train.log_every": COUNT, "train.amp": FLAG,
    "train.augmentation.rotate_z": FLAG, "train.augmentation.scale": SCALE_RANGE,
    "train.augmentation.flip_p": PROBABILITY, "train.augmentation.jitter_sigma": NON_NEGATIVE,
    "train.augmentation.jitter_clip": NON_NEGATIVE, "train.lovasz_weight": NON_NEGATIVE,
    "train.bn_recalibration_batches": NON_NEGATIVE_INT,
    "train.resume": (lambda v: str(v).lower() in ("auto", "true", "false"), "auto, true or false"),
    "train.stop_at_step": optional(COUNT), "train.checkpoint_every_min": optional(POSITIVE),
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.block_lr_scale": NON_NEGATIVE,
    "optim.lr_scaling": one_of("none", "linear", "sqrt"), "optim.reference_voxels": POSITIVE,
    "optim.pct_start": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"), "optim.div_factor": POSITIVE,
    "optim.final_div_factor": POSITIVE, "optim.clip_grad_norm": optional(POSITIVE),
    "infer.batch_points": COUNT, "infer.num_workers": NON_NEGATIVE_INT, "infer.checkpoint": CHECKPOINT,
    "infer.frames_per_chunk": COUNT, "infer.device": DEVICE, "infer.amp": FLAG,
    "fuse.device": DEVICE,
    "fusion.name": one_of("logit_average", "softmax_average", "mc_uncertainty"), "fusion.mc_passes": COUNT,
    "fusion.weighting": one_of("entropy", "lowest"), "fusion.temperature": POSITIVE,
    "infer.tta.rotations": ROTATIONS, "stage.tta_rotations": ROTATIONS,
    "stage.train_sampling": TEXT, "stage.samplings": NAMES, "stage.fusions": NAMES,
    "stage.tta": (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, bool) for x in v),
                  "a non-empty list of true / false"),
    "stage.label_fractions": (lambda v: isinstance(v, list) and len(v) > 0 and all(SHARE[0](x) for x in v),
                              "a non-empty list of shares in (0, 1], e.g. [1.0, 0.1, 0.01]"),
    "stage.max_points": optional(COUNT), "stage.mc_passes": optional(COUNT),
    "infer.tta.flip": FLAG,
    "sampling.leaf_points": COUNT, "sampling.voxel_size": POSITIVE,
    "data_dir": TEXT, "tiles_dir": TEXT, "run_dir": TEXT, "dataset.root": TEXT, "dataset.name": TEXT,
    "model.in_channels": COUNT, "model.orders": ORDER_LIST, "model.shuffle_orders": FLAG,
    "model.stem_kernel": (lambda v: _integer(v) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "model.enc_depths": COUNTS, "model.enc_channels": COUNTS, "model.enc_heads": COUNTS,
    "model.enc_patch_size": COUNTS, "model.dec_depths": COUNTS, "model.dec_channels": COUNTS,
    "model.dec_heads": COUNTS, "model.dec_patch_size": COUNTS, "model.mlp_ratio": POSITIVE,
    "model.qkv_bias": FLAG, "model.drop_path": PROBABILITY, "model.attn_drop": PROBABILITY,
    "model.proj_drop": PROBABILITY, "model.bn_eps": POSITIVE, "model.bn_momentum": PROBABILITY,
    "model.checkpoint_levels": NON_NEGATIVE_INT,
}
# Keys with no rule here: names (labels of runs), the split lists (checked below) and stage.steps
# (scalept.steps.check_steps); tests/test_config_check.py holds this list to every shipped key.
UNCHECKED = ("dataset.splits", "dataset.synthetic", "infer.splits", "preprocess.splits", "stage.steps", "stage.name",
             "model.name", "optim.name", "sampling.name", "train.name")


def _value(cfg: DictConfig, key: str):
    """The value at ``key`` (resolved), or a marker when the key is absent (options differ in keys)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


_ABSENT = object()


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line: key, value, fix) for the first bad value of ``cfg``."""
    for key, (test, wanted) in RULES.items():
        value = _value(cfg, key)
        if value is not _ABSENT and not test(value):
            raise ConfigError(f"{key}={value!r} is not valid: use {wanted}")
    for split, names in cfg.dataset.splits.items():
        names = OmegaConf.to_container(names, resolve=True)
        if not SEQUENCES[0](names):
            raise ConfigError(f"dataset.splits.{split}={names!r} is not valid: use {SEQUENCES[1]}")
    crop = cfg.preprocess.crop
    for low, high in (("min_range", "max_range"), ("min_z", "max_z")):
        if crop.get(low) is not None and crop.get(high) is not None and crop[low] >= crop[high]:
            raise ConfigError(f"preprocess.crop.{low}={crop[low]} must be below {high}={crop[high]}")
    if "overlap" in cfg.sampling and cfg.sampling.name == "hilbert" and cfg.sampling.overlap >= cfg.sampling.max_points:
        raise ConfigError(f"sampling.overlap={cfg.sampling.overlap} must be below sampling.max_points="
                          f"{cfg.sampling.max_points} (the window stride is their difference)")
    _check_model_shape(cfg.model)
    for split in ("preprocess.splits", "infer.splits"):
        for name in _value(cfg, split):
            if name not in cfg.dataset.splits:
                raise ConfigError(f"{split} names {name!r}, but dataset.splits has only "
                                  f"{', '.join(cfg.dataset.splits)}; fix one of the two")


def _check_model_shape(model: DictConfig) -> None:
    """Per-stage lists agree in length (decoder: one stage fewer) and every width splits into its heads."""
    for side, stages in (("enc", len(model.enc_depths)), ("dec", len(model.enc_depths) - 1)):
        for key in ("depths", "channels", "heads", "patch_size"):
            if len(model[f"{side}_{key}"]) != stages:
                raise ConfigError(f"model.{side}_{key}={list(model[f'{side}_{key}'])} needs {stages} entries "
                                  f"(one per {'encoder' if side == 'enc' else 'decoder'} stage, as model.enc_depths "
                                  f"has {len(model.enc_depths)} encoder stages)")
        for width, heads in zip(model[f"{side}_channels"], model[f"{side}_heads"]):
            if width % heads:
                raise ConfigError(f"model.{side}_channels={list(model[f'{side}_channels'])}: {width} channels do "
                                  f"not split into {heads} heads (model.{side}_heads); make each a multiple")
    if model.checkpoint_levels > len(model.enc_depths):
        raise ConfigError(f"model.checkpoint_levels={model.checkpoint_levels} is above the "
                          f"{len(model.enc_depths)} levels of model.enc_depths")


# The folders stages write, by the config key that names them.
OUTPUT_DIRS = ("data_dir", "tiles_dir", "run_dir")


def check_output_dirs(cfg: DictConfig) -> None:
    """Make the folders the stages write, or raise :class:`ConfigError` naming the key: a file in the
    way, no permission, a read-only place (/proc) — before the first unit of work, not after it."""
    for key in OUTPUT_DIRS:
        path = Path(str(cfg[key]))
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as err:
            in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
            why = f"{in_the_way} is a file, not a folder" if in_the_way else (err.strerror or str(err))
            raise ConfigError(f"{key}={cfg[key]}: cannot make the folder ({why}); point {key} elsewhere") from None
