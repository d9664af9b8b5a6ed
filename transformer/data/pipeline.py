"""Tokenize, filter, bucket to a token budget, and batch with Grain.

Paper sec 5.1: "Sentence pairs were batched together by approximate sequence
length. Each training batch contained a set of sentence pairs containing
approximately 25000 source tokens and 25000 target tokens."

A pair goes to the smallest bucket boundary L >= max(source, target length);
bucket L has a fixed global batch size B = max(1, tokens_per_batch // L)
rounded down to a multiple of `batch_multiple` (at least `batch_multiple`).
Every batch of a bucket has exactly B rows (missing rows are all PAD, with
index -1), so a jitted step sees at most len(boundaries) shapes.

Batches are dicts of numpy int32:
  'inputs':  [B, L] source ids + EOS, 0-padded
  'targets': [B, L] target ids + EOS, 0-padded
  'index':   [B] index of the example in the split, -1 for padding rows
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import sys
import threading
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from absl import logging
import grain
import numpy as np

from transformer.config import EOS_ID, PAD_ID, DataConfig

Batch = dict[str, np.ndarray]
Boundaries = Union[str, Sequence[int], np.ndarray]


# ----------------------------------------------------------------------------
# Tokenization.


@dataclasses.dataclass
class TokenizedSplit:
  """Token ids of a split as flat int32 buffers (ragged rows).

  Row i of the source is `source_tokens[source_offsets[i]:source_offsets[i+1]]`
  and ends with EOS; the same for the target. Lengths include EOS.
  """
  source_tokens: np.ndarray   # [total_source_tokens] int32
  source_lengths: np.ndarray  # [n] int32
  target_tokens: np.ndarray   # [total_target_tokens] int32
  target_lengths: np.ndarray  # [n] int32
  index: np.ndarray           # [n] int64, position in the untokenized split
  ids: np.ndarray             # [n] int64, example 'id' (original line number)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.source_offsets = row_offsets(self.source_lengths)
    self.target_offsets = row_offsets(self.target_lengths)
    self.source_starts = self.source_offsets[:-1]  # [n] where each row starts
    self.target_starts = self.target_offsets[:-1]

  def __len__(self) -> int:
    return len(self.index)

  def source(self, i: int) -> np.ndarray:
    return self.source_tokens[self.source_offsets[i]:self.source_offsets[i + 1]]

  def target(self, i: int) -> np.ndarray:
    return self.target_tokens[self.target_offsets[i]:self.target_offsets[i + 1]]

  @property
  def lengths(self) -> np.ndarray:
    """[n] max(source, target) length: what decides the bucket."""
    return np.maximum(self.source_lengths, self.target_lengths)


def row_offsets(lengths: np.ndarray) -> np.ndarray:
  """[rows + 1] int64: row i spans [out[i], out[i + 1]) of the flat tokens."""
  out = np.zeros(len(lengths) + 1, dtype=np.int64)
  np.cumsum(lengths, out=out[1:])
  return out


def ragged_with_eos(id_lists: Sequence[Sequence[int]], dtype=np.int32
                     ) -> tuple[np.ndarray, np.ndarray]:
  """[total] ids (of `dtype`) with EOS after each row, and the [rows] int32 lengths."""
  n = len(id_lists)
  lengths = np.fromiter((len(x) for x in id_lists), np.int64, count=n) + 1
  total = int(lengths.sum())
  flat = np.full(total, EOS_ID, dtype=dtype)
  not_eos = np.ones(total, dtype=bool)
  not_eos[np.cumsum(lengths) - 1] = False
  flat[not_eos] = np.fromiter(itertools.chain.from_iterable(id_lists),
                              dtype, count=total - n)
  return flat, lengths.astype(np.int32)


def length_filter(src_len: np.ndarray, tgt_len: np.ndarray,
                  max_source_length: Optional[int] = None,
                  max_target_length: Optional[int] = None, drop_empty: bool = False,
                  name: str = "split") -> tuple[np.ndarray, dict[str, int]]:
  """([n] bool rows kept, counts) for [n] source/target lengths (EOS included).

  Drops rows longer than a limit (None: no limit) and, with `drop_empty`, rows with an
  empty side (length 1: EOS only). counts: 'input', 'kept', 'too_long' (not empty), 'empty'.
  Logs the dropped rows; raises ValueError if none is kept.
  """
  n = len(src_len)
  too_long = np.zeros(n, dtype=bool)
  if max_source_length is not None:
    too_long |= src_len > max_source_length
  if max_target_length is not None:
    too_long |= tgt_len > max_target_length
  empty = ((src_len <= 1) | (tgt_len <= 1)) if drop_empty else np.zeros(n, bool)
  keep = ~(too_long | empty)
  counts = {"input": n, "kept": int(keep.sum()),
            "too_long": int((too_long & ~empty).sum()), "empty": int(empty.sum())}
  if counts["kept"] < n:
    logging.info("%s: dropped %d of %d pairs (%d longer than %s/%s tokens, %d empty).",
                 name, n - counts["kept"], n, counts["too_long"],
                 max_source_length, max_target_length, counts["empty"])
  if counts["kept"] == 0:
    raise ValueError(
        f"{name}: all {n} pairs were filtered out (max_source_length="
        f"{max_source_length}, max_target_length={max_target_length})")
  return keep, counts


def _chunks(source: Sequence[dict[str, Any]], size: int
            ) -> Iterator[list[dict[str, Any]]]:
  if hasattr(source, "iter_chunks"):
    yield from source.iter_chunks(size)
    return
  for start in range(0, len(source), size):
    stop = min(start + size, len(source))
    if hasattr(source, "__getitems__"):
      yield list(source.__getitems__(range(start, stop)))
    else:
      yield [source[i] for i in range(start, stop)]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
  if hasattr(tokenizer, "encode_batch"):
    return tokenizer.encode_batch(texts)
  return [tokenizer.encode(t) for t in texts]


def tokenize_split(source: Sequence[dict[str, Any]], tokenizer,
                   max_source_length: Optional[int] = None,
                   max_target_length: Optional[int] = None,
                   drop_empty: bool = False,
                   chunk_size: int = 8192) -> TokenizedSplit:
  """Tokenizes `{'source', 'target'[, 'id']}` examples and appends EOS.

  Args:
    source: random-access examples (e.g. `datasets.get_split(...)`).
    tokenizer: has `encode(str) -> list[int]` (or `encode_batch`).
    max_source_length: drop pairs whose source (incl. EOS) is longer; None
      keeps all. Use for training only.
    max_target_length: the same for the target.
    drop_empty: drop pairs with an empty source or target (training).
    chunk_size: examples read and encoded at a time.

  Returns:
    The kept pairs in split order; `index` is each one's position in `source`.
    `counts` has 'input', 'kept', 'too_long' and 'empty'.
  """
  src_parts, src_lens, tgt_parts, tgt_lens, ids = [], [], [], [], []
  for chunk in _chunks(source, chunk_size):
    s_flat, s_len = ragged_with_eos(_encode(tokenizer, [ex["source"] for ex in chunk]))
    t_flat, t_len = ragged_with_eos(_encode(tokenizer, [ex["target"] for ex in chunk]))
    src_parts.append(s_flat)
    src_lens.append(s_len)
    tgt_parts.append(t_flat)
    tgt_lens.append(t_len)
    ids.append(np.fromiter((ex.get("id", -1) for ex in chunk), np.int64, count=len(chunk)))
  n = sum(len(x) for x in src_lens)
  if n == 0:
    raise ValueError(f"No examples to tokenize in {getattr(source, 'name', 'split')}")
  src_len = np.concatenate(src_lens)
  tgt_len = np.concatenate(tgt_lens)
  index = np.arange(n, dtype=np.int64)
  ids_arr = np.concatenate(ids)
  ids_arr = np.where(ids_arr < 0, index, ids_arr)  # no 'id': use the position
  keep, counts = length_filter(src_len, tgt_len, max_source_length, max_target_length,
                               drop_empty, getattr(source, "name", "") or "split")
  src_tokens = np.concatenate(src_parts)
  tgt_tokens = np.concatenate(tgt_parts)
  if counts["kept"] < n:
    src_tokens = src_tokens[np.repeat(keep, src_len)]
    tgt_tokens = tgt_tokens[np.repeat(keep, tgt_len)]
  return TokenizedSplit(source_tokens=src_tokens, source_lengths=src_len[keep],
                        target_tokens=tgt_tokens, target_lengths=tgt_len[keep],
                        index=index[keep], ids=ids_arr[keep], counts=counts)


# ----------------------------------------------------------------------------
# Buckets.


def parse_boundaries(boundaries: Boundaries,
                     lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """'8,16,32' or [8, 16, 32] -> sorted unique int64 array of positive ints.

  'auto:K' (or 'auto:K:M'): the K bucket lengths, multiples of M (default 8), that minimise
  the padded tokens of `lengths` (the pairs' max(source, target) lengths), see `auto_boundaries`.
  """
  if isinstance(boundaries, str) and boundaries.strip().startswith("auto"):
    k, multiple = parse_auto(boundaries)
    if lengths is None:
      raise ValueError(f"Bucket boundaries {boundaries!r} need the lengths of the data")
    return auto_boundaries(lengths, k, multiple)
  if isinstance(boundaries, str):
    try:
      values = [int(b) for b in boundaries.split(",") if b.strip()]
    except ValueError as e:
      raise ValueError(f"Bad bucket boundaries {boundaries!r}: {e}") from None
  else:
    values = [int(b) for b in boundaries]
  if not values or min(values) <= 0:
    raise ValueError(f"Bucket boundaries must be positive ints, got {boundaries!r}")
  return np.unique(np.asarray(values, dtype=np.int64))


def parse_auto(spec: str) -> tuple[int, int]:
  """'auto:K' -> (K, 8); 'auto:K:M' -> (K, M)."""
  parts = spec.strip().split(":")
  try:
    if parts[0] != "auto" or len(parts) not in (2, 3):
      raise ValueError
    k, multiple = int(parts[1]), int(parts[2]) if len(parts) == 3 else 8
  except ValueError:
    raise ValueError(f"Bad bucket boundaries {spec!r}: expected e.g. 8,16,32 or auto:K or"
                     " auto:K:M (K buckets, lengths multiples of M)") from None
  if k <= 0 or multiple <= 0:
    raise ValueError(f"Bad bucket boundaries {spec!r}: K and M must be positive")
  return k, multiple


def auto_boundaries(lengths: np.ndarray, k: int, multiple: int = 8) -> np.ndarray:
  """At most k bucket lengths (multiples of `multiple`, the last >= max(lengths)) minimising
  the padded length summed over examples, sum_i boundary(i): exact dynamic programme over the
  candidate lengths (O(k * c^2) for c candidates, c <= max length / multiple)."""
  lengths = np.asarray(lengths, dtype=np.int64)
  if not len(lengths):
    raise ValueError("auto bucket boundaries: no lengths")
  rounded = -(-np.maximum(lengths, 1) // multiple) * multiple
  cands, counts = np.unique(rounded, return_counts=True)  # each example fits its own candidate
  c = len(cands)
  cum = np.concatenate([[0], np.cumsum(counts)])  # examples in candidates [0, j)
  # best[m][j]: min cost of covering candidates [0, j) with m buckets, the last ending at j-1.
  inf = np.iinfo(np.int64).max // 4
  best = np.full((k + 1, c + 1), inf, dtype=np.int64)
  back = np.zeros((k + 1, c + 1), dtype=np.int64)
  best[0, 0] = 0
  for m in range(1, k + 1):
    for j in range(1, c + 1):
      # Last bucket covers candidates [i, j) with boundary cands[j-1].
      costs = best[m - 1, :j] + (cum[j] - cum[:j]) * cands[j - 1]
      i = int(np.argmin(costs))
      best[m, j], back[m, j] = costs[i], i
  m = int(np.argmin(best[1:, c])) + 1  # fewest buckets reaching the optimum
  out, j = [], c
  while j > 0:
    out.append(int(cands[j - 1]))
    j = int(back[m, j])
    m -= 1
  return np.asarray(sorted(out), dtype=np.int64)


def bucket_batch_size(length: int, tokens_per_batch: int, batch_multiple: int) -> int:
  """B = max(1, T // L) rounded down to a multiple of batch_multiple (>= it)."""
  b = max(1, tokens_per_batch // int(length))
  return max(batch_multiple, (b // batch_multiple) * batch_multiple)


def _check_batching_args(tokens_per_batch: int, batch_multiple: int,
                         process_index: int, process_count: int) -> None:
  if tokens_per_batch <= 0:
    raise ValueError(f"tokens_per_batch must be positive, got {tokens_per_batch}")
  if batch_multiple <= 0:
    raise ValueError(f"batch_multiple must be positive, got {batch_multiple}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index={process_index} / process_count={process_count}")
  if batch_multiple % process_count:
    raise ValueError(f"batch_multiple={batch_multiple} must be a multiple of"
                     f" process_count={process_count}")


def _chunk_rows(members: np.ndarray, batch_size: int) -> np.ndarray:
  """[k, batch_size] rows of `members`, the last one padded with -1."""
  k = -(-len(members) // batch_size)
  rows = np.full(k * batch_size, -1, dtype=np.int64)
  rows[:len(members)] = members
  return rows.reshape(k, batch_size)


def collate(tokenized: TokenizedSplit, rows: np.ndarray, length: int) -> Batch:
  """Pads the pairs at positions `rows` (-1: padding row) to [len(rows), length].

  `tokenized` is a `TokenizedSplit` or a `store.StoredSplit`: only the tokens of `rows` are
  read (a memory-mapped store reads just those pages).
  """
  rows = np.asarray(rows, dtype=np.int64)
  valid = rows >= 0
  real = rows[valid]
  cols = np.arange(length)
  out = {}
  for key, tokens, starts, lengths in (
      ("inputs", tokenized.source_tokens, tokenized.source_starts, tokenized.source_lengths),
      ("targets", tokenized.target_tokens, tokenized.target_starts, tokenized.target_lengths)):
    starts, lens = starts[real], lengths[real]
    if len(lens) and lens.max() > length:
      raise ValueError(f"A sequence of length {lens.max()} does not fit in {length}")
    mask = cols[None, :] < lens[:, None]  # [real rows, length]
    block = np.full((len(real), length), PAD_ID, dtype=np.int32)
    block[mask] = tokens[(starts[:, None] + cols[None, :])[mask]]
    padded = np.full((len(rows), length), PAD_ID, dtype=np.int32)
    padded[valid] = block
    out[key] = padded
  index = np.full(len(rows), -1, dtype=np.int32)
  index[valid] = tokenized.index[real]
  out["index"] = index
  return out


def _process_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  per = len(rows) // process_count
  return rows[process_index * per:(process_index + 1) * per]


# ----------------------------------------------------------------------------
# Training: an infinite, deterministic plan of global batches.


class TrainBatchPlan:
  """Global batch `i` -> (padded length L, [B] example positions or -1).

  Epoch e = i // batches_per_epoch is shuffled with seed (shuffle_seed, e):
  examples within each bucket, then the order of the epoch's batches. The
  plan is a random-access Grain data source of infinite length.
  """

  def __init__(self, tokenized: TokenizedSplit, boundaries: Boundaries,
               tokens_per_batch: int, batch_multiple: int = 1, shuffle_seed: int = 0):
    _check_batching_args(tokens_per_batch, batch_multiple, 0, 1)
    if shuffle_seed < 0:
      raise ValueError(f"shuffle_seed must be >= 0, got {shuffle_seed}")
    self.boundaries = parse_boundaries(boundaries, tokenized.lengths)
    self.tokens_per_batch = tokens_per_batch
    self.batch_multiple = batch_multiple
    self.shuffle_seed = shuffle_seed
    lengths = tokenized.lengths
    bucket = np.searchsorted(self.boundaries, lengths, side="left")
    self.num_too_long = int((bucket == len(self.boundaries)).sum())
    if self.num_too_long:
      logging.info("Training: dropped %d of %d pairs longer than the largest"
                   " bucket (%d).", self.num_too_long, len(lengths), self.boundaries[-1])
    self.batch_sizes = np.array([bucket_batch_size(L, tokens_per_batch, batch_multiple)
                                 for L in self.boundaries], dtype=np.int64)
    order = np.argsort(bucket, kind="stable")
    counts = np.bincount(bucket, minlength=len(self.boundaries) + 1)
    splits = np.split(order, np.cumsum(counts)[:-1])
    self._members = splits[:len(self.boundaries)]  # positions per bucket, sorted
    self.bucket_counts = counts[:len(self.boundaries)]
    self.batches_per_bucket = -(-self.bucket_counts // self.batch_sizes)
    self.batches_per_epoch = int(self.batches_per_bucket.sum())
    if self.batches_per_epoch == 0:
      raise ValueError(f"No training pair fits the largest bucket ({self.boundaries[-1]})")
    self._source_lengths = tokenized.source_lengths
    self._target_lengths = tokenized.target_lengths
    self._cache: collections.OrderedDict[int, tuple[np.ndarray, list[np.ndarray]]] = (
        collections.OrderedDict())
    self._lock = threading.Lock()
    digest = hashlib.sha256()
    for part in (self.boundaries, self.batch_sizes, np.array([shuffle_seed]),
                 tokenized.source_lengths, tokenized.target_lengths, tokenized.index):
      digest.update(np.ascontiguousarray(part).tobytes())
    self.fingerprint = digest.hexdigest()[:16]

  def __len__(self) -> int:
    return sys.maxsize  # infinite: epochs follow each other

  def _make_epoch(self, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng([self.shuffle_seed, epoch])
    lengths, rows = [], []
    for b, members in enumerate(self._members):
      if not len(members):
        continue
      chunks = _chunk_rows(rng.permutation(members), int(self.batch_sizes[b]))
      lengths.extend([int(self.boundaries[b])] * len(chunks))
      rows.extend(chunks)
    perm = rng.permutation(len(rows))
    return np.asarray(lengths, dtype=np.int64)[perm], [rows[j] for j in perm]

  def epoch(self, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """([batches] padded lengths, [batches] row arrays) of one epoch."""
    with self._lock:
      if epoch not in self._cache:
        self._cache[epoch] = self._make_epoch(epoch)
        while len(self._cache) > 3:
          self._cache.popitem(last=False)
      return self._cache[epoch]

  def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
    """(L, [B] positions in the tokenized split, -1 = padding row)."""
    if i < 0:
      raise IndexError(f"Negative batch index {i}")
    epoch, j = divmod(int(i), self.batches_per_epoch)
    lengths, rows = self.epoch(epoch)
    return int(lengths[j]), rows[j]

  def padding_stats(self, epoch: int = 0) -> dict[str, float]:
    """Token counts of one epoch: non-pad / total over inputs and targets."""
    lengths, rows = self.epoch(epoch)
    return padding_stats(lengths, rows, self._source_lengths, self._target_lengths)


def padding_stats(lengths: Sequence[int], rows: Sequence[np.ndarray], source_lengths: np.ndarray,
                  target_lengths: np.ndarray) -> dict[str, float]:
  """Token counts of a batch plan (`TrainBatchPlan.epoch`, `eval_batch_plan`): non-pad / total
  over inputs and targets, without collating.

  lengths: [batches] padded length L; rows: [batches] rows of the split (-1 = padding row);
  source_lengths, target_lengths: [examples] tokens incl. EOS.
  """
  total = nonpad = 0
  for L, r in zip(lengths, rows):
    real = r[r >= 0]
    total += 2 * int(L) * len(r)
    nonpad += int(source_lengths[real].sum() + target_lengths[real].sum())
  return {"batches": len(rows), "total_tokens": total, "non_pad_tokens": nonpad,
          "non_pad_fraction": nonpad / max(total, 1),
          "padding_fraction": 1.0 - nonpad / max(total, 1)}


class _PlanCheckedIterDataset(grain.IterDataset):
  """Adds the plan fingerprint to the iterator state and checks it on restore."""

  def __init__(self, parent: grain.IterDataset, fingerprint: str):
    super().__init__(parent)
    self._fingerprint = fingerprint

  def __iter__(self) -> grain.DatasetIterator:
    return _PlanCheckedIterator(self._parent.__iter__(), self._fingerprint)

  def __str__(self) -> str:
    return f"PlanCheckedIterDataset(fingerprint={self._fingerprint})"


class _PlanCheckedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, fingerprint: str):
    super().__init__(parent)
    self._fingerprint = fingerprint

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    state = dict(self._parent.get_state())
    state["plan_fingerprint"] = self._fingerprint
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    saved = state.pop("plan_fingerprint", self._fingerprint)
    if saved != self._fingerprint:
      raise ValueError(
          "The data iterator state was saved for another batch plan (different"
          " data, tokenizer, boundaries, tokens_per_batch, batch_multiple or"
          f" shuffle_seed): fingerprint {saved} != {self._fingerprint}")
    self._parent.set_state(state)

  def __str__(self) -> str:
    return "PlanCheckedIterator"


def make_train_dataset(tokenized: TokenizedSplit, tokens_per_batch: int,
                       boundaries: Boundaries, batch_multiple: int = 1,
                       shuffle_seed: int = 0, process_index: int = 0,
                       process_count: int = 1) -> tuple[grain.MapDataset, TrainBatchPlan]:
  """(infinite `grain.MapDataset` of this process's rows of each global batch, plan)."""
  _check_batching_args(tokens_per_batch, batch_multiple, process_index, process_count)
  plan = TrainBatchPlan(tokenized, boundaries, tokens_per_batch, batch_multiple,
                        shuffle_seed)

  def to_batch(item: tuple[int, np.ndarray]) -> Batch:
    length, rows = item
    return collate(tokenized, _process_rows(rows, process_index, process_count), length)

  return grain.MapDataset.source(plan).map(to_batch), plan


def make_train_iterator(tokenized: TokenizedSplit,
                        tokens_per_batch: Union[int, DataConfig],
                        boundaries: Optional[Boundaries] = None,
                        batch_multiple: int = 1, shuffle_seed: Optional[int] = None,
                        process_index: int = 0, process_count: int = 1,
                        read_options: Optional[grain.ReadOptions] = None
                        ) -> grain.DatasetIterator:
  """Checkpointable iterator over this process's part of each global batch.

  Every process builds the same global plan from (shuffle_seed, epoch) and
  keeps rows [p*B/P, (p+1)*B/P) of each [B, L] batch. `get_state()` is a small
  JSON-able dict (next global batch index and a plan fingerprint);
  `set_state(state)` resumes with exactly the same following batches.

  Args:
    tokenized: training pairs (`tokenize_split` with max lengths).
    tokens_per_batch: T, approximate source (and target) tokens per global
      batch; or a `DataConfig`, which then supplies T (tokens_per_batch),
      boundaries (bucket_boundaries) and shuffle_seed unless given here.
    boundaries: bucket lengths, e.g. '8,16,32' or [8, 16, 32].
    batch_multiple: global batch sizes are multiples of this (data-parallel
      shards); must be a multiple of process_count.
    shuffle_seed: data order seed (default 0).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    read_options: Grain prefetch threads/buffer (default: 1 thread, 4 batches).
  """
  if isinstance(tokens_per_batch, DataConfig):
    cfg = tokens_per_batch
    tokens_per_batch = cfg.tokens_per_batch
    boundaries = cfg.bucket_boundaries if boundaries is None else boundaries
    shuffle_seed = cfg.shuffle_seed if shuffle_seed is None else shuffle_seed
  if boundaries is None:
    raise ValueError("make_train_iterator needs bucket boundaries")
  shuffle_seed = 0 if shuffle_seed is None else shuffle_seed
  ds, plan = make_train_dataset(tokenized, tokens_per_batch, boundaries,
                                batch_multiple, shuffle_seed, process_index,
                                process_count)
  read_options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  stats = plan.padding_stats(0)
  logging.info(
      "Train plan: %d batches/epoch, batch sizes %s for lengths %s, non-pad"
      " fraction %.3f.", plan.batches_per_epoch,
      dict(zip(plan.boundaries.tolist(), plan.batch_sizes.tolist())),
      plan.boundaries.tolist(), stats["non_pad_fraction"])
  it_ds = _PlanCheckedIterDataset(ds.to_iter_dataset(read_options), plan.fingerprint)
  return iter(it_ds)


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """JSON-able state of a train iterator (to store in a checkpoint)."""
  return dict(iterator.get_state())


def restore_iterator(iterator: grain.DatasetIterator,
                     state: Optional[dict[str, Any]]) -> None:
  """Continues `iterator` from a saved state; empty/None: from the first batch."""
  if not state:
    logging.warning("No data iterator state saved: the data starts from batch 0.")
    return
  iterator.set_state(state)


# ----------------------------------------------------------------------------
# Evaluation / decoding.


def eval_batch_plan(tokenized: TokenizedSplit, tokens_per_batch: int,
                    boundaries: Boundaries, batch_multiple: int = 1
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
  """([batches] L, [batches] rows): every example once, sorted by length.

  An example longer than the largest boundary goes to a bucket of its length
  rounded up to a multiple of 8.
  """
  _check_batching_args(tokens_per_batch, batch_multiple, 0, 1)
  bounds = parse_boundaries(boundaries, tokenized.lengths)
  lengths = tokenized.lengths.astype(np.int64)
  bucket = np.searchsorted(bounds, lengths, side="left")
  padded = np.where(bucket < len(bounds), bounds[np.minimum(bucket, len(bounds) - 1)],
                    -(-lengths // 8) * 8)
  order = np.lexsort((np.arange(len(lengths)), lengths, padded))
  out_lengths, out_rows = [], []
  for L in np.unique(padded):
    members = order[padded[order] == L]
    chunks = _chunk_rows(members, bucket_batch_size(int(L), tokens_per_batch, batch_multiple))
    out_lengths.extend([int(L)] * len(chunks))
    out_rows.extend(chunks)
  return np.asarray(out_lengths, dtype=np.int64), out_rows


def make_eval_batches(tokenized: TokenizedSplit, tokens_per_batch: int,
                      boundaries: Boundaries, batch_multiple: int = 1,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """All examples in length-sorted batches; 'index' restores the split order.

  Use `restore_order` (or `batch['index']`) to put per-row outputs back.
  """
  _check_batching_args(tokens_per_batch, batch_multiple, process_index, process_count)
  lengths, rows = eval_batch_plan(tokenized, tokens_per_batch, boundaries, batch_multiple)
  return [collate(tokenized, _process_rows(r, process_index, process_count), int(L))
          for L, r in zip(lengths, rows)]


def restore_order(batches: Iterable[Batch], outputs: Iterable[Sequence[Any]],
                  num_examples: int) -> list[Any]:
  """Per-row `outputs` of each batch -> list in split order (padding rows dropped).

  `num_examples` is the length of the untokenized split; missing entries are None.
  """
  result: list[Any] = [None] * num_examples
  for batch, out in zip(batches, outputs):
    for idx, value in zip(batch["index"].tolist(), out):
      if idx >= 0:
        result[idx] = value
  return result
