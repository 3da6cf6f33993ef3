"""The Slurm jobs a ``cluster=slurm`` multirun submits besides the sweep's own array job.

For ``python -m scalept.launch -m sampling=block,hilbert cluster=slurm nodes=2`` the
cluster sees, in dependency order (every arrow is ``--dependency=afterok``):

1. ``scalept-synth`` (one task), only when the synthetic dataset is not generated yet;
2. ``scalept-preprocess-<sampling>``: one array job per strategy whose tiles are
   missing, ``--array=0-N%K``, one task per (sequence, chunk) unit;
3. the sweep's array job (hydra-submitit-launcher), one task per sweep point, each
   ``nodes`` nodes wide; it waits for every preprocessing array of the sweep (one
   array job has one dependency list);
4. ``scalept-fuse``: one per sweep point that predicts, starting when its array task
   ended well.

Steps 1-2 happen in :class:`PrepareSweep`, a Hydra callback that runs in the
launching process before the launcher submits anything; steps 3-4 in
:class:`hydra_plugins.scalept_slurm.sweep_launcher.SweepLauncher`, with :func:`submit_fusion`. Every job is
submitted from the login node.
Jobs with a dependency that can no longer be met are cancelled by Slurm
(``--kill-on-invalid-dep=yes``) rather than left pending forever.

Preemption and time limits are submitit's: on USR2 the training loop writes ``last.pt``
and hands the signal back to submitit, whose handler on rank 0 requeues the job through
the launcher's ``checkpoint()``; the requeued job reruns the same steps, each of which
skips finished work, so training resumes from ``last.pt`` (:func:`wait_for_requeue`
keeps the other ranks from ending the job step first).
"""
from __future__ import annotations

import copy
import itertools
import logging
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from scalept.errors import ConfigError, ScalePTError
from scalept.steps import plan_step, run_step

log = logging.getLogger("scalept")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def executor(launcher: DictConfig, job_name: str, dependency: str | None = None, **resources):
    """A submitit Slurm executor with the site settings of ``hydra.launcher`` and the given resources.

    Partition, account, QOS, constraint, setup lines and extra sbatch options come from the
    launcher config (cluster/slurm.yaml), so these jobs land where the sweep's jobs do.
    """
    import submitit

    extra = {k: v for k, v in OmegaConf.to_container(launcher.additional_parameters).items()
             if k != "dependency"}  # a dependency of the sweep's jobs is not one of these
    if dependency:
        extra["dependency"] = dependency
        extra["kill_on_invalid_dep"] = "yes"
    ex = submitit.SlurmExecutor(folder=str(launcher.submitit_folder), max_num_timeout=int(launcher.max_num_timeout))
    ex.update_parameters(job_name=job_name, partition=launcher.partition, account=launcher.account,
                         qos=launcher.qos, constraint=launcher.constraint, setup=list(launcher.setup or []),
                         additional_parameters=extra, **resources)
    return ex


# ----------------------------------------------------------------------------- fusion after the job


def fuse_job(cfg: DictConfig) -> None:
    """Body of the fusion job: fuse the shards every rank of the sweep point's job wrote."""

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    run_step("fuse", cfg)


def fusion_is_own_job(stage: DictConfig) -> bool:
    """On Slurm a point that predicts fuses in a job of its own (it needs every rank's shards); a study
    fuses each of its evaluations inside its job, after a barrier, before the next one starts."""
    return stage.name != "study" and "infer" in stage.steps and "fuse" in stage.steps


def submit_fusion(point: DictConfig, after: str) -> str:
    """Submit one sweep point's fusion as a one-task job that starts once job ``after`` ended well.

    ``point`` is the point's whole config (``hydra`` included), as the launcher composes it.
    """
    launcher = point.hydra.launcher
    cfg = copy.deepcopy(point)
    with open_dict(cfg):
        del cfg["hydra"]  # what the stage sees, as in the sweep's own jobs
    ex = executor(launcher, "scalept-fuse", dependency=f"afterok:{after}", nodes=1, ntasks_per_node=1,
                  time=int(launcher.timeout_min), cpus_per_task=launcher.cpus_per_task,
                  mem=None if launcher.mem_gb is None else f"{launcher.mem_gb}GB")
    fuse_id = ex.submit(fuse_job, cfg).job_id
    log.info("scalept-launch: fusion of %s: job %s (afterok:%s)", cfg.run_dir, fuse_id, after)
    return fuse_id


def wait_for_requeue(job, timeout_s: float = 300.0) -> None:
    """On a rank other than 0 after a preemption stop: give rank 0 time to requeue the job.

    submitit's handler requeues from rank 0 only; a rank that exits with an error first
    ends the job step (SLURM_KILL_BAD_EXIT) and may kill rank 0 before it has requeued.
    Slurm ends this process when the requeue happens; the timeout covers a rank 0 that
    could not requeue.
    """
    log.info("scalept-launch: rank %d waits up to %.0f s for rank 0 to requeue job %s",
             job.global_rank, timeout_s, job.job_id)
    time.sleep(timeout_s)


# ----------------------------------------------------------------------------- tiles before training


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a basic-sweeper multirun (the cartesian product of the sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ValueError(f"{override.input_line}: interval sweeps need a sweeper plugin; "
                                 "cluster=slurm tiles ahead only for comma-separated or range() sweeps")
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(point) for point in itertools.product(*choices)]


def check_nodes(config: DictConfig, points: list[list[str]]) -> None:
    """``nodes`` is a whole number >= 1 and the same for every sweep point (one allocation per multirun)."""
    counts = {o.split("=", 1)[1] for point in points for o in point if o.split("=", 1)[0].lstrip("+") == "nodes"}
    if len(counts) > 1:
        raise ConfigError(f"nodes is swept ({', '.join(sorted(counts))}): the Slurm launcher sizes every job of a "
                          "multirun alike; run one multirun per node count (nodes=1, then nodes=2)")
    nodes = config.get("nodes")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"nodes={nodes!r}: give the number of nodes per job, a whole number >= 1 (e.g. nodes=2)")


def synth_task(cfg: DictConfig) -> None:
    """Body of the synth job."""

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    run_step("synth", cfg)


def preprocess_task(cfg: DictConfig, task_id: int) -> None:
    """Body of one task of the preprocessing array: unit ``task_id``."""

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.preprocess.task_id = task_id
    run_step("preprocess", cfg)


class PrepareSweep(Callback):
    """Hydra callback of cluster=slurm, run by the launching process before the sweep is submitted.

    Checks the node count, then (``tile_missing``) tiles missing strategies as sbatch arrays
    and makes the sweep's array job depend on them (``afterok``). Only sweep points whose
    steps tile and then train (e.g. ``stage=pipeline``) count: a ``stage=preprocess``
    multirun tiles inside its own jobs. The sweep jobs' own preprocess step then finds the
    tiles complete and skips them.
    """

    def __init__(self, tile_missing: bool = True, array_parallelism: int = 32, cpus_per_task: int = 1,
                 mem_gb: int | None = 8, timeout_min: int = 60) -> None:
        self.tile_missing = bool(tile_missing)
        self.array_parallelism = int(array_parallelism)
        self.resources = {"ntasks_per_node": 1, "nodes": 1, "cpus_per_task": int(cpus_per_task),
                          "mem": None if mem_gb is None else f"{mem_gb}GB", "time": int(timeout_min)}

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs) -> None:
        # Hydra turns a callback's exception into a warning and goes on submitting: stop here instead.
        try:
            points = sweep_points(list(config.hydra.overrides.task))
            check_nodes(config, points)
            self._check_points(config_name, points)
            if self.tile_missing:
                self._submit(config, config_name, points)
        except ScalePTError as err:
            log.error("%s", err)
            sys.exit(2 if isinstance(err, ConfigError) else 1)
        except Exception as err:  # e.g. sbatch refused the job: one line, nothing else submitted
            log.error("scalept-launch: could not submit the preprocessing jobs: %s: %s", type(err).__name__,
                      str(err).strip().splitlines()[-1] if str(err).strip() else "")
            sys.exit(1)

    @staticmethod
    def _check_points(config_name: str | None, points: list[list[str]]) -> None:
        """Every sweep point's config checked here, on the login node, before anything is submitted."""
        from hydra import compose

        from scalept.config_check import check_config

        for overrides in points:
            check_config(compose(config_name=config_name, overrides=overrides))

    def _submit(self, config: DictConfig, config_name: str | None, points: list[list[str]]) -> None:
        from hydra import compose

        launcher = config.hydra.launcher
        job_ids, seen, synth_ids = [], set(), {}  # synth_ids: dataset root -> its synth job
        for overrides in points:
            cfg = compose(config_name=config_name, overrides=overrides)
            steps = list(cfg.stage.steps)
            if "preprocess" not in steps or "train" not in steps:
                continue
            key = (str(Path(cfg.tiles_dir).resolve()), cfg.sampling.name)
            tiling = plan_step("preprocess", cfg)  # what the stage itself says is left
            if key in seen or tiling.done:
                continue
            seen.add(key)
            root = str(Path(cfg.dataset.root).resolve())
            if root not in synth_ids and "synth" in steps and not plan_step("synth", cfg).done:
                synth_ids[root] = executor(launcher, "scalept-synth", **self.resources).submit(synth_task, cfg).job_id
                log.info("scalept-launch: synthetic dataset %s: synth job %s", cfg.dataset.root, synth_ids[root])
                job_ids.append(synth_ids[root])
            after = f"afterok:{synth_ids[root]}" if root in synth_ids else None
            units = tiling.total  # array task i tiles unit i; those of finished sequences return at once
            ex = executor(launcher, f"scalept-preprocess-{cfg.sampling.name}", dependency=after, **self.resources)
            ex.update_parameters(array_parallelism=self.array_parallelism)
            jobs = ex.map_array(preprocess_task, [cfg] * units, list(range(units)))
            array_id = jobs[0].job_id.split("_")[0]
            job_ids.append(array_id)
            log.info("scalept-launch: tiles of sampling=%s missing under %s: preprocessing array job %s "
                     "(--array=0-%d%%%d)", cfg.sampling.name, cfg.tiles_dir, array_id, units - 1,
                     self.array_parallelism)
        if not job_ids:
            return
        with read_write(config.hydra), open_dict(config.hydra):
            extra = config.hydra.launcher.additional_parameters
            earlier = extra.get("dependency")
            extra.dependency = ",".join(filter(None, [earlier, f"afterok:{':'.join(job_ids)}"]))
            extra.kill_on_invalid_dep = "yes"
        log.info("scalept-launch: the sweep's jobs start after %s", extra.dependency)


class WatchJobs(Callback):
    """Hydra callback of cluster=slurm: while the launcher waits for the sweep, say which jobs exist.

    Every ``interval_s`` seconds the launching process asks ``squeue`` for this user's jobs named
    ``scalept-*`` that were not there when the multirun started, and logs one line per job whose
    state changed (id, role, state, elapsed time), with the folder of their logs; a heartbeat
    line says how many are still queued when nothing changed for ``heartbeat_s``.
    """

    def __init__(self, interval_s: float = 30.0, heartbeat_s: float = 300.0) -> None:
        self.interval_s, self.heartbeat_s = float(interval_s), float(heartbeat_s)
        self._stop = None
        self._thread = None

    def __getstate__(self):  # the launcher pickles its callbacks into the jobs: not the watching thread
        return {"interval_s": self.interval_s, "heartbeat_s": self.heartbeat_s, "_stop": None, "_thread": None}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import threading

        folder = str(config.hydra.launcher.submitit_folder).replace("%j", "<job id>")
        watcher = JobStates(squeue_jobs, before=set(squeue_jobs()))
        log.info("scalept-launch: job logs will be under %s (<job id>_<task>_log.out and .err); watch with "
                 "`squeue -u $USER --name=%s`", folder, ",".join(JOB_ROLES))
        self._stop = threading.Event()

        def loop():
            last_line = time.monotonic()
            while not self._stop.wait(self.interval_s):
                lines = watcher.changes()
                for line in lines:
                    log.info("scalept-launch: %s", line)
                if lines:
                    last_line = time.monotonic()
                elif time.monotonic() - last_line >= self.heartbeat_s and watcher.current:
                    log.info("scalept-launch: %d jobs queued or running: %s", len(watcher.current),
                             ", ".join(f"{j} {s}" for j, (_, s, _) in sorted(watcher.current.items())))
                    last_line = time.monotonic()

        self._thread = threading.Thread(target=loop, name="scalept-watch-jobs", daemon=True)
        self._thread.start()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)


# job name -> what it does, for the launcher's lines
JOB_ROLES = {"scalept-synth": "synthetic data", "scalept-preprocess": "tiling array",
             "scalept-pipeline": "sweep: train + infer", "scalept-train": "sweep: train", "scalept-infer": "sweep: infer",
             "scalept-fuse": "fusion and scores"}


def _role(name: str) -> str:
    for prefix, role in JOB_ROLES.items():
        if name == prefix or name.startswith(prefix + "-"):
            return role + name[len(prefix):].replace("-", " ", 1)
    return name


def squeue_jobs() -> dict[str, tuple[str, str, str]]:
    """This user's queued and running ``scalept-*`` jobs: id -> (name, state, elapsed); {} without squeue."""
    import getpass
    import subprocess

    try:
        out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j|%T|%M"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[1].startswith("scalept-"):
            jobs[parts[0]] = (parts[1], parts[2], parts[3])
    return jobs


class JobStates:
    """The jobs of this multirun as ``squeue`` shows them, and what changed since the last look."""

    def __init__(self, query, before: set[str]):
        self.query, self.before = query, before
        self.current: dict[str, tuple[str, str, str]] = {}

    def changes(self) -> list[str]:
        now = {j: v for j, v in self.query().items() if j not in self.before}
        lines = [f"job {j} ({_role(name)}): {state}, {elapsed} elapsed" for j, (name, state, elapsed) in
                 sorted(now.items()) if self.current.get(j, (None, None))[1] != state]
        lines += [f"job {j} ({_role(self.current[j][0])}): left the queue" for j in sorted(self.current)
                  if j not in now]
        self.current = now
        return lines
