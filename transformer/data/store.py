"""Tokenize once: a split's token ids on disk, memory-mapped, read row by row.

A store holds every example of one split, encoded with one SentencePiece model, in one
direction (source -> target), EOS appended, in split order:

  <root>/<dataset>/<config>/<version>/<split>-<name sha256[:8]>.<src>-<tgt>.<vocab sha256[:16]>/
    source_tokens.npy   [total source tokens] uint16 (int32 if the vocabulary has > 65536 ids)
    source_offsets.npy  [rows + 1] int64: row i is source_tokens[offsets[i]:offsets[i + 1]]
    target_tokens.npy, target_offsets.npy   the same for the target
    ids.npy             [rows] int64: each example's 'id' (original line number)
    meta.json           key (dataset, split, direction, vocabulary sha256), counts, file sizes
    COMPLETE            written last, before the directory is renamed into place

`<root>` is `<tfds data dir>/tokenized`, next to the prepared array_record files. The
length filters (--max_source_length/--max_target_length, empty pairs) are not part of the
key: the store keeps every row and `StoredSplit` applies them from the offsets alone, so a
run with other limits reuses the same store.

It is built in a temporary directory that is renamed into place only when complete; a
directory without COMPLETE, or whose files do not have the sizes meta.json records, is never
read. Files are .npy read with `np.load(mmap_mode='r')`: opening a store reads only the
offsets; token pages are read on demand, so each process touches only the rows of its own
batches (and the OS page cache shares them between processes on one host).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import numpy as np

from transformer import io_utils
from transformer.data import pipeline
from transformer.data.errors import describe_failure

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
_FILES = ("source_tokens.npy", "source_offsets.npy", "target_tokens.npy",
          "target_offsets.npy", "ids.npy")
_CHUNK_ROWS = 8192      # examples read and encoded at a time
_TASK_ROWS = 131072     # most rows per worker task when building with several processes
_MIN_TASK_ROWS = 512    # fewest: a smaller split is encoded here (a worker takes ~1 s to start)


class StoreError(ValueError):
  """A store that cannot be built or read (one line)."""


# ----------------------------------------------------------------------------
# Keys and paths.


def _safe(part: str) -> str:
  """'train[:3000]' -> 'train_3000': a file-name-safe rendering of a split or name part
  ('.' and '..' become '_': a store path never leaves the store root)."""
  part = re.sub(r"[^A-Za-z0-9_.=-]+", "_", part).strip("_") or "_"
  return "_" if part in (".", "..") else part


def store_dir(root: str, name: str, source_lang: str, target_lang: str,
              vocab_sha256: str) -> str:
  """Directory of the store of split `name` ('<dataset full name>/<split>').

  The leaf ends with a sha256 of the exact `name`: splits that `_safe` renders alike
  ('train[:3000]', 'train[3000:]') get different directories.
  """
  parts = [_safe(p) for p in name.split("/") if p]
  if not parts:
    raise StoreError("a store needs the split's name")
  digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
  leaf = (f"{parts[-1]}-{digest}.{_safe(source_lang)}-{_safe(target_lang)}"
          f".{vocab_sha256[:16]}")
  return os.path.join(root, *parts[:-1], leaf)


def key(name: str, source_lang: str, target_lang: str, vocab_sha256: str,
        rows: int) -> dict[str, Any]:
  """What must match for a store to be reused (saved in meta.json)."""
  return {"format": FORMAT_VERSION, "name": name, "source_lang": source_lang,
          "target_lang": target_lang, "vocab_sha256": vocab_sha256, "rows": int(rows)}


# ----------------------------------------------------------------------------
# Reading.


def _read_meta(directory: str) -> Optional[dict[str, Any]]:
  """meta.json of a complete store whose files have their recorded sizes, else None."""
  if not os.path.isfile(os.path.join(directory, COMPLETE)):
    return None
  try:
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  for name, size in meta.get("file_bytes", {}).items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path) or os.path.getsize(path) != size:
      return None
  return meta if set(meta.get("file_bytes", {})) == set(_FILES) else None


def is_complete(directory: str) -> bool:
  return _read_meta(directory) is not None


class StoredSplit:
  """The kept rows of a store, with `TokenizedSplit`'s interface (see pipeline.py).

  Row i (0 <= i < len) is store row `index[i]`; its source ids (EOS included) are
  `source_tokens[source_starts[i]:source_starts[i] + source_lengths[i]]`. Token arrays are
  memory-mapped: nothing but the offsets is read until a batch is collated.
  """

  def __init__(self, directory: str, max_source_length: Optional[int] = None,
               max_target_length: Optional[int] = None, drop_empty: bool = False):
    meta = _read_meta(directory)
    if meta is None:
      raise StoreError(f"no complete tokenized store in {directory}")
    self.directory = directory
    self.meta = meta
    load = lambda name: np.load(os.path.join(directory, name), mmap_mode="r")
    self.source_tokens = load("source_tokens.npy")
    self.target_tokens = load("target_tokens.npy")
    src_off = np.asarray(load("source_offsets.npy"))  # [rows + 1], read whole (8 bytes a row)
    tgt_off = np.asarray(load("target_offsets.npy"))
    src_len = np.diff(src_off).astype(np.int32)
    tgt_len = np.diff(tgt_off).astype(np.int32)
    keep, self.counts = pipeline.length_filter(src_len, tgt_len, max_source_length,
                                               max_target_length, drop_empty, meta["name"])
    self.index = np.flatnonzero(keep).astype(np.int64)   # [kept] store row of each row
    self.ids = np.asarray(load("ids.npy"))[keep]          # [kept] example 'id'
    self.source_lengths = src_len[keep]                   # [kept] int32, EOS included
    self.target_lengths = tgt_len[keep]
    self.source_starts = src_off[:-1][keep]               # [kept] int64
    self.target_starts = tgt_off[:-1][keep]

  def __len__(self) -> int:
    return len(self.index)

  def source(self, i: int) -> np.ndarray:
    s = int(self.source_starts[i])
    return np.asarray(self.source_tokens[s:s + int(self.source_lengths[i])], np.int32)

  def target(self, i: int) -> np.ndarray:
    s = int(self.target_starts[i])
    return np.asarray(self.target_tokens[s:s + int(self.target_lengths[i])], np.int32)

  @property
  def lengths(self) -> np.ndarray:
    """[n] max(source, target) length: what decides the bucket."""
    return np.maximum(self.source_lengths, self.target_lengths)


# ----------------------------------------------------------------------------
# Building.


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _encode_rows(examples, tokenizer, start: int, stop: int, dtype: np.dtype,
                 out: dict[str, Any], num_threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encodes examples[start:stop], appending token bytes to the open files in `out`.

  Returns ([rows] source lengths, [rows] target lengths, [rows] ids) as int64.
  """
  src_lens, tgt_lens, ids = [], [], []
  for a in range(start, stop, _CHUNK_ROWS):
    b = min(a + _CHUNK_ROWS, stop)
    chunk = (examples.__getitems__(range(a, b)) if hasattr(examples, "__getitems__")
             else [examples[i] for i in range(a, b)])
    for side, lens in (("source", src_lens), ("target", tgt_lens)):
      flat, n = pipeline.ragged_with_eos(
          tokenizer.encode_batch([ex[side] for ex in chunk], num_threads=num_threads), dtype)
      out[side].write(flat.tobytes())
      lens.append(n.astype(np.int64))
    ids.append(np.fromiter((ex.get("id", -1) for ex in chunk), np.int64, count=len(chunk)))
  cat = lambda x: np.concatenate(x) if x else np.zeros(0, np.int64)
  return cat(src_lens), cat(tgt_lens), cat(ids)


# One (examples, tokenizer) per worker process, opened once by the pool's initializer.
_WORKER: dict[str, Any] = {}


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
  """Ends this worker when the process that started it ends, however it ends (SIGKILL too):
  a worker must not outlive its builder (Linux: the kernel's parent-death signal)."""
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):  # not Linux: no parent-death signal
    return
  if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    logging.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
  if os.getppid() != parent_pid:  # the builder ended before the signal was set
    os._exit(1)  # pylint: disable=protected-access


def _worker_init(opener: Callable[[], Sequence], tokenizer, parent_pid: int) -> None:
  _die_with_parent(parent_pid)
  _WORKER["examples"] = opener()
  _WORKER["tokenizer"] = tokenizer


def _worker_task(start: int, stop: int, dtype: str, prefix: str):
  """Encodes rows [start, stop) into '<prefix>.source' / '<prefix>.target' raw files."""
  with open(prefix + ".source", "wb") as fs, open(prefix + ".target", "wb") as ft:
    return _encode_rows(_WORKER["examples"], _WORKER["tokenizer"], start, stop,
                        np.dtype(dtype), {"source": fs, "target": ft}, num_threads=1)


def _write_npy_from_raw(raw_paths: Sequence[str], dtype: np.dtype, path: str) -> int:
  """Concatenates raw little-endian parts into one .npy file; returns its element count."""
  count = sum(os.path.getsize(p) for p in raw_paths) // dtype.itemsize
  with open(path, "wb") as f:
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": (count,)})
    for p in raw_paths:
      with open(p, "rb") as part:
        shutil.copyfileobj(part, f, 1 << 24)
      os.remove(p)
  return count


def build(examples: Sequence[dict[str, Any]], tokenizer, directory: str,
          key_: dict[str, Any], workers: int = 1,
          opener: Optional[Callable[[], Sequence]] = None) -> dict[str, Any]:
  """Encodes every example into a new store at `directory` (which must not be complete).

  Args:
    examples: random-access `{'source', 'target'[, 'id']}` (e.g. `datasets.get_split`).
    tokenizer: `transformer.data.tokenizer.Tokenizer`.
    directory: the store's final path; it is written as '<directory>.tmp-*' and renamed.
    key_: `key(...)` of this store, saved in meta.json.
    workers: processes encoding row ranges in parallel (each reads its own rows; ranges of
      ceil(rows / workers) rows, within [_MIN_TASK_ROWS, _TASK_ROWS]); 1 encodes here with
      SentencePiece's threads. A worker ends when this process ends, however it ends.
    opener: picklable () -> examples for the worker processes (needed when workers > 1).

  Returns:
    meta.json's contents.
  """
  t0 = time.time()
  n = len(examples)
  if n == 0:
    raise StoreError(f"{key_['name']}: no examples to tokenize")
  dtype = _token_dtype(tokenizer.vocab_size)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
  try:
    task_rows = min(_TASK_ROWS, max(_MIN_TASK_ROWS, -(-n // max(1, workers))))
    ranges = [(a, min(a + task_rows, n)) for a in range(0, n, task_rows)]
    processes = 1
    if workers > 1 and len(ranges) > 1 and opener is not None:
      processes = min(workers, len(ranges))
      ctx = multiprocessing.get_context("spawn")  # no fork of a process running JAX threads
      with concurrent.futures.ProcessPoolExecutor(
          max_workers=processes, mp_context=ctx,
          initializer=_worker_init, initargs=(opener, tokenizer, os.getpid())) as pool:
        futures = [pool.submit(_worker_task, a, b, dtype.str, os.path.join(tmp, f"part{i:06d}"))
                   for i, (a, b) in enumerate(ranges)]
        try:
          parts = [f.result() for f in futures]
        except OSError as e:  # e.g. a full disk: the error, without the worker's traceback
          raise e from None
      raw = {side: [os.path.join(tmp, f"part{i:06d}.{side}") for i in range(len(ranges))]
             for side in ("source", "target")}
    else:
      raw = {side: [os.path.join(tmp, f"part.{side}")] for side in ("source", "target")}
      with open(raw["source"][0], "wb") as fs, open(raw["target"][0], "wb") as ft:
        parts = [_encode_rows(examples, tokenizer, 0, n, dtype, {"source": fs, "target": ft},
                              num_threads=-1)]
    src_len = np.concatenate([p[0] for p in parts])
    tgt_len = np.concatenate([p[1] for p in parts])
    ids = np.concatenate([p[2] for p in parts])
    if len(src_len) != n:
      raise StoreError(f"{key_['name']}: encoded {len(src_len)} of {n} rows")
    ids = np.where(ids < 0, np.arange(n, dtype=np.int64), ids)  # no 'id': the position
    totals = {}
    for side, lens in (("source", src_len), ("target", tgt_len)):
      totals[side] = _write_npy_from_raw(raw[side], dtype,
                                         os.path.join(tmp, f"{side}_tokens.npy"))
      if totals[side] != int(lens.sum()):
        raise StoreError(f"{key_['name']}: {side} token count mismatch")
      np.save(os.path.join(tmp, f"{side}_offsets.npy"), pipeline.row_offsets(lens))
    np.save(os.path.join(tmp, "ids.npy"), ids)
    meta = dict(key_, dtype=dtype.name, vocab_size=int(tokenizer.vocab_size),
                source_tokens=totals["source"], target_tokens=totals["target"],
                build_seconds=round(time.time() - t0, 3), workers=processes,
                file_bytes={f: os.path.getsize(os.path.join(tmp, f)) for f in _FILES})
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
    for name in _FILES + ("meta.json",):
      _fsync(os.path.join(tmp, name))
    with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as f:
      f.write("ok\n")
    _fsync(os.path.join(tmp, COMPLETE))
    other = _move_into_place(tmp, directory)
    tmp = None
    if other is not None:
      return other
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  logging.info("tokenized %s: %d rows, %d + %d tokens in %.1f s -> %s", key_["name"], n,
               meta["source_tokens"], meta["target_tokens"], meta["build_seconds"], directory)
  return meta


def _move_into_place(tmp: str, directory: str) -> Optional[dict[str, Any]]:
  """Renames the complete store `tmp` to `directory`; None if it is now there.

  If another builder renamed its (complete) store into place first, `tmp` is deleted and that
  store's meta returned; an incomplete or damaged `directory` is moved aside (never deleted,
  never while complete) to a new unique '<directory>.invalid-*' and the rename retried.
  """
  for _ in range(8):
    try:
      os.rename(tmp, directory)
      return None
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
    meta = _read_meta(directory)
    if meta is not None:  # another builder finished the same store first
      shutil.rmtree(tmp, ignore_errors=True)
      logging.info("tokenized store %s was built meanwhile; keeping it", directory)
      return meta
    aside = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".invalid-",
                             dir=os.path.dirname(directory))
    try:
      os.rename(directory, aside)  # replaces the empty `aside`
    except FileNotFoundError:  # moved away meanwhile: retry the rename
      os.rmdir(aside)
      continue
    logging.warning("tokenized store %s was incomplete; moved to %s", directory, aside)
  raise StoreError(f"cannot move the tokenized store into {directory}: it keeps changing")


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _matching_meta(directory: str, want: dict[str, Any]) -> Optional[dict[str, Any]]:
  """meta.json of the complete store at `directory` (None if there is none); a store of
  another key there is a StoreError."""
  meta = _read_meta(directory)
  if meta is not None:
    got = {k: meta.get(k) for k in want}
    if got != want:
      raise StoreError(f"tokenized store {directory} was built for {got}, not {want};"
                       " move it away to rebuild")
  return meta


def _describe(examples, tokenizer) -> tuple[str, str, str, str, dict[str, Any]]:
  """(name, source lang, target lang, vocabulary sha256, key) of the store of `examples`."""
  name = getattr(examples, "name", "")
  src = getattr(examples, "source_lang", "source")
  tgt = getattr(examples, "target_lang", "target")
  fp = tokenizer.fingerprint()
  return name, src, tgt, fp, key(name, src, tgt, fp, len(examples))


def _roots(root: str, fallback_root: Optional[str]) -> list[str]:
  return [root] + ([fallback_root] if fallback_root and fallback_root != root else [])


def existing(examples: Sequence[dict[str, Any]], tokenizer, root: str,
             fallback_root: Optional[str] = None) -> Optional[tuple[str, dict[str, Any]]]:
  """(directory, meta) of the complete store of `examples` under `root`, else under
  `fallback_root`; None if neither has one (see `open_or_build`)."""
  name, src, tgt, fp, want = _describe(examples, tokenizer)
  for r in _roots(root, fallback_root):
    directory = store_dir(r, name, src, tgt, fp)
    meta = _matching_meta(directory, want)
    if meta is not None:
      return directory, meta
  return None


def open_or_build(examples: Sequence[dict[str, Any]], tokenizer, root: str,
                  workers: int = 1, opener: Optional[Callable[[], Sequence]] = None,
                  fallback_root: Optional[str] = None,
                  may_build: bool = True) -> tuple[str, dict[str, Any], bool]:
  """(store directory, meta, whether it was built now) of `examples` under `root`.

  `examples` needs `name`, `source_lang` and `target_lang` (`datasets.ParallelSplit`). A
  complete store under `root`, else under `fallback_root`, is opened; a missing one is built
  under `root`, or under `fallback_root` when `root` is read-only (e.g. shared data mounted
  read-only on the training nodes). With `may_build=False` (a process other than the one
  that builds) a missing store is a `StoreError`. Processes sharing `root` build a store
  once: the first holds '.<store directory name>.lock' next to it while building, the others
  wait and then open it (and return False). A disk failure while building (full disk,
  file-size limit, I/O error) is a one-line `StoreError`.
  """
  found = existing(examples, tokenizer, root, fallback_root)
  if found is not None:
    return found + (False,)
  name, src, tgt, fp, want = _describe(examples, tokenizer)
  roots = _roots(root, fallback_root)
  if not may_build:
    raise StoreError(f"{store_dir(root, name, src, tgt, fp)}: not visible after process 0 built"
                     " it (every process needs the same --tfds_data_dir, on a shared"
                     " filesystem)")
  for i, r in enumerate(roots):
    directory = store_dir(r, name, src, tgt, fp)
    try:
      lock = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.lock")
      with io_utils.exclusive_lock(lock):  # builders of the same store wait for the first
        meta = _matching_meta(directory, want)
        if meta is not None:
          logging.info("tokenized store %s was built by another process meanwhile", directory)
          return directory, meta, False
        return directory, build(examples, tokenizer, directory, want, workers, opener), True
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise StoreError(f"building {directory} failed: {describe_failure(e)}") from e
      if i + 1 == len(roots):
        raise StoreError(f"cannot write the tokenized store {directory}: {e}") from e
      logging.warning("cannot write under %s (%s); building the store under %s", r, e,
                      roots[i + 1])
  raise AssertionError("unreachable")


def default_workers() -> int:
  return max(1, min(os.cpu_count() or 1, 8))
