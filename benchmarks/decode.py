r"""Beam-search decoding speed: beam 4 over the KV cache, a fixed number of output tokens.

  python -m benchmarks.decode --config=small|base|big [--batch=N --src_len=L --out_len=T --beam=4]
      [--dtype=bfloat16] [--cache_segment=C] [--warmup=1 --reps=5]

Prints one JSON object: median seconds per batch over the timed repetitions (each a
different random source batch of the same shape; compilation is in the untimed warm-up),
sentences/s, output tokens/s, and how often the search was compiled (1 expected).

Defaults per config (benchmarks/shapes.py): batch 64 (small), 32 (base), 16 (big); 24 source
tokens and 24 output tokens per sentence (both incl. EOS), beam 4, alpha 0.6, fp32, the
library's default attention for the encoder (xla, as --mode=translate; the decoder steps use
the einsum attention over the head-major cache of transformer/kv_cache.py whatever the
flag), randomly initialised parameters, and the jitted BeamSearcher of transformer/decode.py
over a mesh of all devices (one on a CPU).

Fixed work: random weights would end sentences at random lengths, so `forbid_eos` gives EOS
a constant logit of -1000 (the others are O(1)): beam search never picks it before the length
limit, which is set to out_len, where only EOS may follow. Every sentence thus takes exactly
out_len decoder steps and outputs out_len - 1 tokens + EOS; `shapes.check_fixed_length`
verifies it after timing.
The peer (benchmarks/peer.py) does the same work with min_new_tokens=out_len - 1,
max_new_tokens=out_len and a forced final EOS.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import shapes
from transformer import host, sharding
from transformer.config import EOS_ID, DecodeConfig, ModelConfig
from transformer.decode import BeamSearcher
from transformer.model import Transformer
from transformer.train import count_params

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (only when run as a program: importing defines none)."""
  shapes.define_flags()
  flags.DEFINE_float("alpha", 0.6, "Length penalty exponent.")
  flags.DEFINE_integer("cache_segment", 0, "As transformer.main's --cache_segment (0: one loop).")
  flags.DEFINE_string("dtype", "float32", "Compute dtype (parameters stay float32).")
  flags.DEFINE_string("attention_impl", "xla", "xla | einsum.")
  flags.DEFINE_integer("warmup", 1, "Untimed batches (the first one compiles).")
  flags.DEFINE_integer("reps", 5, "Timed batches.")
  flags.DEFINE_string("mesh", "data:-1", "Mesh spec.")
  host.define_flag()


EOS_LOGIT = -1000.0  # log-softmax of the other tokens is ~ -log(vocab) +- a few
_EOS_FEATURE = 0     # the model feature that carries the constant EOS logit

# XLA backend compilations, counted through jax.monitoring (one listener per process).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]
_listening = [False]


def _listen_for_compiles():
  if not _listening[0]:
    def listener(event, duration, **kwargs):
      del duration, kwargs
      if event == _BACKEND_COMPILE_EVENT:
        _compiles[0] += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    _listening[0] = True


def init_params(model_cfg: ModelConfig, mesh):
  """Random parameters placed with their shardings, and the shardings."""
  model = Transformer(model_cfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  init = lambda rng: model.init(rng, dummy, dummy)["params"]
  shardings = sharding.boxed_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
  with sharding.mesh_context(mesh):
    params = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
        jax.random.PRNGKey(0))
  return params, shardings


def set_eos_logit(params, model_cfg: ModelConfig, logit: float):
  """Parameters whose EOS logit is exactly `logit` at every decoder step.

  The logits are y E^T, y the output of the decoder's last LayerNorm. That LayerNorm's
  feature c gets scale 0 and bias -logit (so y_c = -logit always), E[EOS] becomes -e_c
  (so the EOS logit is y_c * -1 = logit), and column c of every other row of E becomes 0
  (so no other logit sees y_c). As E is shared, this also changes inputs: every token's
  embedding loses feature c, and the source's final EOS is embedded as -sqrt(d_model) e_c,
  an ordinary magnitude. Values change, not the computation: same shapes and operations,
  all finite.
  """
  if not model_cfg.share_embeddings:
    raise ValueError("set_eos_logit needs the shared embedding (--share_embeddings)")
  c = _EOS_FEATURE
  params = jax.tree.map(lambda x: x, params)  # new dicts; the caller's stay as they are
  emb = params["shared_embedding"]["embedding"]
  emb = emb.at[:, c].set(0.0).at[EOS_ID].set(0.0).at[EOS_ID, c].set(-1.0)
  params["shared_embedding"]["embedding"] = emb
  if model_cfg.pre_layer_norm:
    norm = params["decoder"]["final_norm"]
  else:  # post-LN: the last sublayer's LayerNorm is the last operation before the logits
    norm = params["decoder"][f"layer_{model_cfg.num_decoder_layers - 1}"]["ffn_block"]["norm"]
  norm["scale"] = norm["scale"].at[c].set(0.0)
  norm["bias"] = norm["bias"].at[c].set(-logit)
  return params


def forbid_eos(params, model_cfg: ModelConfig):
  """EOS is never chosen before the length limit (where beam search forces it)."""
  return set_eos_logit(params, model_cfg, EOS_LOGIT)


def make_searcher(model_cfg: ModelConfig, mesh, params_shardings, *, beam: int, alpha: float,
                  src_len: int, out_len: int, cache_segment: int = 0) -> BeamSearcher:
  """Beam search whose length limit is out_len for unpadded sources of src_len tokens.

  The limit is (non-pad source tokens) + max_decode_len_offset, so the offset is
  out_len - src_len (zero or negative when out_len <= src_len: beam_search allows it).
  """
  decode_cfg = DecodeConfig(beam_size=beam, alpha=alpha, max_decode_len_offset=out_len - src_len,
                            cache_segment=cache_segment)
  return BeamSearcher(model_cfg, decode_cfg, mesh, params_shardings)


def jit_cache_size(searcher: BeamSearcher) -> Optional[int]:
  """Compiled variants held by the searcher's jitted function (None if jax hides it)."""
  size = getattr(searcher._search, "_cache_size", None)  # pylint: disable=protected-access
  return size() if size is not None else None


def run(config: str, *, batch: int = 0, src_len: int = 0, out_len: int = 0, beam: int = 4,
        alpha: float = 0.6, cache_segment: int = 0, dtype: str = "float32",
        attention_impl: str = "xla",
        warmup: int = 1, reps: int = 5, mesh_spec: str = "data:-1",
        devices: Optional[list] = None) -> dict:
  shape = shapes.SHAPES[config]
  batch, src_len, out_len = (batch or shape.decode_batch, src_len or shape.src_len,
                             out_len or shape.out_len)
  model_cfg = ModelConfig(**shapes.model_config_kwargs(shape), dtype=dtype,
                          attention_impl=attention_impl)
  if out_len + 1 > model_cfg.max_len:
    raise ValueError(f"--out_len={out_len} exceeds the model's {model_cfg.max_len} positions")
  if src_len > model_cfg.max_len:
    raise ValueError(f"--src_len={src_len} exceeds the model's {model_cfg.max_len} positions")
  mesh = sharding.make_mesh(mesh_spec, devices)
  if batch % sharding.batch_size_multiple(mesh):
    raise ValueError(f"--batch={batch} does not split over the mesh {dict(mesh.shape)}")
  params, params_shardings = init_params(model_cfg, mesh)
  params = jax.device_put(forbid_eos(params, model_cfg), params_shardings)
  searcher = make_searcher(model_cfg, mesh, params_shardings, beam=beam, alpha=alpha,
                           src_len=src_len, out_len=out_len, cache_segment=cache_segment)
  batch_sh = sharding.batch_sharding(mesh)
  inputs = [jax.device_put(x, batch_sh) for x in
            shapes.decode_batches(model_cfg.vocab_size, warmup + reps, batch, src_len)]
  _listen_for_compiles()

  t = time.perf_counter()
  outputs = [jax.block_until_ready(searcher(params, inputs[0]))]
  first_call = time.perf_counter() - t
  for x in inputs[1:warmup]:
    outputs.append(jax.block_until_ready(searcher(params, x)))
  compiles_before = _compiles[0]
  times = []
  for x in inputs[warmup:]:
    t = time.perf_counter()
    out = jax.block_until_ready(searcher(params, x))
    times.append(time.perf_counter() - t)
    outputs.append(out)
  compiles_timed = _compiles[0] - compiles_before
  for seqs, _ in outputs:  # after timing: every batch did the fixed work
    problem = shapes.check_fixed_length(np.asarray(seqs), out_len)
    if problem:
      raise RuntimeError(f"fixed-length decoding failed: {problem}")

  batch_time = float(np.median(times))
  return {"benchmark": "decode", "config": config, "dtype": dtype,
          "attention_impl": attention_impl, "batch": batch, "src_len": src_len,
          "out_len": out_len, "beam": beam, "alpha": alpha, "cache_segment": cache_segment,
          "params": count_params(params), "devices": mesh.size,
          "median_batch_s": batch_time, "batch_times_s": [round(t, 4) for t in times],
          "first_call_s": first_call,
          "sentences_per_s": batch / batch_time,
          "output_tokens_per_s": batch * out_len / batch_time,
          "beam_tokens_per_s": batch * beam * out_len / batch_time,
          "compilations": jit_cache_size(searcher),
          "backend_compiles_during_timed": compiles_timed,
          "eos_logit": EOS_LOGIT, "outputs_checked": len(outputs)}


def main(_):
  for name in ("batch", "src_len", "out_len"):
    if getattr(FLAGS, name) < 0:
      print(f"error: --{name} must be positive (0: the config's)", file=sys.stderr)
      sys.exit(2)
  if FLAGS.cache_segment < 0:
    print(f"error: --cache_segment must be >= 0, got {FLAGS.cache_segment}", file=sys.stderr)
    sys.exit(2)
  for name in ("beam", "reps", "warmup"):
    if getattr(FLAGS, name) <= 0:
      print(f"error: --{name} must be positive, got {getattr(FLAGS, name)}", file=sys.stderr)
      sys.exit(2)
  retained = FLAGS.retain_freed_memory and host.retain_freed_memory()  # before JAX's threads
  try:
    result = run(FLAGS.config, batch=FLAGS.batch, src_len=FLAGS.src_len, out_len=FLAGS.out_len,
                 beam=FLAGS.beam, alpha=FLAGS.alpha, cache_segment=FLAGS.cache_segment,
                 dtype=FLAGS.dtype,
                 attention_impl=FLAGS.attention_impl, warmup=FLAGS.warmup, reps=FLAGS.reps,
                 mesh_spec=FLAGS.mesh)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({**result, "retain_freed_memory": retained}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
