"""Benchmark shapes and batches, shared by our JAX benchmarks and the PyTorch peer.

Imports only numpy, so that `benchmarks/peer.py` (its own venv, no JAX) and our
benchmarks build the same model sizes and the same token batches from one table.

  small  the Multi30k CPU model of the README (N=3, d_model 256, d_ff 1024, h 4, vocab 8000)
  base   the paper's Transformer base with a shared vocabulary of 37000
  big    the paper's Transformer big (P_drop 0.3, as in train_throughput)
  tiny   smoke tests only
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

# Token ids of transformer.config (repeated here: that module needs absl).
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
FIRST_WORD_ID = 4  # ids 0-3 are PAD, EOS, BOS, UNK


@dataclasses.dataclass(frozen=True)
class Shape:
  vocab_size: int    # shared source/target vocabulary
  num_layers: int    # N, encoder and decoder
  d_model: int
  d_ff: int
  num_heads: int
  dropout: float     # P_drop: sublayer outputs and embedding sums
  train_batch: int   # sentences per training step
  train_length: int  # tokens per source and per target sentence (incl. EOS), no padding
  decode_batch: int  # sentences per beam-search call
  src_len: int       # decoding: source tokens per sentence (incl. EOS), no padding
  out_len: int       # decoding: output tokens per sentence (incl. the final EOS)


SHAPES = {
    "tiny": Shape(vocab_size=128, num_layers=1, d_model=32, d_ff=64, num_heads=2, dropout=0.1,
                  train_batch=4, train_length=8, decode_batch=2, src_len=6, out_len=6),
    "small": Shape(vocab_size=8000, num_layers=3, d_model=256, d_ff=1024, num_heads=4,
                   dropout=0.1, train_batch=64, train_length=24,
                   decode_batch=64, src_len=24, out_len=24),
    "base": Shape(vocab_size=37000, num_layers=6, d_model=512, d_ff=2048, num_heads=8,
                  dropout=0.1, train_batch=64, train_length=32,
                  decode_batch=32, src_len=24, out_len=24),
    "big": Shape(vocab_size=37000, num_layers=6, d_model=1024, d_ff=4096, num_heads=16,
                 dropout=0.3, train_batch=16, train_length=32,
                 decode_batch=16, src_len=24, out_len=24),
}


def model_config_kwargs(shape: Shape) -> dict:
  """Keyword arguments of our transformer.config.ModelConfig for this shape."""
  return dict(vocab_size=shape.vocab_size, num_encoder_layers=shape.num_layers,
              num_decoder_layers=shape.num_layers, d_model=shape.d_model, d_ff=shape.d_ff,
              num_heads=shape.num_heads, dropout_rate=shape.dropout)


def random_sentences(vocab_size: int, batch: int, length: int,
                     rng: np.random.RandomState) -> np.ndarray:
  """[batch, length] int32 word ids, each row ending in EOS; no padding."""
  ids = rng.randint(FIRST_WORD_ID, vocab_size, (batch, length)).astype(np.int32)
  ids[:, -1] = EOS_ID
  return ids


def train_batch(vocab_size: int, batch: int, length: int, seed: int = 0):
  """(source, target) token batches, [batch, length] each; every token is a real (non-pad) one."""
  rng = np.random.RandomState(seed)
  src = random_sentences(vocab_size, batch, length, rng)
  return src, random_sentences(vocab_size, batch, length, rng)


def define_flags(batch_help: str = "Sentences per batch") -> None:
  """The absl flags naming a shape: --config, --batch, --src_len, --out_len and --beam (0: the
  config's value). For our JAX benchmarks only: absl is imported here, the peer has none."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("config", "small", list(SHAPES), "Model configuration (tiny: smoke tests).")
  flags.DEFINE_integer("batch", 0, f"{batch_help} (0: the config's).")
  flags.DEFINE_integer("src_len", 0, "Decoding: source tokens per sentence, incl. EOS (0: the"
                       " config's).")
  flags.DEFINE_integer("out_len", 0, "Decoding: output tokens per sentence, incl. EOS (0: the"
                       " config's).")
  flags.DEFINE_integer("beam", 4, "Decoding: beam size.")


def decode_batches(vocab_size: int, count: int, batch: int, src_len: int,
                   seed: int = 0) -> list[np.ndarray]:
  """`count` different source batches of one shape, [batch, src_len] each."""
  rng = np.random.RandomState(seed)
  return [random_sentences(vocab_size, batch, src_len, rng) for _ in range(count)]


def check_fixed_length(seqs: np.ndarray, out_len: int) -> Optional[str]:
  """None if every row is out_len tokens, the last one the only EOS (then only PAD); else why not.

  seqs: [batch, >= out_len] output ids without the start token. (A random model may pick PAD
  or BOS as words: that is the same work.)
  """
  seqs = np.asarray(seqs)
  if seqs.ndim != 2 or seqs.shape[1] < out_len:
    return f"output shape {seqs.shape}, expected [batch, >= {out_len}]"
  bad = np.flatnonzero(np.any(seqs[:, :out_len - 1] == EOS_ID, axis=1)
                       | (seqs[:, out_len - 1] != EOS_ID)
                       | np.any(seqs[:, out_len:] != PAD_ID, axis=1))
  if bad.size:
    return (f"{bad.size} of {len(seqs)} sentences are not {out_len} tokens ending in EOS,"
            f" e.g. {seqs[bad[0]].tolist()}")
  return None
