"""Tests for transformer/data/datasets.py: TFDS array_record without TensorFlow."""

from __future__ import annotations

import glob
import itertools
import fcntl
import os
import sys
import threading

import pytest

from transformer import io_utils
from transformer.config import DataConfig
from transformer.data import datasets


def _raw_lines(path, n=None):
  """Lines of a UTF-8 file, split on '\\n' only (independent of the code)."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.decode("utf-8").split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return lines[:n] if n is not None else lines


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write("".join(line + "\n" for line in lines))


@pytest.fixture
def small_corpus(multi30k_dir, tmp_path):
  """train/dev prefixes with the first 200 / 60 Multi30k train / val lines."""
  raw = tmp_path / "raw"
  raw.mkdir()
  lines = {}
  for split, stem, n in (("train", "train", 200), ("dev", "val", 60)):
    for lang in ("en", "de"):
      lines[split, lang] = _raw_lines(multi30k_dir / f"{stem}.{lang}", n)
      _write_lines(raw / f"{split}.{lang}", lines[split, lang])
  return raw, lines


def _cfg(raw, src, tgt, **kw):
  return DataConfig(dataset="parallel_text", source_lang=src, target_lang=tgt,
                    parallel_text_splits=f"train={raw}/train,validation={raw}/dev",
                    **kw)


def test_parallel_text_both_directions(small_corpus, tmp_path):
  raw, lines = small_corpus
  data_dir = str(tmp_path / "tfds")
  for src, tgt in (("en", "de"), ("de", "en")):
    for split, name in (("train", "train"), ("validation", "dev"), ("dev", "dev")):
      ds = datasets.get_split(_cfg(raw, src, tgt), split, data_dir)
      assert len(ds) == len(lines[name, src])
      got = list(ds)
      assert [ex["source"] for ex in got] == lines[name, src]
      assert [ex["target"] for ex in got] == lines[name, tgt]
      assert [ex["id"] for ex in got] == list(range(len(got)))
  # Prepared once (both directions share it), as array_record, no TensorFlow.
  files = glob.glob(f"{data_dir}/parallel_text/*/1.0.0/*.array_record-*")
  assert {os.path.basename(f).split(".")[0] for f in files} == {
      "parallel_text-train", "parallel_text-validation"}
  assert len(glob.glob(f"{data_dir}/parallel_text/*")) == 1
  assert "tensorflow" not in sys.modules
  # Random access, negative index and a slice of the split.
  ds = datasets.get_split(_cfg(raw, "en", "de"), "train", data_dir)
  assert ds[-1]["source"] == lines["train", "en"][-1]
  assert ds[17]["target"] == lines["train", "de"][17]
  head = datasets.get_split(_cfg(raw, "en", "de"), "train[:10]", data_dir)
  assert [ex["source"] for ex in head] == lines["train", "en"][:10]


def test_different_corpora_do_not_collide(small_corpus, tmp_path):
  raw, lines = small_corpus
  other = tmp_path / "other"
  other.mkdir()
  for lang in ("en", "de"):
    _write_lines(other / f"train.{lang}", lines["train", lang][:30])
    _write_lines(other / f"dev.{lang}", lines["dev", lang][:5])
  data_dir = str(tmp_path / "tfds")
  a = datasets.get_split(_cfg(raw, "en", "de"), "train", data_dir)
  b = datasets.get_split(_cfg(other, "en", "de"), "train", data_dir)
  assert (len(a), len(b)) == (200, 30)


def _read_parallel_files(src_path, tgt_path, non_utf8="replace"):
  """All (line number, source, target) triples of iter_parallel_files and its counts."""
  counts = {}
  triples = list(datasets.iter_parallel_files(src_path, tgt_path, non_utf8, counts))
  return triples, counts


def test_mismatched_line_counts(tmp_path):
  _write_lines(tmp_path / "c.en", ["one", "two", "three"])
  _write_lines(tmp_path / "c.de", ["eins", "zwei"])
  with pytest.raises(ValueError) as e:
    _read_parallel_files(str(tmp_path / "c.en"), str(tmp_path / "c.de"))
  msg = str(e.value)
  assert str(tmp_path / "c.en") in msg and str(tmp_path / "c.de") in msg
  assert "3" in msg and "2" in msg and "\n" not in msg
  cfg = DataConfig(dataset="parallel_text", parallel_text_splits=f"train={tmp_path}/c")
  with pytest.raises(ValueError, match="differ in line count"):
    datasets.get_split(cfg, "train", str(tmp_path / "tfds"))
  # A failed preparation leaves no prepared dataset behind.
  assert not glob.glob(f"{tmp_path}/tfds/parallel_text/*/1.0.0/dataset_info.json")


def test_missing_files_and_bad_specs(tmp_path):
  cfg = DataConfig(dataset="parallel_text",
                   parallel_text_splits=f"train={tmp_path}/nope")
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nope\.(en|de)"):
    datasets.get_split(cfg, "train", str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="does_not_exist"):
    datasets.get_split(DataConfig(raw_data_dir=str(tmp_path / "does_not_exist")),
                       "train", str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="parallel_text_splits"):
    datasets.get_split(DataConfig(dataset="parallel_text"), "train", str(tmp_path))
  with pytest.raises(ValueError, match="languages"):
    datasets.get_split(DataConfig(source_lang="fr"), "train", str(tmp_path))
  with pytest.raises(ValueError, match="no_such_dataset"):
    datasets.get_split(DataConfig(dataset="no_such_dataset"), "train", str(tmp_path))
  assert datasets.parse_parallel_text_splits("train=a/b, dev = /c/d", "/base") == {
      "train": "/base/a/b", "validation": "/c/d"}


def test_non_utf8_policies(tmp_path):
  en = [b"good one", b"bad \xff\xfe here", b"fine", b"also fine"]
  de = [b"gut eins", b"schlecht", b"ok \xc3(", b"auch gut"]
  (tmp_path / "x.en").write_bytes(b"\n".join(en) + b"\n")
  (tmp_path / "x.de").write_bytes(b"\r\n".join(de))  # CRLF, no final newline
  src, tgt = str(tmp_path / "x.en"), str(tmp_path / "x.de")

  triples, counts = _read_parallel_files(src, tgt, "replace")
  assert counts == {"lines": 4, "kept": 4, "replaced": 2, "skipped": 0}
  assert [t[0] for t in triples] == [0, 1, 2, 3]
  assert triples[1][1] == "bad \ufffd\ufffd here" and triples[1][2] == "schlecht"
  assert triples[2][2] == "ok \ufffd("
  assert triples[3] == (3, "also fine", "auch gut")

  triples, counts = _read_parallel_files(src, tgt, "skip")
  assert counts == {"lines": 4, "kept": 2, "replaced": 0, "skipped": 2}
  assert triples == [(0, "good one", "gut eins"), (3, "also fine", "auch gut")]

  with pytest.raises(ValueError, match="non_utf8"):
    _read_parallel_files(src, tgt, "ignore")

  # Through TFDS: skipped pairs keep their original line numbers as ids.
  for policy, n in (("replace", 4), ("skip", 2)):
    cfg = DataConfig(dataset="parallel_text", parallel_text_splits=f"train={tmp_path}/x",
                     non_utf8=policy, source_lang="de", target_lang="en")
    ds = list(datasets.get_split(cfg, "train", str(tmp_path / "tfds")))
    assert len(ds) == n
    assert ds[-1] == {"source": "auch gut", "target": "also fine", "id": 3}


def _multi30k_prefix(multi30k_dir, raw, n):
  """raw/ with the first n[stem] lines of each Multi30k file."""
  raw.mkdir()
  for stem, k in n.items():
    for lang in ("en", "de"):
      _write_lines(raw / f"{stem}.{lang}", _raw_lines(multi30k_dir / f"{stem}.{lang}", k))
  return raw


def test_multi30k_local_dir(multi30k_dir, tmp_path):
  """Multi30k builder on truncated copies of the three splits (fast)."""
  n = {"train": 150, "val": 40, "test_2016_flickr": 30}
  raw = _multi30k_prefix(multi30k_dir, tmp_path / "m30k", n)
  data_dir = str(tmp_path / "tfds")
  for src, tgt in (("en", "de"), ("de", "en")):
    cfg = DataConfig(dataset="multi30k", raw_data_dir=str(raw), source_lang=src,
                     target_lang=tgt)
    for split, stem in (("train", "train"), ("validation", "val"), ("test", "test_2016_flickr")):
      ds = datasets.get_split(cfg, split, data_dir)
      got = list(ds)
      assert [ex["source"] for ex in got] == _raw_lines(raw / f"{stem}.{src}")
      assert [ex["target"] for ex in got] == _raw_lines(raw / f"{stem}.{tgt}")
      assert [ex["id"] for ex in got] == list(range(n[stem]))
  assert glob.glob(f"{data_dir}/multi30k/replace/1.0.0/multi30k-test.array_record-*")
  with pytest.raises(ValueError, match="no split"):
    datasets.get_split(cfg, "nope", data_dir)


def test_multi30k_real_validation_against_raw(multi30k_dir, tmp_path):
  """The real (untruncated) files: validation and test read back exactly."""
  builder = datasets.Multi30k(config="replace", data_dir=str(tmp_path / "tfds"),
                              raw_data_dir=str(multi30k_dir), file_format="array_record")
  datasets.prepare(builder)
  for split, stem in (("validation", "val"), ("test", "test_2016_flickr")):
    ds = datasets.ParallelSplit(builder.as_data_source(split=split), "de", "en",
                                has_id=True, ordered=False)  # order recomputed from ids
    src, tgt = _raw_lines(multi30k_dir / f"{stem}.de"), _raw_lines(multi30k_dir / f"{stem}.en")
    assert len(ds) == len(src) == len(tgt)
    for ex, s, t, i in zip(itertools.islice(ds, None), src, tgt, itertools.count()):
      assert ex == {"source": s, "target": t, "id": i}


def test_a_job_waiting_for_another_jobs_preparation_reads_it(multi30k_dir, tmp_path,
                                                            monkeypatch):
  """Two jobs sharing a data dir (a sweep's parallel runs), both seeing it unprepared: the one
  that waits on the lock prepares nothing and reads the other's dataset, splits included."""
  raw = _multi30k_prefix(multi30k_dir, tmp_path / "m30k",
                         {"train": 120, "val": 30, "test_2016_flickr": 20})
  data_dir = str(tmp_path / "tfds")
  make = lambda: datasets.Multi30k(config="replace", data_dir=data_dir, raw_data_dir=str(raw),
                                   file_format="array_record")
  first, second = make(), make()  # both made before anything is prepared
  assert not first.is_prepared() and not second.is_prepared()

  waiting = threading.Event()
  real_flock = fcntl.flock
  def flock(f, op):
    if op == fcntl.LOCK_EX:
      waiting.set()
    real_flock(f, op)
  monkeypatch.setattr(io_utils.fcntl, "flock", flock)
  prepared = []
  real_prepare = datasets._download_and_prepare
  monkeypatch.setattr(datasets, "_download_and_prepare",
                      lambda b, local: (prepared.append(b), real_prepare(b, local)))

  os.makedirs(data_dir)
  with open(os.path.join(data_dir, ".multi30k.prepare.lock"), "a", encoding="utf-8") as lock:
    real_flock(lock, fcntl.LOCK_EX)  # the other job holds the lock ...
    thread = threading.Thread(target=datasets.prepare, args=(second,))
    thread.start()
    assert waiting.wait(timeout=60)
    real_prepare(first, True)  # ... and prepares while this one waits
    real_flock(lock, fcntl.LOCK_UN)
  thread.join(timeout=120)
  assert not thread.is_alive() and prepared == []
  assert {k: v.num_examples for k, v in second.info.splits.items()} == {
      "train": 120, "validation": 30, "test": 20}
  ds = datasets.ParallelSplit(second.as_data_source(split="validation"), "en", "de",
                              has_id=True, ordered=False)
  assert [ex["target"] for ex in ds] == _raw_lines(raw / "val.de")


def test_describe_failure_keeps_the_root_cause():
  """The cause survives however long the wrappers are (the old 300-char cut lost it)."""
  wrapper = "Error while extracting /" + "very/long/path/" * 40 + "x.tgz"
  try:
    try:
      raise ModuleNotFoundError("No module named 'tensorflow'")
    except ModuleNotFoundError as e:
      raise RuntimeError(wrapper + "\nsecond line") from e
  except RuntimeError as e:
    text = datasets.describe_failure(e)
  assert "\n" not in text
  assert text.startswith("RuntimeError: Error while extracting /very/long/path/")
  assert text.endswith("[cause: ModuleNotFoundError: No module named 'tensorflow']")
  assert len(text) < 500  # the wrapper is shortened, not the cause

  # A cause already quoted in full by its wrapper is named, not repeated.
  try:
    try:
      raise EOFError("stream ended")
    except EOFError as e:
      raise RuntimeError(f"Error while extracting a.tgz: {e}") from e
  except RuntimeError as e:
    assert datasets.describe_failure(e) == (
        "RuntimeError: Error while extracting a.tgz: stream ended [cause: EOFError]")

  # An error without a cause is reported whole, however long.
  long = ValueError("checksum " + "x" * 2000 + " Got: y")
  assert datasets.describe_failure(long) == f"ValueError: {long}"


@pytest.mark.parametrize("error, hint", [
    (OSError(28, "No space left on device"), "(the disk is full)"),
    (RuntimeError("write() failed: File too large; writing f"),
     "(a file exceeds the file-size limit)"),
])
def test_describe_failure_names_disk_problems(error, hint):
  try:
    raise RuntimeError("Failed to finalize writing of split 'train'") from error
  except RuntimeError as e:
    assert datasets.describe_failure(e).endswith(hint)


def test_parallel_text_over_the_memory_buffer(small_corpus, tmp_path, monkeypatch):
  """Splits larger than TFDS's shuffle buffer go through on-disk buckets (no TensorFlow)."""
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  raw, lines = small_corpus
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1)  # bytes: every record spills
  added = []
  original_add = shuffle._Bucket.add  # pylint: disable=protected-access
  monkeypatch.setattr(shuffle._Bucket, "add",  # pylint: disable=protected-access
                      lambda self, key, data: added.append(key) or original_add(self, key, data))
  ds = datasets.get_split(_cfg(raw, "en", "de"), "train", str(tmp_path / "tfds"))
  assert [(ex["source"], ex["target"]) for ex in ds] == list(
      zip(lines["train", "en"], lines["train", "de"]))
  assert len(added) == len(lines["train", "en"]) + len(lines["dev", "en"])
  assert "tensorflow" not in sys.modules


def test_unsupported_tfds_is_a_data_error(small_corpus, tmp_path, monkeypatch):
  """A TFDS whose modules call TensorFlow beyond tfds_compat: one DataError, nothing written."""
  from transformer.data import tfds_compat  # pylint: disable=g-import-not-at-top
  raw, _ = small_corpus
  monkeypatch.setattr(tfds_compat, "tf_names_used", lambda module: {"io.gfile.Rename"})
  with pytest.raises(datasets.DataError, match=r"uses TensorFlow calls \['io.gfile.Rename'\]"):
    datasets.get_split(_cfg(raw, "en", "de"), "train", str(tmp_path / "tfds"))
  assert not glob.glob(f"{tmp_path}/tfds/parallel_text/*/1.0.0")
