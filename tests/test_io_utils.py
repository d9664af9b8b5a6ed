"""Atomic writes: the new file whole, or the old one untouched and no temporary left."""

import pytest

from transformer import io_utils


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "sub" / "out.bin"  # the directory is created
  with io_utils.atomic_write(path) as f:
    f.write(b"first")
  assert path.read_bytes() == b"first"
  with pytest.raises(RuntimeError, match="midway"):
    with io_utils.atomic_write(path) as f:
      f.write(b"second, half")
      raise RuntimeError("midway")
  assert path.read_bytes() == b"first"
  with io_utils.atomic_write(str(path), "w", encoding="utf-8") as f:
    f.write("dritte ä")
  assert path.read_bytes() == "dritte ä".encode("utf-8")
  assert [p.name for p in path.parent.iterdir()] == ["out.bin"]
