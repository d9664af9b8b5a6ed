"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), section 3.

In the order of the paper:
  3     model architecture              -> `Transformer` (encoder-decoder), `shift_right`
  3.1   encoder and decoder stacks      -> `Encoder`, `Decoder`, `EncoderLayer`, `DecoderLayer`,
                                           `Sublayer` (residual connection + layer norm)
  3.2.1 scaled dot-product attention    -> `dot_product_attention`
  3.2.2 multi-head attention            -> `MultiHeadAttention`
  3.3   position-wise feed-forward      -> `FeedForward`
  3.4   embeddings and softmax          -> `SharedEmbedding` (one matrix, scaled by sqrt(d_model))
  3.5   positional encoding             -> `sinusoidal_positions`, `AddPositions`
Dropout (section 5.4) is `ops.Dropout`. Decoding one token at a time (section 6.1, decode.py)
reads keys and values from the cache of kv_cache.py: `Transformer(cfg, decoding=True)`.

Shapes use [batch, length, heads, head_dim]. Parameters carry logical axis names
('vocab', 'embed', 'heads', 'kv', 'mlp'); `sharding.py` maps them onto the mesh.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer import kv_cache
from transformer.config import BOS_ID, PAD_ID, ModelConfig
from transformer.ops import Dropout, dropout

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
# 3 Model architecture
# ----------------------------------------------------------------------------

class Transformer(nn.Module):
  """Encoder-decoder Transformer. `__call__(inputs, targets)` -> logits [batch, tgt_len, vocab].

  inputs: [batch, src_len] source ids + EOS, PAD-padded.
  targets: [batch, tgt_len] target ids + EOS, PAD-padded (teacher forcing).
  With `decoding=True` (set by the beam search) `decode` runs one token per call over the
  'cache' collection of kv_cache.py.
  """
  config: ModelConfig
  decoding: bool = False

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
    self.encoder = Encoder(cfg, self.source_embed, name="encoder")
    self.decoder = Decoder(cfg, self.target_embed, output, decoding=self.decoding, name="decoder")

  def encode(self, inputs: Array, deterministic: bool = True) -> Array:
    return self.encoder(inputs, deterministic)  # [batch, src_len, d_model]

  def decode(self, encoded: Optional[Array], inputs: Array, decoder_inputs: Array,
             deterministic: bool = True, history: Optional[Array] = None) -> Array:
    return self.decoder(encoded, inputs, decoder_inputs, deterministic, history)

  def __call__(self, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
    encoded = self.encode(inputs, deterministic)
    return self.decode(encoded, inputs, shift_right(targets), deterministic)


def shift_right(targets: Array) -> Array:
  """Decoder inputs, "outputs shifted right": [y1, ..., yn] -> [BOS, y1, ..., y(n-1)] (axis 1)."""
  bos = jnp.full_like(targets[:, :1], BOS_ID)
  return jnp.concatenate([bos, targets[:, :-1]], axis=1)


# ----------------------------------------------------------------------------
# 3.1 Encoder and decoder stacks
# ----------------------------------------------------------------------------

class Encoder(nn.Module):
  """N encoder layers over (embedding * sqrt(d_model) + PE), with dropout on the sum."""
  config: ModelConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    cfg = self.config
    # inputs: [batch, src_len] int32 -> x: [batch, src_len, d_model]
    x = AddPositions(cfg, name="positions")(self.embed(inputs))
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    mask = (inputs != PAD_ID)[:, None, None, :]  # [batch, 1, 1, src_len]
    layers = _layer_stack(EncoderLayer, cfg, cfg.num_encoder_layers, 3)
    x = layers(x, mask, deterministic)
    return _final_norm(cfg, "final_norm")(x)


class Decoder(nn.Module):
  """N decoder layers; output logits through the (shared) pre-softmax projection."""
  config: ModelConfig
  embed: nn.Module
  output: Optional[nn.Module] = None  # untied projection; None -> embed.attend
  decoding: bool = False

  @nn.compact
  def __call__(self, encoded: Optional[Array], inputs: Array, decoder_inputs: Array,
               deterministic: bool, history: Optional[Array] = None) -> Array:
    cfg = self.config
    # encoded: [src_batch, src_len, d_model] (None when decoding: the cross-attention cache);
    # inputs: [src_batch, src_len] source ids (for the padding mask);
    # decoder_inputs: [batch, tgt_len] (BOS + shifted targets, or one token when decoding),
    # batch = r * src_batch, r rows (beams) per source sentence, sentence-major;
    # history: decoding only, see kv_cache.DecodeStep.
    if self.decoding:  # this step's position, and the rows' cache slots
      position, self_mask = kv_cache.DecodeStep(name="step")(
          inputs.shape[0], decoder_inputs.shape[0], history)
    else:
      tgt_len = decoder_inputs.shape[1]
      position = None
      self_mask = jnp.tril(jnp.ones((tgt_len, tgt_len), bool))[None, None]  # [1,1,tgt,tgt]
    y = AddPositions(cfg, name="positions")(self.embed(decoder_inputs), position)
    y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    cross_mask = (inputs != PAD_ID)[:, None, None, :]  # [src_batch, 1, 1, src_len]
    layers = _layer_stack(DecoderLayer, cfg, cfg.num_decoder_layers, 5, decoding=self.decoding)
    y = layers(y, encoded, self_mask, cross_mask, deterministic)
    y = _final_norm(cfg, "final_norm")(y)
    logits = self.output(y) if self.output is not None else self.embed.attend(y)
    logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)  # [batch, tgt_len, vocab]


class EncoderLayer(nn.Module):
  """Self-attention sublayer, then feed-forward sublayer."""
  config: ModelConfig
  scanned: bool = False  # body of nn.scan: returns (x, None)

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    attn = MultiHeadAttention(cfg, name="self_attention")
    ffn = FeedForward(cfg, name="ffn")
    x = _sublayers(cfg, x, deterministic, [
        ("attention_block", lambda y: attn(y, y, mask, deterministic)),
        ("ffn_block", lambda y: ffn(y, deterministic))])
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Masked self-attention, encoder-decoder attention, feed-forward; each a sublayer."""
  config: ModelConfig
  decoding: bool = False  # keys/values from kv_cache.KVCache
  scanned: bool = False   # body of nn.scan: returns (x, None)

  @nn.compact
  def __call__(self, x: Array, encoded: Optional[Array], self_mask: Optional[Array],
               cross_mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    self_attn = MultiHeadAttention(cfg, cache="self" if self.decoding else None,
                                   name="self_attention")
    cross_attn = MultiHeadAttention(cfg, cache="cross" if self.decoding else None,
                                    name="cross_attention")
    ffn = FeedForward(cfg, name="ffn")
    x = _sublayers(cfg, x, deterministic, [
        ("self_attention_block", lambda y: self_attn(y, y, self_mask, deterministic)),
        ("cross_attention_block", lambda y: cross_attn(y, encoded, cross_mask, deterministic)),
        ("ffn_block", lambda y: ffn(y, deterministic))])
    return (x, None) if self.scanned else x


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


def _sublayers(cfg: ModelConfig, x: Array, deterministic: bool, blocks) -> Array:
  """x [batch, length, d_model] through each (name, sublayer) of a layer in turn."""
  for name, sublayer in blocks:
    x = Sublayer(cfg, name=name)(x, sublayer, deterministic)
  return _constrain(x, ("activation_batch", "activation_length", "activation_embed"))


def _final_norm(cfg: ModelConfig, name: str):
  """Pre-LN stacks end with a LayerNorm; post-LN stacks are already normalised."""
  if not cfg.pre_layer_norm:
    return lambda x: x
  return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scale_init=_partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=_partitioned(nn.initializers.zeros, ("embed",)), name=name)


def _layer_stack(cls, cfg: ModelConfig, num_layers: int, deterministic_argnum: int, **kwargs):
  """`x = stack(x, *args)`: N layers `cls(cfg, **kwargs)`, optionally rematerialised
  (`deterministic`, argument `deterministic_argnum` counting self, stays static), as a Python
  loop (params layer_0..layer_{N-1}) or, with --scan_layers, one nn.scan (params 'layers'
  stacked [N, ...], logical axis 'layers'; the decoding cache is stacked the same way).
  Other arguments are broadcast to every layer."""
  layer = nn.remat(cls, static_argnums=(deterministic_argnum,)) if cfg.remat else cls
  if not cfg.scan_layers:
    def loop(x, *args):
      for i in range(num_layers):
        x = layer(cfg, name=f"layer_{i}", **kwargs)(x, *args)
      return x
    return loop
  stacked = nn.scan(layer, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * (deterministic_argnum - 1), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  module = stacked(cfg, scanned=True, name="layers", **kwargs)
  return lambda x, *args: module(x, *args)[0]


# ----------------------------------------------------------------------------
# 3.2.1 Scaled dot-product attention
# ----------------------------------------------------------------------------

def masked_softmax(logits: Array, mask: Optional[Array]) -> Array:
  """softmax over the last axis in float32; positions where mask is False get weight 0."""
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def attention_weights(query: Array, key: Array, mask: Optional[Array],
                      head_major: bool = False) -> Array:
  """softmax(Q K^T / sqrt(d_k)) [kv_batch, heads, r * q_len, kv_len] float32 (shapes below)."""
  batch, q_len = query.shape[:2]
  kv_batch = key.shape[0]
  r = batch // kv_batch
  if r * kv_batch != batch:
    raise ValueError(f"query batch {batch} is not a multiple of key batch {kv_batch}")
  # [r * kv_batch, q_len, heads, d_k] -> [kv_batch, r * q_len, heads, d_k]
  query = query.reshape((kv_batch, r * q_len) + query.shape[2:])
  query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  logits = jnp.einsum("bqhd,bhdk->bhqk" if head_major else "bqhd,bkhd->bhqk", query, key)
  return masked_softmax(logits, mask)


def dot_product_attention(query: Array, key: Array, value: Array, mask: Optional[Array],
                          dropout_rng: Optional[Array] = None, dropout_rate: float = 0.0, *,
                          implementation: str = "einsum", head_major: bool = False,
                          dtype=jnp.float32) -> Array:
  """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, every path's attention (eq. 1).

  Args:
    query: [batch, q_len, heads, d_k], batch = r * kv_batch: r query rows (beams) per
      key/value row, sentence-major, attend to that row's keys and values.
    key:   [kv_batch, kv_len, heads, d_k]; head_major (the decoding cache's layout):
      K^T [kv_batch, heads, d_k, kv_len].
    value: [kv_batch, kv_len, heads, d_v]; head_major: [kv_batch, heads, kv_len, d_v].
    mask:  bool, broadcastable to [kv_batch, heads, r * q_len, kv_len]; True = attend.
    dropout_rng: with dropout_rate > 0, dropout on the attention weights.
    implementation: 'xla' | 'cudnn': `jax.nn.dot_product_attention`'s fused kernel (the same
      formula; only without dropout, with d_k = d_v, r = 1 and the standard layout); 'einsum'.
      An edit to the formula below reaches training with 'einsum' (or attention dropout);
      tests/test_model.py checks that the fused kernel computes the same numbers.
  Returns:
    [batch, q_len, heads, d_v]
  """
  batch, q_len = query.shape[:2]
  fused = (implementation in ("xla", "cudnn") and dropout_rate == 0.0 and not head_major
           and key.shape[0] == batch and query.shape[-1] == value.shape[-1])
  if fused:
    return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                        scale=1.0 / np.sqrt(query.shape[-1]),
                                        implementation=implementation)
  weights = attention_weights(query, key, mask, head_major)
  if dropout_rng is not None and dropout_rate > 0.0:
    weights = dropout(weights, dropout_rate, dropout_rng)
  if head_major:
    # Head-major product, then a transpose of the small result: XLA:CPU runs this batched
    # matmul ~3x faster than one that writes [kv_batch, r * q_len, heads, d_v] directly.
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(dtype), value).transpose(0, 2, 1, 3)
  else:
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), value)
  return out.reshape((batch, q_len) + out.shape[2:])


# ----------------------------------------------------------------------------
# 3.2.2 Multi-head attention
# ----------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

  W^Q, W^K: [d_model, h, d_k]; W^V: [d_model, h, d_v]; W^O: [h, d_v, d_model]; no biases.
  While decoding (`cache` 'self' or 'cross') the keys and values come from
  `kv_cache.KVCache`; `inputs_kv` may then be None (cross-attention: read the cache).
  The weights are sown as 'intermediates'/'attention_weights' when that collection is
  mutable (attention pictures).
  """
  config: ModelConfig
  cache: Optional[str] = None  # None | 'self' | 'cross' (decoding)

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
    activation = ("activation_batch", "activation_length", "activation_heads", None)
    # query: [batch, q_len, heads, d_k]
    query = _constrain(jnp.einsum("bld,dhk->blhk", inputs_q.astype(cfg.dtype), w_q), activation)
    if self.cache is None:
      inputs_kv = inputs_kv.astype(cfg.dtype)
      # key: [batch, kv_len, heads, d_k]; value: [batch, kv_len, heads, d_v]
      key = _constrain(jnp.einsum("bld,dhk->blhk", inputs_kv, w_k), activation)
      value = _constrain(jnp.einsum("bld,dhk->blhk", inputs_kv, w_v), activation)
    else:  # head-major keys/values of every step so far, and their mask
      key, value, mask = kv_cache.KVCache(cfg, self.cache, name="cache")(inputs_kv, w_k, w_v, mask)
    dropout_rng = None
    if not deterministic and cfg.attention_dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    out = dot_product_attention(query, key, value, mask, dropout_rng, cfg.attention_dropout_rate,
                                implementation=cfg.attention_impl,
                                head_major=self.cache is not None, dtype=cfg.dtype)
    if self.is_mutable_collection("intermediates"):  # recomputed: never on the training path
      self.sow("intermediates", "attention_weights",
               attention_weights(query, key, mask, self.cache is not None))
    # out: [batch, q_len, heads, d_v] -> [batch, q_len, d_model]
    return jnp.einsum("blhk,hkd->bld", out, w_o)


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

  x: [batch, length, d_model]; `position` (int32 scalar, decoding) is that of x's first
  token, else 0. A position past the table would read its last row (dynamic_slice clamps),
  so `decode.beam_search` never decodes one: it sizes the sinusoidal table from its output
  limit and caps the output at max_len for a learned one.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, position: Optional[Array] = None) -> Array:
    cfg = self.config
    length = x.shape[1]
    if cfg.positional_encoding == "learned":
      table = self.param("pos_embedding",
                         _partitioned(nn.initializers.normal(stddev=0.02), (None, "embed")),
                         (cfg.max_len, cfg.d_model), cfg.param_dtype)
    else:
      table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))
    if position is not None:
      pe = jax.lax.dynamic_slice_in_dim(table, position, length)[None]  # [1, length, d_model]
      return x + pe.astype(x.dtype)
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds --max_len={cfg.max_len}")
    return x + table[None, :length].astype(x.dtype)
