"""A real Slurm on this machine for the tests: munge, slurmctld and two slurmd daemons (nodes
127.0.0.1 and 127.0.0.2, both on loopback), installed with apt when missing, every file in a private
folder, torn down at the end of the session. The `slurm_cluster` fixture skips, with the reason, where
that cannot be done (not root, no apt-get, a failed install, daemons that do not come up)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.helpers.spawn import free_port

# Debian 12: Slurm 22.05. Without recommends: 8 packages, 3.5 MB, 4 to 20 s to download and install.
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # daemons live here; not always on a test runner's PATH
# Each node is named by its own loopback address: launch.sh rendezvouses on the first node's name,
# which must resolve, and these do without touching /etc/hosts.
NODES = ("127.0.0.1", "127.0.0.2")
# A requeued job may start again only this long after the requeue (Slurm's default is 120 s).
CRED_EXPIRE_S = 10
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 60
DONE_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmUnavailable(Exception):
    """This machine cannot run the test cluster; the message says why."""


def _which(program: str) -> str | None:
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:{SBIN}")


def _apt(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", *args, "-q", "-o", "DPkg::Lock::Timeout=300"]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` took more than {INSTALL_TIMEOUT_S} s") from None


def install_if_missing() -> None:
    """Installs Slurm and munge with apt-get when one of their programs is missing."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if not missing:
        return
    what = f"{', '.join(missing)} not installed"
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{what}, and installing needs root (euid {os.geteuid()})")
    if _which("apt-get") is None:
        raise SlurmUnavailable(f"{what}, and there is no apt-get to install {' '.join(PACKAGES)}")
    install = ["install", "-y", "--no-install-recommends", *PACKAGES]
    proc = _apt(install)
    if proc.returncode != 0:  # missing or stale package lists: refresh them once
        _apt(["update"])
        proc = _apt(install)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {last}")
    missing = [p for p in PROGRAMS if _which(p) is None]
    if missing:
        raise SlurmUnavailable(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(missing)} is missing")


def _tail(path: pathlib.Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


@dataclasses.dataclass
class SlurmCluster:
    """A running test cluster. `env` makes Slurm's commands use it (SLURM_CONF); sbatch passes it on
    to the jobs, so their srun and scontrol use it too."""

    root: pathlib.Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, ExitCode, Restarts, ...); values with
        spaces (Command) are cut at the first one."""
        proc = self.run("scontrol", "--oneliner", "show", "job", job_id)
        assert proc.returncode == 0, f"scontrol show job {job_id}: {proc.stderr.strip()}\n{self.daemon_logs()}"
        return dict(re.findall(r"(\S+?)=(\S*)", proc.stdout))

    def wait_until_done(self, job_id: str, timeout: float, explain=lambda: "") -> dict[str, str]:
        """Polls the job until it has ended (a requeued job is PENDING again, so not ended)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in DONE_STATES:
                return job
            assert time.monotonic() < deadline, (
                f"job {job_id} still {job.get('JobState')} after {timeout} s\n{explain()}\n{self.daemon_logs()}"
            )
            time.sleep(0.5)

    def daemon_logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            if path.stat().st_size:
                parts.append(f"--- {path.name} (last {lines} lines)\n{_tail(path, lines)}")
        return "\n".join(parts)


def _slurm_conf(root: pathlib.Path, host: str, ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={node} NodeHostname={host} NodeAddr={node} Port={port} CPUs=1 State=UNKNOWN"
        for node, port in zip(NODES, ports[1:])
    )
    return f"""\
ClusterName=pretraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A requeued job becomes eligible after cred_expire; without this it waits for the next pass (60 s).
SchedulerParameters=sched_interval=1
ReturnToService=2
JobRequeue=1
PreemptMode=OFF
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _start_munge(root: pathlib.Path, env: dict[str, str], daemons: dict[str, subprocess.Popen]) -> None:
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    daemons["munged"] = _spawn(
        root,
        "munged",
        [
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={munge}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={munge}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={munge}/seed",
        ],
        env,
    )


def _spawn(root: pathlib.Path, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    with open(root / f"{name}.stderr.log", "w") as out:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_nodes(cluster: SlurmCluster) -> None:
    """Until sinfo shows both nodes idle; a daemon that exits or a timeout raises SlurmUnavailable."""
    deadline = time.monotonic() + START_TIMEOUT_S
    states = ""
    while time.monotonic() < deadline:
        for name, daemon in cluster.daemons.items():
            if daemon.poll() is not None:
                raise SlurmUnavailable(
                    f"{name} exited with code {daemon.returncode} at start-up\n{cluster.daemon_logs()}"
                )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %T", timeout=15)
            states = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip()
        if sorted(states.splitlines()) == [f"{node} idle" for node in NODES]:
            return
        time.sleep(0.25)
    raise SlurmUnavailable(
        f"the nodes were not idle after {START_TIMEOUT_S} s (sinfo: {states!r})\n{cluster.daemon_logs()}"
    )


def _stop(cluster: SlurmCluster) -> None:
    """Cancels what still runs, then ends the daemons this module started (newest first)."""
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            cluster.run("scancel", "--user=root")  # SIGTERM, SIGKILL KillWait seconds later
            deadline = time.monotonic() + 20
            while cluster.run("squeue", "--noheader").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.25)
    for proc in reversed(list(cluster.daemons.values())):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in cluster.daemons.values():
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    """Installs Slurm if needed, starts munge, slurmctld and one slurmd per node, yields the cluster
    once both nodes are idle, and stops it all and removes its folder afterwards."""
    install_if_missing()
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"slurmd needs root to start jobs (euid {os.geteuid()})")
    # A short folder: munge's socket path must fit in 108 bytes.
    root = pathlib.Path(tempfile.mkdtemp(prefix="slurm-test-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.update(SLURM_CONF=str(root / "slurm.conf"), PATH=f"{env.get('PATH', '')}:{SBIN}")
    cluster = SlurmCluster(root, env)
    try:
        (root / "state").mkdir()
        (root / "spool").mkdir()
        host = socket.gethostname().split(".")[0]
        (root / "slurm.conf").write_text(_slurm_conf(root, host, [free_port() for _ in range(1 + len(NODES))]))
        _start_munge(root, env, cluster.daemons)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (root / "munge" / "munge.socket").exists():
            if cluster.daemons["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start\n{cluster.daemon_logs()}")
            time.sleep(0.05)
        cluster.daemons["slurmctld"] = _spawn(root, "slurmctld", [_which("slurmctld"), "-D", "-i"], env)
        for node in NODES:
            cluster.daemons[f"slurmd-{node}"] = _spawn(
                root, f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node], env
            )
        _wait_for_nodes(cluster)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One test cluster for the session; skips, saying why, where it cannot run."""
    try:
        with running_cluster() as cluster:
            yield cluster
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm test cluster: {exc}")
