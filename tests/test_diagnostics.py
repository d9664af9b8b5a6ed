"""diagnostics.py against numpy, closed forms and a model that cannot read its source."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from transformer import diagnostics
from transformer.config import ModelConfig
from transformer.model import Transformer
from transformer.train import loss_and_metrics

CFG = ModelConfig(vocab_size=30, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=2,
                  num_decoder_layers=2, max_len=32)


def _numpy_normalized_entropy(w, q_mask, counts):
  """Brute force: mean over (batch, head, real query with > 1 key) of H(row) / log(count)."""
  vals = []
  b, h, q, _ = w.shape
  for bi in range(b):
    for hi in range(h):
      for qi in range(q):
        if not q_mask[bi, qi] or counts[bi, qi] < 2:
          continue
        p = w[bi, hi, qi].astype(np.float64)
        p = p[p > 0]
        vals.append(-(p * np.log(p)).sum() / math.log(counts[bi, qi]))
  return float(np.mean(vals))


def test_normalized_entropy_matches_numpy_and_closed_forms():
  rng = np.random.default_rng(0)
  key_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  q_mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  logits = rng.normal(size=(2, 3, 3, 5))
  logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  counts = np.broadcast_to(key_mask.sum(-1)[:, None], q_mask.shape)
  got = float(diagnostics.normalized_entropy(jnp.asarray(w, jnp.float32), jnp.asarray(q_mask),
                                             jnp.asarray(key_mask)))
  np.testing.assert_allclose(got, _numpy_normalized_entropy(w, q_mask, counts), rtol=1e-5)
  # Uniform over the real keys -> 1; all weight on one key -> 0.
  uniform = key_mask[:, None, None, :] / key_mask.sum(-1)[:, None, None, None]
  uniform = np.broadcast_to(uniform, w.shape)
  assert abs(float(diagnostics.normalized_entropy(uniform, q_mask, key_mask)) - 1.0) < 1e-6
  onehot = np.zeros_like(w)
  onehot[..., 0] = 1.0
  assert float(diagnostics.normalized_entropy(onehot, q_mask, key_mask)) == 0.0


def test_group_by_layer_names_every_layer_and_the_rest():
  tree = {"encoder": {"layer_0": {"a": 1, "b": 2}, "layer_1": {"a": 3}},
          "decoder": {"layer_0": {"c": 4}},
          "shared_embedding": {"embedding": 5}}
  groups = diagnostics.group_by_layer(tree)
  assert {k: sorted(v) for k, v in groups.items()} == {
      "encoder/layer_0": [1, 2], "encoder/layer_1": [3], "decoder/layer_0": [4],
      "embedding": [5]}


def _params(cfg, seed=0):
  x = jnp.ones((2, 6), jnp.int32)
  return nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), x, x)["params"])


def _batch():
  rng = np.random.default_rng(1)
  inputs = rng.integers(4, CFG.vocab_size, size=(4, 7)).astype(np.int32)
  targets = rng.integers(4, CFG.vocab_size, size=(4, 6)).astype(np.int32)
  inputs[0, 5:] = 0   # padding
  targets[1, 4:] = 0
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


def test_source_gain_is_zero_only_for_a_decoder_that_cannot_read_the_source():
  params, batch, model = _params(CFG), _batch(), Transformer(CFG)
  out = jax.device_get(diagnostics.probe_batch(model, params, batch, 0.1))
  rec = diagnostics.combine([out])
  # Independent: NLL of the batch with the source rows rolled by hand in numpy.
  rolled = {"inputs": jnp.asarray(np.roll(np.asarray(batch["inputs"]), 1, axis=0)),
            "targets": batch["targets"]}
  _, m = loss_and_metrics(model.apply({"params": params}, rolled["inputs"], rolled["targets"]),
                          rolled["targets"], 0.1)
  np.testing.assert_allclose(rec["nll_shuffled"], float(m["nll_sum"]) / float(m["tokens"]),
                             rtol=1e-5)
  assert abs(rec["source_gain"]) > 1e-4
  # Zero W^O of every cross-attention: the source cannot reach the output.
  blind = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "cross_attention" in jax.tree_util.keystr(p) else x,
      params)
  rec = diagnostics.combine([jax.device_get(diagnostics.probe_batch(model, blind, batch, 0.1))])
  assert abs(rec["source_gain"]) < 1e-6


def test_layer_gradient_norms_add_up_to_the_global_norm():
  params, batch, model = _params(CFG), _batch(), Transformer(CFG)
  out = jax.device_get(diagnostics.probe_batch(model, params, batch, 0.1))
  norms = {k: float(v) for k, v in out.items() if k.startswith("grad_norm/")}
  assert sorted(norms) == ["grad_norm/decoder/layer_0", "grad_norm/decoder/layer_1",
                           "grad_norm/embedding", "grad_norm/encoder/layer_0",
                           "grad_norm/encoder/layer_1"]
  loss = lambda p: loss_and_metrics(model.apply({"params": p}, batch["inputs"], batch["targets"]),
                                    batch["targets"], 0.1)[0]
  total = float(optax.tree.norm(jax.grad(loss)(params)))
  np.testing.assert_allclose(math.sqrt(sum(v * v for v in norms.values())), total, rtol=1e-4)
  ents = [k for k in out if k.startswith("entropy/")]
  assert len(ents) == 2 + 2 * 2  # encoder self; decoder self and cross


def test_position_similarity_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  x[1] = x[1, :1]  # every position the same vector: similarity 1
  total, n = diagnostics.position_similarity(jnp.asarray(x), jnp.asarray(mask))
  want = []
  for b in range(2):  # sentence 2 has one real position: not counted
    v = x[b, mask[b]] / np.linalg.norm(x[b, mask[b]], axis=-1, keepdims=True)
    c = v @ v.T
    k = len(v)
    want.append((c.sum() - np.trace(c)) / (k * (k - 1)))
  assert float(n) == 2 and abs(want[1] - 1.0) < 1e-6
  np.testing.assert_allclose(float(total), sum(want), rtol=1e-5)
