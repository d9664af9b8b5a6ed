r"""Peak memory of parsing a WMT text pair: TFDS's whole-file parser vs `wmt_streaming`.

  python -m benchmarks.wmt_parse_memory [--lines=1000000 --words=25]

Writes a synthetic gzipped pair like giga-fren's (`giga-fren.release2.fixed.{fr,en}.gz`,
`--lines` sentences of `--words` words, some outside Latin-1) to a temporary directory, then
in a fresh process each: imports only (baseline), iterates every pair with TFDS's
`translate.wmt._parse_parallel_sentences`, and with `transformer.data.wmt_streaming`.
Prints one JSON object: the uncompressed text size, and per parser the pairs, seconds and
peak RSS (and its excess over the baseline, also relative to the text size).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile

_WORDS = ("le la les de des une un est été déjà où ça œuvre € français phrase traduction"
          " the of and to a in is that for it as was with be by on not he this").split()

_CHILD = r"""
import json, resource, sys, time
from tensorflow_datasets.translate import wmt
from transformer.data import wmt_streaming
mode, f1, f2 = sys.argv[1:4]
start, n = time.perf_counter(), 0
if mode == "tfds":
  for _ in wmt._parse_parallel_sentences(f1, f2):
    n += 1
elif mode == "streaming":
  for _ in wmt_streaming.parse_parallel_text(f1, f2, original=wmt._parse_parallel_sentences):
    n += 1
print(json.dumps({"pairs": n, "seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def _write_pair(directory: str, lines: int, words: int) -> tuple[list[str], int]:
  rng = random.Random(0)
  paths, text_bytes = [], 0
  for lang in ("fr", "en"):
    path = os.path.join(directory, f"giga-fren.release2.fixed.{lang}.gz")
    with gzip.open(path, "wb", compresslevel=1) as f:
      for _ in range(lines):
        line = (" ".join(rng.choice(_WORDS) for _ in range(words)) + "\n").encode("utf-8")
        text_bytes += len(line)
        f.write(line)
    paths.append(path)
  return paths, text_bytes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lines", type=int, default=1_000_000)
  parser.add_argument("--words", type=int, default=25)
  args = parser.parse_args(argv)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [repo, os.environ.get("PYTHONPATH")])))
  with tempfile.TemporaryDirectory() as tmp:
    (f1, f2), text_bytes = _write_pair(tmp, args.lines, args.words)
    runs = {}
    for mode in ("baseline", "tfds", "streaming"):
      out = subprocess.run([sys.executable, "-c", _CHILD, mode, f1, f2], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout
      runs[mode] = json.loads(out.strip().splitlines()[-1])
  text_mb = text_bytes / 2**20
  for mode in ("tfds", "streaming"):
    extra = runs[mode]["peak_rss_mb"] - runs["baseline"]["peak_rss_mb"]
    runs[mode]["over_baseline_mb"] = round(extra, 1)
    runs[mode]["over_baseline_per_text_mb"] = round(extra / text_mb, 2)
  print(json.dumps({"lines": args.lines, "words": args.words,
                    "text_mb_both_sides": round(text_mb, 1),
                    "baseline_peak_rss_mb": runs["baseline"]["peak_rss_mb"],
                    "tfds": runs["tfds"], "streaming": runs["streaming"]}))


if __name__ == "__main__":
  main()
