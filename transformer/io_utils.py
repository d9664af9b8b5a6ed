"""Files written whole or not at all; work done once by processes sharing a filesystem."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import IO, Iterator, Optional


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file next to `path` (its directory is created) for writing.

  When the block ends normally the file is flushed, fsynced and renamed over `path`; when it
  raises, the temporary file is removed and `path` is untouched. So `path` is never seen
  half-written.
  """
  path = os.path.abspath(os.fspath(path))
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on the file `path` (created, with its directory) during the block.

  Processes (on one host, or on a shared filesystem with working `flock`) that make the same
  file under this lock, after checking again that it is still missing, make it once: the
  others wait, then find it. The lock is released when the block ends or the process dies.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
    yield


def path_problem(path: str | os.PathLike, directory: bool) -> Optional[str]:
  """Why `path` cannot be (or become) a directory (`directory=True`) or a file, else None.

  An existing path must be of that kind; a missing one must be creatable: its nearest
  existing ancestor must be a directory.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    if directory and not os.path.isdir(path):
      return f"{path} is a file, not a directory"
    if not directory and os.path.isdir(path):
      return f"{path} is a directory, not a file"
    return None
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{path} cannot be created: {parent} is a file, not a directory"
  return None
