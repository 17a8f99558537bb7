"""A real SLURM cluster on localhost for the tests in this folder.

One slurmctld and two slurmd (nodes `node1` and `node2`, distinct ports on 127.0.0.1) emulate a two-node
cluster, so the same cluster runs one-node jobs (`-N1`) and two-node jobs (`-N2`). Everything lives in a
private folder: slurm.conf, a munge key with its own munged and socket, spool and state directories, logs.
Every daemon is stopped by its PID at teardown. Debian's packages are needed: `.ci/slurm-setup.sh` installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

INSTALL_HINT = "install them with `.ci/slurm-setup.sh` (apt-get install slurm-wlm munge)"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
NODES = ("node1", "node2")
# Each emulated node advertises the host's cores; SlurmdParameters=config_overrides keeps two slurmd that
# both claim the same cores from being drained for it.
CPUS_PER_NODE = max(2, os.cpu_count() or 2)
# A requeued job may start again only after cred_expire + 1 seconds (default 120); 10 keeps the test short.
CRED_EXPIRE_S = 10
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _parse_fields(line: str) -> dict[str, str]:
    """`scontrol show -o` prints `Key=Value Key=Value ...`; values never contain ` Key=` but may contain `=`."""
    return dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", line.strip()))


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []
        self.cred_expire_s = CRED_EXPIRE_S

    # ----- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        missing = [tool for tool in DAEMONS + CLIENTS if shutil.which(tool) is None]
        if missing:
            pytest.fail(f"SLURM tests need {', '.join(missing)}; {INSTALL_HINT}", pytrace=False)
        for folder in ("munge", "state", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        _wait(self._nodes_idle, 60, f"nodes {', '.join(NODES)} to become idle ({self.root}/log)")

    def stop(self) -> None:
        if not self.processes:
            return
        # Jobs first: a job's slurmstepd and processes outlive slurmd, so they must end while slurmd still runs.
        jobs = self.command("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if jobs:
            self.command("scancel", *jobs, check=False)
            try:
                _wait(lambda: not self.command("squeue", "-h", check=False).stdout.strip(), 90, "jobs to end")
            except TimeoutError as error:
                print(f"teardown: {error}; stopping the daemons anyway")
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "w")
        process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        time.sleep(0.2)
        if process.poll() is not None:
            pytest.fail(f"{name} exited at start with code {process.returncode}; see {log.name}", pytrace=False)
        return process

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        key.chmod(0o600)
        (self.root / "munge").chmod(0o700)
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        _wait(self.munge_socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        root = self.root
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            for node in NODES
        )
        self.conf.write_text(f"""\
ClusterName=recipes-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # ----- queries -------------------------------------------------------------------------------------
    def command(
        self, *argv: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Runs a client command against this cluster; `env` adds variables (jobs get them via --export=ALL)."""
        result = subprocess.run(argv, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def _nodes_idle(self) -> bool:
        result = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in result.stdout.splitlines())
        return all(states.get(node) == "idle" for node in NODES)

    def job(self, job_id: str) -> dict[str, str]:
        return _parse_fields(self.command("scontrol", "show", "job", "-o", job_id).stdout)

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 300) -> dict[str, str]:
        """Waits until the job (or every task of an array) is in one of `states`; returns its fields."""

        def reached():
            fields = self.job(job_id)
            return fields if fields.get("JobState") in states else None

        return _wait(reached, timeout, f"job {job_id} to reach {sorted(states)} ({self.root}/log)")

    def wait_until_finished(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        return self.wait_for_state(job_id, FINISHED_STATES, timeout)

    def sbatch(self, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        return self.command("sbatch", "--parsable", *argv, cwd=cwd, env=env).stdout.strip().split(";")[0]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
