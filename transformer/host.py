"""Host memory: keep freed buffers mapped, so a jitted step does not page-fault its temporaries in.

XLA:CPU allocates each execution's temporaries (~380 MB for the small config's train step)
with `malloc` and frees them at the end. glibc serves blocks that large with a fresh `mmap`
and returns them with `munmap`, so every step touches ~100K new pages (~0.2 s of kernel time
per 0.6 s step on this machine). Serving every thread from the main heap, never through
`mmap`, and keeping freed memory (no trimming, however much is free: a 2 GiB threshold was
still crossed by the Multi30k run's 4096-token steps) lets the next step reuse the same pages.
Accelerator runs lose nothing: their host allocations are small.

No JAX here (and absl only inside `define_flag`): `benchmarks/peer.py` (PyTorch, its own venv)
applies the same setting for a like-for-like run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_SETTINGS = ((M_ARENA_MAX, 1),       # every thread allocates from the main heap
             (M_MMAP_MAX, 0),        # no block is served by its own mmap
             (M_TRIM_THRESHOLD, -1))  # (size_t)-1: the heap is never trimmed


def retain_freed_memory() -> bool:
  """Applies the settings above through glibc's mallopt; False where there is no glibc.

  Call it before the first allocation worth keeping, i.e. before JAX (or PyTorch) starts its
  thread pools: threads that already have their own heap keep it.
  """
  if not sys.platform.startswith("linux"):
    return False
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False  # musl and other C libraries: no mallopt
  for param, value in _SETTINGS:
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f"mallopt({param}, {value}) failed")
  return True


# Device files of a TPU VM (accel, vfio), an NVIDIA GPU or an AMD GPU (kfd).
ACCELERATOR_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def cpu_unless_accelerator(environ=os.environ) -> bool:
  """Sets JAX_PLATFORMS=cpu when it is unset and the host has no accelerator device file.

  With libtpu or the CUDA plugin installed (the [tpu]/[gpu] extras, for --mode=compile),
  JAX would otherwise try them on every start on a CPU-only host and print a traceback
  and libtpu warnings. Returns whether it set it.
  """
  if "JAX_PLATFORMS" in environ or any(glob.glob(p) for p in ACCELERATOR_DEVICE_FILES):
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  return True


def define_flag() -> None:
  """--retain_freed_memory (default on) for the absl programs: transformer.main and the
  benchmarks. They call `retain_freed_memory()` when it is set, before importing JAX's backend."""
  from absl import flags  # pylint: disable=g-import-not-at-top  (not in the peer's venv)
  flags.DEFINE_bool("retain_freed_memory", True,
                    "Keep freed host memory mapped (glibc mallopt) so that jitted steps do not"
                    " page-fault their temporaries in every step (transformer/host.py).")
