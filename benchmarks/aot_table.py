r"""The paper's configurations compiled ahead of time for TPU slices and GPU nodes.

  python -m benchmarks.aot_table [--configs=base_en_de,big_en_de,...]
      [--topologies=v5e-8,v4-8,a100-40gb-x8,h100-x8] [--programs=train,eval,decode]
      [--search_topologies=v5e-8,a100-40gb-x8] [--out=results.jsonl]

Part 1: each experiments/paper/<config>.flags on each topology (its own mesh, batch,
dtype): bytes per device of every program, fit, FLOPs, estimated step time.
Part 2 (--search_topologies): the largest --tokens_per_batch per device whose train step
fits (with HEADROOM), with and without --remat, for the base and big models (En-De
vocabulary): a secant step on the measured bytes (they grow ~linearly with the batch)
then a bisection over compiles, to a resolution of --resolution tokens per device.
Every result is one JSON line (also appended to --out as it is measured); a markdown
table follows at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for accelerators from the host CPU

from absl import app, flags  # pylint: disable=g-import-not-at-top

from transformer import aot, config as config_lib  # pylint: disable=g-import-not-at-top

flags.DEFINE_list("configs", ["base_en_de", "base_en_fr", "big_en_de", "big_en_fr"],
                  "experiments/paper/<name>.flags")
flags.DEFINE_list("topologies", ["v5e-8", "v4-8", "a100-40gb-x8", "h100-x8"], "Part 1 targets.")
flags.DEFINE_list("programs", ["train", "eval", "decode"], "Programs compiled in part 1.")
flags.DEFINE_list("search_topologies", [], "Part 2 targets (empty: skip).")
flags.DEFINE_list("search_models", ["base_en_de", "big_en_de"], "Part 2 configurations.")
flags.DEFINE_list("search_remat", ["false", "true"], "Part 2: --remat settings searched.")
flags.DEFINE_integer("resolution", 1024, "Part 2: tokens per device resolution.")
flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed for step times.")
flags.DEFINE_list("extra_flags", [], "Flags added to every configuration, e.g. --scan_layers"
                  " (one compiled layer per stack: compiles several times faster).")
flags.DEFINE_string("out", None, "Also append every JSON line to this file.")
flags.DEFINE_string("render", None, "Only print the markdown tables of this file's JSON lines"
                    " (written by --out), compiling nothing.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(name: str, *extra: str) -> config_lib.Config:
  # Nested --flagfile paths are relative to the repository root.
  return config_lib.from_args([f"--flagfile=experiments/paper/{name}.flags",
                               *FLAGS.extra_flags, *extra], cwd=REPO)


def _emit(record: dict) -> None:
  line = json.dumps(record, sort_keys=True)
  print(line, flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def _train_total(name: str, topology: str, tokens_per_device: int, remat: bool) -> dict:
  """Compiles the train step at this per-device batch; bytes, fit and compile time."""
  devices = aot.accelerator(topology).devices
  cfg = _cfg(name, f"--tokens_per_batch={tokens_per_device * devices}",
             "--remat" if remat else "--noremat")
  report = aot.compile_programs(cfg, topology, programs=("train",))
  p = report["programs"]["train"]
  rec = {"part": "search", "config": name, "topology": topology, "remat": remat,
         "tokens_per_device": tokens_per_device, "batch": p["batch"], "length": p["length"],
         "total_bytes": p["total_bytes"], "fits": p["fits"], "oom": "oom" in p,
         "compile_seconds": p["compile_seconds"]}
  _emit(rec)
  return rec


def search(name: str, topology: str, remat: bool, resolution: int) -> dict:
  """Largest tokens per device (multiple of resolution) whose train step fits."""
  limit = (1.0 - aot.HEADROOM) * aot.accelerator(topology).budget_bytes
  lo_t, hi_t = None, None  # largest known fit, smallest known non-fit
  probes = {}

  def probe(t):
    r = _train_total(name, topology, t, remat)
    probes[t] = r
    return r

  a = probe(2048)
  b = probe(8192)
  for r in (a, b):
    if r["fits"]:
      lo_t = max(lo_t or 0, r["tokens_per_device"])
    elif hi_t is None or r["tokens_per_device"] < hi_t:
      hi_t = r["tokens_per_device"]
  if a["total_bytes"] and b["total_bytes"] and b["total_bytes"] > a["total_bytes"]:
    slope = (b["total_bytes"] - a["total_bytes"]) / (8192 - 2048)
    guess = int((2048 + (limit - a["total_bytes"]) / slope) // resolution * resolution)
    guess = max(resolution, min(guess, 16 * 8192))
    if guess not in probes:
      r = probe(guess)
      if r["fits"]:
        lo_t = max(lo_t or 0, guess)
        if hi_t is None and probe(guess + resolution)["fits"]:  # the line underestimated
          lo_t = guess + resolution
        elif hi_t is None:
          hi_t = guess + resolution
      else:
        hi_t = guess if hi_t is None else min(hi_t, guess)
  # Bisection between the largest fit and the smallest non-fit.
  if lo_t is None:
    lo_t, hi_t = 0, hi_t or 2048
  while hi_t is None:  # everything probed fits: double
    t = 2 * lo_t
    if probe(t)["fits"]:
      lo_t = t
    else:
      hi_t = t
  while hi_t - lo_t > resolution:
    t = (lo_t + hi_t) // 2 // resolution * resolution
    if t in (lo_t, hi_t):
      break
    if probe(t)["fits"]:
      lo_t = t
    else:
      hi_t = t
  rec = {"part": "search_result", "config": name, "topology": topology, "remat": remat,
         "scan_layers": "--scan_layers" in FLAGS.extra_flags,
         "max_tokens_per_device": lo_t, "first_non_fit": hi_t,
         "total_bytes_at_max": probes[lo_t]["total_bytes"] if lo_t in probes else None,
         "compiles": len(probes)}
  _emit(rec)
  return rec


def _gib(n):
  return "OOM" if n is None else f"{n / aot.GiB:.2f}"


def main(argv):
  del argv
  rows, found = [], []
  if FLAGS.render:
    with open(FLAGS.render, encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.strip()]
    render([r for r in records if r["part"] == "table"],
           [r for r in records if r["part"] == "search_result"])
    return
  for name in FLAGS.configs:
    for topology in FLAGS.topologies:
      cfg = _cfg(name)
      t0 = time.time()
      report = aot.estimate(aot.compile_programs(cfg, topology, programs=tuple(FLAGS.programs)),
                            cfg, FLAGS.mfu)
      rec = {"part": "table", "config": name, "seconds": round(time.time() - t0, 1), **report}
      _emit(rec)
      rows.append(rec)
  for topology in FLAGS.search_topologies:
    for name in FLAGS.search_models:
      for remat in (v.lower() == "true" for v in FLAGS.search_remat):
        found.append(search(name, topology, remat, FLAGS.resolution))
  render(rows, found)


def render(rows: list[dict], found: list[dict]) -> None:
  """Markdown: one row per compiled program; one per searched batch limit."""
  print("\n| config | topology | program [batch, length] | GiB per device (budget) | fits |"
        " model FLOPs/device | est. step (s) | paper 8xP100 (s) | compile (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    acc = aot.accelerator(r["topology"])
    for prog, p in r["programs"].items():
      est = r["estimate"]
      step = f"{est['step_seconds']:.3f}" if prog == "train" else ""
      paper = str(est.get("paper_step_seconds_8xP100", "")) if prog == "train" else ""
      flops = f"{p['model_flops']:.3g}" if p.get("model_flops") else ""
      print(f"| {r['config']}{' (scan)' if r['scan_layers'] else ''} | {r['topology']} | {prog} [{p['batch']}, {p['length']}] |"
            f" {_gib(p['total_bytes'])} ({acc.budget_bytes / aot.GiB:.1f}) |"
            f" {'yes' if p['fits'] else '**no**'} | {flops} | {step} | {paper} |"
            f" {p['compile_seconds']:.0f} |")
  if found:
    print("\n| config | topology | remat | max tokens per device | GiB at max |"
          " first that does not fit | compiles |")
    print("|---|---|---|---|---|---|---|")
    for r in found:
      print(f"| {r['config']}{' (scan)' if r.get('scan_layers') else ''} | {r['topology']} |"
            f" {r['remat']} | {r['max_tokens_per_device']} | {_gib(r['total_bytes_at_max'])} |"
            f" {r['first_non_fit']} | {r['compiles']} |")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
