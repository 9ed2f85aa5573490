"""A real one-node SLURM cluster in a temp folder, for the slow tier's SLURM tests (tests/system/test_slurm.py).

:func:`start_cluster` writes a ``slurm.conf`` of its own (this machine as the only node, its own ports, state, spool,
logs and a one-line-per-job completion log in the folder), makes sure ``munged`` runs (starting it if not: it is the
machine's authentication daemon, shared, so it is left running), starts ``slurmctld`` and ``slurmd`` as root and
waits for the node to be idle. Clients find the cluster through ``SLURM_CONF`` (:attr:`SlurmCluster.env`); the
machine's own ``/etc/slurm`` is never read or written. :meth:`SlurmCluster.stop` ends exactly the two daemons it
started, by the pids in their pid files. The configuration is the one in ``shared/SERVICES.md`` that was seen
working on this kind of machine (Debian 12's SLURM 22.05: ``apt-get install slurmctld slurmd slurm-client munge``).

By hand (prints the ``export SLURM_CONF=...`` line, keeps the cluster until Enter):

    python -m tests.helpers.slurm_cluster
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge"  # Debian's; .ci/run installs them
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).is_file()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    node: str
    port: int
    jobcomp: Path
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """This process's environment pointed at the cluster (``SLURM_CONF``), without the variables of any SLURM job
        it runs in; what ``sbatch`` is given is what the jobs get (submitit's jobs inherit it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        return {**env, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command (``squeue``, ``scontrol``, ``scancel``, ...) against this cluster."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def jobs(self) -> list[dict[str, str]]:
        """The completion log: one dict per ended job (``JobId``, ``JobName``, ``JobState``, ``ExitCode``, ...).
        A requeued job has a line for each time it ended."""
        if not self.jobcomp.is_file():
            return []
        rows = []
        for line in self.jobcomp.read_text().splitlines():
            row = {}
            for item in line.split():
                key, eq, value = item.partition("=")
                if eq:
                    row[key] = value
            rows.append(row)
        return rows

    def queue(self) -> list[str]:
        """``squeue`` lines ``JOBID STATE NAME`` of the jobs not ended yet (array tasks one per line)."""
        out = self.run("squeue", "--noheader", "--array", "--format=%i %T %j").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def wait_idle(self, timeout: float = 600) -> None:
        """Until no job is queued or running."""
        deadline = time.time() + timeout
        while self.queue():
            if time.time() > deadline:
                raise TimeoutError(f"SLURM jobs still queued after {timeout} s: {self.queue()}")
            time.sleep(1)

    def stop(self) -> None:
        """Stop the two daemons this cluster started, by pid: cancel jobs first, then slurmd, then slurmctld."""
        if "slurmctld" in self.pids:  # jobs left by a failed test: SIGTERM now, SIGKILL after KillWait
            user = pwd.getpwuid(os.getuid()).pw_name
            subprocess.run(["scancel", "--full", "--user", user], env=self.env, capture_output=True, timeout=30)
            try:
                self.wait_idle(timeout=90)
            except (TimeoutError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 30
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (an exited child not yet reaped) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def ensure_munge() -> None:
    """``munged`` running as the ``munge`` user (SLURM authenticates every message with it)."""
    if _munge_works():
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    run_dir.chmod(0o755)
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _program("munged")], check=True, timeout=60)
    deadline = time.time() + 30
    while not _munge_works():
        if time.time() > deadline:
            raise RuntimeError("munged did not start: `munge -n | unmunge` does not say STATUS: Success")
        time.sleep(0.2)


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode:
            return False
        out = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
        return b"STATUS:" in out.stdout and b"Success" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_port_pair() -> int:
    """A port P with P and P + 1 free on 127.0.0.1 and on all interfaces (slurmctld on P, slurmd on P + 1)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port < 65000 and _free(port) and _free(port + 1):
            return port
    raise RuntimeError("no two adjacent free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _real_memory_mb() -> int:
    """What the node offers jobs: 90% of the machine's memory (slurmd refuses a node that claims more than it has)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def write_conf(folder: Path, node: str, port: int, cpus: int, memory_mb: int) -> Path:
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(
        f"""# A one-node test cluster (tests/helpers/slurm_cluster.py); clients and daemons find it through SLURM_CONF.
ClusterName=clipqa-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=30
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
KillWait=60
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def start_cluster(folder: Path, timeout: float = 120) -> SlurmCluster:
    """Start the cluster in ``folder`` and wait until its node is idle; stop it with :meth:`SlurmCluster.stop`."""
    if missing := missing_programs():
        raise RuntimeError(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install {PACKAGES}")
    ensure_munge()
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    port = _free_port_pair()
    conf = write_conf(folder, node, port, os.cpu_count() or 1, _real_memory_mb())
    cluster = SlurmCluster(folder, conf, node, port, folder / "jobcomp.txt")
    env = cluster.env
    try:
        for name in ("slurmctld", "slurmd"):
            subprocess.run([_program(name)], env=env, check=True, timeout=60, capture_output=True)
            pid_file = folder / f"{name}.pid"
            deadline = time.time() + 30
            while not (pid_file.is_file() and pid_file.read_text().strip()):
                if time.time() > deadline:
                    raise RuntimeError(f"{name} wrote no pid file; its log: {_tail(folder / f'{name}.log')}")
                time.sleep(0.1)
            cluster.pids[name] = int(pid_file.read_text().strip())
        deadline = time.time() + timeout
        while True:
            state = cluster.run("sinfo", "--noheader", "--format=%T", check=False).stdout.strip()
            if state == "idle":
                return cluster
            if time.time() > deadline:
                raise RuntimeError(
                    f"the node is {state!r}, not idle, after {timeout} s; slurmd's log: {_tail(folder / 'slurmd.log')}"
                )
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else f"({path} missing)"


if __name__ == "__main__":
    import tempfile

    c = start_cluster(Path(tempfile.mkdtemp(prefix="slurm-")))
    print(f"export SLURM_CONF={c.conf}")
    try:
        input("cluster up; Enter stops it\n")
    finally:
        c.stop()
