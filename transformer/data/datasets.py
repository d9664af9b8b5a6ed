"""Parallel corpora as TFDS datasets (array_record; no TensorFlow needed).

Builders write `{lang_a: Text, lang_b: Text, 'id': int64}` records, the same
text schema as TFDS's `wmt14_translate` plus the line number `id`. They set
`disable_shuffling` and key records by line number, so records are stored in
file order; `get_split` still returns them sorted by `id`.

`get_split(data_cfg, split, data_dir)` returns a random-access sequence of
`{'source': str, 'target': str, 'id': int}` in the configured direction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import os
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from transformer import io_utils
from transformer.config import DataConfig
from transformer.data import records
from transformer.data import tfds_compat
from transformer.data.errors import describe_failure
from transformer.data import wmt_streaming

NON_UTF8_POLICIES = ("replace", "skip")

_MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw"
# Our split name -> Multi30k Task 1 raw file stem.
_MULTI30K_FILES = {"train": "train", "validation": "val",
                   "test": "test_2016_flickr"}
_MULTI30K_LANGS = ("en", "de")

# Accepted spellings of split names -> canonical name.
_SPLIT_ALIASES = {"valid": "validation", "val": "validation",
                  "dev": "validation", "test_2016_flickr": "test"}


class DataError(ValueError):
  """A user-facing data problem (one line)."""


# ----------------------------------------------------------------------------
# Plain-text parallel files.


def _count_lines(path: str) -> int:
  """Lines as Python's binary file iteration sees them (split on b'\\n')."""
  count, last = 0, b""
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      count += chunk.count(b"\n")
      last = chunk[-1:]
  return count + (1 if last not in (b"", b"\n") else 0)


def _decode_line(raw: bytes, non_utf8: str) -> tuple[Optional[str], bool]:
  """Returns (text or None if skipped, whether bytes were undecodable)."""
  raw = raw[:-1] if raw.endswith(b"\n") else raw
  raw = raw[:-1] if raw.endswith(b"\r") else raw
  try:
    return raw.decode("utf-8"), False
  except UnicodeDecodeError:
    if non_utf8 == "skip":
      return None, True
    return raw.decode("utf-8", errors="replace"), True


def iter_parallel_files(src_path: str, tgt_path: str, non_utf8: str = "replace",
                        counts: Optional[dict[str, int]] = None
                        ) -> Iterator[tuple[int, str, str]]:
  """Yields (line number, source line, target line) of two aligned files.

  Args:
    src_path: one sentence per line.
    tgt_path: the aligned translations, same number of lines.
    non_utf8: 'replace' undecodable bytes with U+FFFD, or 'skip' the pair.
    counts: if given, filled with 'lines', 'kept', 'replaced' and 'skipped'
      (pairs) once the generator is exhausted.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the files have different numbers of lines, or a bad policy.
  """
  if non_utf8 not in NON_UTF8_POLICIES:
    raise ValueError(f"non_utf8 must be one of {NON_UTF8_POLICIES}, got {non_utf8!r}")
  for path in (src_path, tgt_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Parallel text file not found: {path}")
  n_src, n_tgt = _count_lines(src_path), _count_lines(tgt_path)
  if n_src != n_tgt:
    raise ValueError(
        f"Parallel files differ in line count: {src_path} has {n_src} lines,"
        f" {tgt_path} has {n_tgt}")
  stats = {"lines": n_src, "kept": 0, "replaced": 0, "skipped": 0}
  with open(src_path, "rb") as fs, open(tgt_path, "rb") as ft:
    for i, (raw_s, raw_t) in enumerate(zip(fs, ft)):
      src, bad_s = _decode_line(raw_s, non_utf8)
      tgt, bad_t = _decode_line(raw_t, non_utf8)
      if src is None or tgt is None:
        stats["skipped"] += 1
        continue
      stats["replaced"] += int(bad_s or bad_t)
      stats["kept"] += 1
      yield i, src, tgt
  if stats["replaced"] or stats["skipped"]:
    logging.warning(
        "Non-UTF-8 bytes in %s / %s: %d pairs replaced, %d pairs skipped (of %d).",
        src_path, tgt_path, stats["replaced"], stats["skipped"], n_src)
  if counts is not None:
    counts.update(stats)


# ----------------------------------------------------------------------------
# TFDS builders.


def _features(languages: Sequence[str]) -> tfds.features.FeaturesDict:
  feats = {lang: tfds.features.Text() for lang in languages}
  feats["id"] = tfds.features.Scalar(dtype=np.int64, doc="0-based line number")
  return tfds.features.FeaturesDict(feats)


@dataclasses.dataclass(eq=False)
class ParallelTextConfig(tfds.core.BuilderConfig):
  """A local corpus: `<prefix>.<lang>` files per split.

  Build it with `ParallelTextConfig.create`; the name hashes the languages,
  policy and absolute prefixes so that corpora don't collide in one data dir.
  """
  languages: tuple[str, ...] = ()
  split_prefixes: tuple[tuple[str, str], ...] = ()  # ((split, prefix), ...)
  non_utf8: str = "replace"

  @classmethod
  def create(cls, languages: Sequence[str], split_prefixes: dict[str, str],
             non_utf8: str = "replace") -> "ParallelTextConfig":
    langs = tuple(sorted(languages))
    if len(langs) != 2 or langs[0] == langs[1]:
      raise ValueError(f"Need two different languages, got {languages}")
    if "id" in langs:
      raise ValueError("'id' is not a valid language code")
    if non_utf8 not in NON_UTF8_POLICIES:
      raise ValueError(f"non_utf8 must be one of {NON_UTF8_POLICIES}, got {non_utf8!r}")
    if not split_prefixes:
      raise ValueError("No splits given for parallel_text")
    items = tuple(sorted((s, os.path.abspath(p)) for s, p in split_prefixes.items()))
    digest = hashlib.sha256(repr((langs, non_utf8, items)).encode()).hexdigest()[:12]
    return cls(name=f"{langs[0]}-{langs[1]}.{non_utf8}.{digest}",
               version=ParallelText.VERSION,
               description=f"Local files: {dict(items)}",
               languages=langs, split_prefixes=items, non_utf8=non_utf8)


class ParallelText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic parallel corpus from local plain-text files."""

  name = "parallel_text"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if not isinstance(config, ParallelTextConfig):
      raise ValueError("ParallelText needs config=ParallelTextConfig.create(...)")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Sentence-aligned plain-text files, one pair per line.",
        features=_features(config.languages),
        disable_shuffling=True,  # records in line order (keys = line numbers)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    config = self.builder_config
    return {split: self._generate_examples(*(f"{prefix}.{lang}" for lang in config.languages))
            for split, prefix in config.split_prefixes}

  reads_local_files = True  # `prepare` checks them first and lets their errors through

  def check_raw_files(self) -> None:
    """Raises FileNotFoundError naming the first missing `<prefix>.<lang>` file."""
    config = self.builder_config
    _check_files(f"{prefix}.{lang}" for _, prefix in config.split_prefixes
                 for lang in config.languages)

  def _generate_examples(self, path_a: str, path_b: str):
    """(line number, example) pairs; files in `config.languages` order."""
    config = self.builder_config
    lang_a, lang_b = config.languages
    for i, text_a, text_b in iter_parallel_files(path_a, path_b, config.non_utf8):
      yield i, {lang_a: text_a, lang_b: text_b, "id": i}


def _check_files(paths: Iterable[str]) -> None:
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Raw data file not found: {path}")


class RawDataDirMixin:
  """A TFDS builder that reads raw files from a local `raw_data_dir` (None: download)."""

  def __init__(self, *, raw_data_dir: Optional[str] = None, **kwargs):
    self._raw_data_dir = raw_data_dir
    super().__init__(**kwargs)
    self._original_state["raw_data_dir"] = raw_data_dir  # for pickling

  @property
  def raw_data_dir(self) -> Optional[str]:
    return self._raw_data_dir


@dataclasses.dataclass(eq=False)
class Multi30kConfig(tfds.core.BuilderConfig):
  """One config per non-UTF-8 policy ('replace', 'skip')."""
  non_utf8: str = "replace"


class Multi30k(RawDataDirMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Multi30k Task 1 En-De, raw (untokenized) text.

  Splits: train (29000), validation (val, 1014), test (test_2016_flickr, 1000).
  With `raw_data_dir` it reads `<dir>/{train,val,test_2016_flickr}.{en,de}`;
  otherwise it downloads the public gzipped raw files. A dataset prepared
  once is reused from the TFDS data dir whatever `raw_data_dir` says.
  """

  name = "multi30k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Multi30kConfig(name=p, version="1.0.0", non_utf8=p,
                     description=f"Undecodable bytes: {p}.")
      for p in NON_UTF8_POLICIES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Multi30k Task 1: English descriptions of Flickr30k images"
                    " and German translations (Elliott et al. 2016).",
        features=_features(_MULTI30K_LANGS),
        homepage="https://github.com/multi30k/dataset",
        disable_shuffling=True,  # records in line order (keys = line numbers)
    )

  def _split_generators(self, dl_manager):
    stems = _MULTI30K_FILES
    if self._raw_data_dir:
      paths = {f"{stem}.{lang}": os.path.join(self._raw_data_dir, f"{stem}.{lang}")
               for stem in stems.values() for lang in _MULTI30K_LANGS}
      for path in paths.values():
        if not os.path.isfile(path):
          raise FileNotFoundError(f"Multi30k raw file not found: {path}")
    else:
      urls = {f"{stem}.{lang}": f"{_MULTI30K_URL}/{stem}.{lang}.gz"
              for stem in stems.values() for lang in _MULTI30K_LANGS}
      paths = {k: os.fspath(v) for k, v in dl_manager.download_and_extract(urls).items()}
    return {split: self._generate_examples(paths[f"{stem}.en"], paths[f"{stem}.de"])
            for split, stem in stems.items()}

  @property
  def reads_local_files(self) -> bool:
    return bool(self._raw_data_dir)

  def check_raw_files(self) -> None:
    """Raises FileNotFoundError naming the first missing raw file (with `raw_data_dir`)."""
    if self._raw_data_dir:
      _check_files(os.path.join(self._raw_data_dir, f"{stem}.{lang}")
                   for stem in _MULTI30K_FILES.values() for lang in _MULTI30K_LANGS)

  def _generate_examples(self, path_en: str, path_de: str):
    """(line number, example) pairs of one split."""
    policy = self.builder_config.non_utf8
    for i, en, de in iter_parallel_files(path_en, path_de, policy):
      yield i, {"en": en, "de": de, "id": i}


# ----------------------------------------------------------------------------
# Reading splits.


class ParallelSplit(Sequence):
  """Random-access `{'source', 'target', 'id'}` view of a TFDS data source.

  Records are ordered by `id` (the original line number); datasets without an
  `id` feature (e.g. wmt14_translate) keep TFDS's record order and use the
  record index as `id`.
  """

  def __init__(self, data_source, source_lang: str, target_lang: str,
               has_id: bool, ordered: bool, name: str = ""):
    self._ds = data_source
    self.source_lang = source_lang
    self.target_lang = target_lang
    self.name = name
    self._has_id = has_id
    self._order: Optional[np.ndarray] = None
    if ordered or not has_id:
      self._order = np.arange(len(data_source), dtype=np.int64)

  def __len__(self) -> int:
    return len(self._ds)

  def _records(self, rec_indices: Sequence[int]) -> list[dict[str, Any]]:
    if hasattr(self._ds, "__getitems__"):
      return self._ds.__getitems__([int(i) for i in rec_indices])
    return [self._ds[int(i)] for i in rec_indices]

  @property
  def order(self) -> np.ndarray:
    """Record index of each position, sorted by `id` (computed once)."""
    if self._order is None:
      ids = np.empty(len(self._ds), dtype=np.int64)
      for start in range(0, len(ids), 8192):
        recs = self._records(range(start, min(start + 8192, len(ids))))
        ids[start:start + len(recs)] = [int(r["id"]) for r in recs]
      self._order = np.argsort(ids, kind="stable")
    return self._order

  def _convert(self, record: dict[str, Any], rec_index: int) -> dict[str, Any]:
    def text(x):
      return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    return {"source": text(record[self.source_lang]),
            "target": text(record[self.target_lang]),
            "id": int(record["id"]) if self._has_id else int(rec_index)}

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    rec = int(self.order[index])
    return self._convert(self._ds[rec], rec)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    recs = [int(self.order[i]) for i in indices]
    return [self._convert(r, i) for r, i in zip(self._records(recs), recs)]

  def iter_chunks(self, chunk_size: int = 4096) -> Iterator[list[dict[str, Any]]]:
    """Yields all examples in order, `chunk_size` at a time."""
    for start in range(0, len(self), chunk_size):
      yield self.__getitems__(range(start, min(start + chunk_size, len(self))))

  def __iter__(self):
    for chunk in self.iter_chunks():
      yield from chunk

  def sentences(self) -> Iterator[str]:
    """Source and target sentences (e.g. to train SentencePiece)."""
    for ex in self:
      yield ex["source"]
      yield ex["target"]


def canonical_split(split: str) -> str:
  """'val' -> 'validation' etc.; keeps a TFDS slice suffix like '[:100]'."""
  m = re.fullmatch(r"\s*(\w+)\s*(\[.*\])?\s*", split)
  if not m:
    raise DataError(f"Bad split name {split!r}")
  base = _SPLIT_ALIASES.get(m.group(1), m.group(1))
  return base + (m.group(2) or "")


def parse_parallel_text_splits(spec: str, base_dir: Optional[str] = None
                               ) -> dict[str, str]:
  """'train=/p/train,validation=/p/dev' -> {split: prefix}.

  Relative prefixes are taken relative to `base_dir` when it is given.
  """
  out: dict[str, str] = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if "=" not in item:
      raise DataError(f"--parallel_text_splits item {item!r} is not split=prefix")
    split, prefix = (s.strip() for s in item.split("=", 1))
    split = canonical_split(split)
    if not re.fullmatch(r"\w+", split) or not prefix:
      raise DataError(f"--parallel_text_splits item {item!r} is not split=prefix")
    if split in out:
      raise DataError(f"--parallel_text_splits names split {split!r} twice")
    if base_dir and not os.path.isabs(prefix):
      prefix = os.path.join(base_dir, prefix)
    out[split] = prefix
  if not out:
    raise DataError("--dataset=parallel_text needs --parallel_text_splits="
                    "'train=/path/prefix,...' (files <prefix>.<lang>)")
  return out


def make_builder(data_cfg: DataConfig, data_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `data_cfg.dataset` writing array_record to `data_dir`, checked to
  have the source and target languages (before anything is prepared)."""
  builder = _make_builder(data_cfg, data_dir)
  langs = _languages(builder)
  for lang in (data_cfg.source_lang, data_cfg.target_lang):
    if lang not in langs:
      raise DataError(f"{builder.info.full_name} has languages {list(langs)}, not {lang!r}")
  return builder


def _make_builder(data_cfg: DataConfig, data_dir: str) -> tfds.core.DatasetBuilder:
  name = data_cfg.dataset
  if name == "multi30k":
    raw = data_cfg.raw_data_dir
    if raw and not os.path.isdir(raw):
      raise FileNotFoundError(f"--raw_data_dir not found: {raw}")
    return Multi30k(config=data_cfg.non_utf8, data_dir=data_dir,
                    raw_data_dir=raw, file_format="array_record")
  if name == "parallel_text":
    splits = parse_parallel_text_splits(data_cfg.parallel_text_splits,
                                        data_cfg.raw_data_dir)
    config = ParallelTextConfig.create(
        (data_cfg.source_lang, data_cfg.target_lang), splits, data_cfg.non_utf8)
    return ParallelText(config=config, data_dir=data_dir, file_format="array_record")
  # TFDS imports its legacy builders (wmt*_translate among them) in one loop
  # that stops at the first ImportError (e.g. no h5py): import them here.
  try:
    importlib.import_module("tensorflow_datasets.translate")
  except ImportError as e:
    logging.warning("Could not import tensorflow_datasets.translate: %s", e)
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"Unknown --dataset={name!r}: not multi30k, parallel_text"
                    " or a TFDS dataset name") from e


def _languages(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  features = builder.info.features
  langs = getattr(features, "languages", None)
  if langs is None:
    langs = [k for k in features.keys() if k != "id"]
  return tuple(langs)


def prepare(builder: tfds.core.DatasetBuilder) -> bool:
  """Prepares array_record files unless they already exist; True if this call prepared them.

  Runs without TensorFlow (see `tfds_compat`); TFDS's WMT builders read their
  text files line by line (see `wmt_streaming`). A builder of local files
  (`reads_local_files`: ParallelText, Multi30k with a raw_data_dir, the
  treebanks) is asked to `check_raw_files()` first, and the errors naming its
  files pass through unchanged. Downloads, extraction and
  writing happen in TFDS's temporary directories, renamed into place only
  when complete, so an interrupted or failed preparation is never taken for
  a prepared dataset and the next call prepares again. Jobs sharing a local
  data dir prepare it once (`_preparing`).

  Raises:
    DataError: preparing a downloaded dataset failed (one line with the cause).
    FileNotFoundError, ValueError: bad local raw files.
  """
  if builder.is_prepared():
    return False
  local = getattr(builder, "reads_local_files", False)
  if local:
    builder.check_raw_files()
  with _preparing(builder):
    if builder.is_prepared():  # another process prepared it while this one waited
      builder.info.read_from_directory(builder.data_dir)
      logging.info("%s was prepared by another process", builder.info.full_name)
      return False
    _download_and_prepare(builder, local)
  return True


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds an exclusive lock on `<data dir>/.<name>.prepare.lock` while preparing.

  Independent jobs sharing a --tfds_data_dir (a sweep's parallel runs) prepare
  a dataset once: the others wait, then read it. Object stores (gs://) have no
  file locks; there, jobs sharing a data dir need a `--mode=prepare` first.
  """
  root = os.fspath(builder.data_dir_root)
  if "://" in root:
    yield
    return
  with io_utils.exclusive_lock(os.path.join(root, f".{builder.name}.prepare.lock")):
    yield


def _download_and_prepare(builder: tfds.core.DatasetBuilder, local: bool) -> None:
  logging.info("Preparing %s in %s", builder.info.full_name, builder.data_dir)
  wmt = type(builder).__module__.startswith("tensorflow_datasets.translate.wmt")
  try:
    with tfds_compat.without_tensorflow(), (
        wmt_streaming.streaming_parser() if wmt else contextlib.nullcontext()):
      builder.download_and_prepare(file_format="array_record")
  except tfds_compat.UnsupportedTfdsError as e:
    raise DataError(str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    if local and isinstance(e, (FileNotFoundError, ValueError)):  # they name the local file
      raise
    raise DataError(
        f"{builder.info.full_name} is not prepared in {builder.data_dir_root}"
        f" and preparing it failed: {describe_failure(e)}") from e


def open_split(data_dir: str, split: str,
               make_builder: Callable[[str], tfds.core.DatasetBuilder]):
  """(builder, data source, canonical split name) of `split` of a TFDS dataset.

  The one path of every TFDS-backed split: the builder for `data_dir` (which
  checks what it can before anything is written), prepared there on first use
  (`prepare`), and `split` ('train', 'val', 'train[:1000]', ...) checked to
  exist in it.
  """
  if not data_dir:
    raise DataError("A TFDS data dir is required (--tfds_data_dir)")
  builder = make_builder(data_dir)
  prepare(builder)
  tfds_split = canonical_split(split)
  base = tfds_split.split("[")[0]
  if base not in builder.info.splits:
    raise DataError(f"{builder.info.full_name} has no split {split!r}; it has"
                    f" {sorted(builder.info.splits.keys())}")
  return builder, records.open_split(builder, tfds_split), tfds_split


def get_split(data_cfg: DataConfig, split: str, data_dir: str) -> ParallelSplit:
  """Examples of `split` as `{'source', 'target', 'id'}` in line order.

  Args:
    data_cfg: dataset, languages (direction source_lang -> target_lang), raw
      data location and the non-UTF-8 policy.
    split: 'train', 'validation' (or 'val'/'dev'), 'test', optionally with a
      TFDS slice such as 'train[:1000]'.
    data_dir: TFDS data dir; the dataset is prepared there on first use.
  """
  src, tgt = data_cfg.source_lang, data_cfg.target_lang
  builder, source, tfds_split = open_split(data_dir, split, lambda d: make_builder(data_cfg, d))
  has_id = "id" in builder.info.features.keys()
  ordered = bool(builder.info.disable_shuffling) and has_id
  logging.info("%s %s: %d examples, %s -> %s", builder.info.full_name,
               tfds_split, len(source), src, tgt)
  return ParallelSplit(source, src, tgt, has_id=has_id, ordered=ordered,
                       name=f"{builder.info.full_name}/{tfds_split}")
