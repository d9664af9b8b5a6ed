r"""Training throughput: median step time, tokens/s, model FLOP/s and fraction of measured peak.

  python -m benchmarks.train_throughput --config=small|base|big [--dtype=bfloat16]
      [--batch=N --length=L] [--nomeasure_peak]

Shapes come from `benchmarks/shapes.py` (shared with the PyTorch peer, benchmarks/peer.py);
--batch/--length override the config's sentences per step and tokens per sentence.
Prints one JSON object. The peak is measured in the same run with a large jitted
matmul of the compute dtype (f32 accumulation), so the fraction is a same-machine ratio.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import shapes
from transformer import host, sharding
from transformer.config import ModelConfig, TrainConfig
from transformer.train import Trainer, count_params

CONFIGS = {  # name: (model, batch, length)
    name: (ModelConfig(**shapes.model_config_kwargs(s)), s.train_batch, s.train_length)
    for name, s in shapes.SHAPES.items()}

flags.DEFINE_enum("config", "small", list(CONFIGS),
                  "Model/batch configuration (tiny: smoke tests).")
flags.DEFINE_string("dtype", "float32", "Compute dtype (parameters stay float32).")
flags.DEFINE_string("attention_impl", "einsum", "einsum | xla.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_string("mesh", "data:-1", "Mesh spec.")
flags.DEFINE_bool("remat", False, "Rematerialise layers.")
flags.DEFINE_bool("scan_layers", False, "One nn.scan over the layers of each stack.")
flags.DEFINE_integer("batch", 0, "Sentences per step (0: the config's).")
flags.DEFINE_integer("length", 0, "Tokens per source and per target sentence (0: the config's).")
flags.DEFINE_bool("measure_peak", True, "Also measure the matmul peak (a few seconds).")
host.define_flag()
FLAGS = flags.FLAGS


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
  """(encoder matmul params per source token, decoder + softmax matmul params per target token)."""
  d, h, dk, dv, f = cfg.d_model, cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.d_ff
  attn = 2 * d * h * dk + 2 * d * h * dv
  ffn = 2 * d * f
  enc = cfg.num_encoder_layers * (attn + ffn)
  dec = cfg.num_decoder_layers * (2 * attn + ffn) + cfg.vocab_size * d  # + pre-softmax projection
  return enc, dec


def train_flops(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int) -> float:
  """6 x matmul params x tokens + attention scores/values, forward and backward (x3)."""
  enc, dec = matmul_params(cfg)
  dense = 6 * (enc * batch * src_len + dec * batch * tgt_len)
  h, dk, dv = cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v
  def attn(lq, lk):  # QK^T and AV, forward
    return 2 * batch * h * lq * lk * (dk + dv)
  fwd = (cfg.num_encoder_layers * attn(src_len, src_len)
         + cfg.num_decoder_layers * (attn(tgt_len, tgt_len) + attn(tgt_len, src_len)))
  return dense + 3 * fwd


def measure_peak(dtype, n: int = 2048, reps: int = 5) -> float:
  """GFLOP/s of a jitted n x n x n matmul in `dtype` with float32 accumulation."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / np.median(times) / 1e9


def run(config: str, dtype: str, attention_impl: str, warmup: int, steps: int, mesh_spec: str,
        remat: bool = False, batch: int = 0, length: int = 0, with_peak: bool = True,
        scan_layers: bool = False) -> dict:
  model_cfg, default_batch, default_length = CONFIGS[config]
  batch, length = batch or default_batch, length or default_length
  model_cfg = dataclasses.replace(model_cfg, dtype=dtype, attention_impl=attention_impl, remat=remat,
                                  scan_layers=scan_layers)
  mesh = sharding.make_mesh(mesh_spec)
  trainer = Trainer(model_cfg, TrainConfig(), mesh)
  state = trainer.init_state(0)
  # Random tokens, no padding: every position is a real token; EOS ends each row.
  src, tgt = shapes.train_batch(model_cfg.vocab_size, batch, length)
  gb = sharding.global_batch({"inputs": src, "targets": tgt}, mesh)
  for _ in range(warmup):
    state, m = trainer.train_step(state, gb)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = trainer.train_step(state, gb)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_time = float(np.median(times))
  flops = train_flops(model_cfg, batch, length, length)
  peak = measure_peak(jnp.dtype(dtype)) if with_peak else None
  achieved = flops / step_time / 1e9
  return {"benchmark": "train_throughput", "config": config, "dtype": dtype,
          "attention_impl": attention_impl, "remat": remat, "scan_layers": scan_layers, "batch": batch, "length": length,
          "params": count_params(state.params), "devices": jax.device_count(),
          "median_step_s": step_time, "step_times_s": [round(t, 4) for t in times],
          "source_tokens_per_s": batch * length / step_time,
          "target_tokens_per_s": batch * length / step_time,
          "model_gflop_per_step": flops / 1e9, "achieved_gflop_s": achieved,
          "peak_matmul_gflop_s": peak, "fraction_of_peak": achieved / peak if peak else None}


def main(_):
  if FLAGS.batch < 0 or FLAGS.length < 0:
    print("error: --batch and --length must be positive (0: the config's)", file=sys.stderr)
    sys.exit(2)
  retained = FLAGS.retain_freed_memory and host.retain_freed_memory()  # before JAX's threads
  result = run(FLAGS.config, FLAGS.dtype, FLAGS.attention_impl, FLAGS.warmup, FLAGS.steps,
               FLAGS.mesh, FLAGS.remat, FLAGS.batch, FLAGS.length, FLAGS.measure_peak,
               FLAGS.scan_layers)
  print(json.dumps({**result, "retain_freed_memory": retained}))


if __name__ == "__main__":
  app.run(main)
