"""One-line descriptions of failures (shared by the data modules, no imports of them)."""

from __future__ import annotations

import errno
import os

_DISK_ERRNOS = {errno.ENOSPC: "the disk is full",
                errno.EFBIG: "a file exceeds the file-size limit",
                errno.EDQUOT: "the disk quota is exceeded",
                errno.EIO: "the disk reported an I/O error"}


def _one_line(text, limit: int = 400) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_failure(error: BaseException) -> str:
  """One line naming the error and its root cause (e.g. a missing module).

  TFDS wraps causes (an `ExtractError` around an `EOFError`, ...): the root
  cause is shown in full, the message of a wrapper around it is shortened.
  """
  chain, seen = [error], {id(error)}
  while True:
    nxt = chain[-1].__cause__ or (None if chain[-1].__suppress_context__
                                  else chain[-1].__context__)
    if nxt is None or id(nxt) in seen:
      break
    chain.append(nxt)
    seen.add(id(nxt))
  root = chain[-1]
  root_message = " ".join(str(root).split())
  if root is error:
    text = f"{type(error).__name__}: {root_message}"
  else:
    text = f"{type(error).__name__}: {_one_line(error)}"
    if root_message and root_message in text:  # already quoted by the wrapper
      text += f" [cause: {type(root).__name__}]"
    else:
      text += f" [cause: {type(root).__name__}: {root_message}]"
  # array_record reports write failures as RuntimeError text, so match both.
  for code, hint in _DISK_ERRNOS.items():
    if any(isinstance(e, OSError) and e.errno == code for e in chain) or (
        os.strerror(code) in text):
      return f"{text} ({hint})"
  return text
