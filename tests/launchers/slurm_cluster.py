"""A real Slurm cluster on this machine for the launcher tests: Debian's slurm-wlm and munge
(installed when missing), one controller and two emulated nodes on loopback, every state, log and
pid file in a temporary directory, stopped afterwards. Each node gives a job a private /tmp and
/dev/shm (job_container/tmpfs), as separate machines would: mosaicml-streaming keeps per-node state
in /dev/shm, which two emulated nodes would otherwise share. So what a job reads or writes must
live outside /tmp (`workspace()`). Anything that keeps it from starting raises
SlurmUnavailable with what failed and how to fix it: the launcher tests then fail, never skip."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("node1", "node2")


class SlurmUnavailable(RuntimeError):
    pass


def workspace(prefix: str) -> Path:
    """A fresh directory that the jobs see too: outside /tmp (each job has its own /tmp)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    """apt-get the packages when a binary is missing (as root, or with password-less sudo)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it: install "
                               f"{' '.join(PACKAGES)} (Debian/Ubuntu package names) and rerun")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = _run(sudo + cmd, env=env, timeout=600)
        if r.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(sudo + cmd)}` failed ({r.returncode}): {r.stderr[-1500:]}\n"
                                   f"install {' '.join(PACKAGES)} by hand (as root) and rerun")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _hardware() -> str:
    """CPUs / sockets / cores / memory as slurmd sees them (a node may not claim more)."""
    r = _run(["slurmd", "-C"], timeout=60)
    line = next((x for x in r.stdout.splitlines() if x.startswith("NodeName=")), None)
    if r.returncode != 0 or line is None:
        raise SlurmUnavailable(f"`slurmd -C` failed: {r.stderr[-800:]}")
    return " ".join(f for f in line.split()[1:] if not f.startswith("UpTime"))


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait(what: str, ok, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ok():
            return
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise SlurmUnavailable(f"{what} within {timeout:.0f} s{': ' + tail if tail else ''}")


class Cluster:
    """`with Cluster(tmp) as c:` a controller and NODES; `c.env` has SLURM_CONF for the clients."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if Path("/tmp") in self.root.resolve().parents:
            raise ValueError(f"{root}: the cluster's directory must be outside /tmp (jobs get a private /tmp)")
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._munged_started = False

    # -- munge ---------------------------------------------------------------------------------
    def _munge_ok(self) -> bool:
        gen = subprocess.run(["munge", "-n"], capture_output=True)
        return gen.returncode == 0 and subprocess.run(["unmunge"], input=gen.stdout,
                                                      capture_output=True).returncode == 0

    def _start_munge(self) -> None:
        if self._munge_ok():  # a munged of the machine's is running already: use it, leave it
            return
        if not Path("/etc/munge/munge.key").exists():
            _run(["mungekey", "--create"])
        # munged refuses to run as root (insecure log dir) and needs its socket directory
        _run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"])
        r = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        if r.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {r.stderr[-800:]}")
        self._munged_started = True
        _wait("munge did not answer", self._munge_ok, 20)

    # -- slurm ---------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        ctld, n1, n2 = _free_ports(3)
        if n2 != n1 + 1:  # the nodes take a port range
            n2 = n1 + 1
        (self.root / "spool").mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=megamomtest
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits this long before it starts again (default 120 s)
AuthInfo=cred_expire=5
JobContainerType=job_container/tmpfs
PrologFlags=Contain
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=5
KillWait=30
JobRequeue=1
MpiDefault=none
SchedulerType=sched/backfill
# a requeued job (held for cred_expire) is started by the next backfill pass
SchedulerParameters=bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1}-{n2} {_hardware()}
PartitionName=debug Nodes=ALL Default=YES State=UP MaxTime=INFINITE
""")
        # every node its own /tmp and /dev/shm per job, under BasePath/<node>/<job>
        (self.root / "job_container.conf").write_text(f"AutoBasePath=true\nBasePath={r}/jobs\n")

    def start(self) -> "Cluster":
        ensure_installed()
        self._start_munge()
        self._write_conf()
        log = self.root / "slurmctld.log"
        r = _run(["slurmctld"], env=self.env, timeout=60)
        if r.returncode != 0:
            raise SlurmUnavailable(f"slurmctld did not start ({r.returncode}): {r.stderr[-800:]}")
        _wait("slurmctld did not answer `scontrol ping`",
              lambda: "UP" in _run(["scontrol", "ping"], env=self.env).stdout, 30, log)
        for n in NODES:
            r = _run(["slurmd", "-N", n], env=self.env, timeout=60)
            if r.returncode != 0:
                raise SlurmUnavailable(f"slurmd -N {n} did not start ({r.returncode}): {r.stderr[-800:]}")
        _wait("the nodes did not come up idle",
              lambda: len(_run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=self.env).stdout.split())
              == len(NODES), 60, self.root / "slurmd-node1.log")
        return self

    def stop(self) -> None:
        pids = [self.root / f"slurmd-{n}.pid" for n in NODES] + [self.root / "slurmctld.pid"]
        for path in pids:
            pid = _pid(path)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for path in pids:
            pid = _pid(path)
            while pid and time.time() < deadline and _alive(pid):
                time.sleep(0.1)
        if self._munged_started:
            pid = _pid(Path("/run/munge/munged.pid"))
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------------
    def run(self, *cmd, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
        r = _run(list(cmd), env={**self.env, **(env or {})}, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"`{' '.join(map(str, cmd))}` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def job_state(self, job_id: str) -> str:
        r = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        return r.stdout.strip() or "GONE"

    def wait_gone(self, job_id: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.job_state(job_id) == "GONE":
                return
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s; "
                             f"controller log:\n{(self.root / 'slurmctld.log').read_text()[-3000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
