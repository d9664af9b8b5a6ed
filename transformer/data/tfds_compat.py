"""Lets TFDS download, extract and write large splits without TensorFlow.

The pinned TFDS (4.9.10) writes array_record without TensorFlow, but three of
its modules still call TensorFlow through a lazy `tf` module attribute:

- `core/download/extractor.py`: `tf.compat.as_text` on archive member names,
  `tf.io.gfile.GFile` to read archives and write extracted files;
- `core/shuffle.py`: `tf.io.gfile.{GFile, exists, remove}` and
  `tf.errors.ResourceExhaustedError` for the on-disk buckets used once a
  split's serialized size exceeds `shuffle.MAX_MEM_BUFFER_SIZE` (1000 MiB),
  with or without shuffling;
- `core/download/downloader.py`: `tf.io.gfile.copy` and
  `tf.errors.UnimplementedError` for non-HTTP URLs.

Without TensorFlow each of these raises `ModuleNotFoundError` (extraction of
any archive, and every split over 1000 MiB, e.g. WMT14 En-De train).

The extractor also reads tar archives with Python's `tarfile`, which ends the
iteration silently at a damaged header in the middle of an archive; TFDS then
renames the partial extraction into place and reuses it on every later run.
Within the block its tar archives are read by `CompleteTarFile`, which raises
unless the archive ends with its end-of-archive marker, so only a complete
extraction is renamed into place (a failed one is done again by the next run).

`without_tensorflow()` replaces that `tf` attribute of those modules, for the
duration of the block only, by `TF_SUBSET`: the same calls implemented with
Python files on local paths. Before patching it reads each module's source and
refuses (`UnsupportedTfdsError`) if the module uses a TensorFlow name that
`TF_SUBSET` does not provide, so a TFDS upgrade cannot silently reach a
missing call.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import importlib
import inspect
import os
import shutil
import tarfile
import threading
import types
from typing import Any, Callable, Iterator

# TFDS modules whose `tf` attribute is replaced; every `tf.<name>` in their code
# must be provided by `TF_SUBSET` (checked by `check_modules`).
PATCHED_MODULES = (
    "tensorflow_datasets.core.download.extractor",
    "tensorflow_datasets.core.shuffle",
    "tensorflow_datasets.core.download.downloader",
)


class UnsupportedTfdsError(RuntimeError):
  """The installed TFDS calls TensorFlow in a way this module does not cover."""


def _local(path) -> str:
  path = os.fspath(path)
  if "://" in path:
    raise ValueError(f"Only local paths are supported without TensorFlow: {path}")
  return path


def GFile(name, mode: str = "r"):  # pylint: disable=invalid-name
  """`tf.io.gfile.GFile` for local files: a Python file, or a `_LazyWriter`."""
  if "w" in mode or "a" in mode:
    return _LazyWriter(name, mode)
  return open(_local(name), mode)  # pylint: disable=consider-using-with


class _LazyWriter:
  """A file for writing that, like TensorFlow's, is opened on the first write.

  So "Too many open files" surfaces at `write` as `ResourceExhaustedError`,
  which `core/shuffle.py` handles by raising the open-files limit and writing
  again.
  """

  def __init__(self, name, mode: str):
    self.name = _local(name)
    self.mode = mode
    self._f = None

  def write(self, data) -> None:
    if self._f is None:
      try:
        self._f = open(self.name, self.mode)  # pylint: disable=consider-using-with
      except OSError as e:
        if e.errno == errno.EMFILE:
          raise ResourceExhaustedError(None, None, "Too many open files") from e
        raise
    self._f.write(data)

  def flush(self) -> None:
    if self._f is not None:
      self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None

  def __enter__(self) -> "_LazyWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class OpError(Exception):
  """`tf.errors.OpError`: (node_def, op, message) with a `.message`."""

  def __init__(self, node_def, op, message: str):
    super().__init__(message)
    self.node_def, self.op, self.message = node_def, op, message


class ResourceExhaustedError(OpError):
  pass


class UnimplementedError(OpError):
  pass


def as_text(bytes_or_text, encoding: str = "utf-8") -> str:
  """`tf.compat.as_text`."""
  if isinstance(bytes_or_text, str):
    return bytes_or_text
  if isinstance(bytes_or_text, (bytes, bytearray)):
    return bytes(bytes_or_text).decode(encoding)
  raise TypeError(f"Expected bytes or str, got {bytes_or_text!r}")


def _copy(src, dst, overwrite: bool = False) -> None:
  src, dst = _local(src), _local(dst)
  if not overwrite and os.path.exists(dst):
    raise FileExistsError(f"{dst} exists")
  shutil.copyfile(src, dst)


TF_SUBSET = types.SimpleNamespace(
    compat=types.SimpleNamespace(as_text=as_text),
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=GFile,
        exists=lambda path: os.path.exists(_local(path)),
        remove=lambda path: os.remove(_local(path)),
        copy=_copy)),
    errors=types.SimpleNamespace(
        OpError=OpError,
        ResourceExhaustedError=ResourceExhaustedError,
        UnimplementedError=UnimplementedError),
)


class _StopRecordingTarInfo(tarfile.TarInfo):
  """A TarInfo that records on its TarFile the header error where reading stopped."""

  @classmethod
  def fromtarfile(cls, tarfile_):
    try:
      return super().fromtarfile(tarfile_)
    except tarfile.HeaderError as e:  # includes EOFHeaderError: the end-of-archive marker
      tarfile_.stopped_at = e
      raise


class CompleteTarFile(tarfile.TarFile):
  """A TarFile whose iteration ends only at the end-of-archive marker.

  `tarfile.TarFile.next` returns None (the end) at a damaged header or at the end of a
  truncated archive alike; here those raise `tarfile.ReadError`.
  """

  tarinfo = _StopRecordingTarInfo
  stopped_at = None

  def next(self):
    info = super().next()
    if info is None and not isinstance(self.stopped_at, tarfile.EOFHeaderError):
      raise tarfile.ReadError(
          f"the tar archive is damaged or truncated after {self.offset} bytes"
          f" ({self.stopped_at or 'no end-of-archive marker'}); members read before it:"
          f" {len(self.members)}")
    return info


class _TarfileModule:
  """The `tarfile` module with `open` returning a `CompleteTarFile`."""

  open = staticmethod(CompleteTarFile.open)

  def __getattr__(self, name):
    return getattr(tarfile, name)


def _provides(name: str) -> bool:
  obj = TF_SUBSET
  for part in name.split("."):
    if not hasattr(obj, part):
      return False
    obj = getattr(obj, part)
  return True


def tf_names_used(module: types.ModuleType) -> set[str]:
  """Every `tf.<dotted name>` in the module's code (comments excluded)."""
  names = set()
  for node in ast.walk(ast.parse(inspect.getsource(module))):
    parts = []
    while isinstance(node, ast.Attribute):
      parts.append(node.attr)
      node = node.value
    if parts and isinstance(node, ast.Name) and node.id == "tf":
      names.add(".".join(reversed(parts)))
  # Keep only the longest chains (`tf.io.gfile.GFile`, not also `tf.io`).
  return {n for n in names if not any(m.startswith(n + ".") for m in names)}


def check_modules() -> list[types.ModuleType]:
  """The modules to patch; raises if one uses TensorFlow beyond `TF_SUBSET`."""
  modules = [importlib.import_module(name) for name in PATCHED_MODULES]
  for module in modules:
    missing = sorted(n for n in tf_names_used(module) if not _provides(n))
    if missing:
      raise UnsupportedTfdsError(
          f"{module.__name__} uses TensorFlow calls {missing} that"
          " transformer.data.tfds_compat does not provide; this TFDS version is"
          " not supported without TensorFlow")
    if not hasattr(module, "tf"):
      raise UnsupportedTfdsError(f"{module.__name__} has no `tf` attribute to replace")
    if module.__name__.endswith(".extractor") and getattr(module, "tarfile", None) is not tarfile:
      raise UnsupportedTfdsError(f"{module.__name__} has no `tarfile` attribute to replace")
  return modules


class ReentrantPatch:
  """Module attributes replaced while any of several nested (or concurrent) blocks runs.

  `patch()` runs when the outermost block is entered: it replaces the attributes and returns
  [(module, attribute name, original value)]; those originals are put back when the
  outermost block exits (also on error).
  """

  def __init__(self, patch: Callable[[], list[tuple[types.ModuleType, str, Any]]]):
    self._patch = patch
    self._lock = threading.RLock()
    self._depth = 0
    self._saved: list[tuple[types.ModuleType, str, Any]] = []

  @contextlib.contextmanager
  def __call__(self) -> Iterator[None]:
    with self._lock:
      if self._depth == 0:
        self._saved = self._patch()
      self._depth += 1
    try:
      yield
    finally:
      with self._lock:
        self._depth -= 1
        if self._depth == 0:
          for module, name, original in self._saved:
            setattr(module, name, original)
          self._saved = []


def _use_tf_subset() -> list[tuple[types.ModuleType, str, Any]]:
  saved = []
  for module in check_modules():
    saved.append((module, "tf", module.tf))
    module.tf = TF_SUBSET
    if getattr(module, "tarfile", None) is tarfile:  # the extractor
      saved.append((module, "tarfile", tarfile))
      module.tarfile = _TarfileModule()
  return saved


_without_tensorflow = ReentrantPatch(_use_tf_subset)


def without_tensorflow() -> contextlib.AbstractContextManager[None]:
  """Within the block, TFDS's extractor, shuffler and downloader use `TF_SUBSET`,
  and the extractor reads tar archives with `CompleteTarFile`.

  Re-entrant; the original attributes are restored when the outermost block
  exits (also on error).
  """
  return _without_tensorflow()
