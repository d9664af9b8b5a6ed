"""Probes of what a trained model uses: does the decoder read the source, how sharp is each
attention layer, and how large is each layer's gradient.

`probe_batch(model, params, batch, label_smoothing)` measures one batch with dropout off:
  nll           per-token NLL of the targets (teacher forcing)
  nll_shuffled  the same with each row's source replaced by another row's (rows rolled by one):
                a decoder that ignores the source scores both alike, so `source_gain` =
                nll_shuffled - nll (nats per token) is ~0 for an unconditional language model
  entropy       per attention (stack/layer_i/kind): mean over heads and real query tokens of
                the attention distribution's entropy, divided by log(number of real keys), so 1
                is uniform attention and 0 attends to one key
  grad_norm     per layer (stack/layer_i, plus 'embedding'): the L2 norm of the gradient of the
                mean smoothed loss with respect to that layer's parameters
  encoder_similarity  mean cosine similarity of the encoder's outputs at two different real
                positions of a sentence: 1 when every position carries the same vector (the
                encoder has collapsed to a summary of the sentence; cross-attention can then
                only be uniform), ~0 for unrelated vectors

`--mode=diagnose` (run.py) applies it to every checkpoint of a workdir on the dev split.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import PAD_ID
from transformer.train import loss_and_metrics

# 'encoder/layer_2/self_attention/attention_weights' -> ('encoder/layer_2', 'self_attention')
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)(?:/|$)")


def roll_sources(inputs: jax.Array) -> jax.Array:
  """inputs [batch, src_len] with row i replaced by row i-1 (row 0 by the last)."""
  return jnp.roll(inputs, 1, axis=0)


def normalized_entropy(weights: jax.Array, query_mask: jax.Array, key_mask: jax.Array):
  """Mean entropy / log(#keys) of attention rows.

  weights: [batch, heads, q_len, kv_len] (each row sums to 1 over the real keys);
  query_mask: [batch, q_len] bool, rows averaged over; key_mask: [batch, kv_len] bool, the
  real keys (a row whose query sees one key only is left out: its entropy is 0 by force).
  """
  n_keys = jnp.sum(key_mask, axis=-1).astype(jnp.float32)[:, None]  # [batch, 1]
  return _mean_normalized_entropy(weights, query_mask, jnp.broadcast_to(
      n_keys, query_mask.shape))


def _mean_normalized_entropy(weights, query_mask, key_counts):
  """weights [batch, heads, q, k]; query_mask [batch, q]; key_counts [batch, q] float."""
  p = weights.astype(jnp.float32)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  keep = query_mask & (key_counts > 1)                               # [batch, q]
  norm = jnp.where(keep, jnp.log(jnp.maximum(key_counts, 2.0)), 1.0)  # [batch, q]
  ratio = ent / norm[:, None, :]                                      # [batch, heads, q]
  w = jnp.broadcast_to(keep[:, None, :], ratio.shape).astype(jnp.float32)
  return jnp.sum(ratio * w) / jnp.maximum(jnp.sum(w), 1.0)


def position_similarity(encoded: jax.Array, mask: jax.Array):
  """(sum over sentences of the mean pairwise cosine similarity of distinct real positions,
  number of sentences with >= 2 real positions); encoded [batch, len, d_model], mask
  [batch, len] bool."""
  x = encoded.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = jnp.einsum("bid,bjd->bij", x, x)                        # [batch, len, len]
  pair = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(x.shape[1], dtype=bool)[None]
  n_pairs = jnp.sum(pair, axis=(1, 2))
  per_sentence = jnp.sum(jnp.where(pair, cos, 0.0), axis=(1, 2)) / jnp.maximum(n_pairs, 1)
  has = n_pairs > 0
  return jnp.sum(jnp.where(has, per_sentence, 0.0)), jnp.sum(has).astype(jnp.float32)


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def group_by_layer(tree: Any) -> dict[str, list]:
  """Leaves of a params-shaped tree grouped as 'encoder/layer_i', 'decoder/layer_i' or, for
  everything outside the layers (embeddings, final norms), 'embedding'."""
  groups: dict[str, list] = collections.defaultdict(list)
  for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
    m = _LAYER.match(_path(keys))
    groups[f"{m.group(1)}/layer_{m.group(2)}" if m else "embedding"].append(leaf)
  return dict(groups)


def probe_batch(model, params, batch: dict[str, jax.Array], label_smoothing: float):
  """The measurements of the module docstring on one batch {'inputs', 'targets'}; returns
  (sums, counts): per-token quantities as sums over the batch's target tokens, so batches add."""
  inputs, targets = batch["inputs"], batch["targets"]

  def loss_fn(p):
    logits, inter = model.apply({"params": p}, inputs, targets, mutable=["intermediates"])
    loss, metrics = loss_and_metrics(logits, targets, label_smoothing)
    return loss, (metrics, inter["intermediates"])

  (_, (m, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  src_real, tgt_real = inputs != PAD_ID, targets != PAD_ID
  _, m_shuf = loss_and_metrics(model.apply({"params": params}, roll_sources(inputs), targets),
                               targets, label_smoothing)
  tgt_pos = jnp.cumsum(jnp.ones_like(targets), axis=1).astype(jnp.float32)  # 1..tgt_len
  out = {"nll": m["nll_sum"], "nll_shuffled": m_shuf["nll_sum"], "tokens": m["tokens"]}
  encoded = model.apply({"params": params}, inputs, method=model.encode)
  out["encoder_similarity_sum"], out["sentences"] = position_similarity(encoded, src_real)
  for keys, w in jax.tree_util.tree_leaves_with_path(inter):
    path = _path(keys)
    lm = _LAYER.match(path)
    if lm is None or "/attention_weights" not in path:  # sown as a 1-tuple
      continue
    kind = path.split("/")[2]
    name = f"entropy/{lm.group(1)}/layer_{lm.group(2)}/{kind}"
    if lm.group(1) == "encoder":
      out[name] = normalized_entropy(w, src_real, src_real)
    elif kind == "cross_attention":
      out[name] = normalized_entropy(w, tgt_real, src_real)
    else:  # causal: query i sees keys 1..i
      out[name] = _mean_normalized_entropy(w, tgt_real, tgt_pos)
  for group, leaves in group_by_layer(grads).items():
    out[f"grad_norm/{group}"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
  return out


def combine(results: list[dict[str, float]]) -> dict[str, float]:
  """Per-batch `probe_batch` results (fetched) -> one record: NLLs per token over all batches,
  entropies and gradient norms averaged over batches weighted by their target tokens."""
  tokens = np.asarray([r["tokens"] for r in results], np.float64)
  total = max(float(tokens.sum()), 1.0)
  rec = {"nll": sum(float(r["nll"]) for r in results) / total,
         "nll_shuffled": sum(float(r["nll_shuffled"]) for r in results) / total,
         "tokens": total}
  rec["source_gain"] = rec["nll_shuffled"] - rec["nll"]
  rec["encoder_similarity"] = (sum(float(r["encoder_similarity_sum"]) for r in results)
                               / max(sum(float(r["sentences"]) for r in results), 1.0))
  for k in results[0]:
    if k.startswith(("entropy/", "grad_norm/")):
      rec[k] = float(np.sum(tokens * np.asarray([float(r[k]) for r in results])) / total)
  return rec
