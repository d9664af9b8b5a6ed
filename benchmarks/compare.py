r"""Ours vs the PyTorch peer, measured alternately in one run: each side's medians and the ratios.

  python -m benchmarks.compare --config=small|base|big --what=train|decode [--rounds=3]
      [--peer_python=/work/peer_venv/bin/python] [--peer_compile] [--bf16]

Run from our venv (it starts the peer with --peer_python; create that venv with
`bash benchmarks/peer_setup.sh`). Each round runs every variant once, each in its own
process: ours is benchmarks.train_throughput / benchmarks.decode, the peer benchmarks.peer.
Within a round ours and the peer alternate, and every other round runs in reverse order, so
slow drifts of the machine hit both sides alike.

Both sides get the same explicit workload (--batch, --length / --src_len, --out_len, --beam;
defaults from benchmarks/shapes.py), check it in each result, and have their throughput
computed here by one formula from the workload and the median time:
  train   target tokens/s = batch x length / median step time (no padding: every token counts)
  decode  sentences/s = batch / median seconds per batch (every sentence out_len tokens)
Prints one JSON object: per variant the median over rounds of each run's median time and the
throughput from it; ratios ours / peer (> 1: ours is faster) from those medians and per round.

Variants: ours vs the peer (fp32, eager); --peer_compile adds the peer under torch.compile
(train only); --bf16 adds ours --dtype=bfloat16 vs the peer under torch.autocast(bfloat16);
--allocator adds ours without and the peer with transformer/host.py's malloc settings (ours
applies them by default, as transformer.main does; the peer does not), so the ratio can be
read with the allocator equal on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from absl import app, flags

from benchmarks import shapes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER_PYTHON = "/work/peer_venv/bin/python"
FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (only when run as a program: importing defines none)."""
  shapes.define_flags("Sentences per step / batch")
  flags.DEFINE_enum("what", "train", ["train", "decode"], "Which measurement.")
  flags.DEFINE_integer("rounds", 3, "Rounds; each runs every variant once.")
  flags.DEFINE_string("peer_python", DEFAULT_PEER_PYTHON, "Python of the peer venv.")
  flags.DEFINE_bool("peer_compile", False, "Add the peer under torch.compile (train).")
  flags.DEFINE_bool("bf16", False, "Add ours --dtype=bfloat16 vs the peer under bf16 autocast.")
  flags.DEFINE_bool("allocator", False, "Add ours --noretain_freed_memory and the peer"
                    " --retain_freed_memory (transformer/host.py).")
  flags.DEFINE_integer("length", 0, "train: tokens per sentence (0: the config's).")
  flags.DEFINE_integer("warmup", 0, "Untimed steps / batches per run (0: 3 train, 1 decode).")
  flags.DEFINE_integer("steps", 10, "train: timed steps per run.")
  flags.DEFINE_integer("reps", 5, "decode: timed batches per run.")


class CompareError(Exception):
  """A one-line user-facing problem."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  side: str                   # 'ours' | 'peer'
  args: tuple[str, ...] = ()  # extra command-line arguments


# ratio name -> (our variant, peer variant)
RATIOS = {"ours/peer": ("ours", "peer"), "ours/peer_compile": ("ours", "peer_compile"),
          "ours_bf16/peer_bf16": ("ours_bf16", "peer_bf16"),
          "ours/peer_retain": ("ours", "peer_retain"),
          "ours_noretain/peer": ("ours_noretain", "peer")}
METRIC = {"train": "target_tokens_per_s", "decode": "sentences_per_s"}
TIME = {"train": "median_step_s", "decode": "median_batch_s"}


def variants(what: str, peer_compile: bool, bf16: bool, allocator: bool = False) -> list[Variant]:
  """In run order: ours and the peer alternate."""
  if peer_compile and what != "train":
    raise CompareError("--peer_compile is only supported with --what=train")
  out = [Variant("ours", "ours"), Variant("peer", "peer")]
  if peer_compile:
    out.append(Variant("peer_compile", "peer", ("--compile",)))
  if bf16:
    out += [Variant("ours_bf16", "ours", ("--dtype=bfloat16",)),
            Variant("peer_bf16", "peer", ("--bf16",))]
  if allocator:
    out += [Variant("ours_noretain", "ours", ("--noretain_freed_memory",)),
            Variant("peer_retain", "peer", ("--retain_freed_memory",))]
  return out


def workload(what: str, config: str, batch: int = 0, length: int = 0, src_len: int = 0,
             out_len: int = 0, beam: int = 4) -> dict:
  """The shapes both sides must measure; 0 -> the config's."""
  s = shapes.SHAPES[config]
  if what == "train":
    return {"batch": batch or s.train_batch, "length": length or s.train_length}
  return {"batch": batch or s.decode_batch, "src_len": src_len or s.src_len,
          "out_len": out_len or s.out_len, "beam": beam}


def command(v: Variant, what: str, config: str, work: dict, *, warmup: int, steps: int,
            reps: int, peer_python: str) -> list[str]:
  shape_args = [f"--{k}={x}" for k, x in work.items()]
  timing = [f"--warmup={warmup}"] + ([f"--steps={steps}"] if what == "train" else
                                     [f"--reps={reps}"])
  if v.side == "ours":
    module = "benchmarks.train_throughput" if what == "train" else "benchmarks.decode"
    extra = ["--nomeasure_peak"] if what == "train" else []  # the peak is not compared
    return ([sys.executable, "-m", module, f"--config={config}"] + shape_args + timing
            + extra + list(v.args))
  return ([peer_python, "-m", "benchmarks.peer", f"--config={config}", f"--mode={what}"]
          + shape_args + timing + list(v.args))


def run_json(cmd: list[str]) -> dict:
  """Runs one benchmark process from the repository root; its last JSON line on stdout."""
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    why = next((l for l in reversed(lines) if l.startswith("error:")), lines[-1] if lines else "")
    raise CompareError(f"{shlex.join(cmd)} failed (exit {proc.returncode}): {why}")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise CompareError(f"{shlex.join(cmd)} printed no JSON")


def throughput(what: str, work: dict, seconds: float) -> float:
  """The one formula for both sides (see the module docstring)."""
  if what == "train":
    return work["batch"] * work["length"] / seconds
  return work["batch"] / seconds


def summarize(what: str, work: dict, runs: dict[str, list[dict]]) -> dict:
  """Medians per variant and ours / peer ratios, from each run's JSON (in round order)."""
  time_key, metric = TIME[what], METRIC[what]
  out: dict = {"variants": {}, "ratios": {}, "per_round_ratios": {}}
  for name, results in runs.items():
    for r in results:
      got = {k: r.get(k) for k in work}
      if got != work:
        raise CompareError(f"{name} measured {got}, but the workload is {work}")
    times = [float(r[time_key]) for r in results]
    out["variants"][name] = {
        time_key: float(np.median(times)), metric: throughput(what, work, np.median(times)),
        f"per_round_{time_key}": times,
        f"per_round_{metric}": [throughput(what, work, t) for t in times],
        "reported": {k: results[0].get(k) for k in
                     ("benchmark", "dtype", "compile", "framework", "attention_impl",
                      "attn_implementation", "params", "devices", "threads",
                      "retain_freed_memory")
                     if k in results[0]}}
  for ratio, (ours, peer) in RATIOS.items():
    if ours in runs and peer in runs:
      v = out["variants"]
      out["ratios"][ratio] = v[ours][metric] / v[peer][metric]
      out["per_round_ratios"][ratio] = [
          a / b for a, b in zip(v[ours][f"per_round_{metric}"], v[peer][f"per_round_{metric}"])]
  return out


def compare(what: str, config: str, work: dict, vs: list[Variant], *, rounds: int, warmup: int,
            steps: int, reps: int, peer_python: str,
            runner: Callable[[list[str]], dict] = run_json,
            log: Optional[Callable[[str], None]] = None) -> dict:
  """Runs `rounds` rounds of all variants, alternating, and summarizes."""
  cmds = {v.name: command(v, what, config, work, warmup=warmup, steps=steps, reps=reps,
                          peer_python=peer_python) for v in vs}
  runs: dict[str, list[dict]] = {v.name: [] for v in vs}
  for r in range(rounds):
    order = vs if r % 2 == 0 else vs[::-1]
    for v in order:
      result = runner(cmds[v.name])
      runs[v.name].append(result)
      if log:
        log(f"round {r + 1}/{rounds} {v.name}: {result.get(TIME[what])} s")
  return {"benchmark": "compare", "what": what, "config": config, "rounds": rounds,
          "workload": work, "metric": METRIC[what], "ratio": "ours / peer (> 1: ours faster)",
          **summarize(what, work, runs),
          "commands": {name: shlex.join(c) for name, c in cmds.items()}}


def check_peer_python(path: str) -> None:
  if not (os.path.isfile(path) and os.access(path, os.X_OK)):
    raise CompareError(f"no peer python at {path}; create the peer venv with: bash"
                       " benchmarks/peer_setup.sh (or pass --peer_python=...)")


def main(_):
  try:
    for name in ("rounds", "beam", "steps", "reps"):
      if getattr(FLAGS, name) <= 0:
        raise CompareError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
    for name in ("batch", "length", "src_len", "out_len", "warmup"):
      if getattr(FLAGS, name) < 0:
        raise CompareError(f"--{name} must be positive (0: the default)")
    vs = variants(FLAGS.what, FLAGS.peer_compile, FLAGS.bf16, FLAGS.allocator)
    check_peer_python(FLAGS.peer_python)
    work = workload(FLAGS.what, FLAGS.config, FLAGS.batch, FLAGS.length, FLAGS.src_len,
                    FLAGS.out_len, FLAGS.beam)
    warmup = FLAGS.warmup or (3 if FLAGS.what == "train" else 1)
    result = compare(FLAGS.what, FLAGS.config, work, vs, rounds=FLAGS.rounds, warmup=warmup,
                     steps=FLAGS.steps, reps=FLAGS.reps, peer_python=FLAGS.peer_python,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
