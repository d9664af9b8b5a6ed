"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section 3.

Modules appear in the order of the paper:
  3.2.1 scaled dot-product attention   -> `dot_product_attention`
  3.2.2 multi-head attention           -> `MultiHeadAttention` (with a KV cache for decoding)
  3.3   position-wise feed-forward     -> `FeedForward`
  3.4   embeddings and softmax         -> `SharedEmbedding` (one matrix, scaled by sqrt(d_model))
  3.5   positional encoding            -> `sinusoidal_positions`, `AddPositions`
  3.1   encoder and decoder stacks     -> `EncoderLayer`, `DecoderLayer`, `Encoder`, `Decoder`
        the whole model                -> `Transformer`

Shapes use [batch, length, heads, head_dim]. Parameters carry logical axis names
('vocab', 'embed', 'heads', 'kv', 'mlp'); `sharding.py` maps them onto the mesh.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
from jax.extend.random import threefry2x32_p
import jax.numpy as jnp
import numpy as np

from transformer.config import BOS_ID, PAD_ID, ModelConfig

Array = jax.Array

# Initialisers (the paper does not specify them): Glorot-uniform projections,
# N(0, d_model^-1/2) embeddings so that embeddings * sqrt(d_model) have unit scale.
_dense_init = nn.initializers.xavier_uniform()


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _constrain(x: Array, names: tuple[Optional[str], ...]) -> Array:
  """Activation sharding hint (no-op outside a mesh / without rules)."""
  return nn.with_logical_constraint(x, names)


# ----------------------------------------------------------------------------
# 5.4 Dropout (used by the modules below)
# ----------------------------------------------------------------------------

def _random_halves(rng: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
  """Two uint32 arrays of `shape`: the 64 bits of one Threefry-2x32 hash per element."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(rng) if typed else rng
  threefry = data.shape == (2,) and (not typed or jax.random.key_impl(rng) == "threefry2x32")
  if not threefry:  # another PRNG implementation: its own bits, two words per element
    bits = jax.random.bits(rng, shape + (2,), jnp.uint32)
    return bits[..., 0], bits[..., 1]
  # Counters of each element: (row-major index over the axes after the first, index on the
  # first axis); built as a [shape[0], rest] iota so that a batch-sharded activation
  # computes only its own rows.
  rest = int(np.prod(shape[1:]))
  if rest >= 2**32:
    raise ValueError(f"dropout mask too large for 32-bit counters: {shape}")
  flat = (shape[0], rest) if shape else (1, 1)
  c0 = jax.lax.broadcasted_iota(jnp.uint32, flat, 0).reshape(shape)
  c1 = jax.lax.broadcasted_iota(jnp.uint32, flat, 1).reshape(shape)
  return threefry2x32_p.bind(data[0], data[1], c1, c0)


def dropout(x: Array, rate: float, rng: Array) -> Array:
  """Inverted dropout: each element is zeroed with probability ~`rate`, the rest scaled up.

  The drop probability is rounded to a multiple of 2^-16 (0.1 -> 6554/65536 = 0.100006)
  and the scale is 1 / (1 - rounded rate), so E[dropout(x)] = x exactly. One Threefry
  hash (64 bits) decides four elements (16-bit uniforms), a quarter of the hashes of
  `jax.random.bernoulli` (flax.linen.Dropout); `python -m benchmarks.dropout` times both.
  x: any shape [..., d]; rng: a raw uint32[2] or typed key.
  """
  if rate <= 0.0:
    return x
  threshold = round(rate * 65536)  # drop iff uniform16 < threshold
  if threshold >= 65536:
    return jnp.zeros_like(x)
  d = x.shape[-1]
  b1, b2 = _random_halves(rng, x.shape[:-1] + (-(-d // 4),))  # [..., ceil(d / 4)] each
  u = jnp.concatenate([b1 & 0xFFFF, b1 >> 16, b2 & 0xFFFF, b2 >> 16], axis=-1)[..., :d]
  return jnp.where(u >= threshold, x * (65536 / (65536 - threshold)), 0).astype(x.dtype)


class Dropout(nn.Module):
  """`dropout` with a key from the 'dropout' collection; identity if deterministic."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))


# ----------------------------------------------------------------------------
# 3.2.1 Scaled dot-product attention
# ----------------------------------------------------------------------------

def masked_softmax(logits: Array, mask: Optional[Array]) -> Array:
  """softmax over the last axis in float32; positions where mask is False get weight 0."""
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(query: Array, key: Array, value: Array, mask: Optional[Array],
                          dropout_rng: Optional[Array] = None, dropout_rate: float = 0.0,
                          deterministic: bool = True, dtype=jnp.float32) -> Array:
  """softmax(Q K^T / sqrt(d_k)) V.

  Args:
    query: [batch, q_len, heads, d_k]
    key:   [batch, kv_len, heads, d_k]
    value: [batch, kv_len, heads, d_v]
    mask:  bool, broadcastable to [batch, heads, q_len, kv_len]; True = attend.
  Returns:
    [batch, q_len, heads, d_v]
  """
  d_k = query.shape[-1]
  query = query / jnp.sqrt(d_k).astype(query.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [batch, heads, q_len, kv_len]
  weights = masked_softmax(logits, mask)
  if not deterministic and dropout_rate > 0.0:
    weights = dropout(weights, dropout_rate, dropout_rng)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), value)


# ----------------------------------------------------------------------------
# 3.2.2 Multi-head attention
# ----------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

  W^Q, W^K: [d_model, h, d_k]; W^V: [d_model, h, d_v]; W^O: [h, d_v, d_model]; no biases.
  With `decode=True` and `cache=True` (decoder self-attention) keys and values of
  earlier steps are kept in the 'cache' collection, one slot per decoder row (r rows per
  sentence): keys [src_batch, heads, d_k, max_len * r], values [src_batch, heads,
  max_len * r, d_v]; `mask` [src_batch, 1, r, max_len, r] tells which slot each row reads
  at each position (see Decoder). With `decode=True` and `cross_cache=True`
  (encoder-decoder attention) the projected encoder keys and values are computed once,
  when `inputs_kv` is given, and read back from 'cache' when it is None: keys
  [kv_batch, heads, d_k, src_len], values [kv_batch, heads, src_len, d_v].

  The query batch may be a multiple r of the key/value batch (beam search: r beams per
  sentence, rows sentence-major); then the r query rows of a sentence attend to its one
  copy of the keys and values, so the encoder output is never repeated per beam.
  """
  config: ModelConfig
  cache: bool = False        # decoder self-attention: cache keys/values step by step
  cross_cache: bool = False  # encoder-decoder attention: cache the projected encoder output
  sow_weights: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array], mask: Optional[Array],
               deterministic: bool) -> Array:
    cfg = self.config
    h, d_k, d_v, d = cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.d_model

    def weight(name, shape, names, in_axis, out_axis):
      init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
      w = self.param(name, _partitioned(init, names), shape, cfg.param_dtype)
      return jnp.asarray(w, cfg.dtype)

    w_q = weight("query", (d, h, d_k), ("embed", "heads", "kv"), 0, (1, 2))
    w_k = weight("key", (d, h, d_k), ("embed", "heads", "kv"), 0, (1, 2))
    w_v = weight("value", (d, h, d_v), ("embed", "heads", "kv"), 0, (1, 2))
    w_o = weight("out", (h, d_v, d), ("heads", "kv", "embed"), (0, 1), 2)
    inputs_q = inputs_q.astype(cfg.dtype)
    query = jnp.einsum("bld,dhk->blhk", inputs_q, w_q)
    # query: [batch, q_len, heads, d_k]
    query = _constrain(query, ("activation_batch", "activation_length", "activation_heads", None))
    if cfg.decode and (self.cache or self.cross_cache):
      out = self._decode_attention(query, inputs_kv, w_k, w_v, mask)
    else:
      inputs_kv = inputs_kv.astype(cfg.dtype)
      key = jnp.einsum("bld,dhk->blhk", inputs_kv, w_k)
      value = jnp.einsum("bld,dhk->blhk", inputs_kv, w_v)
      # key: [batch, kv_len, heads, d_k]; value: [batch, kv_len, heads, d_v]
      key = _constrain(key, ("activation_batch", "activation_length", "activation_heads", None))
      value = _constrain(value, ("activation_batch", "activation_length", "activation_heads", None))
      dropout_rng = None
      if not deterministic and cfg.attention_dropout_rate > 0.0:
        dropout_rng = self.make_rng("dropout")
      if (cfg.attention_impl in ("xla", "cudnn") and cfg.attention_dropout_rate == 0.0
          and d_k == d_v):
        out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                           implementation=cfg.attention_impl)
      else:
        out = dot_product_attention(query, key, value, mask, dropout_rng,
                                    cfg.attention_dropout_rate, deterministic, dtype=cfg.dtype)
      if self.sow_weights:  # for attention pictures; recomputed, not on the training path
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(d_k)
        self.sow("intermediates", "attention_weights", masked_softmax(logits, mask))
    # out: [batch, q_len, heads, d_v] -> [batch, q_len, d_model]
    return jnp.einsum("blhk,hkd->bld", out, w_o)

  def _decode_attention(self, query: Array, inputs_kv: Optional[Array], w_k: Array, w_v: Array,
                        mask: Optional[Array]) -> Array:
    """Attention while decoding (no dropout), with cached keys/values.

    The caches are head-major, the layout of a batched matmul over (batch, heads), so a
    step reads them in place: values [kv_batch, heads, kv_len, d_v] and keys transposed,
    [kv_batch, heads, d_k, kv_len], so that Q K^T is a plain matmul (XLA:CPU ran the form
    that contracts both operands' last axes 2-6x slower at beam search's shapes).
    The query batch may be r * kv_batch (r beams per sentence, sentence-major).
    query: [batch, q_len, heads, d_k]. Returns [batch, q_len, heads, d_v].
    """
    cfg = self.config

    def project(w, spec):  # [kv_batch, kv_len, d_model] -> spec's layout
      return _constrain(jnp.einsum(spec, inputs_kv.astype(cfg.dtype), w),
                        ("activation_batch", "activation_heads", None, None))

    if self.cross_cache:
      if inputs_kv is None:
        key_t, value = self._cached_cross_kv()
      else:
        key_t, value = project(w_k, "bld,dhk->bhkl"), project(w_v, "bld,dhk->bhlk")
        self.variable("cache", "cross_key", lambda: key_t).value = key_t
        self.variable("cache", "cross_value", lambda: value).value = value
    else:
      key_t, value, mask = self._update_cache(project(w_k, "bld,dhk->bhkl"),
                                              project(w_v, "bld,dhk->bhlk"), mask)

    q_batch, q_len = query.shape[:2]
    kv_batch = key_t.shape[0]
    r = q_batch // kv_batch
    if r * kv_batch != q_batch:
      raise ValueError(f"query batch {q_batch} is not a multiple of key batch {kv_batch}")
    # [r * kv_batch, q_len, heads, d_k] -> [kv_batch, r * q_len, heads, d_k]
    query = query.reshape((kv_batch, r * q_len) + query.shape[2:])
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = jnp.einsum("bqhd,bhdk->bhqk", query, key_t)
    weights = masked_softmax(logits, mask)  # [kv_batch, heads, r * q_len, kv_len]
    # Head-major product, then a transpose of the small result: XLA:CPU runs this batched
    # matmul ~3x faster than one that writes [kv_batch, r * q_len, heads, d_v] directly.
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(cfg.dtype), value).transpose(0, 2, 1, 3)
    return out.reshape((q_batch, q_len) + out.shape[2:])

  def _update_cache(self, key_t: Array, value: Array, mask: Array):
    """Writes this step's keys/values into the rows' slots; returns every slot and the mask.

    key_t: [src_batch * r, heads, d_k, 1], value: [src_batch * r, heads, 1, d_v] (during
    `init` max_len instead of 1, which sizes the cache). mask: [src_batch, 1, r, max_len, r]
    bool, row j may read position p of slot s (from Decoder). The cache is position-major
    (position p of slot s at p * r + s), values [src_batch, heads, max_len * r, d_v] and keys
    [src_batch, heads, d_k, max_len * r], so a step writes one small block per (sentence,
    head) and the attention reads the cache in place. Returns keys, values and the mask
    [src_batch, 1, r, max_len * r], which also hides positions after this step's.
    """
    src_batch, _, r = mask.shape[:3]

    def slots(x):  # [src_batch * r, heads, length, d] -> [src_batch, heads, length * r, d]
      x = x.reshape((src_batch, r) + x.shape[1:]).transpose(0, 2, 3, 1, 4)
      x = x.reshape(x.shape[:2] + (x.shape[2] * r, x.shape[4]))
      return _constrain(x, ("activation_batch", "activation_heads", None, None))

    slots_t = lambda x: slots(x.swapaxes(2, 3)).swapaxes(2, 3)
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", lambda: slots_t(jnp.zeros_like(key_t)))
    cached_value = self.variable("cache", "cached_value", lambda: slots(jnp.zeros_like(value)))
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key_t, value, None
    max_len = cached_value.value.shape[2] // r
    if mask.shape[3] not in (1, max_len):
      raise ValueError(f"history of {mask.shape[3]} positions for a cache of {max_len}")
    if value.shape[2] != 1:
      raise ValueError(f"decode step expects one token, got value shape {value.shape}")
    i = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, slots_t(key_t),
                                                    (0, 0, 0, i * r))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, slots(value),
                                                      (0, 0, i * r, 0))
    cache_index.value = i + 1
    mask = mask & (jnp.arange(max_len) <= i)[:, None]  # the new query sees positions 0..i
    return cached_key.value, cached_value.value, mask.reshape(mask.shape[:3] + (max_len * r,))

  def _cached_cross_kv(self):
    """The encoder keys/values stored by an earlier call with `inputs_kv` (decode only)."""
    if not self.has_variable("cache", "cross_key"):
      raise ValueError("inputs_kv=None needs a cross-attention cache filled by a decode call"
                       " with the encoder output")
    return (self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value"))


def extend_decode_cache(cache, max_len: int, rows: int):
  """The 'cache' collection with room for max_len positions: each self-attention key/value
  cache (layout in MultiHeadAttention._update_cache; rows slots per sentence) is padded
  with zeros after its last position. Filled positions and every other entry stay as they are.
  """
  def leaf(path, x):
    name = getattr(path[-1], "key", None)
    if name not in ("cached_key", "cached_value"):
      return x
    axis = x.ndim - 1 if name == "cached_key" else x.ndim - 2  # the max_len * rows axis
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, max_len * rows - x.shape[axis])
    if pad[axis][1] < 0:
      raise ValueError(f"cannot shrink a decode cache of {x.shape[axis] // rows} positions"
                       f" to {max_len}")
    return jnp.pad(x, pad)
  return jax.tree_util.tree_map_with_path(leaf, cache)


# ----------------------------------------------------------------------------
# 3.3 Position-wise feed-forward network
# ----------------------------------------------------------------------------

class FeedForward(nn.Module):
  """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2; W_1: [d_model, d_ff], W_2: [d_ff, d_model]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    x = nn.Dense(cfg.d_ff, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 kernel_init=_partitioned(_dense_init, ("embed", "mlp")),
                 bias_init=_partitioned(nn.initializers.zeros, ("mlp",)), name="wi")(x)
    x = nn.relu(x)  # [batch, length, d_ff]
    x = _constrain(x, ("activation_batch", "activation_length", "activation_mlp"))
    x = Dropout(cfg.relu_dropout_rate)(x, deterministic=deterministic)
    return nn.Dense(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=_partitioned(_dense_init, ("mlp", "embed")),
                    bias_init=_partitioned(nn.initializers.zeros, ("embed",)), name="wo")(x)


# ----------------------------------------------------------------------------
# 3.4 Embeddings and softmax
# ----------------------------------------------------------------------------

class SharedEmbedding(nn.Module):
  """Token embedding E: [vocab, d_model]; embed(ids) = E[ids] * sqrt(d_model).

  `attend(x) = x E^T` is the pre-softmax linear transformation that shares E.
  """
  config: ModelConfig
  num_embeddings: int

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding",
        _partitioned(nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("vocab", "embed")),
        (self.num_embeddings, cfg.d_model), cfg.param_dtype)

  def __call__(self, ids: Array) -> Array:
    cfg = self.config
    x = jnp.take(jnp.asarray(self.embedding, cfg.dtype), ids, axis=0)
    return x * jnp.sqrt(cfg.d_model).astype(cfg.dtype)  # [batch, length, d_model]

  def attend(self, x: Array) -> Array:
    # [batch, length, d_model] x [vocab, d_model] -> [batch, length, vocab]
    return jnp.einsum("bld,vd->blv", x, jnp.asarray(self.embedding, self.config.dtype))


class OutputProjection(nn.Module):
  """Untied pre-softmax projection [d_model, vocab] (only with --noshare_embeddings)."""
  config: ModelConfig
  vocab_size: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(self.vocab_size, use_bias=False, dtype=self.config.dtype,
                    param_dtype=self.config.param_dtype,
                    kernel_init=_partitioned(_dense_init, ("embed", "vocab")), name="kernel")(x)


# ----------------------------------------------------------------------------
# 3.5 Positional encoding
# ----------------------------------------------------------------------------

def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
  """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

  Returns [length, d_model] float32.
  """
  pos = np.arange(length, dtype=np.float64)[:, None]                 # [length, 1]
  two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]        # [1, d_model/2]
  angles = pos / np.power(10000.0, two_i / d_model)                  # [length, d_model/2]
  pe = np.zeros((length, d_model), dtype=np.float64)
  pe[:, 0::2] = np.sin(angles)
  pe[:, 1::2] = np.cos(angles[:, : d_model // 2])
  return pe.astype(np.float32)


class AddPositions(nn.Module):
  """x + PE[positions]: sinusoids (default) or a learned table (Table 3 row E).

  In decode mode the position is the number of tokens decoded so far (kept in 'cache');
  `init` checks the cache width against max_len, and a step past the table would read its
  last row (dynamic_slice clamps), so `decode.beam_search` never runs one: it sizes the
  sinusoidal table from its output limit and caps the output at max_len for a learned one.
  """
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    length = x.shape[1]
    if cfg.positional_encoding == "learned":
      table = self.param("pos_embedding",
                         _partitioned(nn.initializers.normal(stddev=0.02), (None, "embed")),
                         (cfg.max_len, cfg.d_model), cfg.param_dtype)
    else:
      table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))
    if self.decode:
      initialized = self.has_variable("cache", "position_index")
      index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
      if initialized:
        pe = jax.lax.dynamic_slice_in_dim(table, index.value, 1)[None]  # [1, 1, d_model]
        index.value = index.value + 1
        return x + pe.astype(x.dtype)
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds --max_len={cfg.max_len}")
    return x + table[None, :length].astype(x.dtype)


# ----------------------------------------------------------------------------
# 3.1 Encoder and decoder stacks
# ----------------------------------------------------------------------------

class Sublayer(nn.Module):
  """Residual + LayerNorm around a sublayer.

  post-LN (paper): LayerNorm(x + Dropout(Sublayer(x)))
  pre-LN (flag):   x + Dropout(Sublayer(LayerNorm(x)))
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, sublayer, deterministic: bool) -> Array:
    cfg = self.config
    norm = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype,
                        scale_init=_partitioned(nn.initializers.ones, ("embed",)),
                        bias_init=_partitioned(nn.initializers.zeros, ("embed",)), name="norm")
    drop = Dropout(cfg.dropout_rate)
    if cfg.pre_layer_norm:
      return x + drop(sublayer(norm(x)), deterministic=deterministic)
    return norm(x + drop(sublayer(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
  """Self-attention sublayer, then feed-forward sublayer."""
  config: ModelConfig
  sow_weights: bool = False
  scanned: bool = False  # body of nn.scan: returns (x, None)

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    attn = MultiHeadAttention(cfg, sow_weights=self.sow_weights, name="self_attention")
    x = Sublayer(cfg, name="attention_block")(
        x, lambda y: attn(y, y, mask, deterministic), deterministic)
    ffn = FeedForward(cfg, name="ffn")
    x = Sublayer(cfg, name="ffn_block")(x, lambda y: ffn(y, deterministic), deterministic)
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Masked self-attention, encoder-decoder attention, feed-forward; each a sublayer."""
  config: ModelConfig
  sow_weights: bool = False
  scanned: bool = False  # body of nn.scan: returns (x, None)

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_mask: Optional[Array],
               cross_mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    self_attn = MultiHeadAttention(cfg, cache=True, sow_weights=self.sow_weights,
                                   name="self_attention")
    x = Sublayer(cfg, name="self_attention_block")(
        x, lambda y: self_attn(y, y, self_mask, deterministic), deterministic)
    cross_attn = MultiHeadAttention(cfg, cross_cache=True, sow_weights=self.sow_weights,
                                    name="cross_attention")
    x = Sublayer(cfg, name="cross_attention_block")(
        x, lambda y: cross_attn(y, encoded, cross_mask, deterministic), deterministic)
    ffn = FeedForward(cfg, name="ffn")
    x = Sublayer(cfg, name="ffn_block")(x, lambda y: ffn(y, deterministic), deterministic)
    x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return (x, None) if self.scanned else x


def _final_norm(cfg: ModelConfig, name: str):
  """Pre-LN stacks end with a LayerNorm; post-LN stacks are already normalised."""
  if not cfg.pre_layer_norm:
    return lambda x: x
  return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scale_init=_partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=_partitioned(nn.initializers.zeros, ("embed",)), name=name)


def _layer_cls(cls, cfg: ModelConfig, deterministic_argnum: int):
  """Optionally rematerialised layer; `deterministic` (counting self) stays static."""
  if cfg.remat:
    return nn.remat(cls, static_argnums=(deterministic_argnum,))
  return cls


def _layer_stack(cls, cfg: ModelConfig, num_layers: int, deterministic_argnum: int,
                 sow_weights: bool):
  """`x = stack(x, *args)`: N layers as a Python loop (params layer_0..layer_{N-1}) or, with
  --scan_layers, one nn.scan (params 'layers' stacked [N, ...], logical axis 'layers'; the
  decoding cache is stacked the same way). Other arguments are broadcast to every layer."""
  layer = _layer_cls(cls, cfg, deterministic_argnum)
  if not cfg.scan_layers:
    def loop(x, *args):
      for i in range(num_layers):
        x = layer(cfg, sow_weights=sow_weights, name=f"layer_{i}")(x, *args)
      return x
    return loop
  stacked = nn.scan(layer, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * (deterministic_argnum - 1), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  module = stacked(cfg, sow_weights=sow_weights, scanned=True, name="layers")
  return lambda x, *args: module(x, *args)[0]


class Encoder(nn.Module):
  """N encoder layers over (embedding * sqrt(d_model) + PE), with dropout on the sum."""
  config: ModelConfig
  embed: nn.Module
  sow_weights: bool = False

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    cfg = self.config
    # inputs: [batch, src_len] int32 -> x: [batch, src_len, d_model]
    x = AddPositions(cfg, name="positions")(self.embed(inputs))
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    mask = (inputs != PAD_ID)[:, None, None, :]  # [batch, 1, 1, src_len]
    layers = _layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers, 3, self.sow_weights)
    x = layers(x, mask, deterministic)
    return _final_norm(cfg, "final_norm")(x)


class Decoder(nn.Module):
  """N decoder layers; output logits through the (shared) pre-softmax projection."""
  config: ModelConfig
  embed: nn.Module
  output: Optional[nn.Module] = None  # untied projection; None -> embed.attend
  sow_weights: bool = False

  @nn.compact
  def __call__(self, encoded: Optional[Array], inputs: Array, decoder_inputs: Array,
               deterministic: bool, history: Optional[Array] = None) -> Array:
    cfg = self.config
    # encoded: [src_batch, src_len, d_model] (None when decoding: the cross-attention cache);
    # inputs: [src_batch, src_len] source ids (for the padding mask);
    # decoder_inputs: [batch, tgt_len] (BOS + shifted targets, or one token when decoding),
    # batch = r * src_batch, r rows (beams) per source sentence, sentence-major.
    # history (decoding only): [src_batch, r, cache positions] int32, the cache slot that
    # holds position p of row j's prefix; None: its own slot j. Beam search reorders its
    # beams by rewriting `history`, so the cache itself is never moved.
    y = AddPositions(cfg, decode=cfg.decode, name="positions")(self.embed(decoder_inputs))
    y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    cross_mask = (inputs != PAD_ID)[:, None, None, :]  # [batch, 1, 1, src_len]
    if cfg.decode:
      # [src_batch, 1, r, max_len | 1, r]: row j reads position p of slot s; the cache
      # adds the causal part step by step.
      src_batch = inputs.shape[0]
      r = decoder_inputs.shape[0] // src_batch
      if r * src_batch != decoder_inputs.shape[0]:
        raise ValueError(f"decoder batch {decoder_inputs.shape[0]} is not a multiple of the "
                         f"source batch {src_batch}")
      slots = jnp.arange(r)
      if history is not None and history.shape[:2] != (src_batch, r):
        raise ValueError(f"history {history.shape} does not start with (source batch, rows)"
                         f" = {(src_batch, r)}")
      if history is None:
        self_mask = jnp.broadcast_to((slots[:, None] == slots[None, :])[None, None, :, None, :],
                                     (src_batch, 1, r, 1, r))
      else:
        self_mask = (history[:, :, :, None] == slots)[:, None]
    else:
      tgt_len = decoder_inputs.shape[1]
      self_mask = jnp.tril(jnp.ones((tgt_len, tgt_len), bool))[None, None]  # [1,1,tgt,tgt]
    layers = _layer_stack(DecoderLayer, cfg, cfg.num_decoder_layers, 5, self.sow_weights)
    y = layers(y, encoded, self_mask, cross_mask, deterministic)
    y = _final_norm(cfg, "final_norm")(y)
    logits = self.output(y) if self.output is not None else self.embed.attend(y)
    logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)  # [batch, tgt_len, vocab]


def shift_right(targets: Array) -> Array:
  """[y1, y2, ..., yn] -> [BOS, y1, ..., y(n-1)] along axis 1."""
  bos = jnp.full_like(targets[:, :1], BOS_ID)
  return jnp.concatenate([bos, targets[:, :-1]], axis=1)


class Transformer(nn.Module):
  """Encoder-decoder Transformer. `__call__(inputs, targets)` -> logits [batch, tgt_len, vocab].

  inputs: [batch, src_len] source ids + EOS, PAD-padded.
  targets: [batch, tgt_len] target ids + EOS, PAD-padded (teacher forcing).
  """
  config: ModelConfig
  sow_weights: bool = False

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      self.source_embed = SharedEmbedding(cfg, cfg.vocab_size, name="shared_embedding")
      self.target_embed = self.source_embed
      output = None
    else:
      tgt_vocab = cfg.output_vocab_size
      self.source_embed = SharedEmbedding(cfg, cfg.vocab_size, name="source_embedding")
      self.target_embed = SharedEmbedding(cfg, tgt_vocab, name="target_embedding")
      output = OutputProjection(cfg, tgt_vocab, name="output_projection")
    self.encoder = Encoder(cfg, self.source_embed, sow_weights=self.sow_weights, name="encoder")
    self.decoder = Decoder(cfg, self.target_embed, output, sow_weights=self.sow_weights,
                           name="decoder")

  def encode(self, inputs: Array, deterministic: bool = True) -> Array:
    return self.encoder(inputs, deterministic)  # [batch, src_len, d_model]

  def decode(self, encoded: Optional[Array], inputs: Array, decoder_inputs: Array,
             deterministic: bool = True, history: Optional[Array] = None) -> Array:
    return self.decoder(encoded, inputs, decoder_inputs, deterministic, history)

  def __call__(self, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
    encoded = self.encode(inputs, deterministic)
    return self.decode(encoded, inputs, shift_right(targets), deterministic)
