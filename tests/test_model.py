"""Section 3 checks against independent computations (numpy, hand-worked values, closed forms)."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import model as model_lib
from transformer.config import ModelConfig
from transformer.model import Transformer
from transformer.train import count_params

TINY = ModelConfig(vocab_size=50, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=2,
                   num_decoder_layers=2, max_len=64)


def _init(cfg, src_len=7, tgt_len=6, seed=0):
  m = Transformer(cfg)
  x = jnp.ones((2, src_len), jnp.int32)
  y = jnp.ones((2, tgt_len), jnp.int32)
  return m, nn.unbox(m.init(jax.random.PRNGKey(seed), x, y)["params"])


def _numpy_attention(q, k, v, mask):
  """softmax(QK^T/sqrt(d_k)) V per batch and head, with a boolean mask, in float64."""
  b, lq, h, dk = q.shape
  out = np.zeros((b, lq, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi].astype(np.float64) @ k[bi, :, hi].astype(np.float64).T / math.sqrt(dk)
      s = np.where(mask[bi, 0], s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, hi] = w @ v[bi, :, hi]
  return out


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy_with_padding_and_causal_masks(causal, implementation):
  rng = np.random.RandomState(0)
  b, lq, lk, h, dk = 2, 5, 5, 3, 4
  dv = dk if implementation == "xla" else 6  # the fused kernel needs d_k = d_v
  q, k = rng.randn(b, lq, h, dk), rng.randn(b, lk, h, dk)
  v = rng.randn(b, lk, h, dv)
  key_valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)  # first sentence padded
  mask = np.broadcast_to(key_valid[:, None, None, :], (b, 1, lq, lk))
  if causal:
    mask = mask & np.tril(np.ones((lq, lk), bool))[None, None]
  got = model_lib.dot_product_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                        jnp.asarray(v, jnp.float32), jnp.asarray(mask),
                                        implementation=implementation)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, mask), atol=1e-5)


def test_attention_of_beam_rows_over_the_head_major_cache_layout_matches_numpy():
  """The decoding cache's layout: K^T [kv_batch, heads, d_k, kv_len], V [kv_batch, heads,
  kv_len, d_v], and r = 3 query rows per key/value row, each with its own mask row."""
  rng = np.random.RandomState(2)
  kv_b, r, lk, h, dk, dv = 2, 3, 6, 2, 4, 5
  q = rng.randn(kv_b * r, 1, h, dk)
  k, v = rng.randn(kv_b, lk, h, dk), rng.randn(kv_b, lk, h, dv)
  mask = rng.rand(kv_b, 1, r, lk) < 0.6
  mask[..., 0] = True
  got = model_lib.dot_product_attention(
      jnp.asarray(q, jnp.float32), jnp.asarray(k.transpose(0, 2, 3, 1), jnp.float32),
      jnp.asarray(v.transpose(0, 2, 1, 3), jnp.float32), jnp.asarray(mask), head_major=True)
  want = _numpy_attention(q, np.repeat(k, r, 0), np.repeat(v, r, 0),
                          mask.transpose(0, 2, 1, 3).reshape(kv_b * r, 1, 1, lk))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_section_3_2_1_runs_in_training_and_in_cached_decoding(monkeypatch):
  """Every attention of the default configuration (attention_impl='xla') calls
  `dot_product_attention`: a perturbed one changes the training forward pass and a cached
  decoding step, and the fused kernel is chosen inside it."""
  cfg = dataclasses.replace(TINY, attention_impl="xla")
  m, params = _init(cfg)
  x = jnp.array([[5, 6, 7, 1, 0], [8, 9, 10, 11, 1]], jnp.int32)
  y = jnp.array([[5, 9, 1, 0], [7, 7, 7, 1]], jnp.int32)
  decoder = Transformer(cfg, decoding=True)
  encoded = m.apply({"params": params}, x, method=Transformer.encode)
  cache = decoder.init(jax.random.PRNGKey(0), encoded, x, jnp.zeros((2, 4), jnp.int32),
                       method=Transformer.decode)["cache"]
  decode_step = lambda: decoder.apply({"params": params, "cache": cache}, encoded, x, y[:, :1],
                                      method=Transformer.decode, mutable=["cache"])[0]

  train, step = m.apply({"params": params}, x, y), decode_step()
  original, calls = model_lib.dot_product_attention, []

  def perturbed(*args, **kwargs):
    calls.append((kwargs["implementation"], kwargs["head_major"]))
    return 1.5 * original(*args, **kwargs)

  monkeypatch.setattr(model_lib, "dot_product_attention", perturbed)
  assert not np.allclose(np.asarray(m.apply({"params": params}, x, y)), np.asarray(train))
  assert calls == [("xla", False)] * (2 + 2 * 2)  # 2 encoder + 2 x 2 decoder attentions
  calls.clear()
  assert not np.allclose(np.asarray(decode_step()), np.asarray(step))
  assert calls == [("xla", True)] * (2 * 2)  # every decoder attention reads the cache
  monkeypatch.setattr(model_lib, "dot_product_attention", original)
  np.testing.assert_array_equal(np.asarray(m.apply({"params": params}, x, y)), np.asarray(train))


def test_xla_attention_impl_matches_einsum():
  cfg = dataclasses.replace(TINY, attention_impl="xla")
  m, params = _init(dataclasses.replace(TINY, attention_impl="einsum"))
  x = jnp.array([[5, 6, 7, 1, 0, 0, 0], [8, 9, 10, 11, 12, 13, 1]], jnp.int32)
  y = jnp.array([[5, 9, 1, 0, 0, 0], [7, 7, 7, 1, 0, 0]], jnp.int32)
  ref = m.apply({"params": params}, x, y)
  got = Transformer(cfg).apply({"params": params}, x, y)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4)


def test_multihead_attention_matches_numpy_per_head():
  cfg = dataclasses.replace(TINY, d_k=5, d_v=7)  # d_k, d_v independent of d_model / h
  mha = model_lib.MultiHeadAttention(cfg)
  rng = np.random.RandomState(1)
  xq = jnp.asarray(rng.randn(2, 4, 32), jnp.float32)
  xkv = jnp.asarray(rng.randn(2, 6, 32), jnp.float32)
  mask = jnp.asarray(np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], bool)[:, None, None, :])
  params = nn.unbox(mha.init(jax.random.PRNGKey(0), xq, xkv, mask, True)["params"])
  got = mha.apply({"params": params}, xq, xkv, mask, True)
  p = jax.tree.map(np.asarray, params)
  assert p["query"].shape == (32, 4, 5) and p["value"].shape == (32, 4, 7)
  assert p["out"].shape == (4, 7, 32)
  q = np.einsum("bld,dhk->blhk", xq, p["query"])
  k = np.einsum("bld,dhk->blhk", xkv, p["key"])
  v = np.einsum("bld,dhk->blhk", xkv, p["value"])
  heads = _numpy_attention(q, k, v, np.broadcast_to(np.asarray(mask), (2, 1, 4, 6)))
  # Concat(head_1..head_h) W^O
  want = heads.reshape(2, 4, -1) @ p["out"].reshape(-1, 32)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_causal_mask_leaks_nothing():
  m, params = _init(TINY)
  x = jnp.array([[5, 6, 7, 8, 1, 0, 0]] * 2, jnp.int32)
  y1 = jnp.array([[9, 10, 11, 12, 13, 1]] * 2, jnp.int32)
  y2 = y1.at[:, 3:].set(jnp.array([40, 41, 42]))  # change tokens 3.. of the targets
  l1 = m.apply({"params": params}, x, y1)
  l2 = m.apply({"params": params}, x, y2)
  # Decoder input is BOS + targets[:-1]: positions 0..3 only see targets 0..2.
  np.testing.assert_array_equal(np.asarray(l1[:, :4]), np.asarray(l2[:, :4]))
  assert not np.allclose(np.asarray(l1[:, 4:]), np.asarray(l2[:, 4:]))


def test_source_padding_is_ignored():
  m, params = _init(TINY)
  y = jnp.array([[9, 10, 11, 1]], jnp.int32)
  short = m.apply({"params": params}, jnp.array([[5, 6, 1]], jnp.int32), y)
  padded = m.apply({"params": params}, jnp.array([[5, 6, 1, 0, 0, 0, 0]], jnp.int32), y)
  np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-5)


def test_sinusoids_at_known_positions():
  pe = model_lib.sinusoidal_positions(50, 4)
  # d_model = 4: dims 0,1 use 10000^0 = 1, dims 2,3 use 10000^(2/4) = 100.
  assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
  np.testing.assert_allclose(pe[3], [math.sin(3), math.cos(3), math.sin(0.03), math.cos(0.03)],
                             rtol=1e-6)
  pe = model_lib.sinusoidal_positions(100, 512)
  i = 10  # dims 20 (sin) and 21 (cos) share the wavelength 10000^(20/512)
  np.testing.assert_allclose(pe[77, 2 * i], math.sin(77 / 10000 ** (20 / 512)), rtol=1e-5)
  np.testing.assert_allclose(pe[77, 2 * i + 1], math.cos(77 / 10000 ** (20 / 512)), rtol=1e-5)


def test_one_matrix_serves_source_target_and_output():
  m, params = _init(TINY)
  shapes = jax.tree.leaves(jax.tree.map(lambda x: x.shape, params), is_leaf=lambda x: isinstance(x, tuple))
  assert sum(50 in s for s in shapes) == 1  # exactly one vocabulary-sized parameter
  emb = np.asarray(params["shared_embedding"]["embedding"])
  ids = jnp.array([[3, 7, 49]])
  got_src = m.apply({"params": params}, ids, method=lambda mod, i: mod.source_embed(i))
  got_tgt = m.apply({"params": params}, ids, method=lambda mod, i: mod.target_embed(i))
  want = emb[[3, 7, 49]] * math.sqrt(32)
  np.testing.assert_allclose(np.asarray(got_src)[0], want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_tgt)[0], want, rtol=1e-6)
  # Logits are the last decoder layer's output times E^T.
  x = jnp.array([[5, 6, 1]], jnp.int32)
  y = jnp.array([[9, 10, 1]], jnp.int32)
  logits, inter = m.apply({"params": params}, x, y, capture_intermediates=True,
                          mutable=["intermediates"])
  hidden = inter["intermediates"]["decoder"]["layer_1"]["__call__"][0]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(hidden) @ emb.T, atol=1e-4)


def test_untied_embeddings_have_three_matrices():
  cfg = dataclasses.replace(TINY, share_embeddings=False, target_vocab_size=30)
  _, params = _init(cfg)
  assert params["source_embedding"]["embedding"].shape == (50, 32)
  assert params["target_embedding"]["embedding"].shape == (30, 32)
  assert params["output_projection"]["kernel"]["kernel"].shape == (32, 30)


def test_post_ln_is_default_and_pre_ln_adds_final_norms():
  _, post = _init(TINY)
  _, pre = _init(dataclasses.replace(TINY, pre_layer_norm=True))
  assert "final_norm" not in post["encoder"] and "final_norm" in pre["encoder"]
  # Post-LN: every encoder layer output is LayerNorm-ed: zero mean, unit variance per position.
  m = Transformer(TINY)
  enc = m.apply({"params": post}, jnp.array([[5, 6, 7, 1]]), method=Transformer.encode)
  np.testing.assert_allclose(np.asarray(enc).mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(enc).var(-1), 1.0, atol=1e-3)


def test_learned_positions_param_and_dropout_flags():
  _, params = _init(dataclasses.replace(TINY, positional_encoding="learned"))
  assert params["encoder"]["positions"]["pos_embedding"].shape == (64, 32)
  # Dropout is active only when not deterministic.
  cfg = dataclasses.replace(TINY, dropout_rate=0.5)
  m, params = _init(cfg)
  x = jnp.array([[5, 6, 7, 1]]); y = jnp.array([[9, 1]])
  a = m.apply({"params": params}, x, y, deterministic=True)
  b = m.apply({"params": params}, x, y, deterministic=True)
  c = m.apply({"params": params}, x, y, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def closed_form_params(V, N, d, h, d_k, d_v, d_ff):
  """Shared embedding + per layer attention (no biases), FFN (with biases), LayerNorms."""
  attn = d * h * d_k * 2 + d * h * d_v + h * d_v * d
  ffn = 2 * d * d_ff + d_ff + d
  enc_layer = attn + ffn + 2 * 2 * d
  dec_layer = 2 * attn + ffn + 3 * 2 * d
  return V * d + N * enc_layer + N * dec_layer


def count_shapes(cfg):
  return count_params(cfg)


def test_param_count_matches_closed_form_for_odd_shapes():
  cfg = ModelConfig(vocab_size=101, d_model=24, d_ff=40, num_heads=3, d_k=5, d_v=9,
                    num_encoder_layers=3, num_decoder_layers=3)
  assert count_shapes(cfg) == closed_form_params(101, 3, 24, 3, 5, 9, 40)


def _stack_layers(params):
  """Loop parameters (layer_0..layer_{N-1}) -> --scan_layers parameters ('layers', [N, ...])."""
  out = {}
  for stack, sub in params.items():
    if stack not in ("encoder", "decoder"):
      out[stack] = sub
      continue
    names = sorted((k for k in sub if k.startswith("layer_")), key=lambda k: int(k[6:]))
    out[stack] = {k: v for k, v in sub.items() if not k.startswith("layer_")}
    out[stack]["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[sub[k] for k in names])
  return out


@pytest.mark.parametrize("cache_segment", [0, 2])
def test_scan_over_layers_equals_the_layer_loop(cache_segment):
  import dataclasses
  from transformer import decode
  cfg = ModelConfig(vocab_size=50, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=3,
                    num_decoder_layers=2, dropout_rate=0.0)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  rng = np.random.RandomState(0)
  src = jnp.asarray(rng.randint(4, 50, (3, 7)))
  tgt = jnp.asarray(rng.randint(4, 50, (3, 5)))
  params = Transformer(cfg).init(jax.random.PRNGKey(0), src, tgt)["params"]
  params = jax.tree.map(lambda x: x * 3.0, nn.unbox(params))  # peaked, distinct layers
  stacked = _stack_layers(params)
  # Same shapes as scan's own init (and so the same parameter count).
  own = nn.unbox(Transformer(scan_cfg).init(jax.random.PRNGKey(0), src, tgt)["params"])
  assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, stacked)
  assert count_shapes(scan_cfg) == count_shapes(cfg)
  assert own["decoder"]["layers"]["ffn"]["wi"]["kernel"].shape == (2, 16, 32)
  want = Transformer(cfg).apply({"params": params}, src, tgt)
  got = Transformer(scan_cfg).apply({"params": stacked}, src, tgt)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Beam search over the stacked KV cache (with cache_segment=2 grown 2 -> 4 -> 8 -> 11
  # positions) gives the same hypotheses and scores.
  kw = dict(beam_size=3, alpha=0.6, max_decode_len_offset=4, cache_segment=cache_segment)
  seqs, scores = decode.beam_search(params, src, model_cfg=cfg, **kw)
  scan_seqs, scan_scores = decode.beam_search(stacked, src, model_cfg=scan_cfg, **kw)
  np.testing.assert_array_equal(np.asarray(scan_seqs), np.asarray(seqs))
  np.testing.assert_allclose(np.asarray(scan_scores), np.asarray(scores), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Encoder and decoder layers against numpy (residual, LayerNorm, FFN, attention)
# ----------------------------------------------------------------------------

def _np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_mha(xq, xkv, p, mask):
  """MultiHead(Q, K, V) W^O from the module's weights; mask [batch, 1, q_len | 1, kv_len]."""
  q = np.einsum("bld,dhk->blhk", xq, p["query"])
  k = np.einsum("bld,dhk->blhk", xkv, p["key"])
  v = np.einsum("bld,dhk->blhk", xkv, p["value"])
  mask = np.broadcast_to(mask, (xq.shape[0], 1, xq.shape[1], xkv.shape[1]))
  return np.einsum("blhk,hkd->bld", _numpy_attention(q, k, v, mask), p["out"])


def _np_ffn(x, p):
  """FFN(x) = max(0, x W1 + b1) W2 + b2 (eq. 2)."""
  hidden = np.maximum(0.0, x @ p["wi"]["kernel"] + p["wi"]["bias"])
  return hidden @ p["wo"]["kernel"] + p["wo"]["bias"]


def _np_block(x, sublayer, norm, pre_ln, eps):
  """post-LN: LayerNorm(x + Sublayer(x)); pre-LN: x + Sublayer(LayerNorm(x))."""
  if pre_ln:
    return x + sublayer(_np_layer_norm(x, norm, eps))
  return _np_layer_norm(x + sublayer(x), norm, eps)


def _np_layer(x, p, attention_blocks, pre_ln, eps):
  """An encoder/decoder layer: each (block name, attention) block in turn, then the FFN block."""
  for name, sublayer in attention_blocks:
    x = _np_block(x, sublayer, p[name]["norm"], pre_ln, eps)
  return _np_block(x, lambda z: _np_ffn(z, p["ffn"]), p["ffn_block"]["norm"], pre_ln, eps)


def _random_params(params, seed):
  """Every parameter (biases and LayerNorm scales included) drawn at random, in float64."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.normal(0.0, 0.5, x.shape) for x in leaves])


@pytest.mark.parametrize("pre_ln", [False, True])
def test_encoder_layer_matches_numpy(pre_ln):
  cfg = dataclasses.replace(TINY, pre_layer_norm=pre_ln, dropout_rate=0.1)
  layer = model_lib.EncoderLayer(cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 32))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)[:, None, None, :]
  boxed = layer.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), mask, True)["params"]
  p = _random_params(nn.unbox(boxed), 1)
  got = layer.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)},
                    jnp.asarray(x, jnp.float32), mask, True)
  want = _np_layer(x, p, [("attention_block", lambda z: _np_mha(z, z, p["self_attention"], mask))],
                   pre_ln, cfg.layer_norm_epsilon)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_decoder_layer_matches_numpy(pre_ln):
  cfg = dataclasses.replace(TINY, pre_layer_norm=pre_ln, dropout_rate=0.1)
  layer = model_lib.DecoderLayer(cfg)
  rng = np.random.default_rng(2)
  y_in = rng.normal(size=(2, 4, 32))
  enc = rng.normal(size=(2, 6, 32))
  self_mask = np.tril(np.ones((4, 4), bool))[None, None]
  cross_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)[:, None, None, :]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  boxed = layer.init(jax.random.PRNGKey(0), f32(y_in), f32(enc), self_mask, cross_mask,
                     True)["params"]
  p = _random_params(nn.unbox(boxed), 3)
  got = layer.apply({"params": jax.tree.map(f32, p)}, f32(y_in), f32(enc), self_mask, cross_mask,
                    True)
  want = _np_layer(y_in, p, [
      ("self_attention_block", lambda z: _np_mha(z, z, p["self_attention"], self_mask)),
      ("cross_attention_block", lambda z: _np_mha(z, enc, p["cross_attention"], cross_mask))],
                   pre_ln, cfg.layer_norm_epsilon)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_residual_dropout_acts_on_the_sublayer_output_only(pre_ln):
  """Section 5.4: dropout on each sublayer's output, before the residual add and the norm.

  The sublayer returns the constant c. The mask m depends only on the key and the shape, so
  a first call with x = 0 reveals it (post-LN: LayerNorm(m c') is positive exactly where
  m = 1; pre-LN: the output is m c'), c' = c / (1 - P_drop). A second call with the same
  key and random x must give LayerNorm(x + m c') (post-LN) or x + m c' (pre-LN). Dropout
  on x, on the sum or after the norm gives other values.
  """
  rate, c = 0.5, 1.5
  cfg = dataclasses.replace(TINY, pre_layer_norm=pre_ln, dropout_rate=rate)
  block = model_lib.Sublayer(cfg)
  x = np.random.default_rng(4).normal(size=(3, 5, 32))
  sub = lambda z: jnp.full_like(z, c)
  params = block.init(jax.random.PRNGKey(0), jnp.zeros((3, 5, 32)), sub, True)
  run = lambda v: np.asarray(block.apply(params, jnp.asarray(v, jnp.float32), sub, False,
                                         rngs={"dropout": jax.random.PRNGKey(7)}), np.float64)
  first = run(np.zeros_like(x))
  m = (first > 1e-3).astype(np.float64)
  assert 0.3 < m.mean() < 0.7, m.mean()  # about half of the elements survive
  unit = {"scale": 1.0, "bias": 0.0}
  if pre_ln:
    np.testing.assert_allclose(first, m * c / (1 - rate), atol=1e-5)
    want = x + m * c / (1 - rate)
  else:
    want = _np_layer_norm(x + m * c / (1 - rate), unit, cfg.layer_norm_epsilon)
  np.testing.assert_allclose(run(x), want, atol=1e-4)
