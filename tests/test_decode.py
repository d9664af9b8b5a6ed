"""Section 6.1 checks: beam search against exhaustive search, greedy, and the KV cache."""

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import decode
from transformer.config import BOS_ID, EOS_ID, ModelConfig
from transformer.model import Transformer

CFG = ModelConfig(vocab_size=6, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                  num_decoder_layers=2, max_len=16)


def _params(cfg=CFG, scale=3.0):
  m = Transformer(cfg)
  params = nn.unbox(m.init(jax.random.PRNGKey(1), jnp.ones((1, 4), jnp.int32),
                           jnp.ones((1, 4), jnp.int32))["params"])
  return m, jax.tree.map(lambda x: x * scale, params)  # sharper next-token distributions


def _log_probs(m, params, src, ys):
  """log P(y | src) of equal-length sequences ys, by teacher-forced forward passes (no cache)."""
  ys = np.asarray(ys, np.int32)
  logits = m.apply({"params": params}, jnp.asarray(np.repeat(src[None], len(ys), 0)),
                   jnp.asarray(ys))
  lp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)  # [n, length, vocab]
  return np.take_along_axis(lp, ys[:, :, None], axis=2)[:, :, 0].sum(1)


@pytest.mark.parametrize("cache_segment", [0, 2])
def test_beam_search_equals_exhaustive_search(cache_segment):
  """cache_segment=2: the cache grows 2 -> 4 -> 6 positions between three loops."""
  m, params = _params()
  inputs = np.array([[4, 5, 1, 0], [5, 1, 0, 0]], np.int32)
  offset, alpha, beam = 2, 0.6, 40
  assert decode.cache_widths(4 + offset, cache_segment) == ([2, 4, 6] if cache_segment else [6])
  seqs, scores = decode.beam_search(params, jnp.asarray(inputs), model_cfg=CFG, beam_size=beam,
                                    alpha=alpha, max_decode_len_offset=offset,
                                    cache_segment=cache_segment)
  for b in range(2):
    limit = int((inputs[b] != 0).sum()) + offset  # source length + offset
    scored = []
    for length in range(1, limit + 1):  # every sequence ending in EOS within the limit
      ys = [list(p) + [EOS_ID] for p in
            itertools.product([t for t in range(6) if t != EOS_ID], repeat=length - 1)]
      lp = ((5 + length) / 6) ** alpha
      scored += [(s / lp, y) for s, y in zip(_log_probs(m, params, inputs[b], ys), ys)]
    scored.sort(key=lambda s: -s[0])
    best_score, best_y = scored[0]
    got = np.asarray(seqs[b, 0])
    assert got[:len(best_y)].tolist() == best_y and (got[len(best_y):] == 0).all()
    # float32 rounding: the cached decode and the full forward passes add in other orders, and
    # how depends on the CPU's vector width (1.3e-4 at a score of -10.4 with AVX-512).
    np.testing.assert_allclose(float(scores[b, 0]), best_score, rtol=5e-5, atol=1e-4)
    # All 40 finished hypotheses are the exhaustive top 40, in order.
    np.testing.assert_allclose(np.asarray(scores[b]), [s for s, _ in scored[:beam]], rtol=5e-5,
                               atol=1e-4)


def test_cached_decoding_equals_full_forward_pass():
  m, params = _params(scale=1.0)
  dm = Transformer(CFG, decoding=True)
  inputs = jnp.array([[4, 5, 1, 0], [5, 1, 0, 0]], jnp.int32)
  targets = jnp.array([[4, 5, 3, 1], [5, 4, 1, 0]], jnp.int32)
  full = m.apply({"params": params}, inputs, targets)
  encoded = m.apply({"params": params}, inputs, method=Transformer.encode)
  cache = dm.init(jax.random.PRNGKey(0), encoded, inputs, jnp.zeros((2, 4), jnp.int32),
                  method=Transformer.decode)["cache"]
  dec_in = np.concatenate([np.full((2, 1), BOS_ID), np.asarray(targets[:, :-1])], 1)
  steps = []
  for t in range(4):
    logits, v = dm.apply({"params": params, "cache": cache}, encoded, inputs,
                         jnp.asarray(dec_in[:, t:t + 1]), method=Transformer.decode,
                         mutable=["cache"])
    cache = v["cache"]
    steps.append(np.asarray(logits[:, 0]))
  np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full), atol=1e-4)


def test_cross_attention_cache_and_beam_rows_equal_full_forward_pass():
  """Beam layout: r = 3 decoder rows per sentence against one copy of the encoder output;
  only the first step passes `encoded` (projected into the cross-attention cache), the later
  steps pass None and read it back. Every row must match the uncached teacher-forced pass."""
  m, params = _params(scale=1.0)
  dm = Transformer(CFG, decoding=True)
  inputs = jnp.array([[4, 5, 1, 0], [5, 1, 0, 0]], jnp.int32)
  targets = jnp.array([[4, 5, 3, 1], [5, 4, 1, 0]], jnp.int32)
  full = np.asarray(m.apply({"params": params}, inputs, targets))  # [2, 4, vocab]
  encoded = m.apply({"params": params}, inputs, method=Transformer.encode)
  r = 3
  rows = np.repeat(np.asarray(targets), r, axis=0)  # [6, 4], sentence-major
  cache = dm.init(jax.random.PRNGKey(0), encoded, inputs, jnp.zeros((2 * r, 4), jnp.int32),
                  method=Transformer.decode)["cache"]
  dec_in = np.concatenate([np.full((2 * r, 1), BOS_ID), rows[:, :-1]], 1)
  steps = []
  for t in range(4):
    logits, v = dm.apply({"params": params, "cache": cache}, encoded if t == 0 else None,
                         inputs, jnp.asarray(dec_in[:, t:t + 1]), method=Transformer.decode,
                         mutable=["cache"])
    cache = v["cache"]
    steps.append(np.asarray(logits[:, 0]))
  cross = cache["decoder"]["layer_0"]["cross_attention"]["cache"]["cross_key"]  # [2, heads, d_k, 4]
  assert cross.shape[0] == 2  # one copy per sentence, not per beam row
  np.testing.assert_allclose(np.stack(steps, 1), np.repeat(full, r, axis=0), atol=1e-4)
  with pytest.raises(ValueError, match="multiple"):
    dm.apply({"params": params, "cache": cache}, None, inputs, jnp.zeros((5, 1), jnp.int32),
             method=Transformer.decode, mutable=["cache"])


@pytest.mark.parametrize("parent", [(1, 0), (1, 1), (0, 0)])
def test_history_lets_rows_continue_other_rows_prefixes_without_moving_the_cache(parent):
  """Beam reordering by `history` alone: from step 2 on, row j of each sentence continues the
  first two tokens of row parent[j] (both rows swap prefixes; both continue row 1's; both
  continue row 0's), as beam search does when children come from other parents or share
  one. Each step's logits must equal the uncached forward pass over the sequence the row
  now continues, and the cache must keep its shapes."""
  m, params = _params(scale=1.0)
  dm = Transformer(CFG, decoding=True)
  inputs = jnp.array([[4, 5, 1, 0], [5, 1, 0, 0]], jnp.int32)
  encoded = m.apply({"params": params}, inputs, method=Transformer.encode)
  r, steps = 2, 4
  # Tokens fed at each step, rows sentence-major: [2 * r, steps].
  fed = np.array([[BOS_ID, 4, 5, 3], [BOS_ID, 3, 4, 4],
                  [BOS_ID, 5, 3, 4], [BOS_ID, 4, 4, 5]], np.int32)
  parent = np.array(parent)
  seen = fed.copy()  # the decoder input each row has seen, after the reordering
  for b in range(2):
    seen[b * r:(b + 1) * r, :2] = fed[b * r + parent, :2]
  cache = dm.init(jax.random.PRNGKey(0), encoded, inputs, jnp.zeros((2 * r, steps), jnp.int32),
                  method=Transformer.decode)["cache"]
  shapes_before = jax.tree.map(jnp.shape, cache)
  got = []
  for t in range(steps):
    history = np.broadcast_to(np.arange(r)[None, :, None], (2, r, steps)).copy()
    if t >= 2:
      history[:, :, :2] = parent[None, :, None]
    logits, v = dm.apply({"params": params, "cache": cache}, encoded if t == 0 else None,
                         inputs, jnp.asarray(fed[:, t:t + 1]), history=jnp.asarray(history),
                         method=Transformer.decode, mutable=["cache"])
    cache = v["cache"]
    got.append(np.asarray(logits[:, 0]))
  assert jax.tree.map(jnp.shape, cache) == shapes_before
  rows_inputs = jnp.repeat(inputs, r, axis=0)
  # Teacher forcing: decoder input = shift_right(targets), so targets = inputs shifted left.
  before = np.asarray(m.apply({"params": params}, rows_inputs,
                              jnp.asarray(np.concatenate([fed[:, 1:], fed[:, :1]], 1))))
  after = np.asarray(m.apply({"params": params}, rows_inputs,
                             jnp.asarray(np.concatenate([seen[:, 1:], seen[:, :1]], 1))))
  np.testing.assert_allclose(np.stack(got[:2], 1), before[:, :2], atol=1e-4)
  np.testing.assert_allclose(np.stack(got[2:], 1), after[:, 2:], atol=1e-4)
  # The reordering matters: a row that continues another row's prefix gets other logits.
  moved = np.tile(parent != np.arange(r), 2)
  assert np.abs(np.stack(got[2:], 1) - before[:, 2:])[moved].max(axis=(1, 2)).min() > 1e-3
  with pytest.raises(ValueError, match="history"):
    dm.apply({"params": params, "cache": cache}, None, inputs, jnp.asarray(fed[:, :1]),
             history=jnp.zeros((2, r, steps + 1), jnp.int32), method=Transformer.decode,
             mutable=["cache"])


@pytest.mark.parametrize("max_len,segment,widths", [
    (24, 8, [8, 16, 24]), (66, 8, [8, 16, 32, 66]), (20, 8, [8, 20]), (10, 8, [10]),
    (8, 8, [8]), (24, 0, [24]), (1, 4, [1])])
def test_cache_widths_double_and_leave_out_the_last_within_80_percent(max_len, segment, widths):
  assert decode.cache_widths(max_len, segment) == widths


def test_length_penalty_formula():
  assert abs(float(decode.length_penalty(7, 0.6)) - (12 / 6) ** 0.6) < 1e-6
  assert float(decode.length_penalty(30, 0.0)) == 1.0


def test_decoding_compiles_once_per_bucket_shape_and_never_between_batches(multi30k_dir):
  """Length-bucketed eval batches (last batch of a bucket padded with -1 rows): the jitted
  beam search compiles once per [batch, length] shape, and a second pass compiles nothing."""
  from transformer import sharding
  from transformer.config import DecodeConfig, TrainConfig
  from transformer.data import pipeline
  from transformer.train import Trainer

  class WordIds:
    def encode(self, text):
      return [4 + sum(map(ord, w)) % 60 for w in text.split()]

  en = (multi30k_dir / "val.en").read_text(encoding="utf-8").splitlines()[:150]
  examples = [{"source": s, "target": s, "id": i} for i, s in enumerate(en)]
  tokenized = pipeline.tokenize_split(examples, WordIds())
  batches = pipeline.make_eval_batches(tokenized, 192, [8, 12, 16, 24, 32])
  cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1)
  mesh = sharding.make_mesh("data:1", jax.devices()[:1])
  trainer = Trainer(cfg, TrainConfig(), mesh)
  params = trainer.init_state(0).params
  searcher = decode.BeamSearcher(cfg, DecodeConfig(beam_size=2, max_decode_len_offset=4), mesh,
                                 trainer.state_shardings.params)
  shapes = {b["inputs"].shape for b in batches}
  assert len(batches) > len(shapes) > 1
  for _ in range(2):
    for b in batches:
      seqs, _ = searcher(params, sharding.global_batch({"inputs": b["inputs"]}, mesh)["inputs"])
      assert seqs.shape[0] == b["inputs"].shape[0]
  assert searcher._search._cache_size() == len(shapes)  # pylint: disable=protected-access


_ROWS, _WIDTH = 4, 9  # one compiled shape for every uncached pass of the oracles below


@functools.lru_cache(maxsize=None)
def _forward(cfg=CFG):
  m = Transformer(cfg)
  return jax.jit(lambda p, x, y: jax.nn.log_softmax(m.apply({"params": p}, x, y), axis=-1))


def _padded_log_probs(params, src, ys):
  """[n, _WIDTH, vocab] float64 teacher-forced log-probabilities of the rows ys (each at
  most _WIDTH tokens, PAD after them; causal masking makes the PADs irrelevant)."""
  out = []
  for start in range(0, len(ys), _ROWS):
    rows = np.zeros((_ROWS, _WIDTH), np.int32)
    for r, y in enumerate(ys[start:start + _ROWS]):
      rows[r, :len(y)] = y
    out.append(np.asarray(_forward()(params, jnp.asarray(np.repeat(src[None], _ROWS, 0)),
                                     jnp.asarray(rows)), np.float64)[:len(ys[start:start + _ROWS])])
  return np.concatenate(out)


def _next_log_probs(m, params, src, prefixes):
  """[n, vocab] log P(next | src, prefix) of equal-length prefixes, uncached."""
  del m
  n = len(prefixes[0])
  return _padded_log_probs(params, src, [list(p) + [0] for p in prefixes])[:, n]


def _sequence_log_prob(params, src, y):
  lp = _padded_log_probs(params, src, [list(y)])[0]
  return float(sum(lp[i, t] for i, t in enumerate(y)))


def _reference_beam_search(m, params, src, beam, alpha, offset, vocab=6):
  """Beam search written out in Python on uncached forward passes (Wu et al. 2016 scores).

  Each step extends every alive hypothesis by every token (only EOS at the length limit),
  keeps the 2 * beam best extensions by log-probability (ties: lower beam, then lower
  token), moves those that end in EOS into the finished pool with score log P / lp(length),
  and keeps the best `beam` others alive. It runs to the length limit without early stopping.
  Returns the finished pool best-first: [(score, tokens incl. EOS)].
  """
  limit = int((src != 0).sum()) + offset
  alive = [((), 0.0)]
  finished = []
  for i in range(limit):
    lp = _next_log_probs(m, params, src, [p for p, _ in alive])
    cands = []
    for b, (prefix, score) in enumerate(alive):
      for tok in range(vocab):
        if i + 1 >= limit and tok != EOS_ID:
          continue
        cands.append((score + lp[b, tok], b, tok, prefix + (tok,)))
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    top = cands[:2 * beam]
    finished += [(s / ((5 + i + 1) / 6) ** alpha, y) for s, _, t, y in top if t == EOS_ID]
    finished.sort(key=lambda f: -f[0])
    finished = finished[:beam]
    alive = [(y, s) for s, _, t, y in top if t != EOS_ID][:beam]
    if not alive:
      break
  return finished


@functools.lru_cache(maxsize=None)
def _search(beam, alpha, offset=3):
  """Beam search over _BEAM_INPUTS (cached: the tests below share compilations)."""
  _, params = _params()
  seqs, scores = decode.beam_search(params, jnp.asarray(_BEAM_INPUTS), model_cfg=CFG,
                                    beam_size=beam, alpha=alpha, max_decode_len_offset=offset)
  return np.asarray(seqs), np.asarray(scores)


_BEAM_INPUTS = np.array([[4, 5, 1, 0, 0], [5, 1, 0, 0, 0], [3, 3, 4, 5, 1], [4, 1, 0, 0, 0],
                         [5, 4, 3, 1, 0]], np.int32)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_four_equals_a_reference_beam_search(alpha):
  """Section 6.1's beam 4 with alpha 0.6 and without a length penalty, on five sources of a
  6-token vocabulary: every finished hypothesis and score equals the reference's."""
  m, params = _params()
  offset, beam = 3, 4
  seqs, scores = _search(beam, alpha, offset)
  for b, src in enumerate(_BEAM_INPUTS):
    ref = _reference_beam_search(m, params, src, beam, alpha, offset)
    assert len(ref) == beam
    for j, (score, y) in enumerate(ref):
      got = np.asarray(seqs[b, j])
      assert got[:len(y)].tolist() == list(y) and (got[len(y):] == 0).all(), (b, j, got, y)
      assert abs(float(scores[b, j]) - score) < 1e-4, (b, j)
      # Independent of the search: the score is the sequence's log-probability / lp(|Y|).
      lp = _sequence_log_prob(params, src, y)
      assert abs(score - lp / ((5 + len(y)) / 6) ** alpha) < 1e-4


def test_length_penalty_changes_the_ranking():
  """alpha > 0 divides longer hypotheses' (negative) log-probabilities by more: on these
  sources the best hypothesis with alpha = 0.6 is longer than the best with alpha = 0 for at
  least one source, and never shorter; each search's best is the reference's best."""
  best = {}
  for alpha in (0.0, 0.6):
    seqs, _ = _search(4, alpha, 3)
    best[alpha] = [int(np.argmax(np.asarray(s[0]) == EOS_ID)) + 1 for s in seqs]
  assert all(long >= short for long, short in zip(best[0.6], best[0.0])), best
  assert any(long > short for long, short in zip(best[0.6], best[0.0])), best


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_one_follows_the_greedy_path_and_keeps_its_best_eos_branch(alpha):
  """Beam 1 is not greedy decoding: its one alive hypothesis follows the best non-EOS token,
  and every step where EOS is among the 2 best candidates adds `path + EOS` to the finished
  pool; the result is the best of those by log P / lp. Greedy decoding instead stops at the
  first step whose best token is EOS. The two differ on some of these sources."""
  m, params = _params()
  offset = 3
  seqs, scores = _search(1, alpha, offset)
  differs = 0
  for b, src in enumerate(_BEAM_INPUTS):
    limit = int((src != 0).sum()) + offset
    path, path_lp, branches, greedy = [], 0.0, [], None
    for i in range(limit):
      lp = _next_log_probs(m, params, src, [path])[0]
      if i + 1 >= limit:
        lp = np.where(np.arange(len(lp)) == EOS_ID, lp, -np.inf)
      order = np.argsort(-lp, kind="stable")
      if greedy is None and order[0] == EOS_ID:
        greedy = path + [EOS_ID]
      if EOS_ID in order[:2]:
        branches.append(((path_lp + lp[EOS_ID]) / ((5 + i + 1) / 6) ** alpha, path + [EOS_ID]))
      tok = int(next(t for t in order if t != EOS_ID))
      path, path_lp = path + [tok], path_lp + lp[tok]
    score, y = max(branches, key=lambda x: x[0])
    got = np.asarray(seqs[b, 0])
    assert got[:len(y)].tolist() == y and (got[len(y):] == 0).all(), (b, got, y)
    assert abs(float(scores[b, 0]) - score) < 1e-4
    differs += greedy != y
  assert differs > 0


def test_decoding_past_max_len_uses_the_sinusoids_of_those_positions():
  """Outputs may be longer than --max_len (source + offset): the decoder's positions past it
  get their own sinusoids, so every finished hypothesis and score equals a search with a
  table large enough from the start (sinusoids have no parameters)."""
  short = dataclasses.replace(CFG, max_len=5)
  _, params = _params()
  inputs = jnp.asarray(_BEAM_INPUTS[2:4])  # 5 and 2 source tokens; outputs up to 8
  # cache_segment=2: the cache starts 2 wide and grows, so nothing checks 8 against max_len
  # at init; a table of max_len rows would silently repeat its last row at positions 5..7.
  got = decode.beam_search(params, inputs, model_cfg=short, beam_size=8, alpha=0.6,
                           max_decode_len_offset=3, cache_segment=2)
  want = decode.beam_search(params, inputs, model_cfg=CFG, beam_size=8, alpha=0.6,
                            max_decode_len_offset=3)
  assert (np.asarray(want[0]) != 0).sum(-1).max() > 5  # some hypotheses pass max_len
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)


def test_learned_positions_cap_the_output_at_max_len():
  """A learned table has max_len rows: a search whose limit (source + offset) passes it ends
  every output by position max_len, exactly as a search whose offset stops there."""
  cfg = dataclasses.replace(CFG, positional_encoding="learned", max_len=6)
  _, params = _params(cfg)
  inputs = jnp.asarray(_BEAM_INPUTS[2:3])  # 5 source tokens: limit 5 + 3 > 6
  got = decode.beam_search(params, inputs, model_cfg=cfg, beam_size=16, alpha=0.6,
                           max_decode_len_offset=3)
  want = decode.beam_search(params, inputs, model_cfg=cfg, beam_size=16, alpha=0.6,
                            max_decode_len_offset=1)  # limit 6 = max_len
  lengths = (np.asarray(got[0]) != 0).sum(-1)
  assert lengths.max() <= 6
  np.testing.assert_array_equal(np.asarray(got[0])[..., :6], np.asarray(want[0]))
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-5)
