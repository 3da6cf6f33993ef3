"""ScalePT's entry point: ``python -m scalept.launch [overrides]`` (Hydra).

Composes ``conf/`` and runs the steps of the chosen stage in order. This module
only dispatches: each step's work lives in its stage module, which reads and
writes the files that docs/architecture.md lists.
"""
from __future__ import annotations

import logging
import os
import sys

# Before torch (imported by the stages) loads OpenMP: idle threads sleep instead of spinning.
# With other processes on the cores, spinning threads take the time slices their partners
# need (measured: training 10x slower under two busy processes, 1.5x with this, and ~8 %
# slower on idle cores). OMP_WAIT_POLICY=ACTIVE in the environment keeps the spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from scalept import slurm_jobs, study  # noqa: E402
from scalept.steps import check_steps, plan_step, run_step  # noqa: E402
from scalept.config_check import CONF_DIR, check_config, check_output_dirs  # noqa: E402
from scalept.errors import ScalePTError, TrainingInterrupted, one_line  # noqa: E402

log = logging.getLogger("scalept")


def _array_task_id() -> int | None:
    """preprocess.task_id: SLURM_ARRAY_TASK_ID of a plain sbatch array (slurm/preprocess.sbatch).

    Under the Hydra Slurm launcher (submitit sets SUBMITIT_EXECUTOR) the array index is
    the sweep point, not a preprocessing unit, so it is not one here.
    """
    value = os.environ.get("SLURM_ARRAY_TASK_ID")
    return None if value is None or os.environ.get("SUBMITIT_EXECUTOR") else int(value)


OmegaConf.register_new_resolver("scalept.array_task_id", _array_task_id, replace=True)
# cluster/slurm.yaml: one srun task (DDP rank) per GPU when GPUs are requested, else one per node.
OmegaConf.register_new_resolver(
    "scalept.tasks_per_node", lambda gpus_per_node: 1 if gpus_per_node is None else int(gpus_per_node), replace=True)


def _submitit_job():
    """submitit's JobEnvironment when this process is a task of a submitit (cluster=slurm) job, else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    return submitit.JobEnvironment()


def _log_rank(job, env) -> None:
    import socket

    job_id = job.job_id if job is not None else os.environ.get("SLURM_JOB_ID", "-")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the Slurm node name, not the host's
    log.info("scalept-launch: job %s, rank %d of %d on node %s (local rank %d), master %s:%d", job_id, env.rank,
             env.world_size, node, env.local_rank, env.master_addr, env.master_port)


def run(cfg: DictConfig) -> None:
    """Check ``cfg``, then run the stage's steps: here, or as ``local_ranks`` processes of this machine.

    A job of several tasks (a submitit job with cluster=slurm, a plain srun step as in
    slurm/train.sbatch, or torchrun), as ``distributed.resolve_env`` reads it, is one DDP
    world already and runs its steps as it is.
    """
    check_config(cfg)  # every value, before any work (again in every job)
    check_output_dirs(cfg)
    plan = _plan(cfg)
    if cfg.dry_run:
        for run_cfg, run_steps in plan:
            print_plans(run_cfg, run_steps)
        return
    from scalept import distributed, local_ranks

    in_job = _submitit_job() is not None or distributed.resolve_env().world_size > 1
    ranks = 1 if in_job else local_ranks.rank_count(cfg.local_ranks, [s for _, st in plan for s in st])
    if ranks > 1:
        local_ranks.start(cfg, ranks, run_plan)  # each rank plans again from cfg
    else:
        run_plan(cfg, plan)


def _plan(cfg: DictConfig) -> list[tuple[DictConfig, list[str]]]:
    """(config, steps) of every run of the stage, in order: one, or the study's many."""
    steps = check_steps(cfg.stage.steps)
    return study.runs(cfg) if cfg.stage.name == "study" else [(cfg, steps)]


def run_plan(cfg: DictConfig, plan: list[tuple[DictConfig, list[str]]] | None = None) -> None:
    """The stage's steps (``plan``, else :func:`_plan` of ``cfg``) in this process: alone, or as one
    task of a multi-task job.

    In a submitit job that predicts, fusion (which needs every rank's shards) is a job of its
    own, submitted with the sweep (hydra_plugins/scalept_slurm/sweep_launcher.py), so this job
    leaves it out; slurm/pipeline.sh leaves it out of the srun step itself.
    """
    plan = _plan(cfg) if plan is None else plan
    job = _submitit_job()
    if job is not None and slurm_jobs.fusion_is_own_job(cfg.stage):
        plan = [(run_cfg, [s for s in run_steps if s != "fuse"]) for run_cfg, run_steps in plan]
    from scalept import distributed

    env = distributed.resolve_env()
    if cfg.stage.name == "study" and env.rank == 0:
        log.info("study: %d runs; index %s (python -m scalept.analysis %s compares them)", len(plan),
                 study.write_index(cfg, plan), cfg.run_dir)
    if (job.num_tasks if job is not None else env.world_size) == 1:
        for run_cfg, run_steps in plan:
            for step in run_steps:
                run_step(step, run_cfg)
    else:
        _run_as_ranks(plan, job)


def print_plans(cfg: DictConfig, steps: list[str]) -> None:
    """``dry_run=true``: what each step has left, as its stage reads it from the files; no work done.

    A step after one with work left is planned on today's files, so it shows everything it
    would redo once the step before it has run.
    """
    for step in steps:
        print("\n".join(plan_step(step, cfg).lines()), flush=True)


def _run_as_ranks(plan: list[tuple[DictConfig, list[str]]], job=None) -> None:
    """Every task of a multi-task job (submitit's ``job``, or a plain srun step / torchrun when None):
    the steps of every (config, steps) of ``plan`` in one process group, a barrier between two, rank 0
    alone writing frames and fused labels."""
    import contextlib

    from scalept import distributed

    env = distributed.get_env()
    rank = job.global_rank if job is not None else env.rank
    _log_rank(job, env)
    steps = [(run_cfg, step) for run_cfg, run_steps in plan for step in run_steps]
    names = {step for _, step in steps}
    grouped = len(steps) > 1 or not names <= {"synth", "preprocess", "fuse"}  # a step or a barrier needs one
    with distributed.session() if grouped else contextlib.nullcontext():
        for index, (run_cfg, step) in enumerate(steps):
            if step not in ("synth", "fuse") or rank == 0:  # one writer of frames and fused labels
                try:
                    run_step(step, run_cfg)
                except TrainingInterrupted:  # preempted: rank 0 requeues the job (submitit), the others wait
                    if job is not None and rank != 0:
                        slurm_jobs.wait_for_requeue(job)
                    raise
            if index + 1 < len(steps):  # the next step reads what every rank of this one wrote
                distributed.barrier()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ScalePTError as err:  # the user's input: one line, no traceback
        line, code = one_line(err)
        log.error("%s", line)
        sys.exit(code)


if __name__ == "__main__":
    main()
