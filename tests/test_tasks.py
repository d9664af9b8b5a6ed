"""Tests for transformer/tasks: the task interface, picked by --task."""

from __future__ import annotations

import dataclasses

import pytest

from transformer import tasks
from transformer.config import Config, ConfigError, DataConfig, DecodeConfig
from transformer.data import datasets
from transformer.tasks import base


def test_get_by_name():
  assert tasks.get("translation").name == "translation"
  assert tasks.get("parsing").name == "parsing"
  with pytest.raises(ConfigError, match="--task must be one of translation, parsing, got 'x'"):
    tasks.get("x")


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_implements_the_interface(name):
  task = tasks.get(name)
  assert isinstance(task, base.Task)
  for method in ("get_split", "make_builder", "dev_score", "score", "report_lines"):
    assert getattr(type(task), method) is not getattr(base.Task, method), method


def test_translation_report_line_and_dev_subset():
  task = tasks.get("translation")
  cfg = Config(data=DataConfig(source_lang="en", target_lang="de", test_split="test"),
               decode=DecodeConfig(beam_size=4, alpha=0.6))
  report = {"sacrebleu": 31.234, "sacrebleu_signature": "nrefs:1|case:mixed",
            "bleu_tok_compound_split": 32.0, "bleu_tok_lc": 33.456}
  assert task.report_lines(cfg, report, "averaged", 1200) == [
      "BLEU en->de test (averaged step 1200, beam 4, alpha 0.6): sacreBLEU 31.23"
      " [nrefs:1|case:mixed] | tokenized+compound-split 32.00 | tokenized lowercased 33.46"]
  assert task.dev_subset(list(range(10)), 3) == [0, 1, 2]
  hyps = refs = ["a small dog runs in the park today"]
  metrics, text = task.dev_score(cfg, hyps, [{"target": r} for r in refs], beam_size=4)
  assert metrics == {"bleu": pytest.approx(100.0)}
  assert text == " | BLEU 100.00 (1 sents)"
  assert task.output_lines(cfg, ["x", "y"], [{}, {}]) == ["x", "y"]
  assert task.constraint(cfg, tokenizer=None) is None
  with pytest.raises(datasets.DataError, match="is a treebank: use --task=parsing"):
    task.get_split(DataConfig(dataset="ptb_wsj"), "train", "/nonexistent")


class _Pieces:
  """Stands in for the Tokenizer: a vocabulary of pieces."""

  def __init__(self, pieces):
    self.pieces = pieces
    self.vocab_size = len(pieces)

  def id_to_piece(self, i):
    return self.pieces[i]


def test_parsing_outputs_report_lines_and_constraint(tmp_path):
  task = tasks.get("parsing")
  gold = "(S (NP (PRP It)) (VP (VBZ works)))"
  examples = [{"source": "It works", "target": "", "tree": gold, "root": "S", "id": 0}]
  hyp = "(S (NP XX )NP (VP XX )VP )S"
  cfg = Config(data=DataConfig(task="parsing", test_split="validation[:8]"),
               decode=DecodeConfig(beam_size=2, alpha=0.3))
  assert task.output_lines(cfg, [hyp], [{"source": "It works"}]) == [
      "(S (NP (XX It)) (VP (XX works)))"]  # no gold tags: placeholder tags
  task.write_outputs(cfg, str(tmp_path / "dev"), "latest", [hyp], examples)
  assert (tmp_path / "dev.latest.trees").read_text() == gold + "\n"  # gold tags
  assert (tmp_path / "dev.gold.trees").read_text() == gold + "\n"
  report = task.score(cfg, [hyp], examples)
  assert report["f1"] == 100.0 and report["repaired"] == 0 and report["sentences"] == 1
  assert task.report_lines(cfg, report, "latest", 10) == [
      "F1 validation[:8] (latest step 10, beam 2, alpha 0.3): 100.00 (P 100.00 R 100.00;"
      " exact match 100.00; repaired 0/1; EVALB COLLINS.prm)",
      "F1 validation[:8], sentence trees only (1 of 1; no TITLE/HEADING/CAPTION/CIT root):"
      " 100.00 (P 100.00 R 100.00; exact match 100.00; repaired 0/1)"]
  metrics, text = task.dev_score(cfg, ["(S (NP XX XX )NP )S"], examples, beam_size=1)
  # gold brackets S, NP, VP; test S, NP(It works): 1 of 2 test and 1 of 3 gold match.
  assert metrics["f1"] == pytest.approx(2 * 50.0 * (100 / 3) / (50.0 + 100 / 3))
  assert text == f" | F1 {metrics['f1']:.2f} (sentence trees {metrics['f1']:.2f}; 1 trees, beam 1, 0 repaired)"
  assert task.dev_subset(list(range(10)), 4) == [0, 2, 5, 7]  # spread over the split
  assert task.is_stored("validation[:8]") and not task.is_stored("./dev_trees")
  vocab = _Pieces(["<pad>", "</s>", "<s>", "<unk>", "\u2581(S", "\u2581)S", "\u2581XX", "\u2581dog"])
  assert task.constraint(cfg, vocab) is not None
  off = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, tree_constraints=False))
  assert task.constraint(off, vocab) is None
  with pytest.raises(ConfigError, match="--tree_constraints: .*--notree_constraints"):
    task.constraint(cfg, _Pieces(["<pad>", "</s>", "<s>", "<unk>", "\u2581dog"]))
