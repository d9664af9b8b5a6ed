"""The interface of a task: what `run.py` asks of translation, parsing, ...

A task is a sequence-transduction problem: sentences in, sequences out. The
model, the beam search and the workflows are shared; a task says

* where its examples come from (`get_split`, `make_builder`, `is_stored`);
* which examples the periodic dev decode uses (`dev_subset`);
* which hypotheses the beam search may produce (`constraint`);
* how hypotheses are scored (`dev_score` during training, `score` for
  --mode=evaluate) and reported (`report_lines`);
* what is written besides the hypotheses (`write_outputs`) and what
  --mode=translate prints for a hypothesis (`output_lines`).

Examples are `{'source': str, 'target': str, 'id': int, ...}` mappings; a task
may add its own keys (parsing: 'tree', 'root', 'file').
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from transformer.config import Config, DataConfig

Example = Mapping[str, Any]


class Task:
  """Base class of the tasks in `transformer.tasks` (picked by --task)."""

  name: str = ""

  # -- data -------------------------------------------------------------------

  def get_split(self, data_cfg: DataConfig, split: str, data_dir: str) -> Sequence[Example]:
    """Random-access examples of `split`, prepared in `data_dir` on first use."""
    raise NotImplementedError

  def make_builder(self, data_cfg: DataConfig, data_dir: str):
    """The TFDS builder of --dataset (what --mode=prepare reports on)."""
    raise NotImplementedError

  def is_stored(self, split: str) -> bool:
    """Whether `split` is tokenized once into a store (False: read and tokenized on each use)."""
    del split
    return True

  def dev_subset(self, examples: Sequence[Example], n: int) -> list[Example]:
    """The `n` dev examples beam-decoded at each periodic evaluation."""
    return list(examples[:n])

  # -- decoding ---------------------------------------------------------------

  def constraint(self, cfg: Config, tokenizer) -> Optional[Any]:
    """A `decode.beam_search` constraint over `tokenizer`'s vocabulary, or None."""
    del cfg, tokenizer
    return None

  # -- metric -----------------------------------------------------------------

  def dev_score(self, cfg: Config, hyps: Sequence[str], examples: Sequence[Example],
                beam_size: int) -> tuple[dict[str, float], str]:
    """(metrics for metrics.jsonl, text for the eval log line) of the periodic dev decode."""
    raise NotImplementedError

  def score(self, cfg: Config, hyps: Sequence[str],
            examples: Sequence[Example]) -> dict[str, Any]:
    """The --mode=evaluate report of `hyps` against `examples` (JSON-able)."""
    raise NotImplementedError

  def report_lines(self, cfg: Config, report: Mapping[str, Any], which: str,
                   step: int) -> list[str]:
    """The lines --mode=evaluate prints for `report` (checkpoint `which` of `step`)."""
    raise NotImplementedError

  # -- written outputs --------------------------------------------------------

  def write_outputs(self, cfg: Config, prefix: str, which: str, hyps: Sequence[str],
                    examples: Sequence[Example]) -> None:
    """Files --mode=evaluate writes next to the hypotheses (`<prefix>.<which>.hyp`)."""
    del cfg, prefix, which, hyps, examples

  def output_lines(self, cfg: Config, hyps: Sequence[str],
                   examples: Sequence[Example]) -> list[str]:
    """What --mode=translate writes for each hypothesis."""
    del cfg, examples
    return list(hyps)
