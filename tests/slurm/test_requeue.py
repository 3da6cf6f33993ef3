"""Preemption on the local cluster: a training job signalled mid-run is requeued and finishes from its checkpoint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from tests.conftest import TINY_PIPELINE
from tests.slurm.conftest import job_name, submitted_scripts

STEP_LINE = re.compile(r"step (\d+)/\d+ \(\d+%\) epoch \d+ loss")
TOTAL_STEPS = 40


def test_signalled_training_job_is_requeued_and_resumes_from_last(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**cluster.env, "SCALEPT_MASTER_ADDR": "127.0.0.1"}
    launch = subprocess.Popen(
        [sys.executable, "-m", "scalept.launch", "-m", "cluster=slurm", "nodes=2",
         f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1",
         f"data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", *TINY_PIPELINE,
         f"train.max_steps={TOTAL_STEPS}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # wait until the pipeline job's rank 0 has trained a few steps, then preempt it as Slurm would
        deadline, job, log_path = time.monotonic() + 240, None, None
        while True:
            assert launch.poll() is None, launch.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "training never reached step 3"
            if job is None:
                job = next((j for j, s in submitted_scripts(sweep).items() if job_name(s) == "scalept-pipeline"), None)
                log_path = job and sweep / ".submitit" / job / f"{job}_0_log.out"
            steps = [int(s) for s in STEP_LINE.findall(log_path.read_text())] if log_path and log_path.exists() else []
            if steps and steps[-1] >= 3:
                break
            time.sleep(0.2)
        cluster.run("scancel", "--signal=USR2", job)  # what Slurm sends before preemption or the time limit
        # Slurm holds a requeued job back (BeginTime about 2 minutes ahead); start it as soon as it is pending.
        while not any(r["JobState"] == "PENDING" and r.get("Restarts") == "1" for r in cluster.job_records(job)):
            assert time.monotonic() < deadline + 60, cluster.job_records(job)
            time.sleep(0.2)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        out, _ = launch.communicate(timeout=300)
        print(f"\nrequeued job {job} released; launch returned {time.monotonic() - deadline + 240:.0f} s after it started")
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, out[-3000:]

    (record,) = cluster.wait_finished(job, timeout=60)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record
    log = log_path.read_text()
    errors = log_path.with_suffix(".err").read_text()  # warnings and errors: the job's --error file
    stop = re.search(r"train: stopping at step (\d+) \(SIGUSR2\)", errors)
    assert stop and "stopping at step" not in log, errors[-3000:]
    stopped_at = int(stop.group(1))
    # submitit's handler requeues
    assert re.search(r"Caught signal SIGUSR2 on \S+: this job is preempted", log + errors)
    resumed = re.search(r"train: resumed \S+last\.pt at epoch \d+, step (\d+)", log)
    assert resumed and int(resumed.group(1)) == stopped_at, log[-3000:]
    after_resume = [int(s) for s in STEP_LINE.findall(log[resumed.end():])]
    assert after_resume[0] == stopped_at + 1 and after_resume[-1] == TOTAL_STEPS  # no step run twice
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert (metrics["steps"], metrics["preempted"], metrics["world_size"]) == (TOTAL_STEPS, False, 2)
    fused = tmp_path / "run" / "infer" / "logit_average" / "metrics.json"
    fuse_jobs = [j for j, s in submitted_scripts(sweep).items() if job_name(s) == "scalept-fuse"]
    assert len(fuse_jobs) == 1  # submitted once, with the sweep, and run after the requeued job finished
    (fuse,) = cluster.wait_finished(fuse_jobs[0], timeout=120)
    assert fuse["JobState"] == "COMPLETED" and 0.0 <= json.loads(fused.read_text())["miou"] <= 1.0
    assert cluster.time(fuse, "StartTime") >= cluster.time(record, "EndTime")  # afterok held it through the requeue
    print(f"\njob {job}: USR2 at step {stopped_at}, requeued (Restarts={record['Restarts']}), "
          f"resumed at step {resumed.group(1)}, finished {TOTAL_STEPS} steps; fusion job {fuse_jobs[0]}")
