"""Penn Treebank (WSJ) constituency trees for the parsing task (paper section 6.3).

Reading, normalisation, split definitions and a TFDS builder (array_record, no
TensorFlow), plus `get_parsing_split`, the parsing counterpart of
`datasets.get_split`.

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

Splits:

* layout 'sample' (the NLTK 5-10% WSJ sample, one directory of
  `wsj_NNNN.mrg`): train = wsj_0001-wsj_0159, validation = wsj_0160-wsj_0179,
  test = wsj_0180-wsj_0199 (only if those files are present: the NLTK
  distribution has them, `../shared/data` does not). Not the standard split.
* layout 'wsj_sections' (the full treebank, `<dir>/NN/wsj_NNNN.mrg`, e.g.
  LDC99T42 `parsed/mrg/wsj`): train = sections 02-21, validation = 22,
  test = 23 (Collins 1997 and everybody since, including the paper).
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

  def num_phrases(self) -> int:
    """Number of non-preterminal nodes (the root included)."""
    return sum(1 for kind, _ in self.events() if kind == "open")

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


_TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")


def _where(source: str, count: int) -> str:
  return f"{source}, tree {count + 1}" if source else f"tree {count + 1}"


def iter_trees(text: str, source: str = "") -> Iterator[Tree]:
  """Parses every bracketed tree in `text` (any whitespace/newlines between tokens).

  `(LABEL word)` is a preterminal, `(LABEL child ...)` a phrase, `( ... )` a
  phrase with the empty label (the .mrg root wrapper). Raises TreeError on
  unbalanced brackets, words outside brackets, `(X a b)`, `(X a (Y b))`, `()`.
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
        raise TreeError(f"{_where(source, count)}: ({stack[-1][0]} {stack[-1][2]} ...) mixes a"
                        " word and a constituent")
      stack.append([label, [], None])
    elif tok == ")":
      if not stack:
        raise TreeError(f"{_where(source, count)}: unbalanced ')' (too many closing brackets)")
      label, children, word = stack.pop()
      if word is not None:
        node = Tree(label, word=word)
      elif children:
        node = Tree(label, tuple(children))
      else:
        raise TreeError(f"{_where(source, count)}: empty constituent ({label})")
      if stack:
        stack[-1][1].append(node)
      else:
        count += 1
        yield node
    else:
      if not stack:
        raise TreeError(f"{_where(source, count)}: word {tok!r} outside any bracket")
      top = stack[-1]
      if top[2] is not None:
        raise TreeError(f"{_where(source, count)}: ({top[0]} {top[2]} {tok} ...) has more than"
                        " one word")
      if top[1]:
        raise TreeError(f"{_where(source, count)}: ({top[0]} ... {tok}) mixes constituents and"
                        " a word")
      top[2] = tok
    i += 1
  if stack:
    raise TreeError(f"{_where(source, count)}: unbalanced '(' ({len(stack)} left open at the end)")


def parse_trees(text: str, source: str = "") -> list[Tree]:
  """All trees in `text` (see `iter_trees`)."""
  return list(iter_trees(text, source))


def parse_tree(text: str) -> Tree:
  """Exactly one tree, e.g. a line of a one-tree-per-line file."""
  trees = parse_trees(text)
  if len(trees) != 1:
    raise TreeError(f"expected one tree, found {len(trees)} in {text[:80]!r}")
  return trees[0]


def read_mrg_file(path: str) -> list[Tree]:
  """The raw (unnormalised) trees of a .mrg file, in order."""
  with open(path, encoding="utf-8", errors="strict") as f:
    text = f.read()
  return parse_trees(text, source=path)


# ----------------------------------------------------------------------------
# Normalisation.

ROOT_WRAPPER_LABELS = ("", "TOP", "ROOT")
ROOT_LABEL = "TOP"  # label of a kept root wrapper (deleted by COLLINS.prm)
EMPTY_ELEMENT = "-NONE-"


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
    return Tree(strip_label(node.label), word=node.word)
  kids = tuple(k for k in (_strip_node(c) for c in node.children) if k is not None)
  if not kids:
    return None
  return Tree(strip_label(node.label), kids)


def normalize_tree(tree: Tree) -> Optional[Tree]:
  """The normalised tree (module docstring), or None if no word is left."""
  is_wrapper = not tree.is_preterminal and tree.label in ROOT_WRAPPER_LABELS
  if not is_wrapper:
    out = _strip_node(tree)
    if out is not None and out.is_preterminal:
      out = Tree(ROOT_LABEL, (out,))
    return out
  kids = tuple(k for k in (_strip_node(c) for c in tree.children) if k is not None)
  if not kids:
    return None
  if len(kids) == 1 and not kids[0].is_preterminal:
    return kids[0]
  return Tree(ROOT_LABEL, kids)


def read_normalized(path: str) -> tuple[list[Tree], int]:
  """Normalised trees of a file and the number dropped for having no words left."""
  out, dropped = [], 0
  for tree in read_mrg_file(path):
    norm = normalize_tree(tree)
    if norm is None:
      dropped += 1
    else:
      out.append(norm)
  return out, dropped


# ----------------------------------------------------------------------------
# Splits.

LAYOUTS = ("sample", "wsj_sections")

# Sample layout: inclusive file-number ranges per split.
SAMPLE_SPLITS = {"train": (1, 159), "validation": (160, 179), "test": (180, 199)}
OPTIONAL_SAMPLE_SPLITS = ("test",)  # present in NLTK's 199-file sample only
# Standard WSJ split (sections).
WSJ_SECTIONS = {"train": tuple(range(2, 22)), "validation": (22,), "test": (23,)}


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


def iter_split_trees(paths: Iterable[str]) -> Iterator[tuple[str, Tree]]:
  """(file stem, normalised tree) over files in order; logs trees left empty."""
  dropped = 0
  for path in paths:
    trees, d = read_normalized(path)
    dropped += d
    stem = os.path.splitext(os.path.basename(path))[0]
    for tree in trees:
      yield stem, tree
  if dropped:
    logging.warning("treebank: dropped %d trees with no words after removing -NONE-", dropped)


# ----------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass(eq=False)
class PtbParsingConfig(tfds.core.BuilderConfig):
  """A layout ('sample' | 'wsj_sections') plus optional extra training trees.

  `extra_train_files`: bracketed-tree files (any number of trees per file, any
  layout of whitespace) appended to the train split, e.g. automatically parsed
  sentences for the semi-supervised setting. Build with `create`.
  """
  layout: str = "sample"
  extra_train_files: tuple[str, ...] = ()

  @classmethod
  def create(cls, layout: str, extra_train_files: Sequence[str] = ()) -> "PtbParsingConfig":
    if layout not in LAYOUTS:
      raise ValueError(f"treebank layout must be one of {LAYOUTS}, got {layout!r}")
    extra = tuple(os.path.abspath(p) for p in extra_train_files)
    name = layout
    if extra:
      name += ".extra." + hashlib.sha256(repr(extra).encode()).hexdigest()[:12]
    return cls(name=name, version=PtbParsing.VERSION,
               description=f"Penn Treebank WSJ, layout {layout}"
                           + (f", extra train trees {list(extra)}" if extra else ""),
               layout=layout, extra_train_files=extra)


class PtbParsing(datasets.RawDataDirMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Penn Treebank WSJ constituency trees from a local directory (no download).

  Features: 'sentence' (words joined by spaces), 'tree' (normalised, one line,
  POS tags kept), 'linearized' (`parsing.linearize`), 'file' (e.g. 'wsj_0001';
  '' for extra trees), 'id' (0-based position in the split). Records are in
  file order. A dataset prepared once is reused from the TFDS data dir
  whatever `raw_data_dir` says (as for Multi30k).
  """

  name = "ptb_parsing"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    if not isinstance(self.builder_config, PtbParsingConfig):
      raise ValueError("PtbParsing needs config=PtbParsingConfig.create(...)")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Penn Treebank WSJ trees, normalised (no -NONE-, no function tags),"
                    " with the Vinyals et al. (2015) linearisation.",
        features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "tree": tfds.features.Text(),
            "linearized": tfds.features.Text(),
            "file": tfds.features.Text(),
            "id": tfds.features.Scalar(dtype=np.int64, doc="0-based position in the split"),
        }),
        homepage="https://catalog.ldc.upenn.edu/LDC99T42",
        disable_shuffling=True,  # records in file order (keys = positions)
    )

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
    # Imported here: transformer.parsing imports this module for the Tree type.
    from transformer import parsing  # pylint: disable=g-import-not-at-top
    def extra_trees():
      for path in extra:
        for stem, tree in iter_split_trees([path]):
          del stem
          yield "", tree
    for i, (stem, tree) in enumerate(itertools.chain(iter_split_trees(paths), extra_trees())):
      yield i, {"sentence": " ".join(tree.leaves()), "tree": tree.to_string(),
                "linearized": parsing.linearize(tree), "file": stem, "id": i}


# ----------------------------------------------------------------------------
# Reading splits.

# --dataset name -> layout.
DATASETS = {"ptb_wsj": "wsj_sections", "ptb_wsj_sample": "sample"}


class ParsingSplit(datasets.ParallelSplit):
  """Random-access `{'source', 'target', 'id', 'tree', 'file'}` view of a PtbParsing split.

  'source' is the sentence (words joined by spaces), 'target' the linearised
  tree, 'tree' the normalised gold tree (one line, POS tags kept).
  """

  def __init__(self, data_source, name: str = ""):
    super().__init__(data_source, "sentence", "linearized", has_id=True, ordered=True,
                     name=name)

  def _convert(self, record: dict[str, Any], rec_index: int) -> dict[str, Any]:
    out = super()._convert(record, rec_index)
    for key in ("tree", "file"):
      value = record[key]
      out[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return out


def _extra_train_files(data_cfg: DataConfig) -> list[str]:
  # `parsing_extra_train` is a comma-separated list of files (see the report for the flag).
  spec = data_cfg.parsing_extra_train or ""
  paths = [p.strip() for p in spec.split(",") if p.strip()]
  base = data_cfg.raw_data_dir
  return [p if os.path.isabs(p) or not base else os.path.join(base, p) for p in paths]


def make_parsing_builder(data_cfg: DataConfig, data_dir: str) -> PtbParsing:
  """The PtbParsing builder for `--dataset=ptb_wsj|ptb_wsj_sample`."""
  if data_cfg.dataset not in DATASETS:
    raise datasets.DataError(f"--dataset={data_cfg.dataset!r} is not a parsing dataset"
                             f" ({sorted(DATASETS)})")
  config = PtbParsingConfig.create(DATASETS[data_cfg.dataset], _extra_train_files(data_cfg))
  return PtbParsing(config=config, data_dir=data_dir, raw_data_dir=data_cfg.raw_data_dir,
                    file_format="array_record")


def prepare(builder: PtbParsing) -> None:
  """Writes the array_record files unless present; fails early on missing raw files."""
  if builder.is_prepared():
    return
  split_files(builder.raw_data_dir, builder.builder_config.layout)  # raises on missing files
  logging.info("Preparing %s in %s", builder.info.full_name, builder.data_dir)
  builder.download_and_prepare(file_format="array_record")


def get_parsing_split(data_cfg: DataConfig, split: str, data_dir: str) -> ParsingSplit:
  """Examples of `split` ('train', 'validation'/'dev', 'test', optional '[:n]' slice).

  Same contract as `datasets.get_split` (prepared in `data_dir` on first use),
  with the gold tree under 'tree'. `source_lang`/`target_lang` are ignored.
  """
  if not data_dir:
    raise datasets.DataError("A TFDS data dir is required (--tfds_data_dir)")
  builder = make_parsing_builder(data_cfg, data_dir)
  prepare(builder)
  tfds_split = datasets.canonical_split(split)
  base = tfds_split.split("[")[0]
  if base not in builder.info.splits:
    raise datasets.DataError(f"{builder.info.full_name} has no split {split!r}; it has"
                             f" {sorted(builder.info.splits.keys())}")
  source = builder.as_data_source(split=tfds_split)
  logging.info("%s %s: %d trees", builder.info.full_name, tfds_split, len(source))
  return ParsingSplit(source, name=f"{builder.info.full_name}/{tfds_split}")
