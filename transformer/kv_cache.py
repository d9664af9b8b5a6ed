"""The decoder's key/value cache: one token per call, for the beam search of decode.py.

`Transformer(cfg, decoding=True).decode` runs one step for rows [batch, 1], batch = r *
src_batch: r rows (beams) per source sentence, sentence-major. Its 'cache' collection holds

  decoder/step/position    int32: tokens decoded so far = this step's position (`DecodeStep`);
  per decoder layer, self_attention/cache (`KVCache(kind='self')`): every earlier step's keys
    and values, one slot per row, position p of slot s at p * r + s:
      cached_key [src_batch, heads, d_k, max_len * r], cached_value [src_batch, heads,
      max_len * r, d_v], cache_index int32;
  per decoder layer, cross_attention/cache (`KVCache(kind='cross')`): the projected encoder
    output, once per sentence (never repeated per beam):
      cross_key [src_batch, heads, d_k, src_len], cross_value [src_batch, heads, src_len, d_v].

The caches are head-major, the layout of a batched matmul over (batch, heads), so a step reads
them in place, and keys are stored transposed (K^T) so that Q K^T is a plain matmul (XLA:CPU
ran the form that contracts both operands' last axes 2-6x slower at beam search's shapes);
`model.dot_product_attention(..., head_major=True)` reads this layout. A step writes one small
block per (sentence, head). The cache is never reordered: beam search passes `history`
[src_batch, r, width], the slot holding position p of row j's prefix, and rewrites it instead.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.config import ModelConfig

Array = jax.Array


def _constrain_heads(x: Array) -> Array:  # [batch, heads, ., .] activation sharding hint
  return nn.with_logical_constraint(x, ("activation_batch", "activation_heads", None, None))


class DecodeStep(nn.Module):
  """This call's position (a counter in 'cache') and the rows' slot mask for self-attention."""

  @nn.compact
  def __call__(self, src_batch: int, batch: int,
               history: Optional[Array]) -> tuple[Optional[Array], Array]:
    """history: [src_batch, r, width] int32, or None: every row reads its own slot.

    Returns the position (int32 scalar; None during `init`, which runs the full width) and
    the mask [src_batch, 1, r, width | 1, r]: row j may read position p from slot s. The
    self-attention caches add the causal part (positions up to this step's).
    """
    r = batch // src_batch
    if r * src_batch != batch:
      raise ValueError(f"decoder batch {batch} is not a multiple of the source batch {src_batch}")
    if history is not None and history.shape[:2] != (src_batch, r):
      raise ValueError(f"history {history.shape} does not start with (source batch, rows)"
                       f" = {(src_batch, r)}")
    slots = jnp.arange(r)
    if history is None:
      mask = jnp.broadcast_to((slots[:, None] == slots[None, :])[None, None, :, None, :],
                              (src_batch, 1, r, 1, r))
    else:
      mask = (history[:, :, :, None] == slots)[:, None]
    initialized = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return None, mask
    p = position.value
    position.value = p + 1
    return p, mask


class KVCache(nn.Module):
  """Keys and values of one decoder attention layer while decoding (layouts: module doc).

  kind 'self': this step's keys/values are written into the rows' slots, and all slots read.
  kind 'cross': the encoder output is projected once, when `inputs_kv` is given, and read
  back from the cache when it is None.
  """
  config: ModelConfig
  kind: str  # 'self' | 'cross'

  @nn.compact
  def __call__(self, inputs_kv: Optional[Array], w_k: Array, w_v: Array,
               mask: Array) -> tuple[Array, Array, Array]:
    """Projects `inputs_kv` [kv_batch, kv_len, d_model] with w_k [d_model, heads, d_k] and
    w_v [d_model, heads, d_v] into the cache. Returns K^T [src_batch, heads, d_k, kv_len],
    V [src_batch, heads, kv_len, d_v] and the attention mask over kv_len (see `_self`)."""
    dtype = self.config.dtype

    def project(w, spec):  # [kv_batch, kv_len, d_model] -> spec's layout
      return _constrain_heads(jnp.einsum(spec, inputs_kv.astype(dtype), w))

    if self.kind == "self":
      return self._self(project(w_k, "bld,dhk->bhkl"), project(w_v, "bld,dhk->bhlk"), mask)
    if self.kind != "cross":
      raise ValueError(f"unknown cache kind {self.kind!r}")
    if inputs_kv is None:
      if not self.has_variable("cache", "cross_key"):
        raise ValueError("inputs_kv=None needs a cross-attention cache filled by a decode call"
                         " with the encoder output")
      key_t, value = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
      return key_t, value, mask
    key_t, value = project(w_k, "bld,dhk->bhkl"), project(w_v, "bld,dhk->bhlk")
    self.variable("cache", "cross_key", lambda: key_t).value = key_t
    self.variable("cache", "cross_value", lambda: value).value = value
    return key_t, value, mask

  def _self(self, key_t: Array, value: Array, mask: Array) -> tuple[Array, Array, Array]:
    """Writes this step's keys/values into the rows' slots; returns every slot and the mask.

    key_t: [src_batch * r, heads, d_k, 1], value: [src_batch * r, heads, 1, d_v] (during
    `init` max_len instead of 1, which sizes the cache). mask: [src_batch, 1, r, max_len | 1,
    r] from `DecodeStep`. Returns the cached keys and values and the mask [src_batch, 1, r,
    max_len * r], which also hides positions after this step's.
    """
    src_batch, _, r = mask.shape[:3]

    def slots(x):  # [src_batch * r, heads, length, d] -> [src_batch, heads, length * r, d]
      x = x.reshape((src_batch, r) + x.shape[1:]).transpose(0, 2, 3, 1, 4)
      return _constrain_heads(x.reshape(x.shape[:2] + (x.shape[2] * r, x.shape[4])))

    slots_t = lambda x: slots(x.swapaxes(2, 3)).swapaxes(2, 3)
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", lambda: slots_t(jnp.zeros_like(key_t)))
    cached_value = self.variable("cache", "cached_value", lambda: slots(jnp.zeros_like(value)))
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # init: plain attention over the init call's rows
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


def extend(cache, max_len: int, rows: int):
  """The 'cache' collection with room for max_len positions: each self-attention key/value
  cache (rows slots per sentence) is padded with zeros after its last position. Filled
  positions and every other entry stay as they are.
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
