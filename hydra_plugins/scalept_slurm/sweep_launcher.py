"""The Hydra launcher of ``cluster=slurm``: the sweep's array job, then one fusion job per point.

hydra-submitit-launcher submits a multirun as one Slurm array (one task per sweep point) and
waits for it. ScalePT's fusion needs every rank's shards, so it is a job of its own, and it
is submitted here, on the login node, right after the array: ``scalept-fuse`` with
``--dependency=afterok:<array>_<task>`` for every point whose stage predicts and fuses. The
compute jobs submit nothing. The array is submitted as the plugin does it (the same
executor settings from ``hydra.launcher``, the same callable: this launcher, whose
``__call__`` runs one sweep point inside its job).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from scalept.slurm_jobs import fusion_is_own_job, submit_fusion

log = logging.getLogger("scalept")


class SweepLauncher(SlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher that also submits each point's fusion job."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self._submit_sweep(job_overrides, initial_job_idx)
        for overrides, job in zip(job_overrides, jobs):
            point = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            if fusion_is_own_job(point.stage):  # the point's job predicts; fusion comes after
                submit_fusion(point, job.job_id)
        return [job.results()[0] for job in jobs]

    def _submit_sweep(self, job_overrides: Sequence[Sequence[str]], first: int) -> list:
        """One array task per sweep point, with the plugin's executor settings and job arguments."""
        import submitit

        settings = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=settings.pop("submitit_folder"),
                                         slurm_max_num_timeout=settings.pop("max_num_timeout"))
        generic = set(OmegaConf.structured(BaseQueueConf).keys())  # AutoExecutor's own names; the rest are slurm_*
        executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in settings.items()})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        numbers = [first + i for i in range(len(job_overrides))]
        for number, overrides in zip(numbers, job_overrides):
            log.info("scalept-launch: sweep point #%d: %s", number, " ".join(overrides))
        state = Singleton.get_state()
        # the arguments of BaseSubmititLauncher.__call__, one tuple per point
        return executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(numbers), numbers,
                                  [f"job_id_for_{n}" for n in numbers], [state] * len(numbers))
