r"""One command that checks a GPU end to end: correctness, a training trace, speed, the main job.

  python -m benchmarks.gpu_check [--bundle=.bundle] [--out=DIR] [--budget_s=480]
  python -m benchmarks.gpu_check --smoke              # the same code paths on the CPU, tiny
  python -m benchmarks.gpu_check --write_trace        # (CPU) rewrite the committed trace

Parts, in this order (each a subprocess except speed and decode, so that nothing holds the
device while the next part starts):
  correctness  the model-vs-numpy, Adam-by-hand and beam-vs-reference tests, on the device,
               at matmul precision 'highest' (they compare against float64 numpy)
  trace        the first 50 training losses of experiments/cpu/multi30k_en_de.flags in float32,
               at precision 'highest' and at the default (TF32 on an H100), against the CPU
               trace committed in benchmarks/traces/ (same vocabulary, data order and seeds)
  main_job     launch/local.sh on that flag file: train, average, evaluate test_2016_flickr
  speed        train tokens/s and MFU for the paper's base and big models, bfloat16 and float32,
               at the largest batch per device whose compiled train step fits (memory figures
               of the compiled program, transformer/aot.py)
  decode       beam-4 sentences/s (benchmarks/decode.py), base model
Prints one JSON line, then a markdown table; --out=DIR also keeps the JSON and the logs.
A part that would start past --budget_s is skipped and says so.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_FLAGS = "experiments/cpu/multi30k_en_de.flags"
TRACE_FILES = {False: "benchmarks/traces/multi30k_cpu_50.json",
               True: "benchmarks/traces/smoke_cpu.json"}
# Trace tolerance (docs/accelerators.md): largest |loss_device - loss_cpu| over the steps at
# precision 'highest'. Float32 with other reduction orders differs by ~1e-6 per operation,
# which 50 steps are expected to amplify to ~1e-3; the CPU losses fall 9.52 -> 7.26 and swing
# by 0.1-0.6 between batches, the size of a real change (another batch, mask or rate).
TRACE_TOLERANCE = 0.02

CORRECTNESS_TESTS = (
    "tests/test_model.py::test_attention_matches_numpy_with_padding_and_causal_masks",
    "tests/test_model.py::test_multihead_attention_matches_numpy_per_head",
    "tests/test_model.py::test_encoder_layer_matches_numpy",
    "tests/test_model.py::test_decoder_layer_matches_numpy",
    "tests/test_train.py::test_three_adam_steps_through_the_train_step_by_hand",
    "tests/test_decode.py::test_beam_four_equals_a_reference_beam_search",
)
# The tiny model of --smoke: the main flag file scaled down, on slices of Multi30k.
SMOKE_MODEL = ["--num_encoder_layers=1", "--num_decoder_layers=1", "--d_model=32", "--d_ff=64",
               "--num_heads=2", "--d_k=16", "--d_v=16", "--vocab_size=300",
               "--tokens_per_batch=256", "--eval_tokens_per_batch=512",
               "--train_split=train[:400]", "--eval_split=validation[:16]",
               "--test_split=test[:8]", "--bucket_boundaries=64", "--max_source_length=64",
               "--max_target_length=64"]  # one bucket: one compiled step
SMOKE_MAIN = ["--num_train_steps=4", "--checkpoint_every_steps=2", "--num_average=2",
              "--eval_every_steps=4", "--eval_bleu_sentences=0", "--log_every_steps=2"]
SMOKE_TESTS = CORRECTNESS_TESTS[4:5]  # the pytest run itself; the other tests run in CI anyway

flags.DEFINE_bool("smoke", False, "Tiny model, few steps, on the CPU (CI).")
flags.DEFINE_bool("write_trace", False, "Only run the float32 trace here and write it to"
                  " benchmarks/traces/ (on the CPU).")
flags.DEFINE_string("platform", None, "JAX_PLATFORMS for every part (default: cpu with"
                    " --smoke/--write_trace, else cuda).")
flags.DEFINE_string("bundle", None, "Folder made by benchmarks/gpu_bundle.sh: its data/multi30k"
                    " and spm.model are used (default: $TRANSFORMER_DATA_DIR, else"
                    " ../shared/data, /multi30k, and the vocabulary is trained).")
flags.DEFINE_string("out", None, "Folder for gpu_check.json and the parts' logs.")
flags.DEFINE_float("budget_s", 480, "Parts that would start after this many seconds are skipped.")
flags.DEFINE_list("parts", ["correctness", "trace", "main_job", "speed", "decode"], "Parts to run.")
flags.DEFINE_integer("trace_steps", 50, "Training steps compared with the CPU trace.")
flags.DEFINE_integer("speed_length", 128, "Tokens per source and target sentence (speed).")
flags.DEFINE_integer("speed_steps", 10, "Timed steps per speed point (after 2 untimed).")
flags.DEFINE_integer("decode_batch", 128, "Sentences per beam-search call (decode).")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Context:
  smoke: bool
  platform: str
  raw_data_dir: str
  vocab_path: Optional[str]
  work: str         # scratch folder (tfds data, workdirs)
  out: Optional[str]
  start: float
  budget_s: float

  def elapsed(self) -> float:
    return time.time() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()

  def log_path(self, name: str) -> str:
    return os.path.join(self.out or self.work, f"{name}.log")


def _env(ctx: Context, precision: Optional[str] = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=ctx.platform, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env["PYTHON"] = sys.executable  # launch/local.sh's interpreter
  # One persistent compilation cache for every part: the main job reuses the trace's steps.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ctx.work, "jax_cache"))
  if precision:
    env["JAX_DEFAULT_MATMUL_PRECISION"] = precision
  else:
    env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
  return env


def _run(ctx: Context, name: str, cmd: list[str], precision: Optional[str] = None,
         timeout: Optional[float] = None) -> tuple[int, str, float]:
  """Runs cmd from the repository root; (return code, output, seconds). Output goes to a log."""
  t0 = time.time()
  timeout = max(1.0, timeout if timeout is not None else ctx.left())
  try:
    p = subprocess.run(cmd, cwd=REPO, env=_env(ctx, precision), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
    rc, text = p.returncode, p.stdout
  except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
    out = e.output or ""
    rc, text = 124, (out.decode(errors="replace") if isinstance(out, bytes) else out)
  with open(ctx.log_path(name), "w", encoding="utf-8") as f:
    f.write(text)
  return rc, text, time.time() - t0


def _tail(text: str, n: int = 3) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return " | ".join(lines[-n:])[-400:]


def versions() -> dict[str, Any]:
  """Installed versions of JAX, its CUDA plugin, and the libraries the run depends on."""
  out = {"python": sys.version.split()[0]}
  names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
           "array_record", "numpy", "sentencepiece", "sacrebleu"]
  names += sorted({d.metadata["Name"] for d in importlib.metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith(("jax-cuda", "nvidia-cu"))})
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


# ----------------------------------------------------------------------------
# correctness

def correctness(ctx: Context) -> dict[str, Any]:
  tests = SMOKE_TESTS if ctx.smoke else CORRECTNESS_TESTS
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
  rc, text, secs = _run(ctx, "correctness", cmd, precision="highest")
  counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", text)}
  return {"ok": rc == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped"),
          "returncode": rc, **counts, "seconds": round(secs, 1),
          "summary": _tail(text, 1)}


# ----------------------------------------------------------------------------
# trace

def _main_cmd(ctx: Context, mode: str, workdir: str, *extra: str) -> list[str]:
  cmd = [sys.executable, "-m", "transformer.main", f"--flagfile={MAIN_FLAGS}",
         f"--raw_data_dir={ctx.raw_data_dir}", f"--workdir={workdir}", f"--mode={mode}",
         f"--tfds_data_dir={os.path.join(ctx.work, 'tfds')}"]
  if ctx.vocab_path:
    cmd.append(f"--vocab_path={ctx.vocab_path}")
  return cmd + (SMOKE_MODEL if ctx.smoke else []) + list(extra)


def read_losses(workdir: str) -> list[tuple[int, float]]:
  """(step, training loss) of every progress line of <workdir>/metrics.jsonl."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("kind") == "train" and "loss" in rec:
        out.append((int(rec["step"]), float(rec["loss"])))
  return out


def run_trace(ctx: Context, steps: int, precision: Optional[str], name: str) -> dict[str, Any]:
  """Trains `steps` steps from scratch logging every step; the losses, or why there are none."""
  workdir = os.path.join(ctx.work, name)
  rc, text, secs = _run(ctx, name, _main_cmd(
      ctx, "train", workdir, f"--num_train_steps={steps}", "--log_every_steps=1",
      f"--eval_every_steps={10 ** 6}", f"--checkpoint_every_steps={10 ** 6}",
      "--eval_bleu_sentences=0"), precision)
  if rc != 0:
    return {"ok": False, "returncode": rc, "seconds": round(secs, 1), "error": _tail(text)}
  losses = read_losses(workdir)
  return {"steps": [s for s, _ in losses], "losses": [l for _, l in losses],
          "seconds": round(secs, 1), "vocab_sha256": _sha256(ctx.vocab_path or
                                                               os.path.join(workdir, "spm.model"))}


def _sha256(path: str) -> Optional[str]:
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def compare_trace(run: dict, ref: dict, tolerance: float) -> dict[str, Any]:
  """Largest |loss - reference loss| over the reference's steps; ok when <= tolerance."""
  got = dict(zip(run["steps"], run["losses"]))
  missing = [s for s in ref["steps"] if s not in got]
  if missing:
    return {"ok": False, "error": f"steps {missing[:5]} missing from the run"}
  diffs = [abs(got[s] - l) for s, l in zip(ref["steps"], ref["losses"])]
  worst = max(range(len(diffs)), key=diffs.__getitem__)
  return {"ok": diffs[worst] <= tolerance, "max_abs_diff": diffs[worst],
          "at_step": ref["steps"][worst], "mean_abs_diff": sum(diffs) / len(diffs),
          "tolerance": tolerance, "same_vocab": run.get("vocab_sha256") == ref["vocab_sha256"]}


def trace(ctx: Context) -> dict[str, Any]:
  path = os.path.join(REPO, TRACE_FILES[ctx.smoke])
  with open(path, encoding="utf-8") as f:
    ref = json.load(f)
  steps = ref["steps"][-1]
  out: dict[str, Any] = {"reference": os.path.relpath(path, REPO), "steps": steps}
  for precision, key in (("highest", "fp32_highest"), (None, "fp32_default")):
    r = run_trace(ctx, steps, precision, f"trace_{key}")
    if "losses" in r:
      out[key] = {**compare_trace(r, ref, TRACE_TOLERANCE), "seconds": r["seconds"],
                  "first_losses": [round(l, 4) for l in r["losses"][:3]]}
    else:
      out[key] = r
  # Pass/fail on 'highest'; the default precision (TF32 matmuls on an H100) is reported.
  out["ok"] = bool(out["fp32_highest"].get("ok"))
  return out


def write_trace(ctx: Context, steps: int) -> dict[str, Any]:
  r = run_trace(ctx, steps, "highest", "write_trace")
  if "losses" not in r:
    return r
  cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  model = re.search(r"Model name:\s*(.*)", cpu)
  record = {"flags": MAIN_FLAGS, "extra_flags": SMOKE_MODEL if ctx.smoke else [],
            "matmul_precision": "highest", "dtype": "float32", "platform": ctx.platform,
            "cpu": model.group(1).strip() if model else None, "jax": versions()["jax"],
            "vocab_sha256": r["vocab_sha256"], "steps": r["steps"], "losses": r["losses"]}
  path = os.path.join(REPO, TRACE_FILES[ctx.smoke])
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  return {"written": os.path.relpath(path, REPO), "steps": len(r["steps"]),
          "seconds": r["seconds"]}


# ----------------------------------------------------------------------------
# main job

def main_job(ctx: Context) -> dict[str, Any]:
  workdir = os.path.join(ctx.work, "main_job")
  extra = [f"--raw_data_dir={ctx.raw_data_dir}", f"--tfds_data_dir={os.path.join(ctx.work, 'tfds')}"]
  if ctx.vocab_path:
    extra.append(f"--vocab_path={ctx.vocab_path}")
  extra += (SMOKE_MODEL + SMOKE_MAIN) if ctx.smoke else []
  cmd = ["bash", "launch/local.sh", workdir, MAIN_FLAGS, *extra]
  rc, text, secs = _run(ctx, "main_job", cmd)
  out: dict[str, Any] = {"returncode": rc, "wall_s": round(secs, 1)}
  out.update({m: t for m, t in re.findall(r"\[local\.sh\] (\w+) took (\d+:\d\d:\d\d)", text)})
  reports = glob.glob(os.path.join(workdir, "*.averaged.json"))
  if rc == 0 and reports:
    with open(reports[0], encoding="utf-8") as f:
      rep = json.load(f)
    out.update({"split": rep["split"], "step": rep["step"], "sentences": rep["sentences"],
                "sacrebleu": round(rep["sacrebleu"], 2),
                "signature": rep["sacrebleu_signature"],
                "test_perplexity": round(rep["test_perplexity"], 3)})
  else:
    out["error"] = "timed out" if rc == 124 else _tail(text)
  out["ok"] = rc == 0 and "sacrebleu" in out
  return out


# ----------------------------------------------------------------------------
# speed and decode (in this process)

def peak_flops(device, dtype: str) -> tuple[Optional[float], str]:
  """The chip's dense peak for `dtype` matmuls at default precision, and where it comes from."""
  from transformer import aot  # pylint: disable=g-import-not-at-top
  kind = getattr(device, "device_kind", "") or ""
  if re.search(r"H100|H200|GH200", kind):  # the same tensor cores and clocks
    acc = aot.ACCELERATORS["h100-x8"]
    return (acc.peak_bf16 if dtype == "bfloat16" else acc.peak_f32), "H100/H200 SXM datasheet"
  if "A100" in kind:
    acc = aot.ACCELERATORS["a100-80gb-x8"]
    return (acc.peak_bf16 if dtype == "bfloat16" else acc.peak_f32), "A100 SXM datasheet"
  return None, f"no datasheet peak for {kind!r}: measured matmul"


def speed_point(config: str, dtype: str, length: int, steps: int, budget_bytes: int,
                max_rows: int, probe_rows: int, peak_n: int = 2048) -> dict[str, Any]:
  """Largest batch that fits (from compiled memory figures), then its train tokens/s and MFU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import shapes, train_throughput  # pylint: disable=g-import-not-at-top
  from transformer import aot, sharding  # pylint: disable=g-import-not-at-top
  from transformer.config import TrainConfig  # pylint: disable=g-import-not-at-top
  from transformer.train import Trainer  # pylint: disable=g-import-not-at-top

  model_cfg = dataclasses.replace(train_throughput.CONFIGS[config][0], dtype=dtype)
  mesh = sharding.make_mesh("data:-1", jax.devices()[:1])
  trainer = Trainer(model_cfg, TrainConfig(), mesh)
  param_bytes = aot._per_device_bytes(trainer.abstract_state.params)  # pylint: disable=protected-access
  limit = (1.0 - aot.HEADROOM) * budget_bytes
  batch_sh = sharding.batch_sharding(mesh)

  def compile_rows(rows):
    struct = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sh)
    return aot.compile_and_measure(trainer.lower_train_step({"inputs": struct, "targets": struct}))

  probes = {}
  _, m0 = compile_rows(probe_rows)
  probes[probe_rows] = m0
  # Bytes per row: temporaries above the gradients (one float32 copy of the parameters).
  per_row = max(m0["temp_bytes"] - param_bytes, m0["temp_bytes"] / 4) / probe_rows
  rows = int(min(max_rows, probe_rows + (limit - m0["total_bytes"]) / per_row)) // 8 * 8
  rows = max(rows, probe_rows)
  compiled, m = compile_rows(rows)
  probes[rows] = m
  if compiled is None or m["total_bytes"] > limit:  # the line underestimated: its secant
    slope = (m["total_bytes"] - m0["total_bytes"]) / max(rows - probe_rows, 1)
    rows = max(probe_rows, int(probe_rows + (limit - m0["total_bytes"]) / slope) // 8 * 8)
    compiled, m = compile_rows(rows)
    probes[rows] = m
  if compiled is None:
    return {"config": config, "dtype": dtype, "ok": False, "error": m.get("oom")}
  # The largest batch on the line through the two compiles (bytes grow ~linearly with rows).
  slope = (m["total_bytes"] - m0["total_bytes"]) / max(rows - probe_rows, 1)
  line_max = (int(probe_rows + (limit - m0["total_bytes"]) / slope) if slope > 0 else None)
  state = trainer.init_state(0)
  src, tgt = shapes.train_batch(model_cfg.vocab_size, rows, length)
  gb = sharding.global_batch({"inputs": src, "targets": tgt}, mesh)
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    state, metrics = compiled(state, gb)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - t)
  del state
  times.sort()
  step_s = times[len(times) // 2]
  flops = aot.train_flops(model_cfg, rows, length)
  peak, peak_source = peak_flops(jax.devices()[0], dtype)
  if peak is None:
    peak = train_throughput.measure_peak(jnp.dtype(dtype), n=peak_n) * 1e9
  return {"config": config, "dtype": dtype, "ok": True, "rows": rows, "length": length,
          "bytes": m["total_bytes"], "budget_bytes": budget_bytes,
          "probe_bytes": {str(k): v["total_bytes"] for k, v in probes.items()},
          "line_max_rows": line_max,
          "median_step_s": round(step_s, 5),
          "target_tokens_per_s": round(rows * length / step_s),
          "model_tflop_s": float(f"{flops / step_s / 1e12:.4g}"),
          "peak_tflop_s": float(f"{peak / 1e12:.4g}"),
          "peak_source": peak_source, "mfu": round(flops / step_s / peak, 4)}


def speed(ctx: Context) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  # The allocator's limit on GPU (JAX preallocates 75%); the CPU has none: a small cap.
  budget = int(stats.get("bytes_limit") or 2 ** 30)
  configs = ["tiny"] if ctx.smoke else ["base", "big"]
  length = 8 if ctx.smoke else FLAGS.speed_length
  points, skipped = [], []
  for config in configs:
    for dtype in ("bfloat16", "float32"):
      if ctx.left() < (10 if ctx.smoke else 60):
        skipped.append(f"{config}/{dtype}")
        continue
      t0 = time.time()
      p = speed_point(config, dtype, length, 2 if ctx.smoke else FLAGS.speed_steps, budget,
                      max_rows=16 if ctx.smoke else 4096, probe_rows=4 if ctx.smoke else 16,
                      peak_n=256 if ctx.smoke else 2048)
      p["seconds"] = round(time.time() - t0, 1)
      points.append(p)
  return {"ok": all(p["ok"] for p in points) and not skipped, "points": points,
          "skipped_for_budget": skipped, "device_memory_limit_bytes": budget}


def decode_speed(ctx: Context) -> dict[str, Any]:
  from benchmarks import decode  # pylint: disable=g-import-not-at-top
  config = "tiny" if ctx.smoke else "base"
  points, skipped = [], []
  for dtype in ("float32", "bfloat16"):
    if ctx.left() < (5 if ctx.smoke else 30):
      skipped.append(f"{config}/{dtype}")
      continue
    r = decode.run(config, batch=0 if ctx.smoke else FLAGS.decode_batch, beam=4, dtype=dtype,
                   warmup=1, reps=2 if ctx.smoke else 5)
    points.append({k: r[k] for k in ("config", "dtype", "batch", "src_len", "out_len", "beam",
                                     "median_batch_s", "sentences_per_s", "first_call_s")})
  return {"ok": len(points) == 2, "points": points, "skipped_for_budget": skipped}


# ----------------------------------------------------------------------------
# report

def markdown(result: dict[str, Any]) -> str:
  rows = ["| part | result | details | s |", "|---|---|---|---|"]
  ok = lambda part: "pass" if part.get("ok") else "FAIL"  # pylint: disable=unnecessary-lambda-assignment
  p = result["parts"]
  if "correctness" in p:
    c = p["correctness"]
    rows.append(f"| correctness (precision highest) | {ok(c)} | {c.get('passed', 0)} passed,"
                f" {c.get('failed', 0)} failed | {c['seconds']} |")
  if "trace" in p:
    for key in ("fp32_highest", "fp32_default"):
      t = p["trace"].get(key, {})
      if "max_abs_diff" in t:
        rows.append(f"| trace {key}, {p['trace']['steps']} steps vs CPU |"
                    f" {ok(t) if key == 'fp32_highest' else 'info'} | max abs diff"
                    f" {t['max_abs_diff']:.2e} at step {t['at_step']} (tolerance"
                    f" {t['tolerance']}), same vocab {t['same_vocab']} | {t['seconds']} |")
      else:
        rows.append(f"| trace {key} | FAIL | {t.get('error')} | {t.get('seconds')} |")
  if "main_job" in p:
    m = p["main_job"]
    detail = (f"sacreBLEU {m['sacrebleu']} on {m['split']} (step {m['step']}); train"
              f" {m.get('train')}, average {m.get('average')}, evaluate {m.get('evaluate')}"
              if m.get("ok") else m.get("error"))
    rows.append(f"| main job | {ok(m)} | {detail} | {m['wall_s']} |")
  for s in p.get("speed", {}).get("points", []):
    detail = (f"{s['rows']} x {s['length']} tokens, {s['bytes'] / 2 ** 30:.1f} GiB of"
              f" {s['budget_bytes'] / 2 ** 30:.1f}; {s['target_tokens_per_s']} tgt tok/s;"
              f" {s['model_tflop_s']} TFLOP/s = MFU {s['mfu']:.1%} of {s['peak_tflop_s']}"
              if s["ok"] else s.get("error"))
    rows.append(f"| train {s['config']} {s['dtype']} | {ok(s)} | {detail} | {s.get('seconds')} |")
  for part, what in (("speed", "train"), ("decode", "decode")):
    for name in p.get(part, {}).get("skipped_for_budget", []):
      rows.append(f"| {what} {name} | skipped | over --budget_s | |")
  for d in p.get("decode", {}).get("points", []):
    rows.append(f"| decode {d['config']} {d['dtype']} beam {d['beam']} | done | batch"
                f" {d['batch']}, {d['out_len']} tokens out: {d['sentences_per_s']:.1f}"
                f" sentences/s | |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  unknown = set(FLAGS.parts) - {"correctness", "trace", "main_job", "speed", "decode"}
  if unknown:
    print(f"error: --parts: unknown {sorted(unknown)}", file=sys.stderr)
    sys.exit(2)
  cpu_only = FLAGS.smoke or FLAGS.write_trace
  platform = FLAGS.platform or ("cpu" if cpu_only else "cuda")
  os.environ["JAX_PLATFORMS"] = platform  # this process (speed, decode) and every part
  if FLAGS.bundle:
    raw, vocab = os.path.join(FLAGS.bundle, "data", "multi30k"), os.path.join(FLAGS.bundle,
                                                                             "spm.model")
  else:
    data = os.environ.get("TRANSFORMER_DATA_DIR",
                          os.path.join(os.path.dirname(REPO), "shared", "data"))
    raw, vocab = os.path.join(data, "multi30k"), None
  if not os.path.exists(os.path.join(raw, "train.en")):
    print(f"error: no Multi30k at {raw}: pass --bundle=DIR (benchmarks/gpu_bundle.sh)",
          file=sys.stderr)
    sys.exit(2)
  if vocab and not os.path.exists(vocab):
    print(f"error: no vocabulary at {vocab}: rebuild the bundle", file=sys.stderr)
    sys.exit(2)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
    ctx = Context(smoke=FLAGS.smoke, platform=platform, raw_data_dir=os.path.abspath(raw),
                  vocab_path=os.path.abspath(vocab) if vocab else None, work=work,
                  out=FLAGS.out, start=time.time(), budget_s=FLAGS.budget_s)
    if FLAGS.write_trace:
      print(json.dumps(write_trace(ctx, FLAGS.trace_steps)))
      return
    parts = {"correctness": correctness, "trace": trace, "main_job": main_job,
             "speed": speed, "decode": decode_speed}
    result: dict[str, Any] = {"check": "gpu_check", "smoke": ctx.smoke, "platform": platform,
                              "versions": versions(), "parts": {}}
    for name in ("correctness", "trace", "main_job", "speed", "decode"):
      if name not in FLAGS.parts:
        continue
      if ctx.left() <= 0:
        result["parts"][name] = {"ok": False, "skipped": "over --budget_s"}
        continue
      result["parts"][name] = parts[name](ctx)
    import jax  # pylint: disable=g-import-not-at-top  (after the subprocess parts)
    result["device"] = jax.devices()[0].device_kind
    result["wall_s"] = round(ctx.elapsed(), 1)
    result["ok"] = all(p.get("ok") for p in result["parts"].values())
  line = json.dumps(result, sort_keys=True)
  if FLAGS.out:
    with open(os.path.join(FLAGS.out, "gpu_check.json"), "w", encoding="utf-8") as f:
      f.write(line + "\n")
  print(line)
  print(markdown(result))
  sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
  app.run(main)
