"""Translation metrics: sacreBLEU, the paper's tokenized BLEU, perplexity.

Three BLEU conventions are reported side by side because published numbers use
different ones and are not comparable across them:

* `sacrebleu_score`: detokenized, cased sacreBLEU (13a tokenization) with its
  signature. The reproducible modern standard.
* `tokenized_bleu(..., split_compounds=True)`: the paper's convention
  (tensor2tensor `get_ende_bleu.sh`, Table 2): Moses tokenization, hyphenated
  compounds split into `A ##AT##-##AT## B`, then multi-bleu.perl-style corpus
  BLEU on the tokens (no smoothing, cased).
* `tokenized_bleu(..., split_compounds=False, lowercase=True)`: the lowercased
  Moses-tokenized BLEU (`multi-bleu.perl -lc`) used by Multi30k papers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Iterable, Sequence

from sacrebleu.metrics import BLEU
from sacremoses import MosesTokenizer

from transformer.io_utils import atomic_write


@dataclasses.dataclass(frozen=True)
class BleuResult:
  """A corpus BLEU score (0-100) with its components and signature."""
  score: float
  signature: str
  precisions: tuple[float, ...]  # modified n-gram precisions (percent), n=1..4
  brevity_penalty: float
  sys_len: int
  ref_len: int

  def __str__(self) -> str:
    p = '/'.join(f'{x:.1f}' for x in self.precisions)
    return (f'BLEU = {self.score:.2f} {p} (BP = {self.brevity_penalty:.3f} '
            f'hyp_len = {self.sys_len} ref_len = {self.ref_len}) '
            f'[{self.signature}]')


def _check_lengths(hyps: Sequence[str], refs: Sequence[str]) -> None:
  """Raises ValueError unless there is exactly one reference per hypothesis."""
  if len(hyps) != len(refs):
    raise ValueError(
        f'{len(hyps)} hypotheses but {len(refs)} references; need one each.')


def _run_bleu(metric: BLEU, hyps: Sequence[str], refs: Sequence[str],
              prefix: str = '') -> BleuResult:
  """Scores with a sacrebleu BLEU object and wraps the result."""
  res = metric.corpus_score(list(hyps), [list(refs)])
  return BleuResult(
      score=float(res.score),
      signature=prefix + str(metric.get_signature()),
      precisions=tuple(float(p) for p in res.precisions),
      brevity_penalty=float(res.bp),
      sys_len=int(res.sys_len),
      ref_len=int(res.ref_len))


def sacrebleu_score(hypotheses: Sequence[str],
                    references: Sequence[str]) -> BleuResult:
  """Detokenized, cased sacreBLEU (13a tokenization, default smoothing)."""
  _check_lengths(hypotheses, references)
  return _run_bleu(BLEU(), hypotheses, references)


# tensor2tensor get_ende_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'.
# Without -C, perl sees undecoded UTF-8 bytes, so the substitution is applied to
# bytes here too (\S on bytes excludes only ASCII whitespace, as in perl). Like
# s///g, re.sub scans left to right over non-overlapping matches, so 'a-b-c' ->
# 'a ##AT##-##AT## b-c' ('b' is consumed by the first match), but a multi-byte
# middle character is only half consumed: 'ä-ö-ü' -> 'ä ##AT##-##AT## ö
# ##AT##-##AT## ü'. Only ASCII is inserted around an ASCII '-', so the result is
# always valid UTF-8.
_COMPOUND_RE = re.compile(rb'(\S)-(\S)')


def split_hyphenated(line: str) -> str:
  """Splits hyphenated compounds exactly like get_ende_bleu.sh's perl one-liner."""
  out = _COMPOUND_RE.sub(rb'\1 ##AT##-##AT## \2', line.encode('utf-8'))
  return out.decode('utf-8')


@functools.lru_cache(maxsize=None)
def _moses(lang: str) -> MosesTokenizer:
  """A cached Moses tokenizer for `lang`."""
  return MosesTokenizer(lang=lang)


def moses_tokenize(line: str, lang: str) -> str:
  """Moses-tokenizes one line (no XML escaping, no aggressive dash splits)."""
  return _moses(lang).tokenize(line, return_str=True, escape=False)


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str,
                   split_compounds: bool = True,
                   lowercase: bool = False) -> BleuResult:
  """multi-bleu.perl BLEU on Moses-tokenized (optionally compound-split) text."""
  _check_lengths(hyps, refs)

  def prep(line: str) -> str:
    line = moses_tokenize(line, lang)
    return split_hyphenated(line) if split_compounds else line

  # multi-bleu.perl: whitespace tokens, no smoothing, corpus-level sums.
  metric = BLEU(tokenize='none', force=True, smooth_method='none',
                lowercase=lowercase)
  prefix = f'pretok:moses-{lang}' + ('+compound-split' if split_compounds
                                     else '') + '|'
  return _run_bleu(metric, [prep(h) for h in hyps], [prep(r) for r in refs],
                   prefix)


# Largest x with math.exp(x) finite (log of the max double).
_MAX_EXP_ARG = math.log(1.7976931348623157e308)


def perplexity(total_nll: float, num_tokens: int) -> float:
  """exp(total_nll / num_tokens), in nats; inf instead of OverflowError."""
  if num_tokens <= 0:
    raise ValueError(f'num_tokens must be positive, got {num_tokens}.')
  mean = float(total_nll) / num_tokens
  if math.isnan(mean):
    return math.nan
  if mean > _MAX_EXP_ARG:
    return math.inf
  return math.exp(mean)


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
  """Atomically writes one line per item, in order (see io_utils.atomic_write)."""
  lines = list(lines)
  for i, line in enumerate(lines):
    if '\n' in line or '\r' in line:
      raise ValueError(f'line {i} contains a newline: {line!r}')
  with atomic_write(path, 'w', encoding='utf-8', newline='\n') as f:
    f.writelines(line + '\n' for line in lines)


def bleu_report(hyps: Sequence[str], refs: Sequence[str],
                lang: str) -> dict:
  """All three BLEU conventions as a flat dict for printing and logging."""
  sb = sacrebleu_score(hyps, refs)
  return {
      'sacrebleu': sb.score,
      'sacrebleu_signature': sb.signature,
      'bleu_tok_compound_split': tokenized_bleu(
          hyps, refs, lang, split_compounds=True, lowercase=False).score,
      'bleu_tok_lc': tokenized_bleu(
          hyps, refs, lang, split_compounds=False, lowercase=True).score,
  }
