"""Penn Treebank-style constituency trees for the parsing task (paper section 6.3).

Reading, normalisation, linearisation, split definitions and a TFDS builder
(array_record, no TensorFlow), plus `get_parsing_split`, the parsing
counterpart of `datasets.get_split` (both read TFDS splits through
`datasets.open_split`).

Normalisation (the usual one for WSJ parsing experiments; `normalize_tree`):

* `-NONE-` empty elements are removed, then every constituent left without
  children (repeatedly, bottom-up).
* Function tags and co-indices are stripped from every label that does not
  start with '-': the label is cut at its first '-' or '=' (`NP-SBJ-1` -> `NP`,
  `PP-LOC=2` -> `PP`, `S-TPC-1` -> `S`); an ambiguous `ADVP|PRT` keeps its first
  alternative (`ADVP`). Labels beginning with '-' (`-LRB-`,
  `-RRB-`, `-NONE-`) are kept whole. This is also what EVALB does to
  non-terminal labels. POS tags are kept (EVALB needs them to delete
  punctuation).
* The outer unlabeled wrapper `( ... )` of the .mrg files (also a `TOP` or
  `ROOT` root) is dropped when it holds exactly one phrasal constituent, which
  becomes the root (usually `S`); otherwise (several children, or a lone
  POS-tagged word) it is kept and labelled `TOP`, which EVALB's COLLINS.prm
  deletes. So every normalised tree has a phrasal root, and scoring counts the
  sentence-level bracket (`S`) exactly as EVALB does on `(TOP (S ...))` input.
* Unary chains (including `X -> X`) are kept, as in the treebank.
* Non-sentence roots (`NON_SENTENCE_ROOTS`: CRAFT's `TITLE`, `HEADING`,
  `CAPTION`, `CIT`, which label a tree's place in the document, not its
  syntax) are root wrappers too: `( (HEADING (NP (NNS Results))) )` ->
  `(NP (NNS Results))`, `( (CIT (-LRB- -LRB-) (NNP Ludwig) ...) )` -> `(TOP
  (-LRB- -LRB-) (NNP Ludwig) ...)`. The model never predicts them; their trees
  are scored on the syntax below, and `root_label` keeps the original root so
  that scores can also be reported on sentence trees only.
* Words are split on ASCII whitespace only; other whitespace inside a word
  (CRAFT has thin and hair spaces, e.g. `Xpd<U+200A>TTD`, elsewhere written
  `XpdTTD`) is deleted, so every word stays one whitespace-free token.

Splits:

* layout 'sample' (the NLTK 5-10% WSJ sample, one directory of
  `wsj_NNNN.mrg`): train = wsj_0001-wsj_0159, validation = wsj_0160-wsj_0179,
  test = wsj_0180-wsj_0199 (only if those files are present: the NLTK
  distribution has them, `../shared/data` does not). Not the standard split.
* layout 'wsj_sections' (the full treebank, `<dir>/NN/wsj_NNNN.mrg`, e.g.
  LDC99T42 `parsed/mrg/wsj`): train = sections 02-21, validation = 22,
  test = 23 (Collins 1997 and everybody since, including the paper).
* layout 'directory' (CRAFT, `--dataset=craft_treebank`): one sub-directory
  per split, `<dir>/train/*.tree`, `<dir>/dev/*.tree` (or `validation/`),
  optional `<dir>/test/*.tree`; files in name order. `.tree` files hold one
  tree per line (errors name the file and line); `.mrg` files any layout.

A split may also be a directory path (any split with a "/", `--test_split=/path/to/trees`): its
`*.tree` / `*.mrg` files are read directly, without TFDS (`read_directory_split`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import os
import re
from typing import Any, Iterable, Iterator, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from transformer.config import DataConfig
from transformer.data import datasets


class TreeError(ValueError):
  """A malformed bracketed tree (one line, says where)."""


# ----------------------------------------------------------------------------
# Trees.


@dataclasses.dataclass(frozen=True)
class Tree:
  """A constituency tree node: a phrase (`label`, `children`) or a POS-tagged word.

  A preterminal has `word` set and no children; its `label` is the POS tag.
  Traversals are iterative, so deep (e.g. badly de-linearised) trees are fine.
  """
  label: str
  children: tuple["Tree", ...] = ()
  word: Optional[str] = None

  def __post_init__(self):
    if self.word is not None and self.children:
      raise TreeError(f"preterminal ({self.label} {self.word}) cannot have children")

  @property
  def is_preterminal(self) -> bool:
    return self.word is not None

  def preterminals(self) -> list["Tree"]:
    """The POS-tagged words, left to right."""
    out, stack = [], [self]
    while stack:
      node = stack.pop()
      if node.is_preterminal:
        out.append(node)
      else:
        stack.extend(reversed(node.children))
    return out

  def leaves(self) -> list[str]:
    """The words, left to right."""
    return [p.word for p in self.preterminals()]  # type: ignore[misc]

  def tags(self) -> list[str]:
    """The POS tags, left to right."""
    return [p.label for p in self.preterminals()]

  def events(self) -> Iterator[tuple[str, "Tree"]]:
    """Depth-first ('open', phrase) / ('word', preterminal) / ('close', phrase) events."""
    stack: list[tuple[bool, Tree]] = [(False, self)]
    while stack:
      closing, node = stack.pop()
      if closing:
        yield "close", node
      elif node.is_preterminal:
        yield "word", node
      else:
        yield "open", node
        stack.append((True, node))
        stack.extend((False, c) for c in reversed(node.children))

  def to_string(self) -> str:
    """One-line PTB bracketing, e.g. `(S (NP (NNP Pierre)) (VP (VBZ is)) (. .))`."""
    parts: list[str] = []
    for kind, node in self.events():
      if kind == "open":
        parts.append(f"({node.label} ")
      elif kind == "word":
        parts.append(f"({node.label} {node.word}) ")
      else:
        if parts and parts[-1].endswith(" "):
          parts[-1] = parts[-1][:-1]
        parts.append(") ")
    return "".join(parts).rstrip()

  def __str__(self) -> str:
    return self.to_string()


PLACEHOLDER = "XX"  # stands for a POS-tagged word in linearised trees


def linearize(tree: Tree, placeholder: str = PLACEHOLDER) -> str:
  """`(S (NP XX XX )NP (VP XX )VP XX )S`: labelled open/close brackets, words -> XX.

  The linearisation of Vinyals et al. (2015), stored as the 'linearized' feature
  of the parsing datasets; `parsing.delinearize` is its inverse.
  """
  out = []
  for kind, node in tree.events():
    if kind == "open":
      out.append("(" + node.label)
    elif kind == "close":
      out.append(")" + node.label)
    else:
      out.append(placeholder)
  return " ".join(out)


def lexicalize(linearized: str, words: Sequence[str], placeholder: str = PLACEHOLDER) -> str:
  """The `--parse_target=words` form of a linearised tree: each placeholder replaced by its
  word, `(S (NP XX )NP (VP XX )VP )S` over 'It works' -> `(S (NP It )NP (VP works )VP )S`.

  `parsing.delinearize(..., placeholder=None)` reads it back (any token that is not a
  bracket takes the next word)."""
  tokens = linearized.split()
  if sum(t == placeholder for t in tokens) != len(words):
    raise ValueError(f"{len(words)} words for {sum(t == placeholder for t in tokens)}"
                     f" placeholders in {linearized!r}")
  it = iter(words)
  return " ".join(next(it) if t == placeholder else t for t in tokens)


# Brackets and words; words end at ASCII whitespace only (see the module docstring).
_TOKEN_RE = re.compile(r"\(|\)|[^ \t\n\r\f\v()]+")


def _where(source: str, count: int, number_trees: bool = True) -> str:
  if not number_trees:
    return source
  return f"{source}, tree {count + 1}" if source else f"tree {count + 1}"


def iter_trees(text: str, source: str = "", number_trees: bool = True) -> Iterator[Tree]:
  """Parses every bracketed tree in `text` (any whitespace/newlines between tokens).

  `(LABEL word)` is a preterminal, `(LABEL child ...)` a phrase, `( ... )` a
  phrase with the empty label (the .mrg root wrapper). Raises TreeError on
  unbalanced brackets, words outside brackets, `(X a b)`, `(X a (Y b))`, `()`,
  saying where: `source` and, if `number_trees`, the tree's number.
  """
  # Each open node: [label, children list, word or None].
  stack: list[list[Any]] = []
  count = 0
  tokens = _TOKEN_RE.findall(text)
  i, n = 0, len(tokens)
  while i < n:
    tok = tokens[i]
    if tok == "(":
      label = ""
      if i + 1 < n and tokens[i + 1] not in ("(", ")"):
        label = tokens[i + 1]
        i += 1
      if stack and stack[-1][2] is not None:
        raise TreeError(f"{_where(source, count, number_trees)}: ({stack[-1][0]} {stack[-1][2]} ...) mixes a"
                        " word and a constituent")
      stack.append([label, [], None])
    elif tok == ")":
      if not stack:
        raise TreeError(f"{_where(source, count, number_trees)}: unbalanced ')' (too many closing brackets)")
      label, children, word = stack.pop()
      if word is not None:
        node = Tree(label, word=word)
      elif children:
        node = Tree(label, tuple(children))
      else:
        raise TreeError(f"{_where(source, count, number_trees)}: empty constituent ({label})")
      if stack:
        stack[-1][1].append(node)
      else:
        count += 1
        yield node
    else:
      if not stack:
        raise TreeError(f"{_where(source, count, number_trees)}: word {tok!r} outside any bracket")
      top = stack[-1]
      if top[2] is not None:
        raise TreeError(f"{_where(source, count, number_trees)}: ({top[0]} {top[2]} {tok} ...) has more than"
                        " one word")
      if top[1]:
        raise TreeError(f"{_where(source, count, number_trees)}: ({top[0]} ... {tok}) mixes constituents and"
                        " a word")
      top[2] = tok
    i += 1
  if stack:
    raise TreeError(f"{_where(source, count, number_trees)}: unbalanced '(' ({len(stack)} left open at the end)")


def parse_trees(text: str, source: str = "") -> list[Tree]:
  """All trees in `text` (see `iter_trees`)."""
  return list(iter_trees(text, source))


def parse_tree(text: str) -> Tree:
  """Exactly one tree, e.g. a line of a one-tree-per-line file."""
  trees = parse_trees(text)
  if len(trees) != 1:
    raise TreeError(f"expected one tree, found {len(trees)} in {text[:80]!r}")
  return trees[0]


def read_tree_lines(path: str) -> list[Tree]:
  """The raw trees of a one-tree-per-line file (CRAFT `.tree`); blank lines are skipped.

  Raises TreeError naming the file and line of a malformed tree, or of a line
  that holds more (or less) than one tree.
  """
  with open(path, encoding="utf-8", errors="strict") as f:
    text = f.read()
  out = []
  # Lines end at '\n' only (str.splitlines would also split at U+2028, U+0085 ...).
  for lineno, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    trees = list(iter_trees(line, source=where, number_trees=False))
    if len(trees) != 1:
      raise TreeError(f"{where}: expected one tree on the line, found {len(trees)}")
    out.append(trees[0])
  return out


def read_mrg_file(path: str) -> list[Tree]:
  """The raw (unnormalised) trees of a file, in order: `.tree` files one per line
  (`read_tree_lines`), other files (.mrg) any layout."""
  if path.endswith(".tree"):
    return read_tree_lines(path)
  with open(path, encoding="utf-8", errors="strict") as f:
    text = f.read()
  return parse_trees(text, source=path)


# ----------------------------------------------------------------------------
# Normalisation.

ROOT_WRAPPER_LABELS = ("", "TOP", "ROOT")
ROOT_LABEL = "TOP"  # label of a kept root wrapper (deleted by COLLINS.prm)
EMPTY_ELEMENT = "-NONE-"
# CRAFT's document-structure roots (module docstring): unwrapped like the root wrapper.
NON_SENTENCE_ROOTS = ("TITLE", "HEADING", "CAPTION", "CIT")
_INNER_SPACE = re.compile(r"\s")  # left inside words by _TOKEN_RE: non-ASCII whitespace


def clean_word(word: str) -> str:
  """`word` without whitespace (module docstring); unchanged if nothing else is left."""
  return _INNER_SPACE.sub("", word) or word


def strip_label(label: str) -> str:
  """Drops function tags and co-indices: `NP-SBJ-1` -> `NP`, `NP=2` -> `NP`.

  An ambiguous label keeps its first alternative (`ADVP|PRT` -> `ADVP`; once in
  the sample).

  Labels that start with '-' (`-LRB-`, `-RRB-`, `-NONE-`) are returned as is,
  and so is a label whose stripped form would be empty.
  """
  if label.startswith("-"):
    return label
  stripped = re.split(r"[-=|]", label, maxsplit=1)[0]
  return stripped or label


def _strip_node(node: Tree) -> Optional[Tree]:
  """Removes -NONE- words and emptied phrases; strips labels (recursive; gold depth is small)."""
  if node.is_preterminal:
    if node.label == EMPTY_ELEMENT:
      return None
    return Tree(strip_label(node.label), word=clean_word(node.word))
  kids = tuple(k for k in (_strip_node(c) for c in node.children) if k is not None)
  if not kids:
    return None
  return Tree(strip_label(node.label), kids)


def _unwrap(kids: tuple[Tree, ...]) -> Optional[Tree]:
  """The root over a wrapper's normalised children: a lone phrase itself, else TOP."""
  if not kids:
    return None
  if len(kids) == 1 and not kids[0].is_preterminal:
    if kids[0].label in NON_SENTENCE_ROOTS:
      return _unwrap(kids[0].children)
    return kids[0]
  return Tree(ROOT_LABEL, kids)


def normalize_tree(tree: Tree) -> Optional[Tree]:
  """The normalised tree (module docstring), or None if no word is left."""
  is_wrapper = not tree.is_preterminal and tree.label in ROOT_WRAPPER_LABELS + NON_SENTENCE_ROOTS
  if not is_wrapper:
    out = _strip_node(tree)
    if out is not None and out.is_preterminal:
      out = Tree(ROOT_LABEL, (out,))
    return out
  return _unwrap(tuple(k for k in (_strip_node(c) for c in tree.children) if k is not None))


def root_label(tree: Tree) -> str:
  """The raw tree's top constituent, function tags stripped: 'S', 'CAPTION', ...

  Under a root wrapper (`( ... )`, TOP, ROOT) it is the wrapper's only child;
  a wrapper over several children (or a lone word) gives 'TOP'.
  """
  node = tree
  while (not node.is_preterminal and node.label in ROOT_WRAPPER_LABELS
         and len(node.children) == 1 and not node.children[0].is_preterminal):
    node = node.children[0]
  if node.is_preterminal or node.label in ROOT_WRAPPER_LABELS:
    return ROOT_LABEL
  return strip_label(node.label)


def is_sentence_root(label: str) -> bool:
  """False for the non-sentence roots (TITLE, HEADING, CAPTION, CIT)."""
  return label not in NON_SENTENCE_ROOTS


def read_normalized(path: str, with_roots: bool = False):
  """Normalised trees of a file and the number dropped for having no words left.

  With `with_roots`, the trees come as (normalised tree, `root_label` of the raw tree).
  """
  out, dropped = [], 0
  for tree in read_mrg_file(path):
    norm = normalize_tree(tree)
    if norm is None:
      dropped += 1
    else:
      out.append((norm, root_label(tree)) if with_roots else norm)
  return out, dropped


# ----------------------------------------------------------------------------
# Splits.

LAYOUTS = ("sample", "wsj_sections", "directory")

# Sample layout: inclusive file-number ranges per split.
SAMPLE_SPLITS = {"train": (1, 159), "validation": (160, 179), "test": (180, 199)}
OPTIONAL_SAMPLE_SPLITS = ("test",)  # present in NLTK's 199-file sample only
# Standard WSJ split (sections).
WSJ_SECTIONS = {"train": tuple(range(2, 22)), "validation": (22,), "test": (23,)}
# Directory layout: split -> sub-directory names tried in order; test is optional.
DIRECTORY_SPLITS = {"train": ("train",), "validation": ("dev", "validation"), "test": ("test",)}
OPTIONAL_DIRECTORY_SPLITS = ("test",)
TREE_FILE_PATTERNS = ("*.tree", "*.mrg")


def tree_files(directory: str) -> list[str]:
  """The `*.tree` and `*.mrg` files of a directory, in name order.

  Raises:
    FileNotFoundError: no such directory, or no tree file in it.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"treebank directory not found: {directory}")
  found = sorted(p for pattern in TREE_FILE_PATTERNS
                 for p in glob.glob(os.path.join(glob.escape(directory), pattern)))
  if not found:
    raise FileNotFoundError(f"no tree files ({', '.join(TREE_FILE_PATTERNS)}) in {directory}")
  return found


def _mrg_path(directory: str, number: int) -> str:
  return os.path.join(directory, f"wsj_{number:04d}.mrg")


def split_files(raw_dir: str, layout: str) -> dict[str, list[str]]:
  """{split: [.mrg paths in order]} of a local treebank directory.

  Raises:
    FileNotFoundError: naming the first missing directory or file.
    ValueError: unknown layout.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"treebank layout must be one of {LAYOUTS}, got {layout!r}")
  if not raw_dir or not os.path.isdir(raw_dir):
    raise FileNotFoundError(f"treebank directory not found: {raw_dir!r} (set --raw_data_dir)")
  out: dict[str, list[str]] = {}
  if layout == "directory":
    for split, names in DIRECTORY_SPLITS.items():
      dirs = [os.path.join(raw_dir, n) for n in names if os.path.isdir(os.path.join(raw_dir, n))]
      if not dirs:
        if split in OPTIONAL_DIRECTORY_SPLITS:
          continue
        raise FileNotFoundError(f"no {' or '.join(names)} directory in {raw_dir} (split {split};"
                                f" expected <raw_data_dir>/{names[0]}/*.tree)")
      out[split] = tree_files(dirs[0])
    return out
  if layout == "sample":
    for split, (lo, hi) in SAMPLE_SPLITS.items():
      paths = [_mrg_path(raw_dir, k) for k in range(lo, hi + 1)]
      present = [p for p in paths if os.path.isfile(p)]
      if split in OPTIONAL_SAMPLE_SPLITS and not present:
        continue
      for p in paths:
        if not os.path.isfile(p):
          raise FileNotFoundError(f"treebank file not found: {p} (split {split}:"
                                  f" wsj_{lo:04d}-wsj_{hi:04d})")
      out[split] = paths
    return out
  for split, sections in WSJ_SECTIONS.items():
    paths = []
    for sec in sections:
      sec_dir = os.path.join(raw_dir, f"{sec:02d}")
      if not os.path.isdir(sec_dir):
        raise FileNotFoundError(f"WSJ section directory not found: {sec_dir}"
                                " (expected <raw_data_dir>/NN/wsj_NNNN.mrg)")
      found = sorted(glob.glob(os.path.join(sec_dir, "wsj_*.mrg"))
                     + glob.glob(os.path.join(sec_dir, "WSJ_*.MRG")))
      if not found:
        raise FileNotFoundError(f"no wsj_*.mrg files in {sec_dir}")
      paths.extend(found)
    out[split] = paths
  return out


def iter_split_trees(paths: Iterable[str], with_roots: bool = False) -> Iterator[tuple]:
  """(file stem, normalised tree) over files in order; logs trees left empty.

  With `with_roots`: (file stem, normalised tree, `root_label` of the raw tree).
  """
  dropped = 0
  for path in paths:
    trees, d = read_normalized(path, with_roots=True)
    dropped += d
    stem = os.path.splitext(os.path.basename(path))[0]
    for tree, root in trees:
      yield (stem, tree, root) if with_roots else (stem, tree)
  if dropped:
    logging.warning("treebank: dropped %d trees with no words after removing -NONE-", dropped)


def _record(i: int, stem: str, tree: Tree, root: str) -> dict[str, Any]:
  """One example of a parsing split (the features of `PtbParsing`)."""
  return {"sentence": " ".join(tree.leaves()), "tree": tree.to_string(),
          "linearized": linearize(tree), "file": stem, "root": root, "id": i}


# ----------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass(eq=False)
class PtbParsingConfig(tfds.core.BuilderConfig):
  """A layout ('sample' | 'wsj_sections' | 'directory') plus optional extra training trees.

  `extra_train_files`: bracketed-tree files (`.tree`: one tree per line; others:
  any number of trees, any layout of whitespace) appended to the train split,
  e.g. automatically parsed sentences for the semi-supervised setting, or
  another treebank's training files. `source_dir`: for the 'directory' layout,
  the absolute raw directory, part of the config name so that two directories
  prepared in one TFDS data dir do not share records. Build with `create`.
  """
  layout: str = "sample"
  extra_train_files: tuple[str, ...] = ()
  source_dir: str = ""

  @classmethod
  def create(cls, layout: str, extra_train_files: Sequence[str] = (),
             source_dir: str = "") -> "PtbParsingConfig":
    if layout not in LAYOUTS:
      raise ValueError(f"treebank layout must be one of {LAYOUTS}, got {layout!r}")
    extra = tuple(os.path.abspath(p) for p in extra_train_files)
    source = os.path.abspath(source_dir) if layout == "directory" and source_dir else ""
    name = layout
    if source:
      name += "." + hashlib.sha256(source.encode()).hexdigest()[:12]
    if extra:
      name += ".extra." + hashlib.sha256(repr(extra).encode()).hexdigest()[:12]
    what = f"directory {source}" if source else f"Penn Treebank WSJ, layout {layout}"
    return cls(name=name, version=PtbParsing.VERSION,
               description=what + (f", extra train trees {list(extra)}" if extra else ""),
               layout=layout, extra_train_files=extra, source_dir=source)


class PtbParsing(datasets.RawDataDirMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Penn Treebank-style constituency trees from a local directory (no download).

  Features: 'sentence' (words joined by spaces), 'tree' (normalised, one line,
  POS tags kept), 'linearized' (`linearize`), 'file' (e.g. 'wsj_0001';
  '' for extra trees), 'root' (`root_label` of the raw tree: 'S', 'CAPTION',
  ...), 'id' (0-based position in the split). Records are in file order. A
  dataset prepared once is reused from the TFDS data dir whatever
  `raw_data_dir` says (as for Multi30k), except in the 'directory' layout,
  whose config name includes the directory.
  """

  name = "ptb_parsing"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "'root' feature; non-sentence roots unwrapped; 'directory' layout."}

  def _info(self) -> tfds.core.DatasetInfo:
    if not isinstance(self.builder_config, PtbParsingConfig):
      raise ValueError("PtbParsing needs config=PtbParsingConfig.create(...)")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Constituency trees, normalised (no -NONE-, no function tags),"
                    " with the Vinyals et al. (2015) linearisation.",
        features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "tree": tfds.features.Text(),
            "linearized": tfds.features.Text(),
            "file": tfds.features.Text(),
            "root": tfds.features.Text(),
            "id": tfds.features.Scalar(dtype=np.int64, doc="0-based position in the split"),
        }),
        homepage="https://catalog.ldc.upenn.edu/LDC99T42",
        disable_shuffling=True,  # records in file order (keys = positions)
    )

  reads_local_files = True  # `datasets.prepare` checks them first

  def check_raw_files(self) -> None:
    """Raises FileNotFoundError naming the first missing directory or file (`split_files`)."""
    split_files(self._raw_data_dir, self.builder_config.layout)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    config = self.builder_config
    files = split_files(self._raw_data_dir, config.layout)
    for path in config.extra_train_files:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"extra training tree file not found: {path}")
    gens = {}
    for split, paths in files.items():
      extra = config.extra_train_files if split == "train" else ()
      gens[split] = self._generate_examples(tuple(paths), tuple(extra))
    return gens

  def _generate_examples(self, paths: tuple[str, ...], extra: tuple[str, ...]):
    def extra_trees():
      for stem, tree, root in iter_split_trees(extra, with_roots=True):
        del stem
        yield "", tree, root
    chained = itertools.chain(iter_split_trees(paths, with_roots=True), extra_trees())
    for i, (stem, tree, root) in enumerate(chained):
      yield i, _record(i, stem, tree, root)


class CraftTreebank(PtbParsing, skip_registration=True):
  """CRAFT (or any treebank in the 'directory' layout): `<dir>/{train,dev}/*.tree`."""

  name = "craft_treebank"


# ----------------------------------------------------------------------------
# Reading splits.

# --dataset name -> layout.
DATASETS = {"ptb_wsj": "wsj_sections", "ptb_wsj_sample": "sample", "craft_treebank": "directory"}


class ParsingSplit(datasets.ParallelSplit):
  """Random-access `{'source', 'target', 'id', 'tree', 'file', 'root'}` view of a parsing split.

  'source' is the sentence (words joined by spaces), 'target' the linearised
  tree (`target_form` 'xx': `linearize`, or 'words': `lexicalize`d), 'tree' the normalised
  gold tree (one line, POS tags kept), 'root' the raw tree's root label (`is_sentence_root`).
  """

  def __init__(self, data_source, name: str = "", target_form: str = "xx"):
    super().__init__(data_source, "sentence", "linearized", has_id=True, ordered=True,
                     name=name)
    self.target_form = target_form
    if target_form == "words":  # names the target side, so tokenized stores keep them apart
      self.target_lang = "linearized_words"

  def _convert(self, record: dict[str, Any], rec_index: int) -> dict[str, Any]:
    del rec_index  # records have an 'id'
    out = {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in record.items()
           if k in ("sentence", "linearized", "tree", "file", "root")}
    out["source"], out["target"] = out.pop("sentence"), out.pop("linearized")
    if self.target_form == "words":
      out["target"] = lexicalize(out["target"], out["source"].split())
    out["id"] = int(record["id"])
    return out


def _extra_train_files(data_cfg: DataConfig) -> list[str]:
  """`--parsing_extra_train`: comma-separated files or directories (their `tree_files`),
  relative to --raw_data_dir."""
  spec = data_cfg.parsing_extra_train or ""
  paths = [p.strip() for p in spec.split(",") if p.strip()]
  base = data_cfg.raw_data_dir
  out = []
  for p in paths:
    p = p if os.path.isabs(p) or not base else os.path.join(base, p)
    out.extend(tree_files(p) if os.path.isdir(p) else [p])
  return out


def make_parsing_builder(data_cfg: DataConfig, data_dir: str) -> PtbParsing:
  """The builder for `--dataset=ptb_wsj|ptb_wsj_sample|craft_treebank`."""
  if data_cfg.dataset not in DATASETS:
    raise datasets.DataError(f"--dataset={data_cfg.dataset!r} is not a parsing dataset"
                             f" ({sorted(DATASETS)})")
  layout = DATASETS[data_cfg.dataset]
  config = PtbParsingConfig.create(layout, _extra_train_files(data_cfg),
                                   source_dir=data_cfg.raw_data_dir or "")
  cls = CraftTreebank if layout == "directory" else PtbParsing
  return cls(config=config, data_dir=data_dir, raw_data_dir=data_cfg.raw_data_dir,
             file_format="array_record")


_PATH_SLICE = re.compile(r"(.*?)\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]")


def is_directory_split(split: str) -> bool:
  """Whether `split` is a directory path (has a '/', e.g. `./trees`, `../x/dev[:100]`)
  rather than a split name ('train', 'dev[:100]')."""
  return "/" in split or os.sep in split


def read_directory_split(split: str, target_form: str = "xx") -> ParsingSplit:
  """The trees of a directory (`tree_files`) as a split, optionally sliced: 'dir[:100]'.

  Normalised like the datasets; read directly (no TFDS), so any treebank in
  this format can be scored without preparing a dataset.
  """
  m = _PATH_SLICE.fullmatch(split)
  path = m.group(1) if m else split
  records = [_record(i, stem, tree, root) for i, (stem, tree, root)
             in enumerate(iter_split_trees(tree_files(path), with_roots=True))]
  if m:
    lo = int(m.group(2)) if m.group(2) else None
    hi = int(m.group(3)) if m.group(3) else None
    records = [dict(r, id=i) for i, r in enumerate(records[lo:hi])]
  if not records:
    raise datasets.DataError(f"no trees in {split}")
  logging.info("%s: %d trees", split, len(records))
  return ParsingSplit(records, name=split, target_form=target_form)


def get_parsing_split(data_cfg: DataConfig, split: str, data_dir: str) -> ParsingSplit:
  """Examples of `split` ('train', 'validation'/'dev', 'test', optional '[:n]' slice),
  or of a directory of tree files (`read_directory_split`).

  Same contract as `datasets.get_split` (prepared in `data_dir` on first use),
  with the gold tree under 'tree'. `source_lang`/`target_lang` are ignored.
  """
  if is_directory_split(split):
    return read_directory_split(split, data_cfg.parse_target)
  builder, source, tfds_split = datasets.open_split(
      data_dir, split, lambda d: make_parsing_builder(data_cfg, d))
  logging.info("%s %s: %d trees", builder.info.full_name, tfds_split, len(source))
  return ParsingSplit(source, name=f"{builder.info.full_name}/{tfds_split}",
                      target_form=data_cfg.parse_target)
