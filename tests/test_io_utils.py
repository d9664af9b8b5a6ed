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


def test_path_problem_names_what_is_in_the_way(tmp_path):
  a_file, a_dir = tmp_path / "f", tmp_path / "d"
  a_file.write_text("x")
  a_dir.mkdir()
  assert io_utils.path_problem(a_dir, directory=True) is None
  assert io_utils.path_problem(a_file, directory=False) is None
  assert io_utils.path_problem(tmp_path / "new" / "deeper", directory=True) is None  # creatable
  assert io_utils.path_problem(a_file, directory=True) == f"{a_file} is a file, not a directory"
  assert io_utils.path_problem(a_dir, directory=False) == f"{a_dir} is a directory, not a file"
  assert io_utils.path_problem(a_file / "a" / "m.model", directory=False) == (
      f"{a_file / 'a' / 'm.model'} cannot be created: {a_file} is a file, not a directory")
