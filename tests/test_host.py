"""transformer/host.py: freed memory stays mapped, so re-allocating it costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Mallocs, writes and frees a block of argv[2] MiB (what XLA:CPU does with a step's
# temporaries) in a worker thread, then counts the minor page faults of doing it again.
_PROBE = r"""
import ctypes, resource, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "retain":
  from transformer import host
  assert host.retain_freed_memory()
size = int(sys.argv[2]) << 20
faults = []
def step():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)                 # every page written
  ctypes.memset(p, 1, size)
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(3):
  t = threading.Thread(target=step); t.start(); t.join()
print(faults[-1])
"""

def _faults(mode: str, mib: int) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(mib)], capture_output=True,
                       text=True, check=True)
  return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
@pytest.mark.parametrize("mib", [256, 2560])  # 2.5 GiB: above any 31-bit trim threshold
def test_retained_memory_is_reused_without_page_faults(mib):
  pages = (mib << 20) // 4096
  # Default glibc: the block is mmap'ed fresh and faulted in page by page each time.
  assert _faults("default", mib) > pages // 2
  # Retained: the third step reuses the pages the first one faulted in.
  assert _faults("retain", mib) < pages // 100


def test_cpu_unless_accelerator(monkeypatch):
  from transformer import host
  env = {}
  monkeypatch.setattr(host.glob, "glob", lambda pattern: [])
  assert host.cpu_unless_accelerator(env) and env == {"JAX_PLATFORMS": "cpu"}
  env = {"JAX_PLATFORMS": "tpu"}  # an explicit choice stays
  assert not host.cpu_unless_accelerator(env) and env == {"JAX_PLATFORMS": "tpu"}
  env = {}
  monkeypatch.setattr(host.glob, "glob",
                      lambda pattern: ["/dev/accel0"] if pattern == "/dev/accel*" else [])
  assert not host.cpu_unless_accelerator(env) and env == {}
