"""A throwaway one-node SLURM cluster on 127.0.0.1 for tests (SLURM 22.05, Debian's slurm-wlm).

`Cluster(tmpdir).start()` generates a munge key and a slurm.conf under tmpdir, starts `munged`,
`slurmctld` and `slurmd` in the foreground as children of this process (their own socket, ports
and spool, so nothing of the host's is used), and waits until `sinfo` shows the node idle.
`stop()` cancels every job, waits for the job steps to end, stops the three daemons and returns
the daemons (name, pid) still alive, which must be none. Commands run against the cluster with
`env()` (SLURM_CONF points at the generated slurm.conf).

Needs root (slurmd starts jobs as their user) and the packages `slurm-wlm munge`;
`missing()` names what is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional

from tests import processes

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue",
             "scancel", "srun")
NODE = "localhost"

_CONF = """\
ClusterName=ci
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=60
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=ci Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> list[str]:
  """The programs of slurm-wlm and munge that are not installed (empty: all there)."""
  return [p for p in _PROGRAMS if shutil.which(p) is None
          and not os.path.exists(os.path.join("/usr/sbin", p))]


def _program(name: str) -> str:
  return shutil.which(name) or os.path.join("/usr/sbin", name)


def _boot_ticks() -> int:
  """Now, in clock ticks since boot (the unit of /proc/PID/stat's start time)."""
  with open("/proc/uptime", encoding="ascii") as f:
    return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def daemons_since(ticks: int) -> list[tuple[str, int]]:
  """(name, pid) of every SLURM or munge daemon that started at or after `ticks`."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    except OSError:  # ended meanwhile
      continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    state, start = fields[0], int(fields[19])
    if name in DAEMONS and state != "Z" and start >= ticks:
      found.append((name, int(pid)))
  return found


class Cluster:
  """One node named localhost with `cpus` CPUs, partition `ci`."""

  def __init__(self, directory: str, cpus: int = 2, job_env: Optional[dict[str, str]] = None):
    self.dir = os.path.abspath(directory)
    self.cpus = cpus
    self.job_env = dict(job_env or {})  # variables every command and job here gets
    self.conf = os.path.join(self.dir, "slurm.conf")
    self._procs: dict[str, subprocess.Popen] = {}
    self._started_at: Optional[int] = None

  def env(self, **extra: str) -> dict[str, str]:
    """processes.environment (no SLURM variables of a surrounding job) + this cluster's conf.

    sbatch hands the submitter's environment to the job, so XLA_FLAGS (tests/conftest.py asks
    for 8 host devices) is left out: each process of a job gets one CPU device.
    """
    env = processes.environment(SLURM_CONF=self.conf, **{**self.job_env, **extra})
    env.pop("XLA_FLAGS", None)
    return env

  def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A SLURM client command against this cluster; a non-zero exit raises with its output."""
    r = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stdout}{r.stderr}"
                         + self.logs())
    return r

  def logs(self, tail: int = 3000) -> str:
    out = []
    for name in ("munged.log", "slurmctld.log", "slurmd.log"):
      path = os.path.join(self.dir, name)
      if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
          out.append(f"\n--- {name} ---\n" + f.read()[-tail:])
    return "".join(out)

  def start(self, timeout: float = 60) -> "Cluster":
    self._started_at = _boot_ticks()
    for sub in ("state", "spool"):
      os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
    os.chmod(self.dir, 0o755)  # munged refuses a group/world-writable socket directory
    ports = {processes.free_port() for _ in range(4)}
    ctld_port, slurmd_port = sorted(ports)[:2]
    with open(self.conf, "w", encoding="utf-8") as f:
      f.write(_CONF.format(node=NODE, dir=self.dir, cpus=self.cpus, ctld_port=ctld_port,
                           slurmd_port=slurmd_port))
    key = os.path.join(self.dir, "munge.key")
    r = subprocess.run([_program("mungekey"), "--create", f"--keyfile={key}"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
      raise RuntimeError(f"mungekey: exit {r.returncode}: {r.stderr.strip()}")
    self._spawn("munged", [_program("munged"), "--foreground", "--force",
                           f"--key-file={key}", f"--socket={self.dir}/munge.socket",
                           f"--pid-file={self.dir}/munged.pid",
                           f"--log-file={self.dir}/munged.log",
                           f"--seed-file={self.dir}/munged.seed"])
    self._wait(lambda: os.path.exists(f"{self.dir}/munge.socket"), timeout, "munged's socket")
    self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", self.conf])
    self._spawn("slurmd", [_program("slurmd"), "-D", "-f", self.conf, "-N", NODE])
    self._wait(self._node_idle, timeout, "the node to be idle in sinfo")
    return self

  def _spawn(self, name: str, cmd: list[str]) -> None:
    log = open(os.path.join(self.dir, f"{name}.out"), "w", encoding="utf-8")  # pylint: disable=consider-using-with
    with log:
      self._procs[name] = subprocess.Popen(cmd, env=self.env(), stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

  def _wait(self, ready, timeout: float, what: str) -> None:
    t0 = time.time()
    while not ready():
      dead = [n for n, p in self._procs.items() if p.poll() is not None]
      if dead or time.time() - t0 > timeout:
        why = f"{dead[0]} exited" if dead else f"not within {timeout:.0f} s"
        raise RuntimeError(f"waiting for {what}: {why}" + self.logs())
      time.sleep(0.2)

  def _node_idle(self) -> bool:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True,
                       text=True, check=False)
    return r.returncode == 0 and r.stdout.strip() == "idle"

  def jobs(self) -> list[str]:
    """Ids of the jobs (array tasks included) the controller still knows as not finished."""
    r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True,
                       text=True, check=False)
    return r.stdout.split() if r.returncode == 0 else []

  def stop(self, timeout: float = 60) -> list[tuple[str, int]]:
    """Cancels every job, stops the daemons; returns the daemons of this cluster still alive."""
    if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
      subprocess.run(["scancel", "--full", "--partition=ci"], env=self.env(),
                     capture_output=True, check=False)
      t0 = time.time()
      while (self.jobs() or self._steps()) and time.time() - t0 < timeout:
        time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
      proc = self._procs.get(name)
      if proc is None or proc.poll() is not None:
        continue
      proc.terminate()
      try:
        proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    self._procs.clear()
    return daemons_since(self._started_at) if self._started_at is not None else []

  def _steps(self) -> list[tuple[str, int]]:
    return [d for d in daemons_since(self._started_at or 0) if d[0] == "slurmstepd"]
