r"""Dropout mask cost: `transformer.ops.dropout` against `jax.random.bernoulli` masks.

  python -m benchmarks.dropout [--masks=17 --shape=64,24,256 --rounds=9]

Times the jitted gradient of a chain of `--masks` dropout + tanh layers on an activation of
`--shape` (default: the small config's 17 residual/embedding dropouts per training step),
for three mask generators, alternating them within each round:
  bernoulli: `jax.random.bernoulli` (what flax.linen.Dropout uses), one 32-bit draw per element;
  ours: `transformer.ops.dropout`, four 16-bit draws per Threefry hash;
  none: the same chain without dropout.
Prints one JSON object: median milliseconds per call and the mask cost (minus `none`) ratio.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from transformer.ops import dropout

flags.DEFINE_integer("masks", 17, "Dropout layers in the chain.")
flags.DEFINE_string("shape", "64,24,256", "Activation shape.")
flags.DEFINE_float("rate", 0.1, "Dropout rate.")
flags.DEFINE_integer("rounds", 9, "Timed rounds (each times every variant once).")
FLAGS = flags.FLAGS


def bernoulli_dropout(x, rate, key):
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _chain(drop, masks: int, rate: float):
  def loss(x, key):
    for i in range(masks):
      x = jnp.tanh(drop(x, rate, jax.random.fold_in(key, i)))
    return jnp.sum(x)
  return jax.jit(jax.grad(loss))


def main(argv):
  del argv
  shape = tuple(int(d) for d in FLAGS.shape.split(","))
  variants = {"bernoulli": bernoulli_dropout, "ours": dropout, "none": lambda x, r, k: x}
  fns = {k: _chain(f, FLAGS.masks, FLAGS.rate) for k, f in variants.items()}
  x, key = jnp.ones(shape), jax.random.PRNGKey(0)
  for f in fns.values():
    f(x, key).block_until_ready()  # compile
  times = {k: [] for k in fns}
  for _ in range(FLAGS.rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      f(x, key).block_until_ready()
      times[k].append(time.perf_counter() - t0)
  ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
  cost = {k: ms[k] - ms["none"] for k in ("bernoulli", "ours")}
  print(json.dumps({"shape": list(shape), "masks": FLAGS.masks, "rate": FLAGS.rate,
                    "median_ms": ms, "mask_cost_ms": cost,
                    "bernoulli_over_ours_mask_cost": cost["bernoulli"] / max(cost["ours"], 1e-9),
                    "devices": jax.device_count(), "backend": jax.default_backend()}))


if __name__ == "__main__":
  app.run(main)
