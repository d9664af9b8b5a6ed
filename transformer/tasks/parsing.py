"""English constituency parsing (paper section 6.3): treebanks, EVALB F1.

The library of linearisation, tree constraint and EVALB is `transformer.parsing`;
trees and treebank datasets are `transformer.data.treebank`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from transformer import parsing as parsing_lib
from transformer.config import Config, ConfigError, DataConfig
from transformer.data import treebank
from transformer.tasks import base


class Parsing(base.Task):
  """Sentences -> linearised trees of --dataset=ptb_wsj|ptb_wsj_sample|craft_treebank."""

  name = "parsing"

  def get_split(self, data_cfg: DataConfig, split: str, data_dir: str) -> treebank.ParsingSplit:
    return treebank.get_parsing_split(data_cfg, split, data_dir)

  def make_builder(self, data_cfg: DataConfig, data_dir: str) -> treebank.PtbParsing:
    return treebank.make_parsing_builder(data_cfg, data_dir)

  def is_stored(self, split: str) -> bool:
    # A directory of tree files is never stored: its files may change, and the same
    # relative path names other trees from another cwd.
    return not treebank.is_directory_split(split)

  def dev_subset(self, examples: Sequence[base.Example], n: int) -> list[base.Example]:
    # Spread over the split (its files), not its first file.
    return [examples[i * len(examples) // n] for i in range(n)]

  def constraint(self, cfg: Config, tokenizer) -> Optional[parsing_lib.TreeConstraint]:
    """With --tree_constraints, only well-formed trees."""
    if not cfg.decode.tree_constraints:
      return None
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    try:
      return parsing_lib.TreeConstraint.from_pieces(pieces, _placeholder(cfg))
    except ValueError as e:
      raise ConfigError(f"--tree_constraints: {e} (or pass --notree_constraints)") from e

  @staticmethod
  def _evalb_params(data_cfg: DataConfig) -> parsing_lib.EvalbParams:
    return (parsing_lib.load_evalb_params(data_cfg.evalb_params) if data_cfg.evalb_params
            else parsing_lib.COLLINS_PARAMS)

  def dev_score(self, cfg: Config, hyps: Sequence[str], examples: Sequence[base.Example],
                beam_size: int) -> tuple[dict[str, float], str]:
    rep = parsing_lib.parsing_report(hyps, examples, self._evalb_params(cfg.data),
                                     _placeholder(cfg))
    metrics = {"f1": rep["f1"], "repaired": rep["repaired"], "exact_match": rep["exact_match"],
               "sentence_f1": rep["sentence_f1"]}
    return metrics, (f" | F1 {rep['f1']:.2f} (sentence trees {rep['sentence_f1']:.2f};"
                     f" {len(examples)} trees, beam {beam_size}, {rep['repaired']} repaired)")

  def score(self, cfg: Config, hyps: Sequence[str],
            examples: Sequence[base.Example]) -> dict[str, Any]:
    return parsing_lib.parsing_report(hyps, examples, self._evalb_params(cfg.data),
                                      _placeholder(cfg))

  def report_lines(self, cfg: Config, report: Mapping[str, Any], which: str,
                   step: int) -> list[str]:
    split, r = cfg.data.test_split, report
    return [
        f"F1 {split} ({which} step {step}, beam {cfg.decode.beam_size}, alpha"
        f" {cfg.decode.alpha}): {r['f1']:.2f} (P {r['precision']:.2f}"
        f" R {r['recall']:.2f}; exact match {r['exact_match']:.2f};"
        f" repaired {r['repaired']}/{r['sentences']}; EVALB"
        f" {os.path.basename(cfg.data.evalb_params or 'COLLINS.prm')})",
        f"F1 {split}, sentence trees only ({r['sentence_sentences']} of"
        f" {r['sentences']}; no TITLE/HEADING/CAPTION/CIT root):"
        f" {r['sentence_f1']:.2f} (P {r['sentence_precision']:.2f}"
        f" R {r['sentence_recall']:.2f}; exact match {r['sentence_exact_match']:.2f};"
        f" repaired {r['sentence_repaired']}/{r['sentence_sentences']})"]

  def write_outputs(self, cfg: Config, prefix: str, which: str, hyps: Sequence[str],
                    examples: Sequence[base.Example]) -> None:
    """Test and gold trees for EVALB: `evalb -p COLLINS.prm <prefix>.gold.trees
    <prefix>.<which>.trees`."""
    trees = parsing_lib.predict_trees(hyps, examples, _placeholder(cfg))
    parsing_lib.write_trees(f"{prefix}.{which}.trees", [t for t, _ in trees])
    parsing_lib.write_trees(f"{prefix}.gold.trees", [ex["tree"] for ex in examples])

  def output_lines(self, cfg: Config, hyps: Sequence[str],
                   examples: Sequence[base.Example]) -> list[str]:
    """Bracketed trees (placeholder POS tags)."""
    return [t.to_string() for t, _ in parsing_lib.predict_trees(hyps, examples, _placeholder(cfg))]


def _placeholder(cfg: Config) -> Optional[str]:
  """The word placeholder of --parse_target: 'XX', or None when the target spells the words."""
  return None if cfg.data.parse_target == "words" else treebank.PLACEHOLDER
