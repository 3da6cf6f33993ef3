"""The steps of ScalePT, by name and in pipeline order, and the stage module that does each one.

A stage module exposes ``run(cfg)`` (do the work, skipping what is done) and ``plan(cfg) ->
scalept.plan.Plan`` (what is left, read from its output files). The launcher, the Slurm
planner and the benchmarks reach stages only through :func:`run_step` and :func:`plan_step`.

Stages are named by dotted module path and imported when first used, as Hydra finds a
``_target_``: the ``preprocessing`` package builds on scalept's formats (tiles, scans,
checkpoints), and no scalept module imports it, so the dependency between the two packages
goes one way (docs/architecture.md, "Modules and their imports").
"""
from __future__ import annotations

import importlib
from types import ModuleType

from omegaconf import DictConfig, OmegaConf

from scalept.errors import ConfigError
from scalept.plan import Plan

# step name -> its stage module, in the order conf/stage/pipeline.yaml runs them
STAGES: dict[str, str] = {
    "synth": "preprocessing.synthetic.stage",
    "preprocess": "preprocessing.preprocess",
    "train": "scalept.train",
    "infer": "scalept.infer",
    "fuse": "scalept.fuse",
}


def check_steps(steps) -> list[str]:
    """``stage.steps`` as a list, each a known step, in pipeline order; else one line naming the key."""
    steps = list(steps)
    for step in steps:
        if step not in STAGES:
            raise ConfigError(f"stage.steps names {step!r}; known steps: {', '.join(STAGES)}")
    order = [s for s in STAGES if s in steps]
    if steps != order:
        raise ConfigError(f"stage.steps={steps} runs a step before the one whose files it reads; use {order}")
    return steps


def stage_module(step: str) -> ModuleType:
    return importlib.import_module(STAGES[step])


def stage_config(step: str, cfg: DictConfig) -> DictConfig:
    """The sub-configs the step's stage declares in its ``READS``, resolved; nothing else of ``cfg``.

    A stage that reaches for a group it did not declare fails at once (struct mode), so
    ``READS`` is the true list of what a stage depends on.
    """
    keys = stage_module(step).READS
    view = OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
                             else cfg[k] for k in keys})
    OmegaConf.set_struct(view, True)
    return view


def run_step(step: str, cfg: DictConfig):
    """Do one step's work on its stage's part of ``cfg``; returns what the stage's ``run`` returns."""
    return stage_module(step).run(stage_config(step, cfg))


def plan_step(step: str, cfg: DictConfig) -> Plan:
    """What one step has left to do for ``cfg``, without doing it."""
    return stage_module(step).plan(stage_config(step, cfg))
