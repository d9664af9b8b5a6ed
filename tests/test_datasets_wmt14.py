"""WMT14 de-en / fr-en and Multi30k downloads prepared without TensorFlow, offline.

Each case runs in a subprocess (so `sys.modules` shows what preparation
imported) against the fake archives of `tests/wmt_fakes.py`, served on
127.0.0.1. The oracle is the text written into the fakes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import wmt_fakes
from transformer.data.pipeline import EOS_ID

REPO = Path(__file__).resolve().parents[1]
NC_V9 = wmt_fakes.NC_V9_URL

# Prepares and reads every split of the given datasets through the project's
# pipeline; prints JSON. argv: data_dir, lines, buffer bytes (0: TFDS default),
# then dataset names.
_READ_ALL = r"""
import json, sys
import tensorflow_datasets.core.shuffle as shuffle
from tests import wmt_fakes
from transformer.config import DataConfig
from transformer.data import datasets, pipeline

data_dir, lines, buffer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if buffer:
  shuffle.MAX_MEM_BUFFER_SIZE = buffer
spilled = []
original_add = shuffle._Bucket.add
def add(self, key, data):
  spilled.append(1)
  return original_add(self, key, data)
shuffle._Bucket.add = add
from transformer.data import wmt_streaming
streamed = []
original_segments = wmt_streaming.iter_segments
def segments(path):
  streamed.append(path.rsplit("/", 1)[-1])
  return original_segments(path)
wmt_streaming.iter_segments = segments

class BytesTokenizer:  # ids: UTF-8 bytes + 3
  def encode(self, text):
    return [b + 3 for b in text.encode("utf-8")]

out = {}
with wmt_fakes.serving(wmt_fakes.make_fakes(lines)):
  for name in sys.argv[4:]:
    xx = "de" if name == "multi30k" else name.split("/")[1][:2]
    cfg = DataConfig(dataset=name, source_lang="en", target_lang=xx)
    for split in ("train", "validation", "test"):
      examples = datasets.get_split(cfg, split, data_dir)
      tok = pipeline.tokenize_split(examples, BytesTokenizer())
      out[f"{name}:{split}"] = {
          "texts": [[ex["source"], ex["target"]] for ex in examples],
          "tokens": [[tok.source(i).tolist(), tok.target(i).tolist()]
                     for i in range(len(tok))]}
out["spilled"] = len(spilled)
out["streamed"] = sorted(set(streamed))
out["tensorflow_imported"] = "tensorflow" in sys.modules
print("JSON " + json.dumps(out))
"""


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return env


def _read_all(data_dir, names, lines=4, buffer=0) -> dict:
  proc = subprocess.run(
      [sys.executable, "-c", _READ_ALL, str(data_dir), str(lines), str(buffer), *names],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("JSON ")][-1]
  return json.loads(line[5:])


def _expected_tokens(text: str) -> list[int]:
  return [b + 3 for b in text.encode("utf-8")] + [EOS_ID]


def _check_split(got: dict, expected_pairs, ordered: bool) -> None:
  """expected_pairs: (foreign, en) as written; the splits read en -> foreign."""
  want = [[en, fx] for fx, en in expected_pairs]
  texts = got["texts"] if ordered else sorted(got["texts"])
  assert texts == (want if ordered else sorted(want))
  # Tokens in split order match the texts in split order.
  assert got["tokens"] == [[_expected_tokens(s), _expected_tokens(t)] for s, t in got["texts"]]


def _prepared(data_dir: Path, config: str = "de-en") -> bool:
  return (data_dir / "wmt14_translate" / config / "1.0.0" / "dataset_info.json").exists()


def test_wmt14_and_multi30k_download_prepare_without_tensorflow(tmp_path):
  assert importlib.util.find_spec("tensorflow") is None  # cannot be imported at all
  fakes = wmt_fakes.make_fakes(4)
  # A 1-byte buffer sends every split through TFDS's on-disk buckets, the path
  # that splits over 1000 MiB (WMT14 En-De train) take.
  got = _read_all(tmp_path, ["wmt14_translate/de-en", "wmt14_translate/fr-en", "multi30k"],
                  buffer=1)
  assert got["tensorflow_imported"] is False
  n_records = 0
  for xx in ("de", "fr"):
    for split in ("train", "validation", "test"):
      expected = fakes.expected[(f"{xx}-en", split)]
      _check_split(got[f"wmt14_translate/{xx}-en:{split}"], expected, ordered=False)
      n_records += len(expected)
  # Sources per split, as TFDS defines them (pairs with an empty side dropped).
  assert len(fakes.expected[("de-en", "train")]) == 3 * (4 - 2)
  assert len(fakes.expected[("fr-en", "train")]) == 5 * (4 - 2)
  for split in ("train", "validation", "test"):
    _check_split(got[f"multi30k:{split}"], fakes.expected[("multi30k", split)], ordered=True)
    n_records += 4
  assert got["spilled"] == n_records  # every record went through a disk bucket
  # Training text was read line by line (wmt_streaming), giga-fren's .gz included.
  assert got["streamed"] == sorted(
      [f"europarl-v7.{xx}-en.{l}" for xx in ("de", "fr") for l in (xx, "en")]
      + [f"commoncrawl.{xx}-en.{l}" for xx in ("de", "fr") for l in (xx, "en")]
      + [f"news-commentary-v9.{xx}-en.{l}" for xx in ("de", "fr") for l in (xx, "en")]
      + ["undoc.2000.fr-en.fr", "undoc.2000.fr-en.en"]
      + ["giga-fren.release2.fixed.fr.gz", "giga-fren.release2.fixed.en.gz"]
      + [f"newstest2013.{l}" for l in ("de", "fr", "en")])


def _cli(tmp_path, *fake_args, lines=4, preexec_fn=None):
  """`python -m tests.wmt_fakes ... -- --mode=train` on WMT14 de-en (fails in prepare)."""
  cmd = [sys.executable, "-m", "tests.wmt_fakes", f"--lines={lines}", *fake_args, "--",
         "--mode=train", "--dataset=wmt14_translate/de-en", "--source_lang=en",
         "--target_lang=de", f"--tfds_data_dir={tmp_path / 'data'}",
         f"--workdir={tmp_path / 'work'}"]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300, check=False, preexec_fn=preexec_fn)


def _error_lines(stderr: str) -> list[str]:
  # TFDS progress bars share stderr; they end with '\r'.
  return [m.group(0) for m in re.finditer(r"error: [^\r\n]*", stderr)]


@pytest.mark.parametrize("case", ["corrupt_archive", "wrong_checksum"])
def test_failed_download_gives_one_error_line_and_no_dataset(tmp_path, case):
  if case == "corrupt_archive":  # the registered checksum matches the broken bytes
    proc = _cli(tmp_path, f"--corrupt={NC_V9}")
    # The root cause is always in full; the wrapper's message may be shortened.
    want = [r"preparing it failed: ExtractError: Error while extracting .*"
            r"training-parallel-nc-v9",
            r"(Compressed file ended before the end-of-stream marker was reached"
            r" \[cause: EOFError\]|\[cause: EOFError: Compressed file ended before"
            r" the end-of-stream marker was reached\])$"]
  else:
    proc = _cli(tmp_path, f"--bad_checksum={NC_V9}")
    want = [r"preparing it failed: NonMatchingChecksumError: Artifact "
            + re.escape(NC_V9) + r", downloaded to .*, has wrong checksum.*Got:"]
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1, errors
  assert errors[0].startswith(
      f"error: wmt14_translate/de-en/1.0.0 is not prepared in {tmp_path / 'data'}")
  for pattern in want:
    assert re.search(pattern, errors[0]), errors[0]
  assert not _prepared(tmp_path / "data")
  assert not (tmp_path / "work").exists()  # train removes its fresh workdir on error


def _limit_file_size(limit: int):
  def preexec():
    import resource  # pylint: disable=g-import-not-at-top
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


def test_full_disk_gives_one_error_line_and_next_run_prepares(tmp_path):
  # 1000 lines per file: downloads and extracted files stay under 100 kB, the
  # train array_record (~3000 pairs) does not.
  lines, limit = 1000, 100_000
  proc = _cli(tmp_path, lines=lines, preexec_fn=_limit_file_size(limit))
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1, errors
  assert re.search(r"preparing it failed: .*File too large.*"
                   r"\(a file exceeds the file-size limit\)$", errors[0]), errors[0]
  assert not _prepared(tmp_path / "data")
  # Nothing of the failed attempt is taken for data: the next run prepares.
  got = _read_all(tmp_path / "data", ["wmt14_translate/de-en"], lines=lines)
  fakes = wmt_fakes.make_fakes(lines)
  for split in ("train", "validation", "test"):
    assert sorted(map(tuple, got[f"wmt14_translate/de-en:{split}"]["texts"])) == sorted(
        (en, fx) for fx, en in fakes.expected[("de-en", split)])
  assert _prepared(tmp_path / "data")


def test_interrupted_prepare_is_redone(tmp_path):
  marker = tmp_path / "stalled"
  cmd = [sys.executable, "-m", "tests.wmt_fakes", f"--stall_marker={marker}", "--",
         "--mode=train", "--dataset=wmt14_translate/de-en", "--source_lang=en",
         "--target_lang=de", f"--tfds_data_dir={tmp_path / 'data'}",
         f"--workdir={tmp_path / 'work'}"]
  with subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL) as proc:
    try:
      deadline = time.monotonic() + 240
      while not marker.exists():
        assert proc.poll() is None, "prepare ended before the test split"
        assert time.monotonic() < deadline, "prepare never reached the test split"
        time.sleep(0.2)
      # Mid-prepare: train and validation written, test being generated.
      config_dir = tmp_path / "data" / "wmt14_translate" / "de-en"
      partial = [p.name for d in config_dir.glob("incomplete.*") for p in d.iterdir()]
      assert any(n.startswith("wmt14_translate-train.array_record") for n in partial), partial
      assert any(n.startswith("wmt14_translate-validation.array_record") for n in partial)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait(timeout=60)
  assert not _prepared(tmp_path / "data")
  got = _read_all(tmp_path / "data", ["wmt14_translate/de-en"])
  fakes = wmt_fakes.make_fakes(4)
  for split in ("train", "validation", "test"):
    _check_split(got[f"wmt14_translate/de-en:{split}"], fakes.expected[("de-en", split)],
                 ordered=False)
  assert _prepared(tmp_path / "data")


def _fr_en_prepare(tmp_path, *fake_args):
  cmd = [sys.executable, "-m", "tests.wmt_fakes", *fake_args, "--", "--mode=prepare",
         "--dataset=wmt14_translate/fr-en", "--source_lang=en", "--target_lang=fr",
         f"--tfds_data_dir={tmp_path / 'data'}", f"--workdir={tmp_path / 'work'}"]
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300, check=False)


def _one_error(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1, errors
  return errors[0]


def test_damaged_gz_member_of_a_tar_is_named(tmp_path):
  """giga-fren's tar holds .gz files; a damaged one is named with the archive it came from."""
  member = wmt_fakes.damage_gz_member(wmt_fakes.make_fakes(4).files[wmt_fakes.GIGAFREN_URL])[1]
  error = _one_error(_fr_en_prepare(tmp_path, f"--damage_gz_member={wmt_fakes.GIGAFREN_URL}"))
  assert re.search(rf"member {re.escape(member)} of the archive \S*training-giga-fren\S*\.tar"
                   r" \(.*\) is damaged: EOFError: Compressed file ended", error), error
  assert not _prepared(tmp_path / "data", "fr-en")


def test_damaged_tar_extraction_is_not_kept_and_is_redone(tmp_path):
  """A tar whose second header is garbled (its checksum registered, so it downloads): the
  extraction fails naming the archive, nothing partial is put in place, the next run
  extracts it again (and fails the same way, not on files missing from a kept extraction)."""
  extracted = tmp_path / "data" / "downloads" / "extracted"
  for _ in range(2):
    error = _one_error(_fr_en_prepare(tmp_path,
                                      f"--garble_tar_header={wmt_fakes.GIGAFREN_URL}"))
    assert re.search(r"ExtractError: Error while extracting \S*training-giga-fren\S*\.tar.*"
                     r"damaged or truncated after \d+ bytes", error), error
    assert not [p for p in extracted.iterdir() if "giga-fren" in p.name
                and not p.name.startswith("incomplete")]
  assert not _prepared(tmp_path / "data", "fr-en")
