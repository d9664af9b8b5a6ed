"""Tests for transformer/evaluate.py against independent computations."""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sacremoses import MosesTokenizer

from transformer import evaluate

DATA_DIR = Path(os.environ.get(
    'TRANSFORMER_DATA_DIR',
    Path(__file__).resolve().parents[2] / 'shared' / 'data'))
VAL_DE = DATA_DIR / 'multi30k' / 'val.de'

PERL_SPLIT = r's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'


def _val_de(n: int) -> list[str]:
  """The first n lines of Multi30k val.de."""
  assert VAL_DE.exists(), f'{VAL_DE} not found: set TRANSFORMER_DATA_DIR'
  with open(VAL_DE, encoding='utf-8') as f:
    return [next(f).rstrip('\n') for _ in range(n)]


def _perturb(lines: list[str]) -> list[str]:
  """Deterministic edits: keep, drop last word, swap words, replace a word."""
  out = []
  for i, line in enumerate(lines):
    w = line.split()
    if i % 4 == 1:
      w = w[:-1]
    elif i % 4 == 2:
      w[1], w[2] = w[2], w[1]
    elif i % 4 == 3:
      w[len(w) // 2] = 'Hund'
    out.append(' '.join(w))
  return out


def _ref_bleu(hyp_toks: list[list[str]], ref_toks: list[list[str]]):
  """multi-bleu.perl: clipped n-gram counts summed over the corpus, no smoothing."""
  correct, total = [0] * 4, [0] * 4
  sys_len = ref_len = 0
  for h, r in zip(hyp_toks, ref_toks):
    sys_len += len(h)
    ref_len += len(r)
    for n in range(1, 5):
      hc = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
      rc = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
      correct[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
      total[n - 1] += max(len(h) - n + 1, 0)
  if min(correct) == 0:
    return 0.0, sys_len, ref_len
  bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
  log_p = sum(math.log(c / t) for c, t in zip(correct, total)) / 4
  return 100 * bp * math.exp(log_p), sys_len, ref_len


def test_tokenized_bleu_matches_independent_multibleu():
  refs = _val_de(12)
  hyps = _perturb(refs)
  tok = MosesTokenizer(lang='de')
  split = lambda s: tok.tokenize(s, return_str=True, escape=False).split()
  want, sys_len, ref_len = _ref_bleu([split(h) for h in hyps],
                                     [split(r) for r in refs])
  assert sys_len < ref_len  # the brevity penalty is exercised
  got = evaluate.tokenized_bleu(hyps, refs, 'de', split_compounds=False)
  assert 0 < got.score < 100
  assert got.score == pytest.approx(want, abs=1e-9)
  assert (got.sys_len, got.ref_len) == (sys_len, ref_len)
  assert got.brevity_penalty == pytest.approx(math.exp(1 - ref_len / sys_len))


def test_tokenized_bleu_is_unsmoothed_like_multibleu():
  hyps = ['Ein Mann schläft nicht', 'Zwei Hunde']
  refs = ['Ein Mann schläft .', 'Zwei Hunde rennen .']
  want, _, _ = _ref_bleu([h.split() for h in hyps], [r.split() for r in refs])
  assert want == 0.0  # no matching 4-gram
  got = evaluate.tokenized_bleu(hyps, refs, 'de', split_compounds=False)
  assert got.score == 0.0
  assert got.precisions[2] > 0 and got.precisions[3] == 0
  assert 'smooth:none' in got.signature
  assert evaluate.sacrebleu_score(hyps, refs).score > 0  # exp smoothing


def test_tokenized_bleu_applies_moses_tokenization():
  hyps = ['Ein Mann schläft in einem grünen Raum auf einem Sofa.']
  refs = ['Ein Mann schläft in einem grünen Raum auf einem Sofa .']
  raw, _, _ = _ref_bleu([hyps[0].split()], [refs[0].split()])
  assert raw < 100
  assert evaluate.tokenized_bleu(hyps, refs, 'de').score == pytest.approx(100)


@pytest.mark.parametrize('line, want', [
    ('Ein 5-jähriger Junge', 'Ein 5 ##AT##-##AT## jähriger Junge'),
    ('a-b-c', 'a ##AT##-##AT## b-c'),
    ('a-b-c-d', 'a ##AT##-##AT## b-c ##AT##-##AT## d'),
    ('Eine Drei-Mann-Band', 'Eine Drei ##AT##-##AT## Mann ##AT##-##AT## Band'),
    # perl works on UTF-8 bytes: a 2-byte middle char is only half consumed.
    ('ä-ö-ü', 'ä ##AT##-##AT## ö ##AT##-##AT## ü'),
    ('\u00a0-a', '\u00a0 ##AT##-##AT## a'),  # NBSP is not \s for perl bytes
    ('a--b', 'a ##AT##-##AT## -b'),
    ('x - y', 'x - y'),
    ('x -y z- w', 'x -y z- w'),
    ('-a-', '-a-'),
    ('blau-weißes T-Shirt', 'blau ##AT##-##AT## weißes T ##AT##-##AT## Shirt'),
])
def test_split_hyphenated_hand_worked(line, want):
  assert evaluate.split_hyphenated(line) == want


def test_split_hyphenated_matches_perl():
  assert shutil.which('perl') is not None, 'perl is needed to check the get_ende_bleu.sh rule'
  lines = ['Ein 5-jähriger Junge', 'a-b-c', 'a-b-c-d', 'a--b', 'x - y', '-a-',
           'x\t-\ty', 'ä-ö-ü ß-€', '\u00a0-a', 'Eine Drei-Mann-Band', '',
           'U-Bahn , T-Shirt-Druck', '1-2-3-4-5 a-b']
  if VAL_DE.exists():
    with open(VAL_DE, encoding='utf-8') as f:
      lines += [l.rstrip('\n') for l in f if '-' in l][:40]
  proc = subprocess.run(['perl', '-ple', PERL_SPLIT],
                        input='\n'.join(lines).encode('utf-8') + b'\n',
                        capture_output=True, check=True)
  want = proc.stdout.decode('utf-8').split('\n')[:-1]
  assert len(want) == len(lines)
  assert [evaluate.split_hyphenated(l) for l in lines] == want


def test_compound_splitting_is_applied_in_bleu():
  refs = ['Ein 5-jähriger Junge spielt mit einem blau-weißen Ball im Park .']
  hyps = ['Ein 6-jähriger Junge spielt mit einem blau-weißen Ball im Park .']
  toks = lambda s: evaluate.split_hyphenated(s).split()
  want, _, _ = _ref_bleu([toks(hyps[0])], [toks(refs[0])])
  no_split, _, _ = _ref_bleu([hyps[0].split()], [refs[0].split()])
  got = evaluate.tokenized_bleu(hyps, refs, 'de')
  assert got.score == pytest.approx(want)
  assert got.score > no_split
  assert evaluate.tokenized_bleu(
      hyps, refs, 'de', split_compounds=False).score == pytest.approx(no_split)
  assert 'compound-split' in got.signature


def test_identical_gives_100_and_empty_gives_0():
  refs = _val_de(5)
  for fn in (evaluate.sacrebleu_score,
             lambda h, r: evaluate.tokenized_bleu(h, r, 'de'),
             lambda h, r: evaluate.tokenized_bleu(h, r, 'de', False, True)):
    assert fn(refs, refs).score == pytest.approx(100)
    assert fn([''] * len(refs), refs).score == 0
    assert fn([''] * len(refs), refs).sys_len == 0


def test_sacrebleu_signature():
  refs = _val_de(3)
  res = evaluate.sacrebleu_score(_perturb(refs), refs)
  assert 'tok:13a' in res.signature
  assert 'case:mixed' in res.signature
  assert 'nrefs:1' in res.signature
  assert 0 < res.score < 100
  assert len(res.precisions) == 4


def test_lowercased_variant():
  refs = _val_de(6)
  hyps = [r[0].lower() + r[1:] for r in refs]  # 'Ein ...' -> 'ein ...'
  assert hyps != refs
  cased = evaluate.tokenized_bleu(hyps, refs, 'de', split_compounds=False)
  lc = evaluate.tokenized_bleu(hyps, refs, 'de', split_compounds=False,
                               lowercase=True)
  assert lc.score == pytest.approx(100)
  assert cased.score < 100
  # Exactly one unigram per sentence is wrong when case matters.
  n_tok = cased.sys_len
  assert cased.precisions[0] == pytest.approx(100 * (n_tok - 6) / n_tok)
  assert 'case:lc' in lc.signature and 'case:mixed' in cased.signature


def test_length_mismatch_raises():
  with pytest.raises(ValueError):
    evaluate.tokenized_bleu(['a'], ['a', 'b'], 'en')
  with pytest.raises(ValueError):
    evaluate.sacrebleu_score(['a', 'b'], ['a'])


def test_perplexity():
  assert evaluate.perplexity(0.0, 7) == 1.0
  assert evaluate.perplexity(10 * math.log(2.0), 10) == pytest.approx(2.0)
  assert evaluate.perplexity(3.5, 2) == pytest.approx(math.exp(1.75))
  assert evaluate.perplexity(1e6, 1) == math.inf
  assert evaluate.perplexity(709.0, 1) == pytest.approx(math.exp(709.0))
  with pytest.raises(ValueError):
    evaluate.perplexity(1.0, 0)


def _read_lines(path):
  """The lines of a file `write_lines` wrote (each ends with '\n')."""
  return path.read_bytes().decode('utf-8').split('\n')[:-1]


def test_write_read_lines_roundtrip(tmp_path):
  path = tmp_path / 'sub' / 'hyps.de'
  lines = ['Ein Mann schläft.', '', '  leading space', 'ä ß €', 'last']
  evaluate.write_lines(path, lines)
  assert path.read_bytes() == ('\n'.join(lines) + '\n').encode('utf-8')
  assert _read_lines(path) == lines
  evaluate.write_lines(path, ['x'])  # overwrite
  assert _read_lines(path) == ['x']
  evaluate.write_lines(path, [])
  assert _read_lines(path) == []
  assert sorted(p.name for p in path.parent.iterdir()) == ['hyps.de']


def test_write_lines_rejects_newline_and_keeps_old_file(tmp_path):
  path = tmp_path / 'hyps.txt'
  evaluate.write_lines(path, ['old'])
  with pytest.raises(ValueError):
    evaluate.write_lines(path, ['ok', 'bad\nline'])
  assert _read_lines(path) == ['old']
  assert [p.name for p in tmp_path.iterdir()] == ['hyps.txt']


def test_bleu_report():
  refs = _val_de(8)
  hyps = _perturb(refs)
  rep = evaluate.bleu_report(hyps, refs, 'de')
  assert set(rep) == {'sacrebleu', 'sacrebleu_signature',
                      'bleu_tok_compound_split', 'bleu_tok_lc'}
  assert rep['sacrebleu'] == evaluate.sacrebleu_score(hyps, refs).score
  assert rep['sacrebleu_signature'].startswith('nrefs:1|case:mixed')
  assert rep['bleu_tok_compound_split'] == evaluate.tokenized_bleu(
      hyps, refs, 'de').score
  assert rep['bleu_tok_lc'] == evaluate.tokenized_bleu(
      hyps, refs, 'de', split_compounds=False, lowercase=True).score
  assert all(isinstance(rep[k], float) for k in rep if k != 'sacrebleu_signature')


def test_sacrebleu_by_hand():
  """Two sentences counted by hand (13a splits off the final '.').

  the cat sat on the mat / the cat sat on a mat: n-gram matches 5/6, 3/5, 2/4, 1/3.
  a dog . / a dog runs .: 3/3, 1/2, 0/1, 0/0.
  Corpus: 8/9, 4/7, 2/5, 1/3 (no zero count, so smoothing plays no part); lengths 9 and 10,
  BP = exp(1 - 10/9).
  """
  hyps = ['the cat sat on the mat', 'a dog .']
  refs = ['the cat sat on a mat', 'a dog runs .']
  got = evaluate.sacrebleu_score(hyps, refs)
  want = 100 * math.exp(1 - 10 / 9) * (8 / 9 * 4 / 7 * 2 / 5 * 1 / 3) ** 0.25
  assert got.score == pytest.approx(want, abs=1e-9)
  assert (got.sys_len, got.ref_len) == (9, 10)
  assert got.precisions == pytest.approx([100 * 8 / 9, 100 * 4 / 7, 100 * 2 / 5, 100 / 3])
  assert got.brevity_penalty == pytest.approx(math.exp(1 - 10 / 9))


def test_sacrebleu_equals_the_sacrebleu_command_line(tmp_path):
  """The project's score and signature against the reference tool run on files."""
  refs = _val_de(40)
  hyps = _perturb(refs)
  (tmp_path / 'hyp.de').write_text('\n'.join(hyps) + '\n', encoding='utf-8')
  (tmp_path / 'ref.de').write_text('\n'.join(refs) + '\n', encoding='utf-8')
  tool = os.path.join(os.path.dirname(sys.executable), 'sacrebleu')
  r = subprocess.run([tool, str(tmp_path / 'ref.de'), '-i', str(tmp_path / 'hyp.de'), '-w', '4'],
                     capture_output=True, text=True, timeout=120, check=True)
  cli = json.loads(r.stdout)
  got = evaluate.sacrebleu_score(hyps, refs)
  assert 0 < cli['score'] < 100
  assert round(got.score, 4) == cli['score']
  assert got.signature == cli['signature']
