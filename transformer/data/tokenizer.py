"""SentencePiece subwords: one vocabulary shared by source and target.

The paper (sec 5.1) uses byte-pair encoding with a shared source-target
vocabulary of about 37000 tokens for WMT14 En-De. The model is trained here with
the special ids of `transformer.config` (PAD=0, EOS=1, BOS=2, UNK=3).
"""

from __future__ import annotations

import io
import hashlib
import os
from typing import Callable, Iterable, Optional, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.io_utils import atomic_write, exclusive_lock


def _sample_sentences(sentences: Iterable[str], max_sentences: int,
                      seed: int) -> list[str]:
  """Uniform reservoir sample of at most `max_sentences` non-empty lines."""
  rng = np.random.default_rng(seed)
  sample: list[str] = []
  seen = 0
  for sentence in sentences:
    if not sentence or not sentence.strip():
      continue
    if len(sample) < max_sentences:
      sample.append(sentence)
    else:
      j = int(rng.integers(0, seen + 1))
      if j < max_sentences:
        sample[j] = sentence
    seen += 1
  logging.info("SentencePiece: sampled %d of %d non-empty sentences.",
               len(sample), seen)
  return sample


def train_sentencepiece(sentences: Iterable[str], model_path: str,
                        vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 1.0,
                        max_sentences: int = 1_000_000, seed: int = 0,
                        split_by_unicode_script: bool = True) -> None:
  """Trains one shared model and writes `model_path` (+ `.vocab`) atomically.

  Args:
    sentences: source and target training sentences (any order).
    model_path: output path, e.g. '<workdir>/spm.model'; the vocabulary is
      written next to it with the suffix '.vocab'.
    vocab_size: target vocabulary size (a soft limit: tiny corpora get less).
    model_type: 'bpe' (paper), 'unigram', 'word' or 'char' (SentencePiece's types).
    character_coverage: fraction of characters covered by the alphabet.
    max_sentences: reservoir sample size used for training.
    seed: sampling and SentencePiece random seed.
    split_by_unicode_script: False keeps tokens like '(NP' whole (parsing targets).
  """
  if vocab_size <= 4:
    raise ValueError(f"vocab_size must be > 4, got {vocab_size}")
  sample = _sample_sentences(sentences, max_sentences, seed)
  if not sample:
    raise ValueError(f"No non-empty sentences to train {model_path}")
  model_path = os.path.abspath(model_path)
  os.makedirs(os.path.dirname(model_path), exist_ok=True)
  vocab_path = os.path.splitext(model_path)[0] + ".vocab"
  spm.set_random_generator_seed(seed)
  proto = io.BytesIO()  # model_writer: no temp path ends up in the trainer spec
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(sample),
      model_writer=proto,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      hard_vocab_limit=False,
      split_by_unicode_script=split_by_unicode_script,
      input_sentence_size=0,        # already sampled above
      shuffle_input_sentence=False,  # deterministic
      num_threads=min(os.cpu_count() or 1, 16),
      minloglevel=1,
  )
  model_proto = proto.getvalue()
  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                  for i in range(sp.get_piece_size()))
  with atomic_write(vocab_path) as f:
    f.write(vocab.encode("utf-8"))
  with atomic_write(model_path) as f:
    f.write(model_proto)
  logging.info("SentencePiece: wrote %s", model_path)


class Tokenizer:
  """Text <-> ids with a SentencePiece model; EOS is added by the pipeline."""

  def __init__(self, model_proto: bytes, path: Optional[str] = None):
    self._proto = model_proto
    self.path = path
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError:  # SentencePiece's protobuf parse failure: a damaged or foreign file
      raise ValueError(f"{path or '<proto>'} is not a readable SentencePiece model (damaged?);"
                       " put back the run's spm.model or pass --vocab_path") from None
    expected = {PAD_ID: "pad", EOS_ID: "eos", BOS_ID: "bos", UNK_ID: "unk"}
    got = {"pad": self._sp.pad_id(), "eos": self._sp.eos_id(),
           "bos": self._sp.bos_id(), "unk": self._sp.unk_id()}
    for want_id, name in expected.items():
      if got[name] != want_id:
        raise ValueError(
            f"SentencePiece model {path or '<proto>'} has {name}_id={got[name]},"
            f" expected {want_id}; retrain it with this code")
    spec = sentencepiece_model_pb2.ModelProto.FromString(model_proto).trainer_spec
    # A word model merges consecutive unknown words into one UNK; encoding word by word
    # keeps one id per whitespace-separated word (parsing counts on it).
    self._by_word = spec.model_type == sentencepiece_model_pb2.TrainerSpec.WORD

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path}")
    with open(path, "rb") as f:
      return cls(f.read(), path=path)

  def __getstate__(self):
    return {"model_proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"])

  def fingerprint(self) -> str:
    """sha256 of the serialized model: two tokenizers agree iff their fingerprints do."""
    return hashlib.sha256(self._proto).hexdigest()

  @property
  def vocab_size(self) -> int:
    """Number of pieces, special ids included."""
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without EOS."""
    return self.encode_batch([text], num_threads=1)[0]

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1
                   ) -> list[list[int]]:
    """Ids of each text, without EOS (multi-threaded in C++)."""
    if not self._by_word:
      return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)
    words = [text.split() for text in texts]
    flat = self._sp.encode([w for ws in words for w in ws], out_type=int, num_threads=num_threads)
    out, i = [], 0
    for ws in words:
      out.append([t for ids in flat[i:i + len(ws)] for t in ids])
      i += len(ws)
    return out

  def _clean(self, ids) -> list[int]:
    out = []
    size = self.vocab_size
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i in (PAD_ID, BOS_ID):
        continue
      out.append(i if 0 <= i < size else UNK_ID)
    return out

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS; PAD and BOS are ignored."""
    return self._sp.decode(self._clean(ids))

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)


def train_unless_present(path: str, sentences_fn: Callable[[], Iterable[str]],
                         vocab_size: int, model_type: str = "bpe",
                         character_coverage: float = 1.0,
                         max_sentences: int = 1_000_000, seed: int = 0,
                         split_by_unicode_script: bool = True) -> bool:
  """Trains `path` from `sentences_fn()` unless it exists; True if this call trained it.

  Processes sharing the directory train it once: the first holds the lock
  '<dir>/.<name>.lock' while training, the others wait and then find the model.
  """
  if os.path.exists(path):
    return False
  lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
  with exclusive_lock(lock):
    if os.path.exists(path):
      logging.info("SentencePiece: %s was trained by another process meanwhile", path)
      return False
    logging.info("SentencePiece: %s not found, training (vocab %d).", path, vocab_size)
    train_sentencepiece(sentences_fn(), path, vocab_size, model_type=model_type,
                        character_coverage=character_coverage,
                        max_sentences=max_sentences, seed=seed,
                        split_by_unicode_script=split_by_unicode_script)
  return True


def load_or_train(path: str, sentences_fn: Callable[[], Iterable[str]],
                  vocab_size: int, **train_kwargs) -> Tokenizer:
  """Loads `path`, trained first from `sentences_fn()` if it does not exist
  (`train_unless_present`; `train_kwargs` are its options)."""
  if os.path.exists(path):
    logging.info("SentencePiece: loading %s", path)
  train_unless_present(path, sentences_fn, vocab_size, **train_kwargs)
  return Tokenizer.load(path)
