"""Ahead-of-time compilation for a TPU slice or a GPU node from any machine (--mode=compile).

XLA compiles for an accelerator it does not have: libtpu describes a TPU slice by its
topology name, the CUDA PJRT plugin a GPU node by a `GpuTargetConfigProto`
(transformer/targets/*.txtpb). The programs compiled are the ones a run of the same flags
executes: `Trainer`'s jitted train and eval steps and `BeamSearcher`'s search, with the
run's mesh and shardings, at the largest bucket shape the data pipeline can produce. Only
shapes are needed (vocabulary size from the config, lengths from the bucket flags): no
data, no vocabulary file, no accelerator.

Per program, per device: argument, output (minus donated aliases) and temporary bytes from
`memory_analysis()`, against the chip's memory; FLOPs from `cost_analysis()` (TPU only;
XLA:GPU has none without a GPU) and from the model-FLOP formula `train_flops`, which with
the chip's peak and an assumed MFU gives a step time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import time
from typing import Any, Optional

import numpy as np

from transformer.config import Config, ConfigError, ModelConfig

GiB = 2 ** 30
HEADROOM = 0.10       # "fits" leaves at least this fraction of the memory budget free
GPU_MEM_FRACTION = 0.75  # JAX's default GPU preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION)
# Transformer base and big on 8 P100 (paper section 5.2): seconds per training step of
# ~25000 source + 25000 target tokens.
PAPER_STEP_SECONDS = {"base": 0.4, "big": 1.0}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One slice/node type: how to describe it to the compiler, its memory and peak FLOP/s."""
  name: str               # user-facing, --topology
  platform: str           # 'tpu' | 'cuda'
  topology: str           # libtpu topology name, or the GPU node's '1x1xN'
  devices: int            # devices of one slice/node (a megacore TPU chip is one device)
  memory_bytes: int       # HBM per device
  peak_bf16: float        # dense bf16 matmul FLOP/s per device
  peak_f32: float         # float32 matmuls at XLA's default precision (one bf16 pass on
                          # TPU, TF32 on A100/H100: docs.jax.dev/en/latest/201/precision.html)
  chip_config: Optional[str] = None  # libtpu chip_config_name ('megacore': v4, v5p)
  target_config: Optional[str] = None  # GPU: transformer/targets/<file>
  multislice: bool = False  # --num_slices > 1 allowed

  @property
  def budget_bytes(self) -> int:
    """Memory XLA may use per device: all HBM on TPU; JAX's preallocation on GPU."""
    frac = GPU_MEM_FRACTION if self.platform == "cuda" else 1.0
    return int(self.memory_bytes * frac)


# Memory and peaks: Cloud TPU system architecture pages (v4: 32 GiB, 275 TFLOP/s bf16;
# v5e: 16 GiB, 197; v5p: 95 GiB, 459; v6e: 32 GiB, 918, per chip) and NVIDIA's A100 / H100
# SXM datasheets (dense bf16 312 / 989 TFLOP/s, TF32 156 / 495); GPU memory sizes are the
# target configs' device_memory_size.
ACCELERATORS = {a.name: a for a in (
    Accelerator("v4-8", "tpu", "v4:2x2x1", 4, 32 * GiB, 275e12, 275e12, chip_config="megacore"),
    Accelerator("v5p-8", "tpu", "v5:2x2x1", 4, 95 * GiB, 459e12, 459e12, chip_config="megacore"),
    Accelerator("v5e-8", "tpu", "v5e:2x4", 8, 16 * GiB, 197e12, 197e12),
    Accelerator("v5e-16", "tpu", "v5e:4x4", 16, 16 * GiB, 197e12, 197e12, multislice=True),
    Accelerator("v6e-8", "tpu", "v6e:2x4", 8, 32 * GiB, 918e12, 918e12),
    Accelerator("a100-40gb-x8", "cuda", "1x1x8", 8, 42331013120, 312e12, 156e12,
                target_config="a100_sxm4_40gb.txtpb"),
    Accelerator("a100-80gb-x8", "cuda", "1x1x8", 8, 85100068864, 312e12, 156e12,
                target_config="a100_sxm4_80gb.txtpb"),
    Accelerator("h100-x8", "cuda", "1x1x8", 8, 84942979072, 989e12, 495e12,
                target_config="h100_sxm_80gb.txtpb"),
)}

_TPU_ACCELERATOR_TYPES = {"v4": "v4-8", "v5": "v5p-8", "v5e": "v5litepod-8", "v6e": "v6e-8"}


def accelerator(name: str) -> Accelerator:
  if name not in ACCELERATORS:
    raise ConfigError(f"--topology={name!r} is unknown; one of {', '.join(ACCELERATORS)}")
  return ACCELERATORS[name]


# The [gpu] extra's PJRT plugin: CUDA 13 (pinned), or CUDA 12 where a user installed that one.
CUDA_PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")


def installed(module: str) -> bool:
  """Whether `module` (e.g. 'libtpu', 'jax_plugins.xla_cuda13') can be imported."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # its parent package is missing
    return False


def compile_devices(acc: Accelerator, num_slices: int = 1) -> list:
  """Compile-only devices of the slice(s)/node; ConfigError naming what to install."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if num_slices < 1 or (num_slices > 1 and not acc.multislice):
    multi = [a.name for a in ACCELERATORS.values() if a.multislice]
    raise ConfigError(f"--num_slices={num_slices}: {acc.name} takes 1"
                      f" (several slices: {', '.join(multi)})")
  if acc.platform == "tpu":
    if not installed("libtpu"):
      raise ConfigError(f"--topology={acc.name} needs libtpu: pip install -e '.[tpu]'")
    # Without a TPU, libtpu would otherwise warn that it cannot find its hosts; compiling
    # touches no chip, so several processes may load libtpu at once (its lock file is for
    # processes that own the chips).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                          _TPU_ACCELERATOR_TYPES[acc.topology.split(":")[0]])
    kwargs: dict[str, Any] = {"num_slices": num_slices}
    if acc.chip_config:
      kwargs["chip_config_name"] = acc.chip_config
    return list(topologies.get_topology_desc(platform="tpu", topology_name=acc.topology,
                                             **kwargs).devices)
  if not any(installed(m) for m in CUDA_PLUGINS):
    raise ConfigError(f"--topology={acc.name} needs the CUDA plugin: pip install -e '.[gpu]'")
  path = os.path.join(os.path.dirname(__file__), "targets", acc.target_config)
  with open(path, encoding="utf-8") as f:
    target = f.read()
  return list(topologies.get_topology_desc(platform="cuda", target_config=target,
                                           topology=acc.topology).devices)


# ----------------------------------------------------------------------------
# Shapes: the largest batch each program sees.

def largest_bucket(cfg: Config, length_limit: Optional[int]) -> int:
  """Padded length of the longest bucket: the smallest boundary >= length_limit (the
  training length filter), or the largest boundary (None: no filter, eval and decode)."""
  from transformer.data import pipeline  # pylint: disable=g-import-not-at-top
  spec = cfg.data.bucket_boundaries
  if spec.strip().startswith("auto"):  # lengths chosen from the data: bound by the filter
    _, multiple = pipeline.parse_auto(spec)
    longest = max(cfg.data.max_source_length, cfg.data.max_target_length)
    return -(-longest // multiple) * multiple
  bounds = pipeline.parse_boundaries(spec)
  if length_limit is not None and length_limit <= bounds[-1]:
    return int(bounds[np.searchsorted(bounds, length_limit)])
  if length_limit is not None:  # longer pairs pass the filter: rounded up to 8 as in eval
    return -(-length_limit // 8) * 8
  return int(bounds[-1])


def program_shapes(cfg: Config, batch_multiple: int) -> dict[str, tuple[int, int]]:
  """{'train' | 'eval' | 'decode': (global batch rows, padded length)}."""
  from transformer.data import pipeline  # pylint: disable=g-import-not-at-top
  train_len = largest_bucket(cfg, max(cfg.data.max_source_length, cfg.data.max_target_length))
  eval_len = largest_bucket(cfg, None)
  decode_tokens = max(cfg.decode.decode_tokens_per_batch // cfg.decode.beam_size, 1)
  return {
      "train": (pipeline.bucket_batch_size(train_len, cfg.data.tokens_per_batch, batch_multiple),
                train_len),
      "eval": (pipeline.bucket_batch_size(eval_len, cfg.data.eval_tokens_per_batch,
                                          batch_multiple), eval_len),
      "decode": (pipeline.bucket_batch_size(eval_len, decode_tokens, batch_multiple), eval_len)}


# ----------------------------------------------------------------------------
# Model FLOPs (for MFU-based step times; XLA's own count, with remat recompute, is separate).

def train_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """Model FLOPs of one training step on [batch, length] sources and targets.

  Forward: 2 FLOPs per multiply-add of every weight matrix per token (encoder on source
  tokens; decoder and the pre-softmax projection on target tokens) plus the attention
  products QK^T and AV (causal masking not discounted); backward twice the forward.
  """
  d, h, dk, dv, f = cfg.d_model, cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.d_ff
  attn_weights = d * h * (2 * dk + 2 * dv)          # Wq, Wk [d, h*dk]; Wv, Wo [d|h*dv, ...]
  enc_weights = cfg.num_encoder_layers * (attn_weights + 2 * d * f)
  dec_weights = cfg.num_decoder_layers * (2 * attn_weights + 2 * d * f) + cfg.output_vocab_size * d
  tokens = batch * length
  products = 2 * batch * h * length * length * (dk + dv)  # one attention: QK^T and AV
  forward = (2 * tokens * (enc_weights + dec_weights)
             + products * (cfg.num_encoder_layers + 2 * cfg.num_decoder_layers))
  return 3.0 * forward


def paper_model(cfg: ModelConfig) -> Optional[str]:
  """'base' or 'big' when the architecture is the paper's (Table 3), else None."""
  dims = (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_model, cfg.d_ff, cfg.num_heads)
  return {(6, 6, 512, 2048, 8): "base", (6, 6, 1024, 4096, 16): "big"}.get(dims)


# ----------------------------------------------------------------------------
# Compilation.

def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shard)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


# libtpu's RESOURCE_EXHAUSTED messages: "... required for HLO temporaries (38.31G) exceeds
# available HBM (15.75G)" or "Used 20.3G of 15.75G hbm".
_OOM_BYTES = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM"),
              re.compile(r"[Uu]sed\s+([\d.]+)([KMGT]?)\s+of\s+[\d.]+[KMGT]?\s+hbm"))


def _oom_bytes(message: str) -> Optional[int]:
  """The bytes per device the compiler asked for, from its out-of-memory message."""
  for pattern in _OOM_BYTES:
    m = pattern.search(message)
    if m:
      scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)]
      return int(float(m.group(1)) * scale)
  return None


def _compile(lowered) -> dict[str, Any]:
  """Compiles; memory and FLOPs per device, or the out-of-memory message."""
  return compile_and_measure(lowered)[1]


def compile_and_measure(lowered) -> tuple[Any, dict[str, Any]]:
  """Compiles; (the executable, or None when out of memory; its memory and FLOPs per device)."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    first = next((l for l in text.splitlines() if "RESOURCE_EXHAUSTED" in l), text[:300])
    return None, {"compile_seconds": round(time.time() - t0, 1), "oom": first.strip()[:400],
                  "total_bytes": _oom_bytes(text)}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  out = {"compile_seconds": round(time.time() - t0, 1),
         "argument_bytes": int(mem.argument_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes),
         "alias_bytes": int(mem.alias_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes),
         "code_bytes": int(mem.generated_code_size_in_bytes),
         "xla_flops": float(cost["flops"]) if cost and "flops" in cost else None}
  # Peak: arguments, outputs not written into donated arguments, temporaries, code.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["code_bytes"])
  return compiled, out


def compile_programs(cfg: Config, topology: str, num_slices: int = 1,
                     programs: tuple[str, ...] = ("train", "eval", "decode")) -> dict[str, Any]:
  """Compiles the run's programs for `topology`; a JSON-able report (no printing)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from transformer import sharding  # pylint: disable=g-import-not-at-top
  from transformer.decode import BeamSearcher  # pylint: disable=g-import-not-at-top
  from transformer.train import Trainer  # pylint: disable=g-import-not-at-top

  acc = accelerator(topology)
  devices = compile_devices(acc, num_slices)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  trainer = Trainer(cfg.model, cfg.train, mesh)
  shapes = program_shapes(cfg, sharding.batch_size_multiple(mesh))
  batch_sh = sharding.batch_sharding(mesh)

  def batch_struct(rows, length, keys):
    return {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch_sh) for k in keys}

  state_bytes = _per_device_bytes(trainer.abstract_state)
  param_bytes = _per_device_bytes(trainer.abstract_state.params)
  report: dict[str, Any] = {
      "topology": acc.name, "compiler_topology": acc.topology, "platform": acc.platform,
      "num_slices": num_slices, "devices": len(devices), "mesh": dict(mesh.shape),
      "memory_bytes": acc.memory_bytes, "budget_bytes": acc.budget_bytes,
      "dtype": cfg.model.dtype, "remat": cfg.model.remat, "scan_layers": cfg.model.scan_layers,
      "tokens_per_batch": cfg.data.tokens_per_batch,
      "grad_accum_steps": cfg.train.grad_accum_steps,
      "param_bytes_per_device": param_bytes, "state_bytes_per_device": state_bytes,
      "programs": {}}
  for name in programs:
    rows, length = shapes[name]
    if name == "train":
      lowered = trainer.lower_train_step(batch_struct(rows, length, ("inputs", "targets")))
    elif name == "eval":
      lowered = trainer.lower_eval_step(batch_struct(rows, length, ("inputs", "targets")))
    else:  # translation beam search (--task=parsing's tree constraint needs the vocabulary)
      searcher = BeamSearcher(cfg.model, cfg.decode, mesh, trainer.state_shardings.params)
      lowered = searcher.lower(trainer.abstract_state.params,
                               batch_struct(rows, length, ("inputs",))["inputs"])
    result = {"batch": rows, "length": length, **_compile(lowered)}
    # Eval (and decode with --eval_bleu_sentences) run inside training, while the optimizer
    # state stays in memory: it counts against the same budget.
    in_training = name == "eval" or (name == "decode" and cfg.train.eval_bleu_sentences > 0)
    resident = state_bytes - param_bytes if in_training else 0
    result["resident_bytes"] = resident
    if result["total_bytes"] is not None:
      result["total_bytes"] += resident
    result["fits"] = ("oom" not in result and
                      result["total_bytes"] <= (1.0 - HEADROOM) * acc.budget_bytes)
    if name in ("train", "eval"):
      flops = train_flops(cfg.model, rows, length) / len(devices)
      result["model_flops"] = flops if name == "train" else flops / 3
    report["programs"][name] = result
  return report


def estimate(report: dict[str, Any], cfg: Config, mfu: float) -> dict[str, Any]:
  """Step times at `mfu` of the chip's peak for the compute dtype; adds them to the report."""
  acc = accelerator(report["topology"])
  peak = acc.peak_bf16 if cfg.model.dtype == "bfloat16" else acc.peak_f32
  accum = cfg.train.grad_accum_steps
  out = {"mfu": mfu, "peak_flops_per_s": peak}
  train = report["programs"].get("train")
  if train is not None:
    micro = train["model_flops"] / (mfu * peak)
    out.update(step_seconds=micro * accum, train_flops_per_step=train["model_flops"] * accum,
               train_hours=micro * accum * cfg.train.num_train_steps / 3600,
               num_train_steps=cfg.train.num_train_steps)
    paper = paper_model(cfg.model)
    if paper:
      out.update(paper_model=paper, paper_step_seconds_8xP100=PAPER_STEP_SECONDS[paper],
                 paper_hours_8xP100=PAPER_STEP_SECONDS[paper] * cfg.train.num_train_steps / 3600)
  if "eval" in report["programs"]:
    out["eval_batch_seconds"] = report["programs"]["eval"]["model_flops"] / (mfu * peak)
  report["estimate"] = out
  return report


def advice(report: dict[str, Any], cfg: Config, program: str = "train") -> str:
  """What to change so that `program` fits."""
  mesh = report["mesh"]
  hints = []
  if program == "eval":
    hints.append(f"--eval_tokens_per_batch={max(cfg.data.eval_tokens_per_batch // 2, 1)}")
  elif program == "decode":
    hints.append(f"--decode_tokens_per_batch={max(cfg.decode.decode_tokens_per_batch // 2, 1)}")
  if mesh["fsdp"] < report["devices"]:
    hints.append(f"more fsdp (--mesh=data:1,fsdp:-1,tensor:{mesh['tensor']}) or tensor to"
                 " shard the train state")
  if not cfg.model.remat and program == "train":
    hints.append("--remat")
  k = 2 * cfg.train.grad_accum_steps
  if program == "train":
    hints.append(f"--tokens_per_batch={max(cfg.data.tokens_per_batch // 2, 1)}"
               f" --grad_accum_steps={k} (same tokens per update)")
  return "; ".join(hints)


def _gib(n: Optional[int]) -> str:
  if n is None:
    return "?"
  return f"{n / GiB:.2f} GiB" if n >= GiB // 4 else f"{n / 2 ** 20:.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
  """Human-readable lines: per program memory against the chip, FLOPs, step times."""
  acc = accelerator(report["topology"])
  lines = [f"{acc.name} ({report['compiler_topology']}, {report['devices']} devices"
           + (f", {report['num_slices']} slices" if report["num_slices"] > 1 else "")
           + f"): mesh {report['mesh']}, {_gib(acc.memory_bytes)} per device"
           + (f" (budget {_gib(acc.budget_bytes)}: JAX preallocates"
              f" {GPU_MEM_FRACTION:.0%}, XLA_PYTHON_CLIENT_MEM_FRACTION)"
              if acc.platform == "cuda" else ""),
           f"  parameters {_gib(report['param_bytes_per_device'])} per device, train state"
           f" {_gib(report['state_bytes_per_device'])}"]
  for name, p in report["programs"].items():
    head = f"  {name:6s} [{p['batch']}, {p['length']}]:"
    if "oom" in p:
      lines.append(f"{head} DOES NOT FIT (compiler: {p['oom']})")
      continue
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    free = 1.0 - p["total_bytes"] / acc.budget_bytes
    lines.append(
        f"{head} args {_gib(p['argument_bytes'])}, out {_gib(p['output_bytes'] - p['alias_bytes'])}"
        f" (+{_gib(p['alias_bytes'])} donated), temp {_gib(p['temp_bytes'])}"
        + (f", +{_gib(p['resident_bytes'])} optimizer state" if p["resident_bytes"] else "")
        + f" = {_gib(p['total_bytes'])} of {_gib(acc.budget_bytes)}: {verdict}"
        f" ({free:.0%} free); compiled in {p['compile_seconds']:.0f} s")
    flops = []
    if p.get("model_flops") is not None:
      flops.append(f"model {p['model_flops']:.3g}")
    if p.get("xla_flops") is not None:
      once = name == "decode" or report["scan_layers"]  # XLA counts a loop body once
      flops.append(f"XLA {p['xla_flops']:.3g}" + (" (loop bodies once)" if once else ""))
    if flops:
      lines.append(f"         FLOPs per device per call: {', '.join(flops)}")
  est = report.get("estimate", {})
  if "step_seconds" in est:
    line = (f"  estimate at {est['mfu']:.0%} MFU of {est['peak_flops_per_s'] / 1e12:.0f}"
            f" TFLOP/s ({report['dtype']}): {est['step_seconds']:.3f} s per step"
            f" ({report['grad_accum_steps']} micro-batch(es)), {est['train_hours']:.1f} h for"
            f" {est['num_train_steps']} steps")
    if "paper_model" in est:
      line += (f"; paper ({est['paper_model']}, 8 P100): {est['paper_step_seconds_8xP100']} s"
               f" per step, {est['paper_hours_8xP100']:.1f} h")
    lines.append(line)
  return "\n".join(lines)


def run(cfg: Config, topology: str, num_slices: int = 1, mfu: float = 0.4,
        programs: tuple[str, ...] = ("train", "eval", "decode")) -> dict[str, Any]:
  """--mode=compile: compiles, prints the report and one JSON line; ConfigError if a program
  does not fit (naming what to change)."""
  if not 0.0 < mfu <= 1.0:
    raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
  report = estimate(compile_programs(cfg, topology, num_slices, programs), cfg, mfu)
  print(format_report(report))
  print(json.dumps(report, sort_keys=True))
  bad = [n for n, p in report["programs"].items() if not p["fits"]]
  if bad:
    p = report["programs"][bad[0]]
    raise ConfigError(
        f"{', '.join(bad)} program does not fit {topology} with {HEADROOM:.0%} headroom"
        f" ({_gib(p['total_bytes'])} of {_gib(accelerator(topology).budget_bytes)} per"
        f" device): {advice(report, cfg, bad[0])}")
  return report

