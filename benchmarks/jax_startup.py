r"""JAX start-up cost of the installed accelerator plugins on a CPU-only machine.

  python -m benchmarks.jax_startup [--python=/path/to/other/venv/bin/python] [--reps=5]

Times `import jax; jax.devices()` in fresh interpreters (this one's and, with --python,
another venv's, e.g. one without the [tpu]/[gpu] extras), with JAX_PLATFORMS unset and
=cpu, interleaved; prints one JSON object: median seconds, the devices found and the
stderr lines each variant prints.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("python", None, "Another interpreter to compare with.")
flags.DEFINE_integer("reps", 5, "Runs per variant.")
FLAGS = flags.FLAGS

_CODE = "import jax; print(jax.devices())"


def _run(python: str, platforms) -> tuple[float, str, list[str]]:
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  t = time.perf_counter()
  r = subprocess.run([python, "-c", _CODE], env=env, capture_output=True, text=True, check=True)
  return time.perf_counter() - t, r.stdout.strip(), r.stderr.splitlines()


def main(_):
  pythons = [sys.executable] + ([FLAGS.python] if FLAGS.python else [])
  variants = [(p, pl) for p in pythons for pl in (None, "cpu")]
  times = {v: [] for v in variants}
  seen = {}
  for _ in range(FLAGS.reps):
    for v in variants:
      seconds, devices, stderr = _run(*v)
      times[v].append(seconds)
      seen[v] = (devices, stderr)
  print(json.dumps({"benchmark": "jax_startup", "reps": FLAGS.reps, "results": [
      {"python": p, "JAX_PLATFORMS": pl, "median_s": round(statistics.median(times[(p, pl)]), 3),
       "devices": seen[(p, pl)][0], "stderr_lines": len(seen[(p, pl)][1]),
       "stderr_first": seen[(p, pl)][1][:3]} for p, pl in variants]}, indent=1))


if __name__ == "__main__":
  app.run(main)
