"""Translation (paper section 6.1): parallel corpora, BLEU."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from transformer import evaluate
from transformer.config import Config, DataConfig
from transformer.data import datasets, treebank
from transformer.tasks import base


class Translation(base.Task):
  """Sentence pairs of --dataset; sacreBLEU and the paper's tokenized BLEU."""

  name = "translation"

  def get_split(self, data_cfg: DataConfig, split: str, data_dir: str) -> datasets.ParallelSplit:
    self._check_dataset(data_cfg)
    return datasets.get_split(data_cfg, split, data_dir)

  def make_builder(self, data_cfg: DataConfig, data_dir: str):
    self._check_dataset(data_cfg)
    return datasets.make_builder(data_cfg, data_dir)

  @staticmethod
  def _check_dataset(data_cfg: DataConfig) -> None:
    if data_cfg.dataset in treebank.DATASETS:
      raise datasets.DataError(f"--dataset={data_cfg.dataset} is a treebank: use --task=parsing")

  def dev_score(self, cfg: Config, hyps: Sequence[str], examples: Sequence[base.Example],
                beam_size: int) -> tuple[dict[str, float], str]:
    del beam_size
    bleu = evaluate.sacrebleu_score(hyps, [ex["target"] for ex in examples]).score
    return {"bleu": bleu}, f" | BLEU {bleu:.2f} ({len(examples)} sents)"

  def score(self, cfg: Config, hyps: Sequence[str],
            examples: Sequence[base.Example]) -> dict[str, Any]:
    return evaluate.bleu_report(hyps, [ex["target"] for ex in examples], cfg.data.target_lang)

  def report_lines(self, cfg: Config, report: Mapping[str, Any], which: str,
                   step: int) -> list[str]:
    d = cfg.data
    return [f"BLEU {d.source_lang}->{d.target_lang} {d.test_split}"
            f" ({which} step {step}, beam {cfg.decode.beam_size}, alpha {cfg.decode.alpha}):"
            f" sacreBLEU {report['sacrebleu']:.2f} [{report['sacrebleu_signature']}]"
            f" | tokenized+compound-split {report['bleu_tok_compound_split']:.2f}"
            f" | tokenized lowercased {report['bleu_tok_lc']:.2f}"]
