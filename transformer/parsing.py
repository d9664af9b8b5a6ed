"""English constituency parsing as sequence transduction (paper section 6.3, Table 4).

Linearisation (Vinyals et al. 2015, "Grammar as a Foreign Language"): a tree
becomes its bracket sequence with labelled opening AND closing brackets, each
POS-tagged word replaced by the placeholder `XX`, tokens separated by spaces:

    (S (NP (NNP John)) (VP (VBZ has) (NP (DT a) (NN dog))) (. .))
    -> (S (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S

so a SentencePiece model trained on sentences + linearised trees learns the
bracket tokens as pieces. `treebank.linearize` writes the datasets' targets;
`delinearize` turns any output sequence back into a tree over the sentence's
words (repairing it if needed), `TreeConstraint` keeps the beam search to
well-formed trees and `evalb` scores trees like the EVALB program (Sekine &
Collins 1997) with COLLINS.prm.

POS tags. The model predicts no tags; the de-linearised tree gets the gold POS
tags (`XX` when none are known). EVALB's bracket scores ignore preterminals but
use their tags to delete punctuation, so with gold tags the punctuation
deletion is the same in gold and test, as in Vinyals et al. (2015), who also
note that their F1 does not depend on POS tags (tagging accuracy is then 100%
by construction and is not a result).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import EOS_ID, PAD_ID, UNK_ID
from transformer.data.treebank import (PLACEHOLDER, Tree, TreeError, is_sentence_root,
                                       parse_tree)
from transformer.evaluate import write_lines

REPAIR_ROOT_LABEL = "TOP"  # wraps several top-level pieces; deleted by COLLINS.prm

TreeLike = Union[Tree, str]


# ----------------------------------------------------------------------------
# De-linearisation (the inverse of `treebank.linearize`).


class _Node:
  """A phrase under construction while de-linearising."""
  __slots__ = ("label", "children")

  def __init__(self, label: str):
    self.label = label
    self.children: list[Any] = []  # _Node (open or finished) or Tree


def delinearize(sequence: str, words: Sequence[str],
                tags: Optional[Sequence[str]] = None,
                placeholder: Optional[str] = PLACEHOLDER) -> tuple[Tree, int]:
  """The tree of a (possibly ill-formed) linearised sequence over `words`; never fails.

  Tokens are read left to right: `(L` opens a phrase L, `)L` or `)` closes the
  innermost open phrase, the placeholder takes the next word (with its tag
  from `tags`, else `XX` as tag). With placeholder=None (`--parse_target=words`) every
  token that is not a bracket is a placeholder: it takes the next word, whatever it says.
  Each repair counts 1:

  * a token that is none of these (e.g. a stray word piece): dropped;
  * a closing bracket with nothing open: dropped;
  * `)L` whose label differs from the innermost open phrase: closes it anyway;
  * a placeholder after all words are used: dropped;
  * a phrase still open at the end: closed;
  * a phrase with no words when it closes (e.g. `(NP )NP`): dropped;
  * a word with no placeholder: appended, in order, as the last child of the
    root (the single top-level phrase, if there is one);
  * a top level that is not exactly one phrase (several pieces, or nothing but
    words): wrapped in one `TOP` root (deleted by EVALB's COLLINS.prm).

  A well-formed sequence with exactly len(words) placeholders gives 0 repairs
  and the same tree as its source (with the given tags).

  Returns:
    (tree, number of repairs).
  """
  if tags is not None and len(tags) != len(words):
    raise ValueError(f"{len(words)} words but {len(tags)} tags")
  repairs = 0
  top = _Node("")  # virtual container of the top-level pieces
  stack = [top]
  next_word = 0

  def close_innermost() -> None:
    nonlocal repairs
    node = stack.pop()
    parent = stack[-1]
    if node.children:
      parent.children.append(Tree(node.label, tuple(node.children)))
    else:
      repairs += 1  # empty phrase: dropped

  for tok in sequence.split():
    is_bracket = tok.startswith(")") or (tok.startswith("(") and len(tok) > 1)
    if tok == placeholder or (placeholder is None and not is_bracket):
      if next_word < len(words):
        tag = tags[next_word] if tags is not None else PLACEHOLDER
        stack[-1].children.append(Tree(tag, word=words[next_word]))
        next_word += 1
      else:
        repairs += 1  # too many placeholders
    elif tok.startswith("(") and len(tok) > 1:
      node = _Node(tok[1:])
      stack.append(node)
    elif tok.startswith(")"):
      if len(stack) == 1:
        repairs += 1  # stray close
        continue
      label = tok[1:]
      if label and label != stack[-1].label:
        repairs += 1  # mismatched close: closes the innermost anyway
      close_innermost()
    else:
      repairs += 1  # unknown token
  while len(stack) > 1:
    repairs += 1  # unclosed phrase
    close_innermost()
  pieces = top.children
  missing = [Tree(tags[i] if tags is not None else PLACEHOLDER, word=words[i])
             for i in range(next_word, len(words))]
  repairs += len(missing)
  if len(pieces) == 1 and not pieces[0].is_preterminal:
    root = pieces[0]
    if missing:
      root = Tree(root.label, root.children + tuple(missing))
    return root, repairs
  pieces = pieces + missing
  if not pieces:  # no words at all (empty sentence)
    return Tree(REPAIR_ROOT_LABEL), repairs + 1
  return Tree(REPAIR_ROOT_LABEL, tuple(pieces)), repairs + 1


# ----------------------------------------------------------------------------
# Constrained beam search: only well-formed trees over the source's words.

_OTHER, _OPEN, _CLOSE, _XX, _EOS = range(5)  # token kinds
_WORD_START = "\u2581"  # SentencePiece's word-boundary mark


@dataclasses.dataclass(frozen=True, eq=False)
class TreeConstraint:
  """A `decode.beam_search` constraint: every hypothesis de-linearises with 0 repairs.

  A token may follow a hypothesis only if the result can still be completed, within
  the sentence's length limit, to one tree with labelled brackets that match, no
  empty phrase and exactly one `XX` per source word (Vinyals et al. 2015 repaired
  ill-formed outputs instead). With `copy_words` (--parse_target=words) the word itself
  stands where `XX` would: the next source token, and no other. Per beam the state is
  the stack of open labels, its depth, the word count and whether the innermost phrase
  has a child yet (and, copying, the source tokens).

  Build it with `from_pieces` from the vocabulary; arrays are indexed by token id.
  """
  kind: np.ndarray         # [vocab] int32: _OTHER, _OPEN, _CLOSE, _XX or _EOS
  label: np.ndarray        # [vocab] int32: label index of a bracket, -1 otherwise
  starts_word: np.ndarray  # [vocab] bool: a source piece that begins a word (or UNK)
  max_depth: int = 64
  copy_words: bool = False  # a word slot takes the next source token (one token per word)

  @classmethod
  def from_pieces(cls, pieces: Sequence[str], placeholder: Optional[str] = PLACEHOLDER,
                  max_depth: int = 64) -> "TreeConstraint":
    """From the vocabulary's pieces (`pieces[i]` of id i), e.g. '\u2581(NP', '\u2581)NP', '\u2581XX'.

    Only word-initial pieces are brackets or placeholders (targets are space-separated
    tokens). A label is usable only if both its `(L` and `)L` are single pieces.
    placeholder=None: words are copied from the source (`copy_words`).
    Raises ValueError if the vocabulary has no placeholder or no usable label.
    """
    words = [p[1:] if p.startswith(_WORD_START) else None for p in pieces]
    opens = {w[1:] for w in words if w and w.startswith("(") and len(w) > 1}
    closes = {w[1:] for w in words if w and w.startswith(")") and len(w) > 1}
    labels = sorted(opens & closes)
    index = {l: i for i, l in enumerate(labels)}
    kind = np.full(len(pieces), _OTHER, np.int32)
    label = np.full(len(pieces), -1, np.int32)
    for i, w in enumerate(words):
      if w is not None and w == placeholder:
        kind[i] = _XX
      elif w and w[:1] in "()" and w[1:] in index:
        kind[i], label[i] = (_OPEN if w[0] == "(" else _CLOSE), index[w[1:]]
    kind[EOS_ID] = _EOS
    if (placeholder is not None and not (kind == _XX).any()) or not labels:
      raise ValueError(f"the vocabulary has no single piece for {placeholder!r} or no label"
                       " with both '(L' and ')L' pieces: tree constraints need word-level"
                       " target pieces (e.g. --spm_model_type=word)")
    starts_word = np.array([w is not None for w in words]) | (np.arange(len(pieces)) == UNK_ID)
    return cls(kind, label, starts_word, max_depth, copy_words=placeholder is None)

  def _table(self, table: np.ndarray, vocab: int) -> jax.Array:
    if vocab < len(table):
      raise ValueError(f"model vocabulary {vocab} < tokenizer vocabulary {len(table)}")
    return jnp.asarray(np.pad(table, (0, vocab - len(table))))  # padded ids: _OTHER

  def init(self, inputs: jax.Array, beam_size: int) -> dict[str, jax.Array]:
    """State of empty hypotheses, [batch, beam, ...]; inputs [batch, src_len] ids."""
    batch = inputs.shape[0]
    # Source words: pieces that begin a word ([batch]); EOS and PAD are not word pieces.
    starts = jnp.take(jnp.asarray(self.starts_word), inputs, mode="fill", fill_value=False)
    n_words = jnp.sum(starts & (inputs != PAD_ID), axis=1)
    zeros = jnp.zeros((batch, beam_size), jnp.int32)
    state = {"n_words": n_words[:, None] + zeros, "depth": zeros, "xx": zeros,
             "nonempty": zeros.astype(bool),
             "stack": jnp.zeros((batch, beam_size, self.max_depth), jnp.int32)}
    if self.copy_words:  # [batch, beam, src_len]: word i is source token i
      state["source"] = jnp.broadcast_to(inputs[:, None, :], (batch, beam_size, inputs.shape[1]))
    return state

  def _next_word(self, state: dict[str, jax.Array]) -> jax.Array:
    """[batch, beam] id of the next source word (copy_words)."""
    src = state["source"]
    i = jnp.minimum(state["xx"], src.shape[-1] - 1)[..., None]
    return jnp.take_along_axis(src, i, axis=2)[..., 0]

  def allowed(self, state: dict[str, jax.Array], i: jax.Array, limits: jax.Array,
              vocab: int) -> jax.Array:
    """[batch, beam, vocab] bool: tokens that may be the (i+1)-th of each hypothesis.

    limits: [batch] maximum output length incl. EOS. A token is allowed only if the
    shortest completion after it (one close per open phrase, the missing XX, EOS) fits.
    """
    kind, label = self._table(self.kind, vocab), self._table(self.label, vocab)
    depth, xx, n = state["depth"][..., None], state["xx"][..., None], state["n_words"][..., None]
    room = (limits[:, None, None] - (i + 1))  # tokens allowed after this one
    top = jnp.take_along_axis(state["stack"], jnp.maximum(state["depth"] - 1, 0)[..., None],
                              axis=2)  # [batch, beam, 1] innermost open label
    words_left = xx < n
    open_ok = ((depth < self.max_depth) & ((depth > 0) | (i == 0)) & words_left
               & (depth + 1 + (n - xx) + 1 <= room))
    close_ok = ((depth > 0) & (label == top) & state["nonempty"][..., None]
                & ((depth > 1) | ~words_left) & (depth - 1 + (n - xx) + 1 <= room))
    xx_ok = (depth > 0) & words_left & (depth + (n - xx - 1) + 1 <= room)
    eos_ok = (depth == 0) & ~words_left & ((i > 0) | (n == 0))
    if self.copy_words:
      word = jnp.arange(vocab) == self._next_word(state)[..., None]
    else:
      word = kind == _XX
    return (((kind == _OPEN) & open_ok) | ((kind == _CLOSE) & close_ok)
            | (word & xx_ok) | ((kind == _EOS) & eos_ok))

  def update(self, state: dict[str, jax.Array], token: jax.Array) -> dict[str, jax.Array]:
    """State after appending token [batch, beam] to each hypothesis."""
    kind = jnp.take(jnp.asarray(self.kind), token, mode="fill", fill_value=_OTHER)
    label = jnp.take(jnp.asarray(self.label), token, mode="fill", fill_value=-1)
    depth = state["depth"]
    is_open, is_close, is_xx = kind == _OPEN, kind == _CLOSE, kind == _XX
    if self.copy_words:
      is_xx = ((token == self._next_word(state)) & (kind == _OTHER) & (depth > 0)
               & (state["xx"] < state["n_words"]))
    at_depth = jnp.arange(self.max_depth) == jnp.minimum(depth, self.max_depth - 1)[..., None]
    return {
        **state,
        "stack": jnp.where(is_open[..., None] & at_depth, label[..., None], state["stack"]),
        "depth": depth + is_open - is_close,
        "xx": state["xx"] + is_xx,
        # A new phrase is empty; closing a child or adding a word fills its parent.
        "nonempty": jnp.where(is_open, False, state["nonempty"] | is_close | is_xx),
    }


# ----------------------------------------------------------------------------
# EVALB.


@dataclasses.dataclass(frozen=True)
class EvalbParams:
  """An EVALB parameter file (fields named after its keywords)."""
  max_error: int = 10
  cutoff_len: int = 40
  labeled: bool = True
  delete_labels: tuple[str, ...] = ()
  delete_labels_for_length: tuple[str, ...] = ()
  quote_labels: tuple[str, ...] = ()  # read but not used (see `evalb`)
  eq_labels: tuple[tuple[str, str], ...] = ()
  eq_words: tuple[tuple[str, str], ...] = ()


# The contents of EVALB's COLLINS.prm (the standard WSJ setting);
# tests check that load_evalb_params('COLLINS.prm') equals it.
COLLINS_PARAMS = EvalbParams(
    max_error=10, cutoff_len=40, labeled=True,
    delete_labels=("TOP", "-NONE-", ",", ":", "``", "''", "."),
    delete_labels_for_length=("-NONE-",),
    eq_labels=(("ADVP", "PRT"),))


def load_evalb_params(path: Union[str, os.PathLike]) -> EvalbParams:
  """Reads an EVALB .prm file the way evalb.c does.

  Trailing whitespace is trimmed; lines starting with '#' or shorter than 3
  characters are skipped; the first word is the keyword, the rest its value.
  Unknown keywords are logged and ignored (evalb warns and goes on).
  """
  fields: dict[str, Any] = {"delete_labels": [], "delete_labels_for_length": [],
                            "quote_labels": [], "eq_labels": [], "eq_words": []}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip()
      if line.startswith("#") or len(line) < 3:
        continue
      parts = line.split(None, 1)
      key, value = parts[0], (parts[1] if len(parts) > 1 else "")
      if not value:
        logging.warning("%s:%d: empty value for %s", path, lineno, key)
        continue
      if key in ("DEBUG", "MAX_ERROR", "CUTOFF_LEN", "LABELED"):
        try:
          number = int(value.split()[0])
        except ValueError as e:
          raise ValueError(f"{path}:{lineno}: {key} needs an integer, got {value!r}") from e
        if key == "DEBUG":  # evalb's verbosity: nothing here prints evalb's listing
          continue
        name = {"MAX_ERROR": "max_error", "CUTOFF_LEN": "cutoff_len", "LABELED": "labeled"}[key]
        fields[name] = bool(number) if key == "LABELED" else number
      elif key == "DELETE_LABEL":
        fields["delete_labels"].append(value)
      elif key == "DELETE_LABEL_FOR_LENGTH":
        fields["delete_labels_for_length"].append(value)
      elif key == "QUOTE_LABEL":
        fields["quote_labels"].append(value)
      elif key in ("EQ_LABEL", "EQ_WORD"):
        pair = value.split()
        if len(pair) != 2:
          logging.warning("%s:%d: %s requires two values", path, lineno, key)
          continue
        fields["eq_labels" if key == "EQ_LABEL" else "eq_words"].append(tuple(pair))
      else:
        logging.warning("%s:%d: unknown keyword %s in EVALB parameter file", path, lineno, key)
  for name in ("delete_labels", "delete_labels_for_length", "quote_labels", "eq_labels",
               "eq_words"):
    fields[name] = tuple(fields[name])
  return EvalbParams(**fields)


def _same(a: str, b: str, pairs: tuple[tuple[str, str], ...]) -> bool:
  """evalb's label_comp / word_comp: equal, or an equivalent pair (either order)."""
  return a == b or any((a == x and b == y) or (a == y and b == x) for x, y in pairs)


def _evalb_label(label: str) -> str:
  """evalb's modify_label: cut at the first '-' or '=' (so '-NONE-' -> '')."""
  for i, ch in enumerate(label):
    if ch in "-=":
      return label[:i]
  return label


@dataclasses.dataclass(frozen=True)
class _Sentence:
  words: tuple[tuple[str, str], ...]  # (word, tag) kept after deletion
  brackets: tuple[tuple[str, int, int], ...]  # (label, start, end), deleted ones removed
  length: int  # words not in DELETE_LABEL_FOR_LENGTH (punctuation counts)


def _evalb_view(tree: Tree, params: EvalbParams) -> _Sentence:
  """Terminals and brackets of one tree exactly as evalb.c reads them."""
  delete = set(params.delete_labels)
  words: list[tuple[str, str]] = []
  brackets: list[tuple[str, int, int]] = []
  starts: list[int] = []
  length = 0
  for kind, node in tree.events():
    if kind == "open":
      starts.append(len(words))
    elif kind == "word":
      if node.label not in params.delete_labels_for_length:
        length += 1
      if node.label not in delete:  # a deleted preterminal takes its word along
        words.append((node.word, node.label))
    else:
      start, end = starts.pop(), len(words)
      if start == end:
        continue  # spans no (kept) word
      label = _evalb_label(node.label)
      if any(_same(label, d, params.eq_labels) for d in params.delete_labels):
        continue  # deleted bracket, its children stay
      brackets.append((label, start, end))
  return _Sentence(tuple(words), tuple(brackets), length)


@dataclasses.dataclass(frozen=True)
class SentenceScore:
  """One line of EVALB's per-sentence table."""
  status: int  # 0 ok, 1 error (length/word mismatch, unreadable tree), 2 skip (empty test)
  length: int
  gold_brackets: int = 0
  test_brackets: int = 0
  matched: int = 0
  crossing: int = 0
  words: int = 0
  correct_tags: int = 0
  message: str = ""


def _as_tree(tree: TreeLike) -> Tree:
  return tree if isinstance(tree, Tree) else parse_tree(tree)


def score_sentence(gold: TreeLike, test: TreeLike,
                   params: EvalbParams = COLLINS_PARAMS) -> SentenceScore:
  """EVALB's comparison of one test tree with its gold tree."""
  try:
    g = _evalb_view(_as_tree(gold), params)
  except TreeError as e:
    return SentenceScore(status=1, length=0, message=f"gold: {e}")
  try:
    t = _evalb_view(_as_tree(test), params)
  except TreeError as e:
    return SentenceScore(status=1, length=g.length, message=f"test: {e}")
  if not t.words:
    return SentenceScore(status=2, length=g.length, message="empty test tree")
  if len(g.words) != len(t.words):
    return SentenceScore(status=1, length=g.length,
                         message=f"Length unmatch ({len(g.words)}|{len(t.words)})")
  for (gw, _), (tw, _) in zip(g.words, t.words):
    if not _same(gw, tw, params.eq_words):
      return SentenceScore(status=1, length=g.length, message=f"Words unmatch ({gw}|{tw})")
  # Matching: each gold bracket takes the first unused test bracket with the
  # same span and an equal or equivalent label (multiset matching).
  by_span: dict[tuple[int, int], list[list[Any]]] = collections.defaultdict(list)
  for label, s, e in t.brackets:
    by_span[s, e].append([label, False])
  matched = 0
  for label, s, e in g.brackets:
    for cand in by_span.get((s, e), ()):
      if not cand[1] and (not params.labeled or _same(label, cand[0], params.eq_labels)):
        cand[1] = True
        matched += 1
        break
  # Crossing: test brackets that cross some gold bracket.
  crossing = 0
  for _, s2, e2 in t.brackets:
    if any((s1 < s2 < e1 < e2) or (s2 < s1 < e2 < e1) for _, s1, e1 in g.brackets):
      crossing += 1
  correct = sum(_same(gt, tt, params.eq_labels) for (_, gt), (_, tt) in zip(g.words, t.words))
  return SentenceScore(status=0, length=g.length, gold_brackets=len(g.brackets),
                       test_brackets=len(t.brackets), matched=matched, crossing=crossing,
                       words=len(g.words), correct_tags=correct)


def _summary(scores: Sequence[SentenceScore]) -> dict[str, float]:
  valid = [s for s in scores if s.status == 0]
  gold = sum(s.gold_brackets for s in valid)
  test = sum(s.test_brackets for s in valid)
  match = sum(s.matched for s in valid)
  words = sum(s.words for s in valid)
  n = len(valid)
  recall = 100.0 * match / gold if gold else 0.0
  precision = 100.0 * match / test if test else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {
      "sentences": len(scores), "error_sentences": sum(s.status == 1 for s in scores),
      "skipped_sentences": sum(s.status == 2 for s in scores), "valid_sentences": n,
      "recall": recall, "precision": precision, "f1": f1,
      "exact_match": 100.0 * sum(s.gold_brackets == s.test_brackets == s.matched
                                 for s in valid) / n if n else 0.0,
      "average_crossing": sum(s.crossing for s in valid) / n if n else 0.0,
      "no_crossing": 100.0 * sum(s.crossing == 0 for s in valid) / n if n else 0.0,
      "two_or_less_crossing": 100.0 * sum(s.crossing <= 2 for s in valid) / n if n else 0.0,
      "tagging_accuracy": 100.0 * sum(s.correct_tags for s in valid) / words if words else 0.0,
      "matched_brackets": match, "gold_brackets": gold, "test_brackets": test,
  }


def evalb(gold_trees: Sequence[TreeLike], test_trees: Sequence[TreeLike],
          params: Optional[EvalbParams] = None) -> dict[str, Any]:
  """Corpus scores as EVALB prints them (percentages 0-100), COLLINS.prm by default.

  Per sentence (as evalb.c): preterminals whose tag is a DELETE_LABEL vanish
  with their word; brackets are (label cut at '-'/'=', start, end) over the
  remaining words; brackets over no word or with a deleted (or equivalent)
  label are dropped; preterminals are not brackets; the root bracket counts
  unless deleted (so an unlabeled `( ... )` root would count as a bracket
  labelled ''; normalised trees have none). Matching is a multiset match of
  (label up to EQ_LABEL, start, end). Corpus recall/precision = sum matched /
  sum gold / sum test over valid sentences; F1 = 2PR/(P+R) (0 when P+R = 0,
  where evalb prints nan); exact match = % of valid sentences with
  matched == gold == test. A test tree with no word is a skip sentence; a
  length or word mismatch, or an unreadable tree, an error sentence; neither
  counts. Keys without prefix are for all sentences; `short_*` for sentences
  of length <= CUTOFF_LEN (`cutoff_len`), length counting every word but
  DELETE_LABEL_FOR_LENGTH ones.

  Differences from the program: no 200-word/bracket limits; errors beyond
  MAX_ERROR are counted (`max_error_exceeded`) instead of aborting; QUOTE_LABEL
  (nk.prm; the 2013 evalb's repair of quote/possessive tag mismatches) is not
  applied: it never matters when test trees carry the gold tags.
  """
  params = params or COLLINS_PARAMS
  if len(gold_trees) != len(test_trees):
    raise ValueError(f"{len(gold_trees)} gold trees but {len(test_trees)} test trees")
  scores = [score_sentence(g, t, params) for g, t in zip(gold_trees, test_trees)]
  out: dict[str, Any] = _summary(scores)
  for key, value in _summary([s for s in scores if s.length <= params.cutoff_len]).items():
    out["short_" + key] = value
  out["cutoff_len"] = params.cutoff_len
  out["max_error_exceeded"] = out["error_sentences"] > params.max_error
  return out


# ----------------------------------------------------------------------------
# The evaluate loop.


def _gold(example: Mapping[str, Any]) -> tuple[Optional[Tree], list[str], Optional[list[str]]]:
  """(gold tree or None, words, gold tags or None) of an example."""
  if example.get("tree"):
    gold = parse_tree(example["tree"])
    return gold, gold.leaves(), gold.tags()
  return None, example["source"].split(), None


def predict_trees(hyp_sequences: Sequence[str], examples: Sequence[Mapping[str, Any]],
                  placeholder: Optional[str] = PLACEHOLDER) -> list[tuple[Tree, int]]:
  """(tree, repairs) per hypothesis: words (and gold tags, if the example has a
  'tree') from the example, otherwise the words of 'source' with `XX` tags.
  placeholder: as in `delinearize` (None for --parse_target=words)."""
  if len(hyp_sequences) != len(examples):
    raise ValueError(f"{len(hyp_sequences)} hypotheses but {len(examples)} examples")
  out = []
  for hyp, ex in zip(hyp_sequences, examples):
    _, words, tags = _gold(ex)
    out.append(delinearize(hyp, words, tags, placeholder))
  return out


def parsing_report(hyp_sequences: Sequence[str], examples: Sequence[Mapping[str, Any]],
                   params: Optional[EvalbParams] = None,
                   placeholder: Optional[str] = PLACEHOLDER) -> dict[str, Any]:
  """De-linearises each hypothesis with its example's words and gold tags and scores it.

  Returns `evalb`'s keys ('f1', 'precision', 'recall', 'exact_match',
  'sentences', ...) plus 'repaired' (hypotheses that needed at least one
  repair) and 'repairs' (total repair operations), for all trees; and the same
  keys prefixed 'sentence_' for the sentence trees only: those whose raw root
  (the example's 'root', else the gold tree's root label) is not one of
  CRAFT's non-sentence roots (TITLE, HEADING, CAPTION, CIT).
  """
  golds, is_sentence = [], []
  for ex in examples:
    gold, _, _ = _gold(ex)
    if gold is None:
      raise ValueError("parsing_report needs examples with a gold 'tree'")
    golds.append(gold)
    is_sentence.append(is_sentence_root(ex.get("root") or gold.label))
  predicted = predict_trees(hyp_sequences, examples, placeholder)
  report = evalb(golds, [t for t, _ in predicted], params)
  report["repaired"] = sum(r > 0 for _, r in predicted)
  report["repairs"] = sum(r for _, r in predicted)
  keep = [i for i, ok in enumerate(is_sentence) if ok]
  sub = evalb([golds[i] for i in keep], [predicted[i][0] for i in keep], params)
  sub["repaired"] = sum(predicted[i][1] > 0 for i in keep)
  sub["repairs"] = sum(predicted[i][1] for i in keep)
  report.update({"sentence_" + k: v for k, v in sub.items()})
  return report


def write_trees(path: Union[str, os.PathLike], trees: Iterable[TreeLike]) -> None:
  """Writes one bracketed tree per line (atomically), the input format of evalb."""
  write_lines(path, [t.to_string() if isinstance(t, Tree) else t for t in trees])
