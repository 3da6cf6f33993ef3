"""`-m sampling=block,hilbert cluster=slurm nodes=2` on the local cluster: the whole chain of Slurm jobs.

synth job -> one preprocessing array per strategy -> the sweep's array job (2 tasks of 2 nodes,
train + infer as one DDP world of 2 ranks) -> one fusion job per sweep point -> analysis.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from tests.conftest import TINY_PIPELINE
from tests.slurm.conftest import job_name, sbatch_option, submitted_scripts, task_log

RANK_LINE = re.compile(r"scalept-launch: job (\S+), rank (\d) of (\d) on node (n\d)")


def test_sweep_runs_as_preprocessing_arrays_one_ddp_array_job_and_dependent_fusions(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    # The tiny pipeline, with each strategy's own tile sizes (block's overlap is metres, hilbert's points).
    tiny = [o for o in TINY_PIPELINE if not o.startswith("sampling")]
    env = {**cluster.env, "SCALEPT_MASTER_ADDR": "127.0.0.1"}  # n1, n2 do not resolve on the local cluster
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "scalept.launch", "-m", "sampling=block,hilbert", "cluster=slurm", "nodes=2",
         f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
         "hydra.callbacks.watch_jobs.interval_s=1", f"data_dir={tmp_path / 'data'}",
         f"run_dir={tmp_path / 'runs'}/${{sampling.name}}", *tiny],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    launch_s = time.monotonic() - started

    scripts = submitted_scripts(sweep)
    by_name = {}
    for job_id, script in scripts.items():
        by_name.setdefault(job_name(script), []).append(job_id)
    assert sorted(by_name) == ["scalept-fuse", "scalept-pipeline", "scalept-preprocess-block",
                               "scalept-preprocess-hilbert", "scalept-synth"], by_name
    (synth,), (sweep_job,) = by_name["scalept-synth"], by_name["scalept-pipeline"]
    arrays = {s: by_name[f"scalept-preprocess-{s}"][0] for s in ("block", "hilbert")}
    # while it waited, the launch said which jobs ran (id, role, state) and where their logs are
    said = run.stdout + run.stderr
    assert f"job logs will be under {sweep}/.submitit" in said
    assert re.search(rf"scalept-launch: job {synth} \(synthetic data\): (PENDING|RUNNING)", said), said[-3000:]
    assert re.search(rf"scalept-launch: job {sweep_job}_\S+ \(sweep: train \+ infer\): RUNNING", said), said[-3000:]

    # (a) one array job of 2 tasks, 2 nodes each, waiting for the synth job and both preprocessing arrays
    sweep_script = scripts[sweep_job]
    assert sbatch_option(sweep_script, "array").startswith("0-1") and sbatch_option(sweep_script, "nodes") == "2"
    assert sbatch_option(sweep_script, "dependency") == f"afterok:{synth}:{arrays['block']}:{arrays['hilbert']}"
    for array in arrays.values():
        assert sbatch_option(scripts[array], "dependency") == f"afterok:{synth}"
        assert sbatch_option(scripts[array], "array").startswith("0-1")  # 00 and 08: one unit each
    records: dict[str, list[dict[str, str]]] = {}  # job name -> its finished records (one per array task)
    for job_id in [synth, *arrays.values(), sweep_job]:
        for record in cluster.wait_finished(job_id, timeout=60):
            records.setdefault(record["JobName"], []).append(record)
    tasks = sorted(records["scalept-pipeline"], key=lambda r: int(r["ArrayTaskId"]))
    assert [(t["JobState"], t["NodeList"], t["NumTasks"]) for t in tasks] == [("COMPLETED", "n[1-2]", "2")] * 2
    tiling_end = max(cluster.time(r, "EndTime") for name in arrays for r in records[f"scalept-preprocess-{name}"])
    assert all(r["JobState"] == "COMPLETED" for name in arrays for r in records[f"scalept-preprocess-{name}"])
    assert all(cluster.time(t, "StartTime") >= tiling_end for t in tasks)

    # (b) DDP of world size 2 in each task: rank 0 on n1, rank 1 on n2 (from the job logs)
    for task in tasks:
        task_id = f"{sweep_job}_{task['ArrayTaskId']}"
        seen = {}
        for rank in (0, 1):
            log = task_log(sweep, task_id, rank)
            (job, rank_s, world, node), = RANK_LINE.findall(log)
            assert job == task_id
            seen[rank_s] = (world, node)
        assert seen == {"0": ("2", "n1"), "1": ("2", "n2")}
        assert "tiled 0 frames" in task_log(sweep, task_id, 0)  # the arrays had tiled everything

    # (c) one fusion job per sweep point, submitted by the launch (not by a compute job) after its own
    # array task, started once inference had ended
    fuse_ids = by_name["scalept-fuse"]
    assert len(fuse_ids) == 2
    for fuse_id in fuse_ids:
        assert re.search(rf"scalept-launch: fusion of \S+: job {fuse_id} \(afterok:{sweep_job}_[01]\)", said), said[-3000:]
    fuses = {}
    for fuse_id in fuse_ids:
        (fuse,) = cluster.wait_finished(fuse_id, timeout=120)
        log = sweep / ".submitit" / fuse_id / f"{fuse_id}_0_log.err"
        assert fuse["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.exists() else fuse
        after = sbatch_option(scripts[fuse_id], "dependency")
        assert sbatch_option(scripts[fuse_id], "nodes") == "1" and after.startswith(f"afterok:{sweep_job}_")
        fuses[after.split("_")[-1]] = fuse
    assert sorted(fuses) == ["0", "1"]
    for task in tasks:
        assert cluster.time(fuses[task["ArrayTaskId"]], "StartTime") >= cluster.time(task, "EndTime")

    # (d) metrics.json with an mIoU for every run; world size 2 in training
    for sampling in ("block", "hilbert"):
        run_dir = tmp_path / "runs" / sampling
        assert json.loads((run_dir / "train_metrics.json").read_text())["world_size"] == 2
        infer_dir = run_dir / "infer" / "logit_average"
        assert sorted(p.name for p in infer_dir.glob("shard-*.json")) == ["shard-000.json", "shard-001.json"]
        metrics = json.loads((infer_dir / "metrics.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0 and metrics["scored_sequences"] == ["08"]
        assert metrics["sampling"] == sampling

    # (e) the analysis table: one row per strategy, 2 nodes, with its mIoU
    analysis = subprocess.run([sys.executable, "-m", "scalept.analysis", str(sweep)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert analysis.returncode == 0, analysis.stderr[-2000:]
    table = (sweep / "analysis" / "comparison.md").read_text()
    for sampling in ("block", "hilbert"):
        miou = json.loads((tmp_path / "runs" / sampling / "infer" / "logit_average" / "metrics.json").read_text())
        assert re.search(rf"^\| {sampling} \| logit_average \| 2 \| {100 * miou['miou']:.2f} \|", table, re.M), table

    print(f"\nsweep through Slurm: launch returned after {launch_s:.0f} s")
    for record in [*records["scalept-synth"], *records["scalept-preprocess-block"],
                   *records["scalept-preprocess-hilbert"], *tasks, *fuses.values()]:
        seconds = (cluster.time(record, "EndTime") - cluster.time(record, "StartTime")).total_seconds()
        label = f"{record['ArrayJobId']}_{record['ArrayTaskId']}" if "ArrayJobId" in record else record["JobId"]
        print(f"  job {label:>6} {record['JobName']:<27} {record['JobState']:<10} {record['NodeList']:<7} "
              f"{record['StartTime']} -> {record['EndTime']} ({seconds:.0f} s)")
