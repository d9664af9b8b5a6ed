"""Tests for transformer/data/pipeline.py (bucketing, Grain iterator, eval order)."""

from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import pytest

from transformer.config import EOS_ID, PAD_ID, DataConfig
from transformer.data import pipeline

BOUNDARIES = [8, 12, 16, 24, 32]
TOKENS = 256


class WordTokenizer:
  """Independent toy tokenizer: one id per whitespace word."""

  def encode(self, text):
    return [4 + sum(map(ord, w)) % 500 for w in text.split()]


def _lines(path, n):
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def examples(multi30k_dir):
  """Real sentence pairs plus a few long and empty ones."""
  en = _lines(multi30k_dir / "val.en", 400)
  de = _lines(multi30k_dir / "val.de", 400)
  pairs = [{"source": s, "target": t, "id": i} for i, (s, t) in enumerate(zip(en, de))]
  long_text = " ".join(en[:5])  # ~60 words: longer than every boundary
  pairs[10] = {"source": long_text, "target": de[10], "id": 10}
  pairs[20] = {"source": en[20], "target": long_text + " " + long_text, "id": 20}
  pairs[30] = {"source": "", "target": de[30], "id": 30}
  return pairs


def _expected_ids(text):
  return WordTokenizer().encode(text) + [EOS_ID]


@pytest.fixture(scope="module")
def tokenized(examples):
  return pipeline.tokenize_split(examples, WordTokenizer())


def _check_row(batch, r, examples):
  """Row r of a batch equals its example's ids + EOS, PAD-padded."""
  idx = int(batch["index"][r])
  L = batch["inputs"].shape[1]
  for key, field in (("inputs", "source"), ("targets", "target")):
    ids = _expected_ids(examples[idx][field])
    assert len(ids) <= L
    np.testing.assert_array_equal(batch[key][r], ids + [PAD_ID] * (L - len(ids)))


def test_tokenize_split(examples, tokenized):
  n = len(examples)
  assert len(tokenized) == n and tokenized.counts["kept"] == n
  for i in (0, 10, 20, 30, n - 1):
    np.testing.assert_array_equal(tokenized.source(i), _expected_ids(examples[i]["source"]))
    np.testing.assert_array_equal(tokenized.target(i), _expected_ids(examples[i]["target"]))
  assert tokenized.source_lengths[30] == 1  # empty source: just EOS
  np.testing.assert_array_equal(tokenized.ids, np.arange(n))

  filt = pipeline.tokenize_split(examples, WordTokenizer(), max_source_length=20,
                                 max_target_length=20, drop_empty=True)
  keep = [i for i, ex in enumerate(examples)
          if 1 < len(_expected_ids(ex["source"])) <= 20
          and 1 < len(_expected_ids(ex["target"])) <= 20]
  np.testing.assert_array_equal(filt.index, keep)
  assert filt.counts["empty"] == 1 and filt.counts["kept"] == len(keep)
  assert filt.counts["too_long"] == n - len(keep) - 1
  for j in (0, 5, len(keep) - 1):
    np.testing.assert_array_equal(filt.source(j), _expected_ids(examples[keep[j]]["source"]))
    np.testing.assert_array_equal(filt.target(j), _expected_ids(examples[keep[j]]["target"]))

  with pytest.raises(ValueError, match="filtered out"):
    pipeline.tokenize_split(examples, WordTokenizer(), max_source_length=1,
                            drop_empty=True)


def test_bucket_batch_size():
  assert pipeline.bucket_batch_size(24, 4096, 8) == 168
  assert pipeline.bucket_batch_size(8, 4096, 1) == 512
  assert pipeline.bucket_batch_size(5000, 4096, 8) == 8
  assert pipeline.bucket_batch_size(100, 4096, 1) == 40
  np.testing.assert_array_equal(pipeline.parse_boundaries("16, 8,32,8"), [8, 16, 32])
  with pytest.raises(ValueError):
    pipeline.parse_boundaries("8,x")


def _epoch(iterator, plan_batches):
  return [next(iterator) for _ in range(plan_batches)]


def test_train_epoch_shapes_and_coverage(examples):
  mult = 4
  # Filtered as for training: 'index' must still point into `examples`.
  tokenized = pipeline.tokenize_split(examples, WordTokenizer(), max_source_length=40,
                                      max_target_length=40, drop_empty=True)
  ds, plan = pipeline.make_train_dataset(tokenized, TOKENS, BOUNDARIES, mult, shuffle_seed=3)
  sizes = {L: max(mult, (max(1, TOKENS // L) // mult) * mult) for L in BOUNDARIES}
  src_lens = [len(_expected_ids(ex["source"])) for ex in examples]
  tgt_lens = [len(_expected_ids(ex["target"])) for ex in examples]
  lengths = [max(a, b) for a, b in zip(src_lens, tgt_lens)]
  kept = {i for i in range(len(examples)) if 1 < src_lens[i] <= 40 and 1 < tgt_lens[i] <= 40}
  fits = {i for i in kept if lengths[i] <= max(BOUNDARIES)}
  assert len(tokenized) == len(kept) and plan.num_too_long == len(kept) - len(fits)
  it = pipeline.make_train_iterator(tokenized, TOKENS, ",".join(map(str, BOUNDARIES)),
                                    mult, shuffle_seed=3)
  for epoch in range(2):
    seen = collections.Counter()
    batches = _epoch(it, plan.batches_per_epoch)
    for b in batches:
      B, L = b["inputs"].shape
      assert b["targets"].shape == (B, L) and b["index"].shape == (B,)
      assert all(v.dtype == np.int32 for v in b.values())
      assert L in sizes and B == sizes[L]
      assert B * L <= TOKENS or B == mult
      for r in range(B):
        idx = int(b["index"][r])
        if idx < 0:
          assert not b["inputs"][r].any() and not b["targets"][r].any()
          continue
        seen[idx] += 1
        # Smallest boundary that holds the pair.
        assert L == min(x for x in BOUNDARIES if x >= lengths[idx])
        _check_row(b, r, examples)
    assert set(seen) == fits and set(seen.values()) == {1}
    # Padding rows only in the last batch of a bucket: at most one per bucket.
    partial = sum(1 for b in batches if (b["index"] < 0).any())
    assert partial <= len(BOUNDARIES)
    if epoch == 0:
      first_order = [b["index"].tolist() for b in batches]
  # The second epoch is shuffled differently.
  assert [b["index"].tolist() for b in batches] != first_order
  # Same as indexing the MapDataset directly.
  np.testing.assert_array_equal(ds[plan.batches_per_epoch + 2]["index"], batches[2]["index"])
  it.close()


def test_train_deterministic_and_seeded(tokenized):
  a = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=7)
  b = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=7)
  c = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=8)
  xs, ys, zs = ([next(i)["index"] for _ in range(12)] for i in (a, b, c))
  assert all(np.array_equal(x, y) for x, y in zip(xs, ys))
  assert not all(np.array_equal(x, z) for x, z in zip(xs, zs))


def test_process_shards_concatenate_to_global_batch(tokenized):
  P, mult, n = 2, 4, 15
  glob = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, mult, shuffle_seed=1)
  parts = [pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, mult, shuffle_seed=1,
                                        process_index=p, process_count=P) for p in range(P)]
  for _ in range(n):
    g = next(glob)
    locs = [next(it) for it in parts]
    for key in g:
      assert all(len(loc[key]) == len(g[key]) // P for loc in locs)
      np.testing.assert_array_equal(np.concatenate([loc[key] for loc in locs]), g[key])
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 3, process_count=2)


def test_iterator_state_restore(tokenized):
  ds, plan = pipeline.make_train_dataset(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=5)
  it = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=5)
  skip = plan.batches_per_epoch - 3  # the restored batches cross an epoch boundary
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
  expected = [next(it) for _ in range(8)]
  fresh = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=5)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(8)]
  for e, g in zip(expected, got):
    for key in e:
      np.testing.assert_array_equal(e[key], g[key])
  # Restoring rewinds the same iterator too.
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["index"], expected[0]["index"])
  # A state of another plan is refused.
  other = pipeline.make_train_iterator(tokenized, TOKENS * 2, BOUNDARIES, 2, shuffle_seed=5)
  with pytest.raises(ValueError, match="another batch plan"):
    other.set_state(state)
  for i in (it, fresh, other):
    i.close()


def test_eval_batches_cover_all_and_restore_order(examples, tokenized):
  mult = 4
  batches = pipeline.make_eval_batches(tokenized, TOKENS, BOUNDARIES, mult)
  seen = collections.Counter()
  shapes = set()
  row_lengths = []
  for b in batches:
    B, L = b["inputs"].shape
    shapes.add((B, L))
    row_lengths += [int(tokenized.lengths[i]) for i in b["index"] if i >= 0]
    assert B % mult == 0 and (B * L <= TOKENS or B == mult)
    assert L in BOUNDARIES or (L > max(BOUNDARIES) and L % 8 == 0)
    for r in range(B):
      if b["index"][r] >= 0:
        seen[int(b["index"][r])] += 1
        _check_row(b, r, examples)
  assert seen == collections.Counter(range(len(examples)))
  assert row_lengths == sorted(row_lengths)  # sorted by length
  # The two long examples got buckets of their length rounded up to 8.
  for i in (10, 20):
    m = int(tokenized.lengths[i])
    (L,) = {b["inputs"].shape[1] for b in batches if i in b["index"]}
    assert L == -(-m // 8) * 8 and L > max(BOUNDARIES)
  assert len(shapes) <= len(BOUNDARIES) + 2
  # Outputs put back in the original order.
  outputs = [[f"out{int(i)}" for i in b["index"]] for b in batches]
  assert pipeline.restore_order(batches, outputs, len(examples)) == [
      f"out{i}" for i in range(len(examples))]
  # Per-process eval shards concatenate back.
  halves = [pipeline.make_eval_batches(tokenized, TOKENS, BOUNDARIES, mult, p, 2) for p in (0, 1)]
  for g, h0, h1 in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), g["inputs"])


def test_padding_stats(tokenized):
  def counted(batches):  # independent: PAD cells of the collated arrays
    total = sum(b[k].size for b in batches for k in ("inputs", "targets"))
    nonpad = sum(int((b[k] != PAD_ID).sum()) for b in batches for k in ("inputs", "targets"))
    return {"batches": len(batches), "total_tokens": total, "non_pad_tokens": nonpad}

  lengths, rows = pipeline.eval_batch_plan(tokenized, TOKENS, BOUNDARIES, 1)
  stats = pipeline.padding_stats(lengths, rows, tokenized.source_lengths,
                                 tokenized.target_lengths)
  batches = pipeline.make_eval_batches(tokenized, TOKENS, BOUNDARIES, 1)
  want = counted(batches)
  assert want["non_pad_tokens"] == int(tokenized.source_lengths.sum()
                                       + tokenized.target_lengths.sum())
  assert {k: stats[k] for k in want} == want
  assert stats["non_pad_fraction"] == pytest.approx(want["non_pad_tokens"] / want["total_tokens"])
  assert stats["padding_fraction"] == pytest.approx(1 - stats["non_pad_fraction"])
  # The train plan's statistics match the collated batches of its epoch (padding rows too).
  ds, plan = pipeline.make_train_dataset(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=0)
  stats = plan.padding_stats(0)
  want = counted([ds[i] for i in range(plan.batches_per_epoch)])
  assert {k: stats[k] for k in want} == want


def test_config_form_and_state_helpers(tokenized):
  cfg = DataConfig(tokens_per_batch=TOKENS, bucket_boundaries="8,12,16,24,32", shuffle_seed=7)
  a = pipeline.make_train_iterator(tokenized, cfg, batch_multiple=2)
  b = pipeline.make_train_iterator(tokenized, TOKENS, BOUNDARIES, 2, shuffle_seed=7)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
  state = pipeline.iterator_state(a)
  assert state["next_index"] == 3
  expected = next(a)["index"]
  c = pipeline.make_train_iterator(tokenized, cfg, batch_multiple=2)
  pipeline.restore_iterator(c, {})  # nothing saved: from the start
  np.testing.assert_array_equal(next(c)["index"], next(
      pipeline.make_train_iterator(tokenized, cfg, batch_multiple=2))["index"])
  pipeline.restore_iterator(c, state)
  np.testing.assert_array_equal(next(c)["index"], expected)


def _padded_cost(lengths, bounds):
  bounds = np.sort(np.asarray(bounds))
  return int(bounds[np.searchsorted(bounds, lengths, side="left")].sum())


def test_auto_boundaries_by_hand_and_by_brute_force():
  # Lengths 3,3,3,10,10,17 with 2 buckets (multiple 1): {10,17} pads to 5*10+17 = 67,
  # {3,17} to 3*3+3*17 = 60 -> {3,17}; 3 buckets: {3,10,17} = 9+20+17 = 46.
  lengths = np.array([3, 3, 3, 10, 10, 17])
  np.testing.assert_array_equal(pipeline.auto_boundaries(lengths, 2, 1), [3, 17])
  np.testing.assert_array_equal(pipeline.auto_boundaries(lengths, 3, 1), [3, 10, 17])
  np.testing.assert_array_equal(pipeline.auto_boundaries(lengths, 9, 1), [3, 10, 17])  # <= K
  # Multiple 8: lengths round up to 8, 16, 24 -> 2 buckets {8, 24} (3*8 + 3*24 = 96 < 5*16+24).
  np.testing.assert_array_equal(pipeline.auto_boundaries(lengths, 2), [8, 24])
  # Brute force over every subset of candidate lengths that contains the largest.
  rng = np.random.RandomState(0)
  for _ in range(20):
    lengths = rng.geometric(0.08, size=200) + 1
    cands = np.unique(-(-lengths // 4) * 4)
    for k in (1, 2, 3, 4):
      best = min(_padded_cost(lengths, (*subset, cands[-1]))
                 for r in range(k) for subset in itertools.combinations(cands[:-1], r))
      got = pipeline.auto_boundaries(lengths, k, 4)
      assert len(got) <= k and got[-1] >= lengths.max() and np.all(got % 4 == 0)
      assert _padded_cost(lengths, got) == best


def test_auto_boundaries_through_the_plans(tokenized):
  plan = pipeline.TrainBatchPlan(tokenized, "auto:4", TOKENS)
  want = pipeline.auto_boundaries(tokenized.lengths, 4)
  np.testing.assert_array_equal(plan.boundaries, want)
  assert plan.num_too_long == 0 and len(plan.boundaries) <= 4
  lengths, _ = pipeline.eval_batch_plan(tokenized, TOKENS, "auto:4:1")
  assert set(lengths.tolist()) <= set(pipeline.auto_boundaries(tokenized.lengths, 4, 1).tolist())
  for bad in ("auto", "auto:0", "auto:x", "auto:4:0", "auto:1:2:3"):
    with pytest.raises(ValueError, match="Bad bucket boundaries"):
      pipeline.TrainBatchPlan(tokenized, bad, TOKENS)


def test_batch_plan_rejects_a_negative_seed_and_a_split_that_fits_no_bucket():
  pairs = [{"source": "a b c", "target": "x y"}, {"source": "a " * 40, "target": "y " * 40}]
  tokenized = pipeline.tokenize_split(pairs, WordTokenizer())
  with pytest.raises(ValueError, match="shuffle_seed must be >= 0, got -1"):
    pipeline.TrainBatchPlan(tokenized, BOUNDARIES, TOKENS, shuffle_seed=-1)
  too_long = pipeline.tokenize_split(pairs[1:], WordTokenizer())  # 41 tokens > 32
  with pytest.raises(ValueError, match=r"No training pair fits the largest bucket \(32\)"):
    pipeline.TrainBatchPlan(too_long, BOUNDARIES, TOKENS)
