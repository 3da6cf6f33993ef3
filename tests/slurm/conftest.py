"""A real two-node Slurm cluster on this machine (slurm/local-cluster.sh), up for the whole session."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local-cluster.sh"
# Not the script's default port: a demo cluster started by hand may be running beside the tests.
TEST_PORT = os.environ.get("SCALEPT_TEST_SLURM_PORT", "16917")


@dataclass
class Cluster:
    """The running test cluster: its directory and the environment every Slurm client call needs."""

    dir: Path
    env: dict[str, str]

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, squeue, scontrol, scancel, sacct) and return its result."""
        kwargs.setdefault("check", True)
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, **kwargs)

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o`, one dict per job record (an array prints one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(field.split("=", 1) for field in line.split() if "=" in field)
                for line in out.splitlines() if line.strip()]

    @staticmethod
    def time(record: dict[str, str], key: str) -> datetime:
        """A time field of a job record (StartTime, EndTime, ...)."""
        return datetime.fromisoformat(record[key])

    def wait_finished(self, job_id: str, timeout: float = 180) -> list[dict[str, str]]:
        """Poll until no record of the job is pending or running; returns the final records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.job_records(job_id)
            if records and all(r["JobState"] not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"}
                               for r in records):
                return records
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                pytest.fail(f"job {job_id} not finished after {timeout:.0f} s: "
                            + "; ".join(f"{r.get('JobId')} {r.get('JobState')}" for r in records))
            time.sleep(0.5)


# Reading what submitit wrote below a sweep dir (tests/slurm/test_submitit_pipeline.py, test_requeue.py).


def submitted_scripts(sweep) -> dict[str, str]:
    """job id (array id for arrays) -> its sbatch script, for every job submitit wrote below the sweep."""
    return {path.parent.name: path.read_text() for path in (sweep / ".submitit").glob("*/*_submission.sh")}


def job_name(script: str) -> str:
    return re.search(r"#SBATCH --job-name=(\S+)", script).group(1)


def sbatch_option(script: str, name: str) -> str | None:
    found = re.search(rf"#SBATCH --{name}=(\S+)", script)
    return found.group(1) if found else None


def task_log(sweep, job_id: str, rank: int) -> str:
    return "".join((sweep / ".submitit" / job_id / f"{job_id}_{rank}_log.{ext}").read_text() for ext in ("out", "err"))


def _cluster_unavailable() -> str | None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    reason = ("Slurm is not installed (no slurmctld or munged): run `slurm/local-cluster.sh install` "
              "(root, Debian packages); these tests start their own two-node cluster")
    if os.environ.get("CI", "").lower() in {"true", "1"}:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    return reason


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(reason)
    # Directly under /tmp: munged (user munge) must reach its socket, pytest's tmp root is private.
    state = Path(tempfile.mkdtemp(prefix="scalept-slurm-test-"))
    state.chmod(0o755)
    env = {**os.environ, "SCALEPT_SLURM_DIR": str(state), "SCALEPT_SLURM_PORT": TEST_PORT}
    started = time.monotonic()
    up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=180)
    if up.returncode != 0:
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, timeout=60)
        pytest.fail(f"slurm/local-cluster.sh up failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
    print(f"\nlocal Slurm cluster up in {time.monotonic() - started:.1f} s under {state}")
    client_env = {**env, "SLURM_CONF": str(state / "slurm.conf"),
                  "PATH": f"{state / 'bin'}{os.pathsep}{env['PATH']}",
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    for name in [k for k in client_env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del client_env[name]  # the tests may themselves run inside a Slurm job
    client_env.pop("SUBMITIT_EXECUTOR", None)
    try:
        yield Cluster(state, client_env)
    finally:
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
        if down.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"slurm/local-cluster.sh down failed (state kept in {state}):\n{down.stderr}")


def pytest_collection_modifyitems(config, items):
    """Every test of tests/slurm runs a local Slurm cluster: marked ``slurm`` (``-m "not slurm"`` skips them)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slurm)
