"""wmt_streaming: the same pairs as TFDS's whole-file WMT parser, read line by line."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
from tensorflow_datasets.translate import wmt

from transformer.data import wmt_streaming

TFDS_PARSE = wmt._parse_parallel_sentences  # pylint: disable=protected-access

CASES = {
    "trailing_newline": ("eins\nzwei\n\ndrei\n", "one\ntwo\nx\nthree\n"),
    "no_trailing_newline": ("eins\nzwei", "one\ntwo"),
    "carriage_returns_kept": ("a\r\nb\r\n", "c\r\nd\r\n"),
    "unicode": ("Grüße\n€ œ\n", "greetings\neuro\n"),
    "empty_files": ("", ""),
    "only_newlines": ("\n\n", "\n\n"),
}


def _write(path, text: str, gz: bool) -> str:
  data = text.encode("utf-8")
  if gz:
    path = f"{path}.gz"
    data = gzip.compress(data)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_pairs_as_tfds(tmp_path, case, gz):
  text_de, text_en = CASES[case]
  f1 = _write(tmp_path / "corpus.de-en.de", text_de, gz)
  f2 = _write(tmp_path / "corpus.de-en.en", text_en, gz)
  got = list(wmt_streaming.parse_parallel_text(f1, f2, original=TFDS_PARSE))
  assert got == list(TFDS_PARSE(f1, f2))
  # And against the texts themselves: split on '\n' only.
  assert got == [(f"0/{i}", {"de": d, "en": e})
                 for i, (d, e) in enumerate(zip(text_de.split("\n"), text_en.split("\n")))]


@pytest.mark.parametrize("gz", [False, True])
def test_unequal_line_counts_fail(tmp_path, gz):
  f1 = _write(tmp_path / "c.de", "a\nb\nc\n", gz)
  f2 = _write(tmp_path / "c.en", "a\nb\n", gz)
  with pytest.raises(AssertionError, match="Sizes do not match: 4 vs 3"):
    list(TFDS_PARSE(f1, f2))
  with pytest.raises(ValueError, match="Sizes do not match: 4 vs 3"):
    list(wmt_streaming.parse_parallel_text(f1, f2, original=TFDS_PARSE))
  with pytest.raises(ValueError, match="Sizes do not match: 3 vs 4"):
    list(wmt_streaming.parse_parallel_text(f2, f1, original=TFDS_PARSE))


def test_invalid_utf8_fails_like_tfds(tmp_path):
  f1 = _write(tmp_path / "c.de", "gut\n", False)
  with open(tmp_path / "c.en", "wb") as f:
    f.write(b"bad \xff\n")
  with pytest.raises(UnicodeDecodeError):
    list(TFDS_PARSE(f1, str(tmp_path / "c.en")))
  with pytest.raises(UnicodeDecodeError):
    list(wmt_streaming.parse_parallel_text(f1, str(tmp_path / "c.en"), original=TFDS_PARSE))


def test_sgm_and_missing_files_go_to_tfds(tmp_path):
  calls = []
  def original(f1, f2):
    calls.append((f1, f2))
    yield "k", {}
  sgm = _write(tmp_path / "t-src.de.sgm", '<seg id="1">x</seg>\n', False)
  assert list(wmt_streaming.parse_parallel_text(sgm, sgm, original=original)) == [("k", {})]
  missing = str(tmp_path / "missing.de")
  list(wmt_streaming.parse_parallel_text(missing, missing, original=original))
  assert calls == [(sgm, sgm), (missing, missing)]


def test_streaming_parser_swaps_and_restores():
  with wmt_streaming.streaming_parser():
    assert wmt._parse_parallel_sentences is not TFDS_PARSE  # pylint: disable=protected-access
  assert wmt._parse_parallel_sentences is TFDS_PARSE  # pylint: disable=protected-access


def test_memory_benchmark_runs():
  """Smoke test of benchmarks/wmt_parse_memory.py (the measurement itself is not asserted)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "benchmarks.wmt_parse_memory", "--lines=500"],
                       cwd=repo, capture_output=True, text=True, timeout=120, check=True)
  result = json.loads(out.stdout)
  # 500 lines ending with '\n': 501 segments, the last pair empty (TFDS drops it later).
  assert result["tfds"]["pairs"] == result["streaming"]["pairs"] == 501
  assert {"peak_rss_mb", "seconds", "over_baseline_mb"} <= set(result["streaming"])
