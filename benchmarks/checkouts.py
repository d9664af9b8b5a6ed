r"""Two checkouts of this repository, measured alternately in one run: medians and their ratio.

  python -m benchmarks.checkouts --a=/path/to/old --b=/path/to/new --bench=train|decode
      [--bench_config=small] [--ab_rounds=4] [-- extra benchmark flags]

For a change that must keep the speed (a refactor): each round runs benchmarks.train_throughput
(`median_step_s`) or benchmarks.decode (`median_batch_s`) once in each checkout, each in its
own process with the checkout as its working directory and first on `sys.path`; every other
round runs b before a, so a slow drift of the machine hits both alike. Prints one JSON object:
per checkout the per-round medians and their median, and the ratio b / a of the medians
(< 1: b is faster) with its per-round values, whose spread is the noise to judge it by.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import numpy as np
from absl import app, flags

flags.DEFINE_string("a", None, "Checkout A (e.g. a `git worktree` of the old commit).")
flags.DEFINE_string("b", None, "Checkout B.")
flags.DEFINE_enum("bench", "train", ["train", "decode"], "Which benchmark.")
flags.DEFINE_string("bench_config", "small", "--config of the benchmark.")
flags.DEFINE_integer("ab_rounds", 4, "Rounds; each runs A and B once.")
flags.DEFINE_string("bench_python", sys.executable, "Interpreter for both checkouts.")
FLAGS = flags.FLAGS

_BENCH = {"train": ("benchmarks.train_throughput", "median_step_s"),
          "decode": ("benchmarks.decode", "median_batch_s")}


def _run(checkout: str, extra: list[str]) -> float:
  """Seconds measured by the benchmark of --bench, run in `checkout`."""
  module, key = _BENCH[FLAGS.bench]
  cmd = [FLAGS.bench_python, "-m", module, f"--config={FLAGS.bench_config}", *extra]
  env = dict(os.environ, PYTHONPATH=checkout)
  proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"error: {' '.join(cmd)} in {checkout} exited {proc.returncode}:\n"
                     f"{proc.stderr[-2000:]}")
  return float(json.loads(proc.stdout.strip().splitlines()[-1])[key])


def measure(a: str, b: str, rounds: int, runner: Callable[[str], float]) -> dict[str, Any]:
  """Alternates runner(a) and runner(b) (b first in odd rounds); medians and ratios b / a."""
  times: dict[str, list[float]] = {a: [], b: []}
  for r in range(rounds):
    for path in ((a, b) if r % 2 == 0 else (b, a)):
      times[path].append(runner(path))
  med_a, med_b = float(np.median(times[a])), float(np.median(times[b]))
  return {"a": {"path": a, "seconds": times[a], "median_s": med_a},
          "b": {"path": b, "seconds": times[b], "median_s": med_b},
          "ratio_b_over_a": med_b / med_a,
          "ratio_per_round": [tb / ta for ta, tb in zip(times[a], times[b])]}


def main(argv):
  extra = argv[1:]
  for name in ("a", "b"):
    path = getattr(FLAGS, name)
    if not path or not os.path.isfile(os.path.join(path, "transformer", "model.py")):
      raise SystemExit(f"error: --{name}={path!r} is not a checkout of this repository")
  if os.path.realpath(FLAGS.a) == os.path.realpath(FLAGS.b):
    raise SystemExit("error: --a and --b are the same checkout")
  out = measure(FLAGS.a, FLAGS.b, FLAGS.ab_rounds, lambda path: _run(path, extra))
  print(json.dumps({"bench": FLAGS.bench, "config": FLAGS.bench_config, "rounds": FLAGS.ab_rounds,
                    "extra": extra, **out}))


if __name__ == "__main__":
  app.run(main)
