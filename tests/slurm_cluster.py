"""A real Slurm cluster on this host for tests: slurmctld plus one slurmd per node name.

All nodes share 127.0.0.1 and differ by slurmd port, so a two-node job runs two `srun` tasks on
the same machine with SLURM_NODEID 0 and 1. Configuration, state, spool, logs and pid files live in
one temporary directory, and the cluster has a munged of its own; the daemons are stopped by the
PIDs in their pid files, never by name. Needs root (slurmd starts jobs as their owner) and the
Debian packages `slurmctld slurmd slurm-client munge` (see .ci/install_slurm.sh).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "munged", "munge", "sbatch")
HOSTS_FILE = Path("/etc/hosts")


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: `env` is what clients (sbatch, squeue, ...) need, SLURM_CONF included."""

    root: Path
    conf: Path
    nodes: tuple[str, ...]
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command; raises with its output when it fails."""
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def job_field(self, job_id: str, field: str) -> str:
        """One `Field=value` of `scontrol show job` (e.g. JobState, Restarts, ExitCode)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        for item in text.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        raise KeyError(f"scontrol show job {job_id}: no field {field!r} in {text!r}")

    def logs(self) -> str:
        """The daemons' log tails, to explain a failure."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


def missing_requirement() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    for program in REQUIRED_PROGRAMS:
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return f"{program} is not installed (run .ci/install_slurm.sh: apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their owner)"
    return None


@contextlib.contextmanager
def local_cluster(root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2) -> Iterator[SlurmCluster]:
    """Start a private munged, slurmctld and one slurmd per node; stop them all afterwards."""
    ensure_host_aliases(nodes)
    munge_dir = Path(tempfile.mkdtemp(prefix="slurmtest-munge-"))
    munge_pid_file = munge_dir / "munged.pid"
    ctld_pid_file = root / "run" / "slurmctld.pid"
    node_pid_files = [root / "run" / f"slurmd-{node}.pid" for node in nodes]
    cluster = None
    try:
        munge_socket = start_munge(munge_dir)
        conf = write_config(root, nodes, cpus, munge_socket)
        cluster = SlurmCluster(root=root, conf=conf, nodes=nodes, env=client_env(conf))
        _start_daemon(["slurmctld", "-f", str(conf)], ctld_pid_file, cluster)
        for node, pid_file in zip(nodes, node_pid_files):
            _start_daemon(["slurmd", "-f", str(conf), "-N", node], pid_file, cluster)
        wait_for_idle(cluster, timeout=30)
        yield cluster
    finally:
        if cluster is not None and _pid_from(ctld_pid_file) is not None:
            _cancel_all_jobs(cluster)
        for pid_file in [*node_pid_files, ctld_pid_file, munge_pid_file]:
            stop_by_pid_file(pid_file)
        shutil.rmtree(munge_dir, ignore_errors=True)


def ensure_host_aliases(nodes: tuple[str, ...]) -> None:
    """Make the node names resolve to 127.0.0.1: job scripts pass them to torch as addresses."""
    missing = [node for node in nodes if not _resolves_to_loopback(node)]
    if missing:
        # Appended in place: /etc/hosts is often a bind mount that os.replace cannot swap.
        with HOSTS_FILE.open("a") as hosts:
            hosts.write(f"127.0.0.1 {' '.join(missing)}\n")


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


def start_munge(run_dir: Path) -> Path:
    """Start a munged of this cluster's own on a private socket; returns the socket path.

    A private daemon rather than the host's: no systemd creates /run/munge here, and a second
    test session stopping a shared munged would break this one's jobs. munged is meant to run as
    the munge user, so it gets a directory that user owns.
    """
    shutil.chown(run_dir, "munge", "munge")
    run_dir.chmod(0o755)
    socket_path = run_dir / "munge.socket"
    subprocess.run(
        ["runuser", "-u", "munge", "--", "munged", f"--socket={socket_path}",
         f"--pid-file={run_dir / 'munged.pid'}", f"--log-file={run_dir / 'munged.log'}",
         f"--seed-file={run_dir / 'munged.seed'}"],
        check=True, timeout=30,
    )
    deadline = time.monotonic() + 10
    while not _munge_works(socket_path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"munged started but `munge -n | unmunge` on {socket_path} still fails after 10 s")
        time.sleep(0.2)
    return socket_path


def _munge_works(socket_path: Path) -> bool:
    try:
        credential = subprocess.run(
            ["munge", "-n", "-S", str(socket_path)], capture_output=True, timeout=5, check=True
        ).stdout
        subprocess.run(["unmunge", "-S", str(socket_path)], input=credential, capture_output=True, timeout=5, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def write_config(root: Path, nodes: tuple[str, ...], cpus: int, munge_socket: Path) -> Path:
    """Write slurm.conf for a controller on localhost and `nodes` on 127.0.0.1, on free ports."""
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ctld_port, *node_ports = _free_ports(1 + len(nodes))
    lines = [
        "ClusterName=localtest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        # A requeued job waits cred_expire seconds (default 120) before it may start again.
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        # The host may have fewer cores than the nodes declare; without this they go `inval`.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "MpiDefault=none",
        # Start jobs as soon as they are eligible: a requeued job becomes eligible with no event
        # that would wake the scheduler, so without short intervals it waits up to a minute.
        "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run'}/slurmd-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log'}/slurmd-%n.log",
    ]
    for node, port in zip(nodes, node_ports):
        lines.append(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={cpus} RealMemory=1000 State=UNKNOWN"
        )
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _free_ports(count: int) -> list[int]:
    """Ports the kernel reports free now; distinct so two test sessions never share a controller."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def client_env(conf: Path) -> dict[str, str]:
    """Environment for Slurm clients and, through sbatch's default --export=ALL, for the jobs."""
    env = dict(os.environ, SLURM_CONF=str(conf))
    # Jobs must find this interpreter (and its torchrun) first, not whatever `python3` means elsewhere.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in [key for key in env if key.startswith(("SLURM_", "SBATCH_", "SRUN_")) and key != "SLURM_CONF"]:
        del env[key]
    return env


def _start_daemon(command: list[str], pid_file: Path, cluster: SlurmCluster) -> None:
    """Start a self-daemonising Slurm daemon and wait until its pid file names a live process."""
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}\n{cluster.logs()}")
    deadline = time.monotonic() + 10
    while _pid_from(pid_file) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{command[0]} wrote no live pid to {pid_file} within 10 s\n{cluster.logs()}")
        time.sleep(0.1)


def wait_for_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=cluster.env, capture_output=True, text=True, timeout=10
        )
        states = result.stdout.split("\n")
        idle = {line.split()[0] for line in states if line.endswith(" idle")}
        if idle >= set(cluster.nodes):
            return
        time.sleep(0.3)
    raise RuntimeError(f"nodes not idle after {timeout} s: {states}\n{cluster.logs()}")


def _cancel_all_jobs(cluster: SlurmCluster) -> None:
    """Jobs outlive slurmd (slurmstepd keeps them), so end them while the controller still runs."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=cluster.env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h"], env=cluster.env, capture_output=True, text=True, timeout=10)
        if not queue.stdout.strip():
            return
        time.sleep(0.5)


def _pid_from(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_by_pid_file(pid_file: Path, timeout: float = 15) -> None:
    """SIGTERM the process a pid file names, SIGKILL it if it outlives `timeout`."""
    pid = _pid_from(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)
