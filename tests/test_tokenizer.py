"""Tests for transformer/data/tokenizer.py on real Multi30k lines."""

from __future__ import annotations

import itertools
import os
import pickle

import pytest
import sentencepiece as spm

from transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.data import tokenizer as tok_lib


def _lines(path, n):
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def corpus(multi30k_dir):
  return (_lines(multi30k_dir / "train.en", 2000)
          + _lines(multi30k_dir / "train.de", 2000))


@pytest.fixture(scope="module")
def model_path(corpus, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  tok_lib.train_sentencepiece(corpus, path, vocab_size=1000)
  return path


def test_special_ids_and_files(model_path):
  sp = spm.SentencePieceProcessor(model_file=model_path)
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
  assert (PAD_ID, EOS_ID, BOS_ID, UNK_ID) == (0, 1, 2, 3)
  assert os.path.exists(os.path.splitext(model_path)[0] + ".vocab")
  # No temporary files are left next to the model.
  assert sorted(os.listdir(os.path.dirname(model_path))) == ["spm.model", "spm.vocab"]
  tok = tok_lib.Tokenizer.load(model_path)
  assert tok.vocab_size == sp.get_piece_size()
  assert 100 < tok.vocab_size <= 1000


def test_round_trip_real_sentences(model_path, multi30k_dir):
  tok = tok_lib.Tokenizer.load(model_path)
  # Held-out sentences (validation), both languages.
  sentences = _lines(multi30k_dir / "val.en", 50) + _lines(multi30k_dir / "val.de", 50)
  sp = spm.SentencePieceProcessor(model_file=model_path)
  for s in sentences:
    ids = tok.encode(s)
    assert ids == sp.encode(s)  # independent path through SentencePiece
    assert EOS_ID not in ids and PAD_ID not in ids
    # SentencePiece normalizes whitespace runs; the sentences here have none.
    assert tok.decode(ids) == " ".join(s.split())
  batch = tok.encode_batch(sentences[:5])
  assert batch == [tok.encode(s) for s in sentences[:5]]


def test_decode_stops_at_eos_and_ignores_pad_bos(model_path):
  tok = tok_lib.Tokenizer.load(model_path)
  a, b = "A man is riding a bike.", "Zwei Hunde spielen im Schnee."
  ids_a, ids_b = tok.encode(a), tok.encode(b)
  assert tok.decode([BOS_ID] + ids_a + [EOS_ID] + ids_b + [PAD_ID]) == a
  assert tok.decode(ids_a + [PAD_ID, PAD_ID]) == a
  assert tok.decode([BOS_ID] + ids_a + [EOS_ID, PAD_ID, PAD_ID]) == a
  assert tok.decode([EOS_ID] + ids_a) == ""


def test_deterministic_and_load_or_train(corpus, model_path, tmp_path):
  path2 = str(tmp_path / "again.model")
  tok = tok_lib.load_or_train(path2, lambda: iter(corpus), vocab_size=1000)
  with open(model_path, "rb") as f1, open(path2, "rb") as f2:
    assert f1.read() == f2.read()
  # Existing file: loaded, the sentences function is not called.
  def fail():
    raise AssertionError("must not retrain")
  tok2 = tok_lib.load_or_train(path2, fail, vocab_size=1000)
  assert tok2.vocab_size == tok.vocab_size
  tok3 = pickle.loads(pickle.dumps(tok2))
  assert tok3.encode("Ein Mann.") == tok2.encode("Ein Mann.")


def test_failed_training_leaves_no_file(tmp_path):
  path = tmp_path / "bad.model"
  with pytest.raises(ValueError, match="No non-empty sentences"):
    tok_lib.train_sentencepiece(["", "  "], str(path), vocab_size=100)
  with pytest.raises(ValueError, match="no_such_type"):  # SentencePiece's INVALID_ARGUMENT
    tok_lib.train_sentencepiece(["a b c"] * 10, str(path), vocab_size=100,
                                model_type="no_such_type")
  assert os.listdir(tmp_path) == []
  with pytest.raises(FileNotFoundError, match="bad.model"):
    tok_lib.Tokenizer.load(str(path))


def test_word_model_for_parsing_one_token_per_word(tmp_path):
  """--spm_model_type=word (the parsing CPU config): a source sentence is one token per
  word, a linearised tree one token per bracket/XX, and each word seen too rarely is one
  UNK, also when unknown words follow each other (SentencePiece alone merges them)."""
  sources = ["The cat sat .", "A dog sat on the mat .", "The dog ran ."] * 20
  trees = ["(S (NP XX XX )NP (VP XX )VP XX )S"] * 40 + ["(S (NP XX )NP (VP XX (PP XX )PP )VP )S"] * 20
  # 20 "words" + 4 special ids; 'Zyzzyva' and 'Quux' are never seen.
  path = str(tmp_path / "spm.model")
  tok_lib.train_sentencepiece(sources + trees, path, vocab_size=24, model_type="word",
                              split_by_unicode_script=False)
  tok = tok_lib.Tokenizer.load(path)
  sentence = "A dog sat on the mat ."
  ids = tok.encode(sentence)
  assert len(ids) == len(sentence.split()) and UNK_ID not in ids
  tree = "(S (NP XX XX )NP (VP XX (PP XX )PP )VP )S"
  tree_ids = tok.encode(tree)
  assert len(tree_ids) == len(tree.split()) and UNK_ID not in tree_ids
  assert tok.decode(tree_ids) == tree
  assert tok.encode("Zyzzyva Quux sat .") == [UNK_ID, UNK_ID] + tok.encode("sat .")
  assert tok.encode_batch([sentence, "Zyzzyva Quux sat ."]) == [
      ids, [UNK_ID, UNK_ID] + tok.encode("sat .")]


@pytest.mark.parametrize("content", [b"not a model", b"\x08\x01" * 40], ids=["text", "bytes"])
def test_damaged_model_file_is_one_clear_error(tmp_path, content):
  """A damaged or foreign spm.model: a ValueError naming the file (main prints one line),
  not SentencePiece's RuntimeError; load_or_train neither retrains nor overwrites it."""
  path = tmp_path / "spm.model"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=f"{path} is not a readable SentencePiece model"):
    tok_lib.Tokenizer.load(str(path))
  with pytest.raises(ValueError, match="not a readable SentencePiece model"):
    tok_lib.load_or_train(str(path), lambda: ["a b c"], 100)
  assert path.read_bytes() == content
