"""Optimizer and schedule: AdamW with a smaller rate inside the transformer blocks, OneCycle over the run.

The learning rate in ``optim.lr`` is the one tuned for optimizer steps of
``optim.reference_voxels`` voxels; it is moved to the run's real global step (the mean
voxels of an optimizer step over every rank, from the epoch's voxel-budget plan) by
``optim.lr_scaling``, so that changing the budget or the number of GPUs needs no retuning.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from scalept.errors import ConfigError
from scalept.model.blocks import Block


def scaled_lr(lr: float, step_voxels: float, reference_voxels: float, rule: str) -> float:
    """``lr`` tuned at ``reference_voxels`` per step moved to ``step_voxels``: none, linear or sqrt (as Grendel-GS)."""
    ratio = step_voxels / reference_voxels
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f"optim.lr_scaling={rule!r}; choose none, linear or sqrt")


def param_groups(model: torch.nn.Module, lr: float, block_lr_scale: float, weight_decay: float) -> list[dict]:
    """Two AdamW groups: everything inside a transformer :class:`Block` at ``lr x block_lr_scale``, the rest at ``lr``."""
    in_blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    other = [p for p in params if id(p) not in in_blocks]
    blocks = [p for p in params if id(p) in in_blocks]
    return [
        {"params": other, "lr": lr, "weight_decay": weight_decay, "name": "base"},
        {"params": blocks, "lr": lr * block_lr_scale, "weight_decay": weight_decay, "name": "blocks"},
    ]


def build_optimizer(model: torch.nn.Module, ocfg: DictConfig, step_voxels: float, total_steps: int,
                    device: torch.device) -> tuple[float, torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """(scaled base lr, AdamW over :func:`param_groups`, cosine OneCycle spanning ``total_steps``)."""
    lr = scaled_lr(float(ocfg.lr), step_voxels, float(ocfg.reference_voxels), str(ocfg.lr_scaling))
    groups = param_groups(model, lr, float(ocfg.block_lr_scale), float(ocfg.weight_decay))
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=total_steps, pct_start=float(ocfg.pct_start),
        anneal_strategy="cos", div_factor=float(ocfg.div_factor), final_div_factor=float(ocfg.final_div_factor),
    )
    return lr, optimizer, scheduler
