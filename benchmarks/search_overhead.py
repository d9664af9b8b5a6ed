r"""The search's own cost per trial, and whether its workers keep their cores busy.

  python -m benchmarks.search_overhead [--trials=8 --workers=2 --run_seconds=3]

Runs `python -m launch.search` (--workers, --cpus_per_run=1 where there are enough cores) on a
one-parameter study whose trials are trained by a stand-in for `transformer.main`: it spins the
CPU for --run_seconds, then writes one dev evaluation, and records when it ran, on which cores
and its CPU seconds. Prints one JSON object:

  overhead_s_per_trial       (workers x wall - the runs' own seconds) / trials: everything the
                             search adds (worker start, Optuna ask/tell, run files, process start)
  gap_s_between_trials       median time a worker spends between one run's end and its next start
  both_running_fraction      share of the wall time during which `workers` runs ran at once
                             (also from the first run's start to the last run's end)
  core_occupied_fraction     per core (or core set): seconds a run pinned to it ran / wall time
  core_cpu_fraction          per core: the CPU seconds those runs got / wall time (below the
                             occupied fraction only when other processes share the cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SPIN = r"""#!PYTHON
import json, os, resource, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv if a.startswith("--") and "=" in a)
start = time.time()
x = 0
while time.time() - start < SECONDS:
  x += 1
end = time.time()
cpu = resource.getrusage(resource.RUSAGE_SELF)
with open(os.path.join(args["workdir"], "metrics.jsonl"), "a") as f:
  f.write(json.dumps({"step": 1, "kind": "eval", "nll": float(args["dropout_rate"])}) + "\n")
with open(os.path.join(args["workdir"], "spin.json"), "w") as f:
  json.dump({"start": start, "end": end, "cpu": cpu.ru_utime + cpu.ru_stime,
             "cores": sorted(os.sched_getaffinity(0)), "worker": os.getppid()}, f)
"""


def measure(trials: int, workers: int, run_seconds: float, tmp: str) -> dict:
  fake = os.path.join(tmp, "spin_python")
  with open(fake, "w", encoding="utf-8") as f:
    f.write(_SPIN.replace("PYTHON", sys.executable, 1).replace("SECONDS", str(run_seconds)))
  os.chmod(fake, 0o755)
  spec = os.path.join(tmp, "spec.json")
  with open(spec, "w", encoding="utf-8") as f:
    json.dump({"base_flagfile": "experiments/cpu/multi30k_en_de.flags",
               "space": {"dropout_rate": {"type": "float", "low": 0.0, "high": 0.4}},
               "objective": {"metric": "nll", "direction": "minimize"},
               "budget": {"trials": trials}, "sampler": {"name": "tpe", "seed": 0}}, f)
  root = os.path.join(tmp, "root")
  pin = ["--cpus_per_run=1"] if len(os.sched_getaffinity(0)) >= workers else []
  env = dict(os.environ, PYTHONPATH=REPO)
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", "launch.search", spec, f"--root={root}",
                      f"--workers={workers}", *pin, f"--python={fake}"], cwd=REPO, env=env,
                     capture_output=True, text=True, check=False)
  wall = time.time() - t0
  if r.returncode != 0:
    raise SystemExit(f"error: the search failed: {r.stderr.strip().splitlines()[-1:]}")
  runs = []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "spin.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        runs.append(json.load(f))
  if len(runs) != trials:
    raise SystemExit(f"error: {len(runs)} of {trials} trials ran")
  run_total = sum(x["end"] - x["start"] for x in runs)
  gaps = []
  for w in {x["worker"] for x in runs}:
    mine = sorted((x for x in runs if x["worker"] == w), key=lambda x: x["start"])
    gaps += [b["start"] - a["end"] for a, b in zip(mine, mine[1:])]
  # Time during which `workers` runs ran at once: sweep the start/end events.
  events = sorted([(x["start"], 1) for x in runs] + [(x["end"], -1) for x in runs])
  running, last, together = 0, events[0][0], 0.0
  for t, d in events:
    if running >= workers:
      together += t - last
    running, last = running + d, t
  cpu: dict[str, float] = {}
  occupied: dict[str, float] = {}
  for x in runs:
    key = ",".join(map(str, x["cores"]))
    cpu[key] = cpu.get(key, 0.0) + x["cpu"]
    occupied[key] = occupied.get(key, 0.0) + x["end"] - x["start"]
  span = max(x["end"] for x in runs) - min(x["start"] for x in runs)
  return {
      "trials": trials, "workers": workers, "run_seconds": run_seconds,
      "pinned": bool(pin), "wall_s": round(wall, 2),
      "overhead_s_per_trial": round((workers * wall - run_total) / trials, 3),
      "gap_s_between_trials": round(statistics.median(gaps), 3) if gaps else None,
      "both_running_fraction": round(together / wall, 3),
      "both_running_fraction_first_start_to_last_end": round(together / span, 3),
      "core_occupied_fraction": {k: round(v / wall, 3) for k, v in sorted(occupied.items())},
      "core_cpu_fraction": {k: round(v / wall, 3) for k, v in sorted(cpu.items())},
      "target_overhead_s": 5.0,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.search_overhead")
  parser.add_argument("--trials", type=int, default=8)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--run_seconds", type=float, default=3.0)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    result = measure(args.trials, args.workers, args.run_seconds, tmp)
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  result.update(cpu=model, load_1min=os.getloadavg()[0])
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
