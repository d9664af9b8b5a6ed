"""Tests for transformer/parsing.py: linearisation, repairs, EVALB-compatible scoring."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import random

import pytest

from transformer import parsing
from transformer.data import treebank
from transformer.data.treebank import parse_tree

_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_dir() -> Path:
  return Path(os.environ.get("TRANSFORMER_DATA_DIR", _DEFAULT_DATA_DIR))


@pytest.fixture(scope="module")
def dev_trees() -> list[treebank.Tree]:
  """Normalised trees of the sample's dev files wsj_0160-0179."""
  d = _data_dir() / "ptb_wsj_sample_nltk" / "combined"
  if not (d / "wsj_0160.mrg").exists():
    pytest.fail(f"{d} not found: set TRANSFORMER_DATA_DIR to the shared data directory")
  files = treebank.split_files(str(d), "sample")["validation"]
  return [t for _, t in treebank.iter_split_trees(files)]


@pytest.fixture(scope="module")
def prm_dir() -> Path:
  d = _data_dir() / "evalb_params"
  if not (d / "COLLINS.prm").exists():
    pytest.fail(f"{d} not found: set TRANSFORMER_DATA_DIR to the shared data directory")
  return d


JOHN = "(S (NP (NNP John)) (VP (VBZ has) (NP (DT a) (NN dog))) (. .))"
JOHN_WORDS = ["John", "has", "a", "dog", "."]
JOHN_TAGS = ["NNP", "VBZ", "DT", "NN", "."]


# ----------------------------------------------------------------------------
# De-linearisation.


def test_round_trip_every_dev_tree(dev_trees):
  assert len(dev_trees) == 273
  for tree in dev_trees:
    lin = treebank.linearize(tree)
    assert lin.split().count("XX") == len(tree.leaves())
    back, repairs = parsing.delinearize(lin, tree.leaves(), tree.tags())
    assert repairs == 0
    assert back == tree


def test_words_form_round_trips_every_craft_train_tree():
  """--parse_target=words: `lexicalize` then `delinearize(placeholder=None)` gives back every
  tree of CRAFT train; the words of the target are the sentence, in order."""
  d = _data_dir() / "craft_treebank" / "train"
  if not d.is_dir():
    pytest.fail(f"{d} not found: set TRANSFORMER_DATA_DIR to the shared data directory")
  n = 0
  for _, tree in treebank.iter_split_trees(treebank.tree_files(str(d))):
    words = tree.leaves()
    lex = treebank.lexicalize(treebank.linearize(tree), words)
    assert [t for t in lex.split() if t[0] not in "()"] == words
    back, repairs = parsing.delinearize(lex, words, tree.tags(), placeholder=None)
    assert repairs == 0 and back == tree
    # Read as the XX form instead, every word is a stray token: the placeholder matters.
    assert parsing.delinearize(lex, words, tree.tags())[1] > 0
    n += 1
  assert n == 18951


def test_lexicalize_hand_worked():
  assert (treebank.lexicalize("(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S", JOHN_WORDS)
          == "(S (NP John )NP (VP has (NP a dog )NP )VP . )S")
  with pytest.raises(ValueError, match="4 words for 5 placeholders"):
    treebank.lexicalize("(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S", JOHN_WORDS[:4])
  # Words form: any non-bracket token takes the next word, whatever it spells.
  tree, n = parsing.delinearize("(S (NP Jon )NP (VP had (NP a cat )NP )VP . )S", JOHN_WORDS,
                                JOHN_TAGS, placeholder=None)
  assert n == 0 and tree == parse_tree(JOHN)


@pytest.mark.parametrize("sequence, want, repairs", [
    # Well formed.
    ("(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S", JOHN, 0),
    # Three phrases never closed: closed at the end (3); '.' ends up inside the NP.
    ("(S (NP XX )NP (VP XX (NP XX XX XX",
     "(S (NP (NNP John)) (VP (VBZ has) (NP (DT a) (NN dog) (. .))))", 3),
    # Two stray closes after the root: dropped (2).
    ("(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S )S )VP", JOHN, 2),
    # A close with the wrong label closes the innermost phrase anyway (1).
    ("(S (NP XX )VP (VP XX (NP XX XX )NP )VP XX )S", JOHN, 1),
    # Two placeholders short: 'dog' and '.' appended to the root (2).
    ("(S (NP XX )NP (VP XX (NP XX )NP )VP )S",
     "(S (NP (NNP John)) (VP (VBZ has) (NP (DT a))) (NN dog) (. .))", 2),
    # Two placeholders too many: the 6th and 7th are dropped (2).
    ("(S (NP XX XX )NP (VP XX (NP XX XX XX )NP )VP XX )S",
     "(S (NP (NNP John) (VBZ has)) (VP (DT a) (NP (NN dog) (. .))))", 2),
    # An empty phrase (1) and an unknown token (1): dropped.
    ("(S (NP )NP foo (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S", JOHN, 2),
    # No root: the three top-level pieces are wrapped in TOP (1).
    ("(NP XX )NP (VP XX (NP XX XX )NP )VP XX",
     "(TOP (NP (NNP John)) (VP (VBZ has) (NP (DT a) (NN dog))) (. .))", 1),
    # Nothing: 5 missing words appended (5) under a TOP root (1).
    ("", "(TOP (NNP John) (VBZ has) (DT a) (NN dog) (. .))", 6),
    # Stray close first (1); ADJP opened at the end: closed (1) and empty (1); S
    # never closed (1); one placeholder short: '.' appended to the root (1).
    (")S (S (NP XX )NP (VP XX (NP XX XX )NP )VP (ADJP", JOHN, 5),
])
def test_delinearize_repairs(sequence, want, repairs):
  tree, n = parsing.delinearize(sequence, JOHN_WORDS, JOHN_TAGS)
  assert tree.to_string() == want
  assert n == repairs
  assert tree.leaves() == JOHN_WORDS and tree.tags() == JOHN_TAGS


def test_delinearize_without_tags_and_random_garbage(dev_trees):
  tree, n = parsing.delinearize("(S (NP XX )NP (VP XX )VP )S", ["It", "works"])
  assert (tree.to_string(), n) == ("(S (NP (XX It)) (VP (XX works)))", 0)
  with pytest.raises(ValueError, match="tags"):
    parsing.delinearize("", ["a", "b"], ["DT"])
  # Any token soup gives a readable tree over exactly the sentence's words (these
  # random ones all need repairs) that EVALB scores without error.
  rng = random.Random(0)
  vocab = ["(S", ")S", "(NP", ")NP", "(VP", ")VP", "XX", "XX", "XX", ")", "junk"]
  for gold in dev_trees[:60]:
    words, tags = gold.leaves(), gold.tags()
    seq = " ".join(rng.choice(vocab) for _ in range(rng.randrange(0, 3 * len(words))))
    tree, n = parsing.delinearize(seq, words, tags)
    assert tree.leaves() == words and tree.tags() == tags
    assert not tree.is_preterminal
    assert parse_tree(tree.to_string()) == tree
    assert n > 0
    score = parsing.score_sentence(gold, tree)
    assert score.status == 0


# ----------------------------------------------------------------------------
# EVALB parameters.


def test_load_evalb_params(prm_dir, tmp_path):
  assert parsing.load_evalb_params(prm_dir / "COLLINS.prm") == parsing.COLLINS_PARAMS
  nk = parsing.load_evalb_params(prm_dir / "nk.prm")
  assert nk.max_error == 10000 and nk.cutoff_len == 40 and nk.labeled
  assert nk.delete_labels == ("TOP", "S1", "-NONE-", ",", ":", "``", "''", ".", "?", "!")
  assert nk.quote_labels == ("``", "''", "POS", "NN", "CD", "VBZ", ":")
  assert nk.eq_labels == (("ADVP", "PRT"),) and nk.eq_words == ()
  custom = tmp_path / "x.prm"
  custom.write_text("# comment\nLABELED 0   \nDELETE_LABEL  TOP\nEQ_WORD a b\n"
                    "\nXX\nCUTOFF_LEN 10\n", encoding="utf-8")
  p = parsing.load_evalb_params(custom)
  assert (p.labeled, p.delete_labels, p.eq_words, p.cutoff_len) == (
      False, ("TOP",), (("a", "b"),), 10)


# ----------------------------------------------------------------------------
# EVALB scoring (COLLINS.prm unless said otherwise). Hand counts in comments;
# spans are [start, end) over the words left after deleting punctuation.

PP_GOLD = ("(S (NP (PRP I)) (VP (VBD saw) (NP (DT the) (NN man)) (PP (IN with)"
           " (NP (DT a) (NN telescope)))) (. .))")
# Wrong attachment: the PP goes under a new NP over "the man with a telescope".
PP_TEST = ("(S (NP (PRP I)) (VP (VBD saw) (NP (NP (DT the) (NN man)) (PP (IN with)"
           " (NP (DT a) (NN telescope))))) (. .))")
CAT_GOLD = "(S (NP (DT The) (NN cat)) (VP (VBD sat) (PP (IN on) (NP (DT the) (NN mat)))))"
CAT_TEST = "(S (NP (DT The) (NN cat) (VBD sat)) (VP (PP (IN on) (NP (DT the) (NN mat)))))"


def test_self_score(dev_trees):
  res = parsing.evalb(dev_trees, dev_trees)
  assert res["f1"] == res["precision"] == res["recall"] == 100.0
  assert res["exact_match"] == 100.0 and res["average_crossing"] == 0.0
  assert res["sentences"] == res["valid_sentences"] == 273
  assert res["error_sentences"] == res["skipped_sentences"] == 0
  assert res["tagging_accuracy"] == 100.0
  # Brackets: every phrase whose span keeps a non-punctuation word.
  punct = set(parsing.COLLINS_PARAMS.delete_labels)
  want = 0
  for tree in dev_trees:
    for kind, node in tree.events():
      if kind == "open" and any(p.label not in punct for p in node.preterminals()):
        want += 1
  assert res["gold_brackets"] == res["test_brackets"] == res["matched_brackets"] == want
  one = parsing.evalb([JOHN], [JOHN])
  assert (one["gold_brackets"], one["exact_match"], one["f1"]) == (4, 100.0, 100.0)


def test_wrong_attachment_and_crossing():
  # I saw the man with a telescope (.) -> 7 words after deleting '.'.
  # gold: S[0,7] NP[0,1] VP[1,7] NP[2,4] PP[4,7] NP[5,7]          = 6
  # test: S[0,7] NP[0,1] VP[1,7] NP[2,7] NP[2,4] PP[4,7] NP[5,7]  = 7
  # matched 6 (all gold); NP[2,7] crosses nothing (VP[1,7] contains it).
  s = parsing.score_sentence(PP_GOLD, PP_TEST)
  assert (s.gold_brackets, s.test_brackets, s.matched, s.crossing, s.length, s.words) == (
      6, 7, 6, 0, 8, 7)
  res = parsing.evalb([PP_GOLD], [PP_TEST])
  assert res["recall"] == 100.0
  assert res["precision"] == pytest.approx(600 / 7)
  assert res["f1"] == pytest.approx(2 * 6 / (6 + 7) * 100)  # 92.31
  assert res["exact_match"] == 0.0
  # The cat sat on the mat -> 6 words.
  # gold: S[0,6] NP[0,2] VP[2,6] PP[3,6] NP[4,6]  = 5
  # test: S[0,6] NP[0,3] VP[3,6] PP[3,6] NP[4,6]  = 5
  # matched S, PP[3,6], NP[4,6] = 3; test NP[0,3] crosses gold VP[2,6] -> 1 crossing.
  s = parsing.score_sentence(CAT_GOLD, CAT_TEST)
  assert (s.gold_brackets, s.test_brackets, s.matched, s.crossing) == (5, 5, 3, 1)
  # Corpus: matched 6+3=9, gold 6+5=11, test 7+5=12.
  res = parsing.evalb([PP_GOLD, CAT_GOLD], [PP_TEST, CAT_TEST])
  assert (res["matched_brackets"], res["gold_brackets"], res["test_brackets"]) == (9, 11, 12)
  assert res["recall"] == pytest.approx(900 / 11)
  assert res["precision"] == pytest.approx(75.0)
  assert res["f1"] == pytest.approx(100 * 18 / 23)  # 78.26
  assert res["exact_match"] == 0.0
  assert res["average_crossing"] == 0.5 and res["no_crossing"] == 50.0
  assert res["two_or_less_crossing"] == 100.0
  # Both sentences are short (8 and 6 words <= 40).
  assert res["short_f1"] == res["f1"] and res["short_sentences"] == 2


def test_punctuation_deletion_changes_spans():
  gold = "(S (NP (NNP Mr.) (NNP Smith)) (, ,) (VP (VBD left)) (. .))"
  test = "(S (NP (NNP Mr.) (NNP Smith) (, ,)) (VP (VBD left)) (. .))"
  # COLLINS.prm: words Mr. Smith left; gold S[0,3] NP[0,2] VP[2,3]; the test NP
  # also ends at 2 once ',' is deleted: 3/3/3.
  res = parsing.evalb([gold], [test])
  assert (res["matched_brackets"], res["gold_brackets"], res["test_brackets"]) == (3, 3, 3)
  assert res["f1"] == 100.0 and res["exact_match"] == 100.0
  # Nothing deleted: 5 words; gold S[0,5] NP[0,2] VP[3,4]; test S[0,5] NP[0,3] VP[3,4]: 2/3.
  res = parsing.evalb([gold], [test], parsing.EvalbParams())
  assert (res["matched_brackets"], res["gold_brackets"], res["test_brackets"]) == (2, 3, 3)
  assert res["f1"] == pytest.approx(200 / 3)
  # A phrase over punctuation only spans no word: dropped (3 test brackets, not 4).
  test2 = "(S (NP (NNP Mr.) (NNP Smith)) (PRN (, ,)) (VP (VBD left)) (. .))"
  s = parsing.score_sentence(gold, test2)
  assert (s.gold_brackets, s.test_brackets, s.matched) == (3, 3, 3)


def test_advp_prt_equivalence():
  gold = "(S (NP (PRP He)) (VP (VBD gave) (PRT (RP up))))"
  test = "(S (NP (PRP He)) (VP (VBD gave) (ADVP (RP up))))"
  # S[0,3] NP[0,1] VP[1,3] PRT/ADVP[2,3]: 4/4 with EQ_LABEL ADVP PRT ...
  assert parsing.evalb([gold], [test])["matched_brackets"] == 4
  # ... 3/4 without it.
  no_eq = dataclasses.replace(parsing.COLLINS_PARAMS, eq_labels=())
  res = parsing.evalb([gold], [test], no_eq)
  assert res["matched_brackets"] == 3 and res["recall"] == 75.0
  # Like evalb, deletion compares labels through EQ_LABEL: deleting PRT deletes ADVP too.
  del_prt = dataclasses.replace(parsing.COLLINS_PARAMS, delete_labels=("PRT",))
  s = parsing.score_sentence(gold, test, del_prt)
  assert (s.gold_brackets, s.test_brackets, s.matched) == (3, 3, 3)


def test_root_labels_function_tags_and_duplicates():
  test = "(S (NP (PRP He)) (VP (VBD left)) (. .))"  # S NP VP = 3 brackets
  # TOP is deleted: 3 gold brackets.
  s = parsing.score_sentence("(TOP (S (NP (PRP He)) (VP (VBD left)) (. .)))", test)
  assert (s.gold_brackets, s.test_brackets, s.matched) == (3, 3, 3)
  # An unlabeled root counts as a bracket labelled '' (as in evalb), ROOT is not deleted.
  for root in ("", "ROOT"):
    s = parsing.score_sentence(f"({root} (S (NP (PRP He)) (VP (VBD left)) (. .)))", test)
    assert (s.gold_brackets, s.test_brackets, s.matched) == (4, 3, 3)
  # Labels are cut at '-' / '=' like evalb's modify_label.
  s = parsing.score_sentence("(S (NP-SBJ-1 (PRP He)) (VP=2 (VBD left)) (. .))", test)
  assert s.matched == 3
  # Identical brackets count twice (multiset): NP[0,1] x2 in gold, once in test.
  s = parsing.score_sentence("(S (NP (NP (NNP John))) (VP (VBD left)))",
                             "(S (NP (NNP John)) (VP (VBD left)))")
  assert (s.gold_brackets, s.test_brackets, s.matched) == (4, 3, 3)
  # -NONE- is deleted with its word and the phrase over it spans nothing.
  s = parsing.score_sentence("(S (NP-SBJ (-NONE- *)) (VP (VB Go)) (. .))", "(S (VP (VB Go)))")
  assert (s.gold_brackets, s.test_brackets, s.matched, s.length) == (2, 2, 2, 2)


def test_unlabeled():
  gold = "(S (NP (PRP He)) (VP (VBD left)))"
  test = "(S (VP (PRP He)) (NP (VBD left)))"
  assert parsing.evalb([gold], [test])["matched_brackets"] == 1
  unlabeled = dataclasses.replace(parsing.COLLINS_PARAMS, labeled=False)
  assert parsing.evalb([gold], [test], unlabeled)["matched_brackets"] == 3


def test_errors_skips_and_cutoff():
  ok = "(S (NP (PRP He)) (VP (VBD left)))"
  res = parsing.evalb(
      [ok, ok, ok, ok],
      [ok,
       "(S (NP (PRP She)) (VP (VBD left)))",  # word mismatch: error
       "(S (NP (PRP He)))",                   # length mismatch: error
       "(S (. .))"],                          # no word after deletion: skip
  )
  assert (res["sentences"], res["valid_sentences"], res["error_sentences"],
          res["skipped_sentences"]) == (4, 1, 2, 1)
  assert res["f1"] == 100.0 and res["gold_brackets"] == 3
  assert not res["max_error_exceeded"]
  res = parsing.evalb([ok], ["(S (NP (PRP He)"])  # unreadable test tree: error
  assert res["error_sentences"] == 1 and res["f1"] == 0.0
  # Length for CUTOFF_LEN counts punctuation but not -NONE-: 40 words + '.' = 41 > 40.
  def flat(n, extra=""):
    return "(S " + " ".join(f"(NN w{i})" for i in range(n)) + extra + ")"
  g40 = flat(39, " (-NONE- *) (. .)")   # length 40 (39 + '.')
  g41 = flat(40, " (. .)")              # length 41
  res = parsing.evalb([g40, g41], [flat(39, " (. .)"), flat(40, " (. .)")])
  assert res["sentences"] == 2 and res["short_sentences"] == 1
  assert parsing.score_sentence(g40, flat(39, " (. .)")).length == 40
  assert parsing.score_sentence(g41, flat(40, " (. .)")).length == 41
  with pytest.raises(ValueError, match="gold trees"):
    parsing.evalb([ok], [])


# ----------------------------------------------------------------------------
# The evaluate loop.


def _example(tree: str, i: int) -> dict:
  t = parse_tree(tree)
  return {"source": " ".join(t.leaves()), "target": treebank.linearize(t), "id": i,
          "tree": tree}


def test_parsing_report_and_write_trees(tmp_path):
  examples = [_example(PP_GOLD, 0), _example(CAT_GOLD, 1), _example(JOHN, 2)]
  hyps = [treebank.linearize(parse_tree(PP_TEST)), treebank.linearize(parse_tree(CAT_TEST)),
          "(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX"]  # root left open: 1 repair
  report = parsing.parsing_report(hyps, examples)
  # Third sentence is exact after the repair: matched 9+4, gold 11+4, test 12+4.
  assert (report["matched_brackets"], report["gold_brackets"], report["test_brackets"]) == (
      13, 15, 16)
  assert report["f1"] == pytest.approx(100 * 2 * 13 / 31)
  assert report["exact_match"] == pytest.approx(100 / 3)
  assert report["repaired"] == 1 and report["repairs"] == 1 and report["sentences"] == 3
  trees = [t for t, _ in parsing.predict_trees(hyps, examples)]
  assert trees[0].to_string() == PP_TEST and trees[2].to_string() == JOHN
  path = tmp_path / "out" / "dev.trees"
  parsing.write_trees(path, trees)
  lines = path.read_text(encoding="utf-8").splitlines()
  assert lines == [PP_TEST, CAT_TEST, JOHN]
  # Examples without a gold tree: words from 'source', tags XX.
  t, n = parsing.predict_trees(["(S XX XX )S"], [{"source": "Hi there", "target": ""}])[0]
  assert (t.to_string(), n) == ("(S (XX Hi) (XX there))", 0)
  with pytest.raises(ValueError, match="gold 'tree'"):
    parsing.parsing_report(["(S XX )S"], [{"source": "Hi", "target": ""}])
  with pytest.raises(ValueError, match="hypotheses"):
    parsing.parsing_report([], examples)


def test_parsing_report_sentence_trees_only():
  # Roots as in CRAFT: the non-sentence roots (here CAPTION, HEADING) are left out of the
  # 'sentence_' scores; an example without 'root' is a sentence unless its gold root is one.
  examples = [dict(_example(PP_GOLD, 0), root="CAPTION"), dict(_example(CAT_GOLD, 1), root="S"),
              dict(_example(JOHN, 2), root="HEADING"), _example(JOHN, 3)]
  hyps = [treebank.linearize(parse_tree(PP_TEST)), treebank.linearize(parse_tree(CAT_TEST)),
          "(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX", treebank.linearize(parse_tree(JOHN))]
  report = parsing.parsing_report(hyps, examples)
  # All four: PP 6 of 6 gold / 7 test, CAT 3 / 5 / 5, John twice 4 / 4 / 4.
  assert (report["matched_brackets"], report["gold_brackets"], report["test_brackets"]) == (
      17, 19, 20)
  assert report["f1"] == pytest.approx(100 * 2 * 17 / 39)
  # Sentence trees: CAT (3 of 5 gold, 5 test) and the second John (exact).
  assert report["sentence_sentences"] == 2
  assert (report["sentence_matched_brackets"], report["sentence_gold_brackets"],
          report["sentence_test_brackets"]) == (7, 9, 9)
  assert report["sentence_f1"] == pytest.approx(100 * 7 / 9)
  assert report["sentence_exact_match"] == pytest.approx(50.0)
  assert report["repaired"] == 1 and report["sentence_repaired"] == 0
  # Without any non-sentence root the two reports agree.
  plain = parsing.parsing_report(hyps[1:2], examples[1:2])
  assert plain["sentence_f1"] == plain["f1"] == pytest.approx(60.0)


# ----------------------------------------------------------------------------
# Constrained beam search.

# Ids 0-3 are PAD, EOS, BOS, UNK. '(X' has no ')X' piece and 'word' is a source word, so
# neither may ever be emitted; 'XX' without the word-boundary mark is not a placeholder.
PIECES = ["<pad>", "</s>", "<s>", "<unk>", "\u2581(S", "\u2581)S", "\u2581(NP", "\u2581)NP",
          "\u2581XX", "\u2581(X", "\u2581word", "XX"]


def _well_formed(ids: list[int], words: list[str]) -> bool:
  """Oracle: the sequence de-linearises with no repair (ids end before EOS)."""
  text = "".join(PIECES[i] for i in ids).replace("\u2581", " ")  # as SentencePiece decodes
  return parsing.delinearize(text, words)[1] == 0


def _accepted(constraint, n_words: int, limit: int) -> set[tuple[int, ...]]:
  """Every sequence (without EOS) the constraint lets finish for n_words source words."""
  return _accepted_ids(constraint, [10] * n_words, limit, len(PIECES))


@pytest.mark.parametrize("n_words,limit", [(1, 6), (2, 8), (3, 9)])
def test_tree_constraint_accepts_exactly_the_well_formed_trees(n_words, limit):
  import itertools  # pylint: disable=g-import-not-at-top
  constraint = parsing.TreeConstraint.from_pieces(PIECES)
  got = _accepted(constraint, n_words, limit)
  # Brute force: every sequence of word-initial pieces that fits the limit with EOS (the
  # constraint must not allow UNK or the mid-word 'XX' either, so `got` may not hold them).
  words = [f"w{i}" for i in range(n_words)]
  want = {seq for length in range(limit)
          for seq in itertools.product(range(4, len(PIECES) - 1), repeat=length)
          # (cheap necessary conditions first: one XX per word, as many opens as closes)
          if seq.count(8) == n_words and seq.count(4) + seq.count(6) == seq.count(5) + seq.count(7)
          and _well_formed(list(seq), words)}
  assert got == want and want
  if n_words == 2:  # e.g. 4 tokens + EOS, and 6 tokens with a unary or NP child
    assert (4, 8, 8, 5) in got and (4, 6, 8, 7, 8, 5) in got and (4, 4, 8, 8, 5, 5) in got
  # An empty sentence has no tree: only the empty output (EOS) is allowed.
  assert _accepted(constraint, 0, limit) == {()}


# Words form: ids 8-10 are the words 'a', 'b', 'c'; 'mid' is not word-initial.
WORD_PIECES = ["<pad>", "</s>", "<s>", "<unk>", "\u2581(S", "\u2581)S", "\u2581(NP", "\u2581)NP",
               "\u2581a", "\u2581b", "\u2581c", "mid"]


def _accepted_ids(constraint, source: list[int], limit: int, vocab: int):
  """Every id sequence (without EOS) the constraint lets finish for one source sentence."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  inputs = jnp.asarray([source + [1]], jnp.int32)
  prefixes, done = [()], set()
  state = constraint.init(inputs, 1)
  for i in range(limit):
    ok = np.asarray(constraint.allowed(state, jnp.int32(i), jnp.asarray([limit]), vocab))
    nxt, parents, tokens = [], [], []
    for p, row in enumerate(ok[0]):
      for tok in np.flatnonzero(row):
        if tok == 1:
          done.add(prefixes[p])
        else:
          nxt.append(prefixes[p] + (int(tok),)), parents.append(p), tokens.append(int(tok))
    if not nxt:
      break
    state = constraint.update({k: v[:, parents] for k, v in state.items()},
                              jnp.asarray([tokens], jnp.int32))
    prefixes = nxt
  return done


@pytest.mark.parametrize("source,limit", [([10, 8], 8), ([9, 3, 9], 9)])
def test_copy_words_constraint_accepts_exactly_the_trees_over_the_source(source, limit):
  import itertools  # pylint: disable=g-import-not-at-top
  constraint = parsing.TreeConstraint.from_pieces(WORD_PIECES, placeholder=None)
  got = _accepted_ids(constraint, source, limit, len(WORD_PIECES))
  # Brute force: every sequence whose non-bracket tokens are the source's, in order (any other
  # is wrong by definition; `got == want` then also shows the constraint never emits one),
  # kept if it de-linearises in the words form with no repair.
  words = [WORD_PIECES[i] for i in source]
  want = set()
  for length in range(len(source), limit):
    for slots in itertools.combinations(range(length), len(source)):
      for brackets in itertools.product(range(4, 8), repeat=length - len(source)):
        seq, it_w, it_b = [], iter(source), iter(brackets)
        for k in range(length):
          seq.append(next(it_w) if k in slots else next(it_b))
        text = " ".join(WORD_PIECES[i].lstrip("\u2581") for i in seq)
        if parsing.delinearize(text, words, placeholder=None)[1] == 0:
          want.add(tuple(seq))
  assert got == want and want
  if source == [10, 8]:
    assert (4, 10, 8, 5) in got and (4, 6, 10, 7, 8, 5) in got and (4, 8, 10, 5) not in got


def test_tree_constraint_needs_bracket_pieces():
  with pytest.raises(ValueError, match="word-level"):
    parsing.TreeConstraint.from_pieces(["<pad>", "</s>", "<s>", "<unk>", "\u2581(S", "\u2581XX"])
  c = parsing.TreeConstraint.from_pieces(PIECES)
  assert c.kind.tolist() == [0, 4, 0, 0, 1, 2, 1, 2, 3, 0, 0, 0]
  assert c.starts_word.tolist() == [False, False, False, True] + [True] * 7 + [False]


def test_constrained_beam_search_outputs_well_formed_trees():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformer import decode  # pylint: disable=g-import-not-at-top
  from transformer.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from transformer.model import Transformer  # pylint: disable=g-import-not-at-top
  # Model vocabulary 16 > the 12 pieces: ids 12-15 must never be emitted either.
  cfg = ModelConfig(vocab_size=16, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1, max_len=32)
  params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(3), jnp.ones((1, 4), jnp.int32),
                                          jnp.ones((1, 4), jnp.int32))["params"])
  inputs = np.array([[10, 10, 3, 10, 1], [10, 1, 0, 0, 0], [10, 3, 1, 0, 0]], np.int32)
  kwargs = dict(model_cfg=cfg, beam_size=3, alpha=0.3, max_decode_len_offset=8)
  constraint = parsing.TreeConstraint.from_pieces(PIECES)
  seqs, scores = decode.beam_search(params, jnp.asarray(inputs), constraint=constraint, **kwargs)
  for b, n in enumerate([4, 1, 2]):  # words: the 'word' and UNK ids
    for k in range(3):
      ids = np.asarray(seqs[b, k]).tolist()
      assert 1 in ids and float(scores[b, k]) > decode.NEG_INF / 2
      ids = ids[:ids.index(1)]
      assert len(ids) + 1 <= n + 1 + 8 and _well_formed(ids, [f"w{i}" for i in range(n)]), ids
  # Unconstrained, the random model's best hypotheses are not trees.
  free, _ = decode.beam_search(params, jnp.asarray(inputs), **kwargs)
  assert not all(_well_formed(np.asarray(free[b, 0]).tolist()[:list(free[b, 0]).index(1)]
                              if 1 in list(free[b, 0]) else [0], ["w"] * n)
                 for b, n in enumerate([4, 1, 2]))
