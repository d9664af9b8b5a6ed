"""Tests for transformer/data/treebank.py: PTB reading, normalisation, splits, TFDS."""

from __future__ import annotations

import glob
import re
import os
from pathlib import Path
import shutil
import sys

import pytest

from transformer.config import DataConfig
from transformer.data import datasets, treebank
from transformer.data.treebank import Tree

_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def sample_dir() -> Path:
  """The NLTK WSJ sample: $TRANSFORMER_DATA_DIR (default ../shared/data)/ptb_wsj_sample_nltk."""
  path = (Path(os.environ.get("TRANSFORMER_DATA_DIR", _DEFAULT_DATA_DIR))
          / "ptb_wsj_sample_nltk" / "combined")
  if not (path / "wsj_0001.mrg").exists():
    pytest.fail(f"{path} not found: set TRANSFORMER_DATA_DIR to the shared data directory")
  return path


# Two trees as in a .mrg file (outer unlabeled wrapper, free layout), with an
# empty subject (-NONE-), function tags, co-indices (-1, =3), -LRB-/-RRB-, and an
# SBAR whose only content is empty elements (it must vanish entirely).
SNIPPET = """
( (S
    (NP-SBJ-1 (DT The) (NN dog) )
    (VP (VBD wanted)
      (S
        (NP-SBJ (-NONE- *-1) )
        (VP (TO to)
          (VP (VB bark)
            (PRN (-LRB- -LRB-) (ADVP-MNR (RB loudly) ) (-RRB- -RRB-) )))))
    (. .) ))
((SINV (`` ``) (S-TPC-2 (NP-SBJ (PRP It)) (VP (VBZ works)))
  (, ,) ('' '') (VP (VBD said) (SBAR (-NONE- 0) (S (-NONE- *T*-2))))
  (NP-SBJ=3 (NNP Ann)) (. .)))
"""

SNIPPET_NORMALIZED = [
    "(S (NP (DT The) (NN dog)) (VP (VBD wanted) (S (VP (TO to) (VP (VB bark)"
    " (PRN (-LRB- -LRB-) (ADVP (RB loudly)) (-RRB- -RRB-)))))) (. .))",
    "(SINV (`` ``) (S (NP (PRP It)) (VP (VBZ works))) (, ,) ('' '') (VP (VBD said))"
    " (NP (NNP Ann)) (. .))",
]


def test_read_and_normalize_snippet(tmp_path):
  path = tmp_path / "wsj_9999.mrg"
  path.write_text(SNIPPET, encoding="utf-8")
  raw = treebank.read_mrg_file(str(path))
  assert len(raw) == 2
  assert raw[0].label == "" and len(raw[0].children) == 1
  assert raw[0].leaves() == ["The", "dog", "wanted", "*-1", "to", "bark", "-LRB-", "loudly",
                             "-RRB-", "."]
  assert raw[0].children[0].children[0].label == "NP-SBJ-1"
  trees, dropped = treebank.read_normalized(str(path))
  assert dropped == 0
  assert [t.to_string() for t in trees] == SNIPPET_NORMALIZED
  assert trees[0].leaves() == ["The", "dog", "wanted", "to", "bark", "-LRB-", "loudly",
                               "-RRB-", "."]
  assert trees[1].tags() == ["``", "PRP", "VBZ", ",", "''", "VBD", "NNP", "."]
  # Printing and re-reading is the identity.
  assert [treebank.parse_tree(s) for s in SNIPPET_NORMALIZED] == trees


def test_root_wrapper_and_empty_trees():
  # Wrapper with one phrase: dropped.
  t = treebank.normalize_tree(treebank.parse_tree("( (NP-HLN (NN Hello)) )"))
  assert t.to_string() == "(NP (NN Hello))"
  # Wrapper with several pieces, or a lone tagged word: kept as TOP.
  t = treebank.normalize_tree(treebank.parse_tree("( (NP (NN Hello)) (. .))"))
  assert t.to_string() == "(TOP (NP (NN Hello)) (. .))"
  t = treebank.normalize_tree(treebank.parse_tree("( (UH Hello) )"))
  assert t.to_string() == "(TOP (UH Hello))"
  t = treebank.normalize_tree(treebank.parse_tree("(ROOT (S (NP (-NONE- *)) (VP (VB Go))))"))
  assert t.to_string() == "(S (VP (VB Go)))"
  # No wrapper: the root is kept (labels stripped).
  t = treebank.normalize_tree(treebank.parse_tree("(S-1 (NP (NN x)))"))
  assert t.to_string() == "(S (NP (NN x)))"
  # Only empty elements: nothing left.
  assert treebank.normalize_tree(treebank.parse_tree("( (S (NP-SBJ (-NONE- *)) ))")) is None


def test_strip_label():
  cases = {"NP-SBJ-1": "NP", "PP-LOC=2": "PP", "NP=3": "NP", "S-TPC-1": "S", "S": "S",
           "-LRB-": "-LRB-", "-RRB-": "-RRB-", "-NONE-": "-NONE-", "ADVP|PRT": "ADVP",
           "PRP$": "PRP$", "WHNP-1": "WHNP", "NP-TTL-SBJ-2": "NP"}
  for label, want in cases.items():
    assert treebank.strip_label(label) == want, label


@pytest.mark.parametrize("text, match", [
    ("(S (NP (NN a))", "unbalanced '\\('"),
    ("(S (NN a)))", "unbalanced '\\)'"),
    ("word (S (NN a))", "outside any bracket"),
    ("(S (NN a b))", "more than one word"),
    ("(S (NN a) b)", "mixes"),
    ("(S (NP))", "empty constituent"),
])
def test_parse_errors(text, match):
  with pytest.raises(treebank.TreeError, match=match):
    treebank.parse_trees(text)


def test_tree_api():
  t = treebank.parse_tree("(S (NP (NNP John)) (VP (VBZ runs)) (. .))")
  assert t.leaves() == ["John", "runs", "."]
  assert t.tags() == ["NNP", "VBZ", "."]
  assert str(t) == "(S (NP (NNP John)) (VP (VBZ runs)) (. .))"
  assert t == Tree("S", (Tree("NP", (Tree("NNP", word="John"),)),
                         Tree("VP", (Tree("VBZ", word="runs"),)), Tree(".", word=".")))
  with pytest.raises(treebank.TreeError):
    Tree("NN", (Tree("X", word="y"),), word="z")
  # Deep trees need no recursion.
  deep = "(X " * 3000 + "(NN w)" + ")" * 3000
  d = treebank.parse_tree(deep)
  assert d.leaves() == ["w"]
  assert d.to_string() == deep


def _count_top_level_trees(text: str) -> int:
  """Independent count: '(' opened at depth 0."""
  depth = count = 0
  for ch in text:
    if ch == "(":
      count += depth == 0
      depth += 1
    elif ch == ")":
      depth -= 1
  assert depth == 0
  return count


def test_sample_splits(sample_dir):
  files = treebank.split_files(str(sample_dir), "sample")
  # The shared folder has wsj_0001-0179: no test split (wsj_0180-0199 absent).
  assert sorted(files) == ["train", "validation"]
  assert [os.path.basename(p) for p in files["train"]] == [
      f"wsj_{i:04d}.mrg" for i in range(1, 160)]
  assert [os.path.basename(p) for p in files["validation"]] == [
      f"wsj_{i:04d}.mrg" for i in range(160, 180)]
  expected = {"train": 3396, "validation": 273}  # 3669 trees in wsj_0001-0179
  for split, paths in files.items():
    raw_count = sum(_count_top_level_trees(Path(p).read_text()) for p in paths)
    assert raw_count == expected[split]
    n = 0
    for path in paths:
      raw = treebank.read_mrg_file(path)
      norm, dropped = treebank.read_normalized(path)
      assert dropped == 0 and len(norm) == len(raw)
      for r, t in zip(raw, norm):
        n += 1
        # Leaves are the raw words minus the empty elements, in order.
        want = [p.word for p in r.preterminals() if p.label != "-NONE-"]
        assert t.leaves() == want
        labels = [node.label for kind, node in t.events() if kind != "close"]
        assert "-NONE-" not in labels and "" not in labels
        for kind, node in t.events():
          if kind == "open":
            assert "-" not in node.label and "=" not in node.label, node.label
          if kind == "open" and node is not t:
            assert node.children  # no empty constituent
    assert n == expected[split]


def test_linearize():
  john = "(S (NP (NNP John)) (VP (VBZ has) (NP (DT a) (NN dog))) (. .))"
  assert treebank.linearize(treebank.parse_tree(john)) == (
      "(S (NP XX )NP (VP XX (NP XX XX )NP )VP XX )S")
  t = treebank.parse_tree("(S (NP (-LRB- -LRB-) (NN x) (-RRB- -RRB-)) (VP (VB y)))")
  assert treebank.linearize(t) == "(S (NP XX XX XX )NP (VP XX )VP )S"


def test_sample_tfds_split(sample_dir, tmp_path):
  cfg = DataConfig(dataset="ptb_wsj_sample", raw_data_dir=str(sample_dir))
  data_dir = str(tmp_path / "tfds")
  dev = treebank.get_parsing_split(cfg, "dev", data_dir)
  assert len(dev) == 273
  assert "tensorflow" not in sys.modules
  first_raw = treebank.read_normalized(str(sample_dir / "wsj_0160.mrg"))[0][0]
  last_raw = treebank.read_normalized(str(sample_dir / "wsj_0179.mrg"))[0][-1]
  ex = dev[0]
  assert ex["id"] == 0 and ex["file"] == "wsj_0160"
  assert ex["tree"] == first_raw.to_string()
  assert ex["source"] == " ".join(first_raw.leaves())
  assert ex["source"].startswith("Savin Corp. reported a third-quarter net loss")
  assert ex["target"] == treebank.linearize(first_raw)
  assert ex["target"].startswith("(S (NP XX XX )NP (VP XX (NP (NP XX XX XX XX )NP")
  assert dev[-1]["tree"] == last_raw.to_string() and dev[-1]["id"] == 272
  assert [e["id"] for e in dev] == list(range(273))
  assert len(treebank.get_parsing_split(cfg, "train", data_dir)) == 3396
  assert [e["id"] for e in treebank.get_parsing_split(cfg, "validation[:5]", data_dir)] == [
      0, 1, 2, 3, 4]
  files = glob.glob(f"{data_dir}/ptb_parsing/sample/1.1.0/*.array_record-*")
  assert {os.path.basename(f).split(".")[0] for f in files} == {
      "ptb_parsing-train", "ptb_parsing-validation"}
  with pytest.raises(datasets.DataError, match="no split 'test'"):
    treebank.get_parsing_split(cfg, "test", data_dir)


def test_wsj_sections_layout_and_extra_trees(sample_dir, tmp_path):
  # Stand-in full treebank: sections 02-23, one sample file each (a temp copy).
  raw = tmp_path / "wsj"
  for sec in range(2, 24):
    (raw / f"{sec:02d}").mkdir(parents=True)
    src = sample_dir / f"wsj_{sec:04d}.mrg"
    shutil.copy(src, raw / f"{sec:02d}" / f"wsj_{sec:02d}01.mrg")
  files = treebank.split_files(str(raw), "wsj_sections")
  assert [os.path.basename(p) for p in files["train"]] == [
      f"wsj_{s:02d}01.mrg" for s in range(2, 22)]
  assert [os.path.basename(p) for p in files["validation"]] == ["wsj_2201.mrg"]
  assert [os.path.basename(p) for p in files["test"]] == ["wsj_2301.mrg"]
  n_train = sum(len(treebank.read_mrg_file(p)) for p in files["train"])
  extra = tmp_path / "extra.trees"
  extra.write_text("(S (NP (PRP It)) (VP (VBZ works)) (. .))\n"
                   "(TOP (FRAG (NP (NN Fine)) (. .)))\n", encoding="utf-8")
  cfg = DataConfig(dataset="ptb_wsj", raw_data_dir=str(raw))
  data_dir = str(tmp_path / "tfds")
  train = treebank.get_parsing_split(cfg, "train", data_dir)
  assert len(train) == n_train
  test = treebank.get_parsing_split(cfg, "test", data_dir)
  assert test[0]["file"] == "wsj_2301"
  assert test[0]["tree"] == treebank.read_normalized(str(sample_dir / "wsj_0023.mrg"))[0][0] \
      .to_string()
  # Extra (e.g. automatically parsed) training trees go after the treebank's.
  builder = treebank.PtbParsing(
      config=treebank.PtbParsingConfig.create("wsj_sections", [str(extra)]),
      data_dir=data_dir, raw_data_dir=str(raw), file_format="array_record")
  datasets.prepare(builder)
  split = treebank.ParsingSplit(builder.as_data_source(split="train"))
  assert len(split) == n_train + 2
  assert split[n_train]["tree"] == "(S (NP (PRP It)) (VP (VBZ works)) (. .))"
  assert split[n_train + 1]["target"] == "(FRAG (NP XX )NP XX )FRAG"
  assert split[n_train + 1]["file"] == ""
  assert len(treebank.ParsingSplit(builder.as_data_source(split="validation"))) == len(
      treebank.read_mrg_file(files["validation"][0]))


def test_missing_data(tmp_path):
  with pytest.raises(FileNotFoundError, match="wsj_0001.mrg"):
    treebank.split_files(str(tmp_path), "sample")
  with pytest.raises(FileNotFoundError, match="02"):
    treebank.split_files(str(tmp_path), "wsj_sections")
  with pytest.raises(FileNotFoundError, match="raw_data_dir"):
    treebank.split_files(str(tmp_path / "nope"), "sample")
  with pytest.raises(ValueError, match="layout"):
    treebank.split_files(str(tmp_path), "penn")
  cfg = DataConfig(dataset="ptb_wsj_sample", raw_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="wsj_0001.mrg"):
    treebank.get_parsing_split(cfg, "train", str(tmp_path / "tfds"))
  assert not glob.glob(f"{tmp_path}/tfds/ptb_parsing/*/*/dataset_info.json")
  with pytest.raises(datasets.DataError, match="not a parsing dataset"):
    treebank.get_parsing_split(DataConfig(dataset="multi30k"), "train", str(tmp_path))


# ----------------------------------------------------------------------------
# CRAFT: one tree per line, Treebank-II annotation, OntoNotes tags, document roots.

# Hand-written lines in the CRAFT format, each with its expected normalised tree and raw root.
CRAFT_LINES = [
    # Function tags and co-indices; an object trace (NP-1 holding only -NONE-) vanishes.
    ("( (S (NP-SBJ-1 (NNS Mice)) (VP (VBD were) (VP (VBN analyzed) (NP-1 (-NONE- *))"
     " (PP-LOC (IN in) (NP (NN vivo))))) (. .)) )",
     "(S (NP (NNS Mice)) (VP (VBD were) (VP (VBN analyzed) (PP (IN in) (NP (NN vivo)))))"
     " (. .))", "S"),
    # -NONE- subtrees that leave empty phrases (SBAR -> S -> only traces), -LRB-/-RRB-.
    ("( (S (NP-SBJ (PRP We)) (VP (VBD found) (SBAR (-NONE- 0) (S (-NONE- *T*-2)))"
     " (PRN (-LRB- -LRB-) (NP (NN Fig.) (CD 1)) (-RRB- -RRB-))) (. .)) )",
     "(S (NP (PRP We)) (VP (VBD found) (PRN (-LRB- -LRB-) (NP (NN Fig.) (CD 1))"
     " (-RRB- -RRB-))) (. .))", "S"),
    # OntoNotes HYPH, NML, AFX are kept.
    ("( (NP (DT an) (NML (VB knock) (HYPH -) (RP in)) (NN allele) (PP (IN of) (NP (AFX pre)"
     " (HYPH -) (NN mRNA)))) )",
     "(NP (DT an) (NML (VB knock) (HYPH -) (RP in)) (NN allele) (PP (IN of) (NP (AFX pre)"
     " (HYPH -) (NN mRNA))))", "NP"),
    # TITLE over one phrase: unwrapped.
    ("( (TITLE (FRAG (NP (NN Intraocular) (NN pressure)) (: :) (NP (DT an) (NN update)))) )",
     "(FRAG (NP (NN Intraocular) (NN pressure)) (: :) (NP (DT an) (NN update)))", "TITLE"),
    # HEADING: unwrapped.
    ("( (HEADING (NP (NNS Results))) )", "(NP (NNS Results))", "HEADING"),
    # CAPTION over a sentence with a function-tagged root child.
    ("( (CAPTION (S-IMP (NP-SBJ (-NONE- *PRO*)) (VP (VB See) (NP (NN text))) (. .))) )",
     "(S (VP (VB See) (NP (NN text))) (. .))", "CAPTION"),
    # CIT over bare tagged words: several pieces -> TOP (deleted by COLLINS.prm).
    ("( (CIT (-LRB- -LRB-) (NNP Ludwig) (FW et) (FW al.) (CD 1992) (-RRB- -RRB-) (. .)) )",
     "(TOP (-LRB- -LRB-) (NNP Ludwig) (FW et) (FW al.) (CD 1992) (-RRB- -RRB-) (. .))", "CIT"),
    # A thin space (U+2009) and a hair space (U+200A) inside words are deleted.
    ("( (NP (NN Xpd\u200aTTD) (HYPH /) (NN Bmp7\u2009)) )",
     "(NP (NN XpdTTD) (HYPH /) (NN Bmp7))", "NP"),
]


def test_craft_lines_normalised():
  for raw, want, root in CRAFT_LINES:
    tree = treebank.parse_tree(raw)
    assert treebank.normalize_tree(tree).to_string() == want, raw
    assert treebank.root_label(tree) == root, raw
  assert [treebank.is_sentence_root(r) for _, _, r in CRAFT_LINES] == [
      True, True, True, False, False, False, False, True]
  # A wrapper over several children has root TOP.
  assert treebank.root_label(treebank.parse_tree("( (NP (NN a)) (. .) )")) == "TOP"


def _write_craft_dir(root: Path) -> None:
  (root / "train").mkdir(parents=True)
  (root / "dev").mkdir()
  # Trees 0-3 in b.tree, 4-7 in a.tree (files are read in name order: a, then b).
  (root / "train" / "b.tree").write_text(
      "\n".join(raw for raw, _, _ in CRAFT_LINES[:4]) + "\n", encoding="utf-8")
  (root / "train" / "a.tree").write_text(
      "\n".join(raw for raw, _, _ in CRAFT_LINES[4:]) + "\n\n", encoding="utf-8")
  (root / "dev" / "c.tree").write_text(CRAFT_LINES[4][0] + "\n" + CRAFT_LINES[0][0] + "\n",
                                       encoding="utf-8")
  (root / "dev" / "notes.txt").write_text("not a tree file", encoding="utf-8")


def test_craft_directory_dataset(tmp_path):
  raw = tmp_path / "craft"
  _write_craft_dir(raw)
  files = treebank.split_files(str(raw), "directory")
  assert {k: [os.path.basename(p) for p in v] for k, v in files.items()} == {
      "train": ["a.tree", "b.tree"], "validation": ["c.tree"]}
  cfg = DataConfig(dataset="craft_treebank", raw_data_dir=str(raw), task="parsing")
  data_dir = str(tmp_path / "tfds")
  train = treebank.get_parsing_split(cfg, "train", data_dir)
  order = CRAFT_LINES[4:] + CRAFT_LINES[:4]
  assert [ex["tree"] for ex in train] == [want for _, want, _ in order]
  assert [ex["root"] for ex in train] == [root for _, _, root in order]
  assert [ex["file"] for ex in train] == ["a"] * 4 + ["b"] * 4
  assert train[3]["source"] == "XpdTTD / Bmp7"
  assert train[3]["target"] == "(NP XX XX XX )NP"
  assert train[1]["target"] == "(S (VP XX (NP XX )NP )VP XX )S"
  dev = treebank.get_parsing_split(cfg, "dev", data_dir)
  assert [(ex["root"], ex["tree"]) for ex in dev] == [
      ("HEADING", "(NP (NNS Results))"), ("S", CRAFT_LINES[0][1])]
  assert glob.glob(f"{data_dir}/craft_treebank/directory.*/1.1.0/dataset_info.json")
  with pytest.raises(datasets.DataError, match="no split 'test'"):
    treebank.get_parsing_split(cfg, "test", data_dir)
  # A split given as a directory path is read directly, in file order, optionally sliced.
  direct = treebank.get_parsing_split(cfg, str(raw / "train"), "")
  assert [ex["tree"] for ex in direct] == [ex["tree"] for ex in train]
  assert [ex["id"] for ex in direct] == list(range(8))
  part = treebank.get_parsing_split(cfg, str(raw / "train") + "[2:4]", data_dir)
  assert [(ex["id"], ex["root"]) for ex in part] == [(0, "CIT"), (1, "NP")]
  # The CRAFT train directory as extra training trees of another treebank.
  extra = DataConfig(dataset="craft_treebank", raw_data_dir=str(raw),
                     parsing_extra_train=os.path.join("train"))
  assert [os.path.basename(p) for p in treebank._extra_train_files(extra)] == [
      "a.tree", "b.tree"]
  extended = treebank.get_parsing_split(extra, "train", data_dir)
  assert [ex["tree"] for ex in extended] == [ex["tree"] for ex in train] * 2
  assert [ex["file"] for ex in extended][8:] == [""] * 8


def test_craft_directory_errors(tmp_path):
  raw = tmp_path / "craft"
  (raw / "train").mkdir(parents=True)
  (raw / "dev").mkdir()
  # An empty split directory.
  with pytest.raises(FileNotFoundError, match=r"no tree files .* in .*craft/train"):
    treebank.split_files(str(raw), "directory")
  (raw / "train" / "a.tree").write_text(CRAFT_LINES[0][0] + "\n", encoding="utf-8")
  with pytest.raises(FileNotFoundError, match=r"craft/dev"):
    treebank.split_files(str(raw), "directory")
  os.rmdir(raw / "dev")
  with pytest.raises(FileNotFoundError, match=r"no dev or validation directory"):
    treebank.split_files(str(raw), "directory")
  with pytest.raises(FileNotFoundError, match="treebank directory not found: .*nothing_here"):
    treebank.read_directory_split(str(raw / "nothing_here"))
  # A malformed tree on line 3 (one ')' missing): the error names the file and the line.
  (raw / "dev").mkdir()
  bad = raw / "dev" / "17194222.tree"
  bad.write_text(CRAFT_LINES[1][0] + "\n" + CRAFT_LINES[4][0] + "\n"
                 + "( (S (NP (NN a)) (VP (VBZ is)) )\n", encoding="utf-8")
  where = re.escape(f"{bad}:3: unbalanced '('")
  cfg = DataConfig(dataset="craft_treebank", raw_data_dir=str(raw), task="parsing")
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(treebank.TreeError, match=where):
    treebank.get_parsing_split(cfg, "dev", data_dir)
  with pytest.raises(treebank.TreeError, match=where):
    treebank.read_directory_split(str(raw / "dev"))
  # Two trees on one line, and a ')' too many.
  bad.write_text(CRAFT_LINES[4][0] + " " + CRAFT_LINES[4][0] + "\n", encoding="utf-8")
  with pytest.raises(treebank.TreeError, match=re.escape(f"{bad}:1: expected one tree") + ".*2"):
    treebank.read_mrg_file(str(bad))
  bad.write_text("\n( (NP (NN a))) )\n", encoding="utf-8")
  with pytest.raises(treebank.TreeError, match=re.escape(f"{bad}:2: unbalanced ')'")):
    treebank.read_mrg_file(str(bad))
  # Nothing half-made: with the file fixed, the dataset prepares from scratch.
  bad.write_text(CRAFT_LINES[4][0] + "\n", encoding="utf-8")
  assert [ex["tree"] for ex in treebank.get_parsing_split(cfg, "dev", data_dir)] == [
      "(NP (NNS Results))"]


def test_craft_shared_dev_split():
  """The shared CRAFT dev articles: tree and root counts against a raw-text count."""
  dev_dir = (Path(os.environ.get("TRANSFORMER_DATA_DIR", _DEFAULT_DATA_DIR))
             / "craft_treebank" / "dev")
  if not dev_dir.is_dir():
    pytest.fail(f"{dev_dir} not found: set TRANSFORMER_DATA_DIR to the shared data directory")
  want_roots: dict[str, int] = {}
  n_lines = 0
  for path in sorted(dev_dir.glob("*.tree")):
    for line in path.read_text(encoding="utf-8").split("\n"):
      if line.strip():
        n_lines += 1
        label = re.match(r"\(\s*\(([^\s()]+)", line).group(1)
        label = re.split(r"[-=]", label)[0]
        want_roots[label] = want_roots.get(label, 0) + 1
  assert n_lines == 2780  # PROVENANCE.md
  split = treebank.read_directory_split(str(dev_dir))
  assert len(split) == 2780
  got: dict[str, int] = {}
  for ex in split:
    got[ex["root"]] = got.get(ex["root"], 0) + 1
    assert len(ex["source"].split()) == ex["target"].split().count("XX")
    assert "-NONE-" not in ex["tree"] and "\u200a" not in ex["source"]
  assert got == want_roots
  assert sum(n for r, n in got.items() if treebank.is_sentence_root(r)) == 2780 - (
      want_roots["CAPTION"] + want_roots["HEADING"] + want_roots["TITLE"])
