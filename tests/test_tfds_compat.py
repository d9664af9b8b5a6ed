"""tfds_compat: TFDS's extractor and on-disk shuffler run without TensorFlow."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import sys
import tarfile

import pytest
from tensorflow_datasets.core import shuffle
from tensorflow_datasets.core.download import extractor
from tensorflow_datasets.core.download import resource

from transformer.data import tfds_compat


def test_tensorflow_is_not_installed():
  # The point of the module: these tests run where TensorFlow cannot be imported.
  assert importlib.util.find_spec("tensorflow") is None


def test_tf_names_used_reads_code_not_comments(tmp_path, monkeypatch):
  path = tmp_path / "fake_tfds_module.py"
  path.write_text(
      "tf = None\n"
      "# tf.io.gfile.Rename is only mentioned here\n"
      "def f(p):\n"
      "  s = 'tf.not.code'\n"
      "  with tf.io.gfile.GFile(p, 'rb') as g:\n"
      "    return tf.compat.as_text(g.read())\n"
      "def g(p):\n"
      "  try:\n"
      "    tf.io.gfile.remove(p)\n"
      "  except tf.errors.NotFoundError:\n"
      "    pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  module = importlib.import_module("fake_tfds_module")
  assert tfds_compat.tf_names_used(module) == {
      "io.gfile.GFile", "compat.as_text", "io.gfile.remove", "errors.NotFoundError"}
  # errors.NotFoundError is not provided: patching such a module is refused.
  monkeypatch.setattr(tfds_compat, "PATCHED_MODULES", ("fake_tfds_module",))
  with pytest.raises(tfds_compat.UnsupportedTfdsError, match="errors.NotFoundError"):
    with tfds_compat.without_tensorflow():
      pass
  assert module.tf is None  # untouched


def test_pinned_tfds_modules_are_supported():
  modules = tfds_compat.check_modules()
  assert [m.__name__ for m in modules] == list(tfds_compat.PATCHED_MODULES)


def _tgz(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode=mode) as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_extraction_without_tensorflow(tmp_path):
  members = {"training/a.de": "Grüße\n".encode(), "b.en": b"hello\nworld\n", "empty": b""}
  archive = tmp_path / "x.tgz"
  archive.write_bytes(_tgz(members))
  method = resource.ExtractMethod.TAR_GZ
  original_tf = extractor.tf
  # Unpatched, TFDS reaches for TensorFlow.
  with pytest.raises(ImportError):
    list(extractor.iter_archive(archive, method))
  with tfds_compat.without_tensorflow():
    assert extractor.tf is tfds_compat.TF_SUBSET
    got = {}
    for name, fobj in extractor.iter_archive(archive, method):
      name = extractor.tf.compat.as_text(name)
      dst = tmp_path / "out" / name
      dst.parent.mkdir(parents=True, exist_ok=True)
      extractor._copy(fobj.read(), os.fspath(dst))  # pylint: disable=protected-access
      got[name] = dst.read_bytes()
  assert got == members
  assert extractor.tf is original_tf
  assert "tensorflow" not in sys.modules


def test_shuffler_spills_to_disk_without_tensorflow(tmp_path, monkeypatch):
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 64)  # bytes: spill at once
  records = {i: f"record {i} {'é' * (i % 5)}".encode() for i in range(300)}
  order = list(records)[::-1]
  # Unpatched, writing a bucket reaches for TensorFlow.
  with pytest.raises(ImportError):
    s = shuffle.Shuffler(tmp_path / "unpatched", hash_salt="x", disable_shuffling=True)
    for key in order:
      s.add(key, records[key])
  with tfds_compat.without_tensorflow():
    s = shuffle.Shuffler(tmp_path / "spill", hash_salt="x", disable_shuffling=True)
    for key in order:
      s.add(key, records[key])
    spilled = sorted(os.listdir(tmp_path / "spill"))
    got = list(s)
  assert spilled, "no bucket files were written"
  # disable_shuffling: records come back sorted by key.
  assert [data for _, data in got] == [records[k] for k in sorted(records)]
  assert os.listdir(tmp_path / "spill") == []  # buckets removed after reading


def test_without_tensorflow_is_reentrant_and_restores_on_error():
  originals = [importlib.import_module(n).tf for n in tfds_compat.PATCHED_MODULES]
  with pytest.raises(KeyError):
    with tfds_compat.without_tensorflow():
      with tfds_compat.without_tensorflow():
        pass
      assert shuffle.tf is tfds_compat.TF_SUBSET  # still patched after the inner block
      raise KeyError("boom")
  assert [importlib.import_module(n).tf for n in tfds_compat.PATCHED_MODULES] == originals


def test_lazy_writer_reports_too_many_open_files(tmp_path, monkeypatch):
  def no_more_files(*args, **kwargs):
    raise OSError(24, "Too many open files")
  writer = tfds_compat.TF_SUBSET.io.gfile.GFile(tmp_path / "f", "wb")
  assert not (tmp_path / "f").exists()  # opened on the first write, like TensorFlow's
  monkeypatch.setattr("builtins.open", no_more_files)
  with pytest.raises(tfds_compat.TF_SUBSET.errors.ResourceExhaustedError) as e:
    writer.write(b"x")
  assert e.value.message.endswith("Too many open files")  # what core/shuffle.py checks


def test_as_text():
  as_text = tfds_compat.TF_SUBSET.compat.as_text
  assert as_text("Köln".encode()) == "Köln"
  assert as_text("Köln") == "Köln"
  with pytest.raises(TypeError):
    as_text(3)


def _extract_names(archive, method) -> list[str]:
  return [tfds_compat.as_text(name) for name, _ in extractor.iter_archive(archive, method)]


@pytest.mark.parametrize("damage", ["garbled_second_header", "cut_before_second_header"])
def test_a_damaged_tar_fails_instead_of_ending_early(tmp_path, damage):
  members = {"giga.fr.gz": b"x" * 700, "giga.en.gz": b"y" * 300}
  data = _tgz(members, mode="w")
  second = 512 + 1024  # the first header, then 700 bytes padded to 1024
  assert data[second + 257:second + 262] == b"ustar"  # the second member's header is there
  if damage == "garbled_second_header":
    data = data[:second] + b"garbage!" * 64 + data[second + 512:]
  else:
    data = data[:second]
  whole, damaged = tmp_path / "whole.tar", tmp_path / "damaged.tar"
  whole.write_bytes(_tgz(members, mode="w"))
  damaged.write_bytes(data)
  method = resource.ExtractMethod.TAR
  # Python's tarfile alone stops after the first member without a word.
  with tarfile.open(damaged, "r:*") as tar:
    assert tar.getnames() == ["giga.fr.gz"]
  with tfds_compat.without_tensorflow():
    assert _extract_names(whole, method) == list(members)
    with pytest.raises(tarfile.ReadError, match=r"damaged or truncated after 1536 bytes.*"
                       r"members read before it: 1$"):
      _extract_names(damaged, method)
    gz = tmp_path / "damaged.tgz"
    gz.write_bytes(gzip.compress(data))
    with pytest.raises(tarfile.ReadError, match="damaged or truncated"):
      _extract_names(gz, resource.ExtractMethod.TAR_GZ)
  assert extractor.tarfile is tarfile  # restored
