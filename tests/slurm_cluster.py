"""A real one-node SLURM for tests: munged, slurmctld and slurmd on localhost, in a temp folder.

Needs root and Debian's `slurmctld slurmd slurm-client munge` packages (`.ci/run` installs
them). Everything lives under one folder: the munge key and socket, slurm.conf, state, spool,
logs and pid files; the daemons run in the foreground as children of the test process and
are stopped, with every job they ran, when the context ends. The system's own munge and
SLURM setup (if any) is never touched: `SLURM_CONF` and the munge socket point into the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import stop_process_group

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel")
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge"


def unavailable_reason() -> str | None:
    """Why a local SLURM cannot start here, or None when it can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "a local SLURM needs a POSIX system"
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs jobs as their user; munged and slurmd need root here)"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}): {INSTALL_HINT}"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def slurm_conf(folder: Path, node: str, cpus: int, memory_mb: int, ports: tuple[int, int]) -> str:
    """A minimal slurm.conf: one node, one partition `debug`, no cgroups, no accounting."""
    socket_path = folder / "munge" / "munge.socket.2"
    return "\n".join(
        [
            "ClusterName=vitattn",
            f"SlurmctldHost={node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            f"SlurmctldPort={ports[0]}",
            f"SlurmdPort={ports[1]}",
            # No cgroups in a container: track processes by parent pid, no task binding.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            # Trust the CPUs/memory below rather than the hardware probe (shared test machines).
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=30",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@dataclass
class LocalSlurm:
    """A running one-node SLURM: `env` has SLURM_CONF for its clients (sbatch, dask-jobqueue)."""

    folder: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(
        self, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, squeue, sbatch, ...) against this cluster."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )

    def node_state(self) -> str:
        proc = self.run(
            "sinfo", "--noheader", "--format=%T", "--nodes", self.node, check=False, timeout=10
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def jobs(self) -> list[str]:
        proc = self.run("squeue", "--noheader", "--format=%i", check=False, timeout=10)
        return proc.stdout.split() if proc.returncode == 0 else []

    def logs(self) -> str:
        """The tails of the daemons' logs, for failure messages."""
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.folder / name
            if path.exists():
                out.append(
                    f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
                )
        return "\n".join(out)


def _start(cmd: list[str], folder: Path, name: str) -> subprocess.Popen:
    log = open(folder / f"{name}.stdout", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def local_slurm(folder: Path, cpus: int | None = None, timeout: float = 30) -> Iterator[LocalSlurm]:
    """Start munged, slurmctld and slurmd under `folder`; wait until the node is idle; stop all on exit.

    Raises RuntimeError (with the daemons' log tails) when the cluster does not come up.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    folder = Path(folder)
    for sub in ("munge", "state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses a socket folder that others may write to, and checks the key's mode.
    for path in (folder, folder / "munge"):
        path.chmod(0o755)
    key = folder / "munge" / "munge.key"
    subprocess.run(
        [_which("mungekey"), "--create", f"--keyfile={key}", "--force"],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)

    node = socket.gethostname().split(".")[0]
    cpus = cpus or max(2, os.cpu_count() or 1)
    conf = folder / "slurm.conf"
    conf.write_text(
        slurm_conf(folder, node, cpus, max(512, _memory_mb() - 512), (_free_port(), _free_port()))
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = LocalSlurm(folder=folder, conf=conf, node=node, cpus=cpus, env=env)
    try:
        munge = folder / "munge"
        cluster.procs.append(
            _start(
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--key-file={key}",
                    f"--socket={munge / 'munge.socket.2'}",
                    f"--pid-file={munge / 'munged.pid'}",
                    f"--seed-file={munge / 'munged.seed'}",
                    f"--log-file={folder / 'munged.log'}",
                ],
                folder,
                "munged",
            )
        )
        _wait_for(
            lambda: (munge / "munge.socket.2").exists(),
            timeout,
            "munged did not create its socket",
            cluster,
        )
        cluster.procs.append(
            _start([_which("slurmctld"), "-D", "-i", "-f", str(conf)], folder, "slurmctld")
        )
        cluster.procs.append(_start([_which("slurmd"), "-D", "-f", str(conf)], folder, "slurmd"))
        _wait_for(
            lambda: cluster.node_state() == "idle",
            timeout,
            "the SLURM node did not become idle",
            cluster,
        )
        yield cluster
    finally:
        _shutdown(cluster)


def _wait_for(ready, timeout: float, what: str, cluster: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: {', '.join(map(str, dead))} exited\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} within {timeout:.0f} s\n{cluster.logs()}")


def _shutdown(cluster: LocalSlurm) -> None:
    """Cancel every job (their steps are not children of this process), then stop the daemons."""
    alive = all(p.poll() is None for p in cluster.procs) and len(cluster.procs) == 3
    if alive:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            cluster.run("scancel", "--full", "--user", "root", check=False, timeout=10)
            deadline = time.monotonic() + 20
            while cluster.jobs() and time.monotonic() < deadline:
                time.sleep(0.3)
    for proc in reversed(cluster.procs):
        stop_process_group(proc)
