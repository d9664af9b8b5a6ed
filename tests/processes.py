"""Tests that start several interpreters (jax.distributed on 127.0.0.1): ports, environment,
start and wait."""

from __future__ import annotations

import os
import socket
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
  """This environment without cluster variables (a test must not join a real job), on the
  CPU, with the repository importable, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "JAX_COORDINATOR", "OMPI_"))}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)
  return env


def start(cmd: list[str], log: str | os.PathLike, env: dict[str, str]) -> subprocess.Popen:
  """Starts `cmd` in the repository root, its output going to the file `log` (not a pipe:
  nobody reads it until the end)."""
  with open(log, "w", encoding="utf-8") as f:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
  """Waits until every process has ended, at most `timeout` seconds. One that fails would
  leave the others waiting for it until jax.distributed's timeout: the first failure stops
  the wait instead. Whatever still runs then is killed."""
  t0 = time.time()
  try:
    while any(p.poll() is None for p in procs) and time.time() - t0 < timeout:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
