"""Section 6.1 inference: beam search over the decoder's KV cache (greedy = beam 1).

Score of a finished hypothesis Y: log P(Y | X) / lp(Y), lp(Y) = ((5 + |Y|) / 6)^alpha
(Wu et al. 2016), |Y| counting EOS. The output of each sentence is at most
(its source length + `max_decode_len_offset`) tokens long (with learned positions also at
most --max_len, the table's size); search stops early when
no alive hypothesis can still beat the worst of the `beam_size` finished ones.
The search is one compiled function per input shape: one `lax.while_loop`, or with
`cache_segment` one per width of the self-attention cache (see `cache_widths`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from transformer import kv_cache, sharding
from transformer.config import BOS_ID, EOS_ID, PAD_ID, DecodeConfig, ModelConfig
from transformer.model import Transformer
from transformer.ops import top_k

NEG_INF = -1.0e7


def length_penalty(length, alpha: float):
  """GNMT: ((5 + |Y|) / 6)^alpha."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@flax.struct.dataclass
class BeamState:
  i: jax.Array                # decode step (number of tokens generated so far)
  alive_seqs: jax.Array       # [batch, beam, max_len + 1] int32, BOS at position 0
  alive_log_probs: jax.Array  # [batch, beam]
  finished_seqs: jax.Array    # [batch, beam, max_len + 1]
  finished_scores: jax.Array  # [batch, beam] length-normalised; NEG_INF if empty
  finished_flags: jax.Array   # [batch, beam] bool
  cache: Any                  # decoder cache (self-attention: one slot per beam)
  history: jax.Array          # [batch, beam, width] int32: the cache slot of each position
                              # (width: the cache's current positions, <= max_len)
  constraint_state: Any = None  # pytree of [batch, beam, ...] arrays, or None


def _flat(x):  # [batch, beam, ...] -> [batch * beam, ...]
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unflat(x, batch):  # [batch * beam, ...] -> [batch, beam, ...]
  return x.reshape((batch, x.shape[0] // batch) + x.shape[1:])


def _take_beams(tree, indices):
  """Selects beams: every leaf [batch, beam, ...] -> [batch, k, ...] by indices [batch, k]."""
  return jax.tree.map(lambda x: jnp.take_along_axis(
      x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1), tree)


def cache_widths(max_len: int, cache_segment: int) -> list[int]:
  """Self-attention cache widths of the search's loops: cache_segment, 2x, 4x, ..., max_len.

  Step i reads positions 0..i, so a loop that runs while i < w needs a cache of w positions;
  the steps of a search that stops early never read the rest of max_len's cache (the cache
  is still grown, one padded copy per remaining width, before loops that run no step). A
  width at or above 80% of max_len is left out (max_len follows). Each width is one more
  loop body to compile. 0: one loop over max_len.
  """
  widths, w = [], cache_segment
  while 0 < w and 5 * w < 4 * max_len:
    widths.append(w)
    w *= 2
  return widths + [max_len]


def beam_search(params, inputs: jax.Array, *, model_cfg: ModelConfig, beam_size: int,
                alpha: float, max_decode_len_offset: int, constraint: Any = None,
                cache_segment: int = 0):
  """Beam search for a batch of sources.

  Args:
    params: model parameters.
    inputs: [batch, src_len] int32 source ids + EOS, PAD-padded.
    cache_segment: the search runs one loop per cache width of `cache_widths`, the cache
      growing between them (0: one loop).
    constraint: None, or an object that restricts the next token (e.g.
      `parsing.TreeConstraint`) with `init(inputs, beam_size) -> state` ([batch, beam, ...]
      leaves), `allowed(state, i, limits, vocab) -> [batch, beam, vocab] bool` and
      `update(state, token [batch, k]) -> state`. Disallowed tokens get log-prob NEG_INF
      (the model's distribution is not renormalised).
  Returns:
    sequences: [batch, beam, max_len] best-first finished hypotheses (EOS, then PAD).
    scores: [batch, beam] length-normalised log probabilities.
  """
  batch, src_len = inputs.shape
  max_len = src_len + max_decode_len_offset  # static bound for this input shape
  # Per-sentence bound: source length (non-pad tokens incl. EOS) + offset.
  limits = jnp.sum(inputs != PAD_ID, axis=1) + max_decode_len_offset  # [batch]
  if model_cfg.positional_encoding == "learned":
    # A learned table has no row past --max_len: outputs end there (EOS forced).
    max_len = min(max_len, model_cfg.max_len)
    limits = jnp.minimum(limits, model_cfg.max_len)
  model = Transformer(model_cfg)
  # Sinusoids exist at every position: the decoder's table covers the whole output limit
  # (its first --max_len rows are the training table's).
  decoder = Transformer(dataclasses.replace(model_cfg, max_len=max(model_cfg.max_len, max_len)),
                        decoding=True)

  # [batch, src_len, d_model]: once per sentence. The decoder's beam rows [batch * beam]
  # attend to it sentence by sentence (dot_product_attention's query-batch multiple).
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  widths = cache_widths(max_len, cache_segment)
  cache_shapes = jax.eval_shape(
      lambda: decoder.init(jax.random.PRNGKey(0), encoded, inputs,
                           jnp.zeros((batch * beam_size, widths[0]), jnp.int32),
                           method=Transformer.decode))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
  own_slot = jnp.arange(beam_size, dtype=jnp.int32)[:, None]  # [beam, 1]

  def own_slots(width):  # [batch, beam, width]: each position in the beam's own slot
    return jnp.broadcast_to(own_slot, (batch, beam_size, width))

  # Only beam 0 is alive at the start, so the first expansion has no duplicates.
  init = BeamState(
      i=jnp.array(0, jnp.int32),
      alive_seqs=jnp.full((batch, beam_size, max_len + 1), PAD_ID, jnp.int32).at[:, :, 0].set(BOS_ID),
      alive_log_probs=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1)), (batch, 1)),
      finished_seqs=jnp.full((batch, beam_size, max_len + 1), PAD_ID, jnp.int32),
      finished_scores=jnp.full((batch, beam_size), NEG_INF),
      finished_flags=jnp.zeros((batch, beam_size), bool),
      cache=cache,
      history=own_slots(widths[0]),
      constraint_state=None if constraint is None else constraint.init(inputs, beam_size))

  def not_done(s: BeamState):
    # Best score an alive beam could still reach: log-probs only fall, lp only grows.
    best_alive = s.alive_log_probs[:, 0] / length_penalty(limits, alpha)
    worst_finished = jnp.where(s.finished_flags, s.finished_scores, NEG_INF).min(axis=1)
    can_improve = ~jnp.all(s.finished_flags, axis=1) | (best_alive > worst_finished)
    return (s.i < max_len) & jnp.any(can_improve & (s.i < limits))

  def step(s: BeamState, encoded):
    """One token for every beam; `encoded` fills the cross-attention cache (None: read it)."""
    tokens = _flat(jax.lax.dynamic_slice_in_dim(s.alive_seqs, s.i, 1, axis=2))  # [b*k, 1]
    logits, new_vars = decoder.apply({"params": params, "cache": s.cache}, encoded, inputs,
                                     tokens, history=s.history, method=Transformer.decode,
                                     mutable=["cache"])
    log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32))  # [b*k, vocab]
    vocab = log_probs.shape[-1]
    log_probs = _unflat(log_probs, batch)                                # [b, k, vocab]
    # At a sentence's length limit only EOS may follow.
    at_limit = (s.i + 1 >= limits)[:, None, None]
    is_eos = (jnp.arange(vocab) == EOS_ID)[None, None, :]
    log_probs = jnp.where(at_limit & ~is_eos, NEG_INF, log_probs)
    if constraint is not None:
      log_probs = jnp.where(constraint.allowed(s.constraint_state, s.i, limits, vocab),
                            log_probs, NEG_INF)
    candidates = (s.alive_log_probs[:, :, None] + log_probs).reshape(batch, -1)  # [b, k*vocab]
    # 2k candidates always hold k that do not end in EOS.
    top_lp, top_idx = top_k(candidates, 2 * beam_size)  # [b, 2k]
    beam_idx, token = top_idx // vocab, top_idx % vocab
    seqs = jnp.take_along_axis(s.alive_seqs, beam_idx[:, :, None], axis=1)  # [b, 2k, T+1]
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], s.i + 1, axis=2)
    ended = token == EOS_ID
    # Alive: the best k candidates that did not end.
    alive_lp = jnp.where(ended, NEG_INF, top_lp)
    alive_lp, alive_pick = jax.lax.top_k(alive_lp, beam_size)
    alive_seqs = jnp.take_along_axis(seqs, alive_pick[:, :, None], axis=1)
    parents = jnp.take_along_axis(beam_idx, alive_pick, axis=1)  # [b, k] beam of each alive
    constraint_state = None
    if constraint is not None:
      constraint_state = constraint.update(_take_beams(s.constraint_state, parents),
                                           jnp.take_along_axis(token, alive_pick, axis=1))
    # Each alive beam continues its parent's prefix: positions 0..i come from the parent's
    # slots; position i + 1 will be written to the beam's own slot. The cache stays put.
    history = jnp.where(jnp.arange(s.history.shape[-1]) <= s.i,
                        _take_beams(s.history, parents), own_slot)
    # Finished: merge the newly ended candidates into the best k so far.
    new_scores = jnp.where(ended & (top_lp > NEG_INF / 2),
                           top_lp / length_penalty(s.i + 1, alpha), NEG_INF)
    all_seqs = jnp.concatenate([s.finished_seqs, seqs], axis=1)
    all_scores = jnp.concatenate([s.finished_scores, new_scores], axis=1)
    all_flags = jnp.concatenate([s.finished_flags, new_scores > NEG_INF / 2], axis=1)
    fin_scores, fin_pick = jax.lax.top_k(jnp.where(all_flags, all_scores, 2 * NEG_INF), beam_size)
    return BeamState(
        i=s.i + 1, alive_seqs=alive_seqs, alive_log_probs=alive_lp,
        finished_seqs=jnp.take_along_axis(all_seqs, fin_pick[:, :, None], axis=1),
        finished_scores=jnp.maximum(fin_scores, NEG_INF),
        finished_flags=jnp.take_along_axis(all_flags, fin_pick, axis=1),
        cache=new_vars["cache"], history=history, constraint_state=constraint_state)

  # The first step projects the encoder output into the cross-attention cache (every
  # sentence needs at least one step: EOS); the loop's steps only read it.
  s = step(init, encoded)
  for width in widths:
    if width > s.history.shape[-1]:  # room for positions up to width - 1
      new = own_slots(width - s.history.shape[-1])
      s = s.replace(cache=kv_cache.extend(s.cache, width, beam_size),
                    history=jnp.concatenate([s.history, new], axis=2))
    s = jax.lax.while_loop(lambda s, w=width: not_done(s) & (s.i < w),
                           lambda s: step(s, None), s)
  return s.finished_seqs[:, :, 1:], s.finished_scores


@dataclasses.dataclass
class BeamSearcher:
  """Jitted beam search, sharded over the mesh; compiles once per input shape."""
  model_cfg: ModelConfig
  decode_cfg: DecodeConfig
  mesh: Mesh
  params_shardings: Any
  constraint: Any = None  # see beam_search

  def __post_init__(self):
    fn = functools.partial(beam_search, model_cfg=self.model_cfg,
                           beam_size=self.decode_cfg.beam_size, alpha=self.decode_cfg.alpha,
                           max_decode_len_offset=self.decode_cfg.max_decode_len_offset,
                           cache_segment=self.decode_cfg.cache_segment,
                           constraint=self.constraint)
    batch_sh = sharding.batch_sharding(self.mesh)
    self._search = jax.jit(fn, in_shardings=(self.params_shardings, batch_sh),
                           out_shardings=(batch_sh, batch_sh))

  def __call__(self, params, inputs: jax.Array):
    """Returns the best hypothesis per sentence: [batch, max_len] ids and [batch] scores."""
    with sharding.mesh_context(self.mesh):
      seqs, scores = self._search(params, inputs)
    return seqs[:, 0], scores[:, 0]

  def lower(self, params, inputs):
    """The jitted search lowered for abstract params and inputs [batch, src_len]."""
    with sharding.mesh_context(self.mesh):
      return self._search.lower(params, inputs)
