"""TFDS's WMT parallel-text parser, reading line by line instead of whole files.

TFDS's `translate/wmt.py` `_parse_parallel_sentences(f1, f2)` reads both files
of a pair whole (`read_bytes()`, or `gzip.read()` for `.gz`) and splits them
into lists before yielding pairs: peak memory grows to about 3.5 times the
pair's uncompressed text (`benchmarks/wmt_parse_memory.py`), many GB for the
giga-fren and UN pairs of WMT14 En-Fr.

`streaming_parser()` replaces that function, for the duration of the block, by
`parse_parallel_text`, which yields the same keys and examples from plain or
gzipped text files one line at a time. Other inputs (`.sgm`, CWMT `.txt`,
wildcards, missing files) are passed to the original.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import inspect
import os
import re
from typing import Iterator
import zlib

from transformer.data import tfds_compat

_WMT_MODULE = "tensorflow_datasets.translate.wmt"
_GLOB_CHARS = frozenset("*?[")


def _handled(path: str) -> bool:
  """Plain or gzipped text that TFDS's `_parse_text` reads (not sgm/CWMT/globs)."""
  ext = path.rsplit(".", 1)[-1]
  return (ext not in ("sgm", "txt") and not _GLOB_CHARS & set(path)
          and os.path.isfile(path))


def _lang(path: str) -> str:
  """The language code TFDS takes from the file name (`x.de`, `x.de.gz`)."""
  parts = path.split(".")
  return parts[-2] if parts[-1] == "gz" else parts[-1]


class DamagedFileError(ValueError):
  """A gzipped text file that cannot be decompressed to its end (names it)."""


# TFDS extracts an archive to '<download dir>/extracted/<METHOD>.<archive file name>/'.
_EXTRACTED = re.compile(r"[A-Z][A-Z0-9_]*\.(.+)")


def describe_path(path: str) -> str:
  """'member <m> of the archive <a> (<path>)' for a file TFDS extracted, else the path."""
  parent = os.path.dirname(os.path.abspath(path))
  while os.path.dirname(parent) != parent:
    m = _EXTRACTED.fullmatch(os.path.basename(parent))
    if m and os.path.basename(os.path.dirname(parent)) == "extracted":
      member = os.path.relpath(os.path.abspath(path), parent)
      return f"member {member} of the archive {m.group(1)} ({path})"
    parent = os.path.dirname(parent)
  return path


def iter_segments(path: str) -> Iterator[str]:
  """The file's text split on '\\n' only, as `text.split('\\n')` would give it.

  So a file ending with '\\n' ends with an empty segment, like TFDS's lists.
  Raises UnicodeDecodeError on invalid UTF-8, as TFDS does, and DamagedFileError
  naming the file (and the archive it came from) on a truncated or corrupt `.gz`.
  """
  with open(path, "rb") as raw:
    f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    ends_with_newline = True  # an empty file is one empty segment
    lines = iter(f)  # binary iteration splits on b'\n' only
    while True:
      try:
        line = next(lines, None)
      except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DamagedFileError(f"{describe_path(path)} is damaged:"
                               f" {type(e).__name__}: {e}") from None
      if line is None:
        break
      ends_with_newline = line.endswith(b"\n")
      yield (line[:-1] if ends_with_newline else line).decode("utf-8")
    if ends_with_newline:
      yield ""


def parse_parallel_text(f1: str, f2: str, original=None):
  """(key, {lang1: s1, lang2: s2}) as TFDS's `_parse_parallel_sentences`.

  Keys are '0/<line number>' (one file per side). Unequal line counts raise
  ValueError once the shorter file ends (TFDS asserts before the first pair).
  """
  if not (_handled(f1) and _handled(f2)):
    yield from original(f1, f2)
    return
  l1, l2 = _lang(f1), _lang(f2)
  it1, it2 = iter_segments(f1), iter_segments(f2)
  line_id = 0
  for s1 in it1:
    s2 = next(it2, None)
    if s2 is None:
      n2 = line_id
      n1 = line_id + 1 + sum(1 for _ in it1)
      raise ValueError(f"Sizes do not match: {n1} vs {n2} for {f1} vs {f2}.")
    yield f"0/{line_id}", {l1: s1, l2: s2}
    line_id += 1
  rest = sum(1 for _ in it2)
  if rest:
    raise ValueError(f"Sizes do not match: {line_id} vs {line_id + rest} for {f1} vs {f2}.")


def _use_streaming_parser() -> list:
  wmt = importlib.import_module(_WMT_MODULE)
  original = getattr(wmt, "_parse_parallel_sentences", None)
  if original is None or list(inspect.signature(original).parameters) != ["f1", "f2"]:
    raise RuntimeError(f"{_WMT_MODULE}._parse_parallel_sentences(f1, f2) not found;"
                       " this TFDS version is not supported")

  def parse(f1, f2):
    return parse_parallel_text(f1, f2, original=original)

  wmt._parse_parallel_sentences = parse  # pylint: disable=protected-access
  return [(wmt, "_parse_parallel_sentences", original)]


_streaming_parser = tfds_compat.ReentrantPatch(_use_streaming_parser)


def streaming_parser() -> contextlib.AbstractContextManager[None]:
  """Within the block, TFDS's WMT builders parse text files line by line (re-entrant)."""
  return _streaming_parser()
