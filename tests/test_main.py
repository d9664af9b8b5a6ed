"""End to end: `python -m transformer.main` trains, averages, evaluates and translates."""

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Eight pairs to memorise; the vocabulary is their words (SentencePiece word model).
PAIRS = [("a man rides a bike .", "ein mann fährt ein fahrrad ."),
         ("two dogs run in the park .", "zwei hunde rennen im park ."),
         ("a woman reads a book .", "eine frau liest ein buch ."),
         ("the child plays with a ball .", "das kind spielt mit einem ball ."),
         ("a man reads in the park .", "ein mann liest im park ."),
         ("two women ride a bike .", "zwei frauen fahren ein fahrrad ."),
         ("the dog plays .", "der hund spielt ."),
         ("a child runs with two dogs .", "ein kind rennt mit zwei hunden .")]


def _memorise_main(workdir, data, *args, stdin=None):
  cmd = [sys.executable, "-m", "transformer.main", "--flagfile=experiments/paper/recipe.flags",
         f"--workdir={workdir}", "--dataset=parallel_text", "--source_lang=en",
         "--target_lang=de", f"--parallel_text_splits=train={data},validation={data},test={data}",
         "--spm_model_type=word", "--vocab_size=64", "--num_encoder_layers=1",
         "--num_decoder_layers=1", "--d_model=32", "--d_ff=64", "--num_heads=2", "--max_len=24",
         "--dropout_rate=0", "--tokens_per_batch=128", "--bucket_boundaries=16",
         "--warmup_steps=30", "--learning_rate_scale=2", "--label_smoothing=0", "--log_every_steps=50",
         "--eval_every_steps=125", "--eval_bleu_sentences=8", "--checkpoint_every_steps=10",
         "--max_decode_len_offset=4", "--mesh=data:1", *args]
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one device
  return subprocess.run(cmd, cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                        timeout=600)


def test_train_average_evaluate_translate(tmp_path):
  """Eight pairs memorised by a tiny model: the known answer bounds every mode's output.
  Training resumes where it stopped, the average of its last 3 checkpoints scores sacreBLEU
  > 95 on the pairs, and translate reproduces every target; a line longer than --max_len is
  cut with a warning naming it while the other lines are translated; no input, no output."""
  data = tmp_path / "pairs"
  (tmp_path / "pairs.en").write_text("".join(en + "\n" for en, _ in PAIRS), encoding="utf-8")
  (tmp_path / "pairs.de").write_text("".join(de + "\n" for _, de in PAIRS), encoding="utf-8")
  workdir = tmp_path / "run"
  r = _memorise_main(workdir, data, "--mode=train", "--num_train_steps=250")
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r"step 200 \| loss [\d.]+ \| nll [\d.]+ \| lr [\d.e-]+ \| \d+ tgt tok/s",
                   r.stderr)
  assert "eval step 250 | validation" in r.stderr
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [x for x in records if x["kind"] == "train"]
  assert [x["step"] for x in train] == [50, 100, 150, 200, 250]
  assert train[-1]["nll"] < 0.1 < train[0]["nll"], train  # memorised
  assert [x["bleu"] for x in records if x["kind"] == "eval"][-1] > 95
  assert os.listdir(workdir / "tensorboard")

  # Resume: the same command with more steps continues from step 250.
  r = _memorise_main(workdir, data, "--mode=train", "--num_train_steps=270")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 250" in r.stderr
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())[-1] == 270

  # The memorised model reads its source; the fresh one (step 0) barely does.
  r = _memorise_main(workdir, data, "--mode=diagnose")
  assert r.returncode == 0, r.stderr[-3000:]
  gains = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
      r"step (\d+): dev nll [\d.]+, with shuffled sources [\d.]+ \(source gain (-?[\d.]+)",
      r.stdout)}
  assert gains[270] > 2.0 and abs(gains[0]) < 0.5, r.stdout
  diag = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
          if json.loads(l)["kind"] == "diagnose"]
  assert [x["step"] for x in diag] == sorted(gains) and "grad_norm/encoder/layer_0" in diag[-1]

  r = _memorise_main(workdir, data, "--mode=average", "--num_average=3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "averaged 3 checkpoints (steps 250..270)" in r.stdout

  r = _memorise_main(workdir, data, "--mode=evaluate", "--checkpoint=averaged")
  assert r.returncode == 0, r.stderr[-3000:]
  m = re.search(r"BLEU en->de test \(averaged step 270, beam 4, alpha 0.6\): sacreBLEU "
                r"([\d.]+) \[nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:2.6.0\] "
                r"\| tokenized\+compound-split ([\d.]+) \| tokenized lowercased ([\d.]+)", r.stdout)
  assert m, r.stdout
  assert all(float(x) > 95 for x in m.groups()), m.groups()
  hyps = (workdir / "test.averaged.hyp").read_text(encoding="utf-8").splitlines()
  assert hyps == [de for _, de in PAIRS]
  assert "perplexity (test):" in r.stdout

  long_line = " ".join(["a man rides a bike ."] * 5)  # 30 words: more than --max_len=24
  lines = [PAIRS[1][0], long_line, PAIRS[2][0]]
  r = _memorise_main(workdir, data, "--mode=translate", stdin="".join(l + "\n" for l in lines))
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout.splitlines()
  assert len(out) == 3 and out[0] == PAIRS[1][1] and out[2] == PAIRS[2][1], out
  assert ("line 2: 31 source tokens (with EOS), more than --max_len=24; translating its first"
          " 23 tokens only") in r.stderr, r.stderr[-2000:]
  r = _memorise_main(workdir, data, "--mode=translate", stdin="")
  assert r.returncode == 0 and r.stdout == "", r.stderr[-2000:]


def test_parsing_train_evaluate_with_tree_constraints(tmp_path):
  """--task=parsing through the CPU flag file: trains, then a constrained beam search gives
  one well-formed tree per dev sentence over exactly its words (no repairs)."""
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from transformer.data.treebank import parse_tree  # pylint: disable=g-import-not-at-top
  data = Path(os.environ.get("TRANSFORMER_DATA_DIR", Path(REPO).parent / "shared" / "data"))
  trees = data / "ptb_wsj_sample_nltk" / "combined"
  assert (trees / "wsj_0001.mrg").exists(), f"{trees} not found: set TRANSFORMER_DATA_DIR"
  workdir = tmp_path / "parse"
  common = ["--flagfile=experiments/cpu/parsing_wsj_sample.flags", f"--workdir={workdir}",
            f"--raw_data_dir={trees}", "--train_split=train[:400]", "--eval_split=validation[:8]",
            "--test_split=validation[:8]", "--vocab_size=600", "--d_model=32", "--d_ff=64",
            "--num_heads=2", "--d_k=16", "--d_v=16", "--tokens_per_batch=1024",
            "--warmup_steps=10", "--log_every_steps=5", "--eval_every_steps=10",
            "--checkpoint_every_steps=10", "--beam_size=2", "--max_decode_len_offset=60",
            "--bucket_boundaries=64,192"]  # two shapes: few compilations
  env = dict(os.environ, PYTHONPATH=REPO)

  def main(*args):
    r = subprocess.run([sys.executable, "-m", "transformer.main", *common, *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

  # Periodic dev F1 (greedy, constrained) on 4 trees spread over the 8, in metrics.jsonl.
  main("--mode=train", "--num_train_steps=10", "--eval_bleu_sentences=4", "--eval_beam_size=1")
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [x for x in records if x["kind"] == "eval"]
  assert [x["step"] for x in evals] == [10]
  assert 0 <= evals[0]["f1"] <= 100 and evals[0]["repaired"] == 0
  assert evals[0]["sentence_f1"] == evals[0]["f1"]  # WSJ: every tree is a sentence
  r = main("--mode=evaluate", "--checkpoint=latest")
  m = re.search(r"F1 validation\[:8\] \(latest step 10, beam 2, alpha 0.3\): ([\d.]+) "
                r"\(P [\d.]+ R [\d.]+; exact match [\d.]+; repaired (\d+)/8; EVALB COLLINS.prm\)",
                r.stdout)
  assert m and m.group(2) == "0", r.stdout
  gold = (workdir / "validation_8.gold.trees").read_text(encoding="utf-8").splitlines()
  test = (workdir / "validation_8.latest.trees").read_text(encoding="utf-8").splitlines()
  assert len(gold) == len(test) == 8
  for g, t in zip(gold, test):
    assert parse_tree(t).leaves() == parse_tree(g).leaves()
  assert re.search(r"F1 validation\[:8\], sentence trees only \(8 of 8; no TITLE/HEADING/CAPTION/CIT"
                   r" root\): [\d.]+ ", r.stdout), r.stdout
  # Any directory of CRAFT-format trees (one per line) is parsed and scored as a split.
  craft = tmp_path / "craft_dev"
  craft.mkdir()
  (craft / "1.tree").write_text(
      "( (HEADING (NP (NNS Results))) )\n"
      "( (S (NP-SBJ-1 (NNS Mice)) (VP (VBD were) (VP (VBN analyzed) (NP-1 (-NONE- *))))"
      " (. .)) )\n", encoding="utf-8")
  r = main("--mode=evaluate", "--checkpoint=latest", f"--test_split={craft}")
  assert re.search(r"repaired 0/2; EVALB COLLINS.prm\)", r.stdout), r.stdout
  assert re.search(r"sentence trees only \(1 of 2;", r.stdout), r.stdout
  [gold] = workdir.glob("*craft_dev.gold.trees")
  assert gold.read_text(encoding="utf-8").splitlines() == [
      "(NP (NNS Results))", "(S (NP (NNS Mice)) (VP (VBD were) (VP (VBN analyzed))) (. .))"]
  from transformer import run  # pylint: disable=g-import-not-at-top
  assert os.path.exists(run.plot(str(workdir)))  # draws the periodic F1 of metrics.jsonl


def test_prepare_the_paper_config_offline_then_nothing_to_do(tmp_path):
  """--mode=prepare with the paper's En-De flag file, against fake WMT14 archives on 127.0.0.1.

  It prepares the three splits without TensorFlow, trains the vocabulary, writes a tokenized
  store per split and says where; a second run finds everything and does nothing.
  """
  cmd = [sys.executable, "-m", "tests.wmt_fakes", "--lines=12", "--check_tf", "--",
         "--mode=prepare", "--flagfile=experiments/paper/base_en_de.flags",
         f"--workdir={tmp_path / 'work'}", f"--tfds_data_dir={tmp_path / 'tfds'}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  # The pairs the fake archives hold (empty sides are dropped by TFDS's WMT reader).
  from tests import wmt_fakes  # pylint: disable=g-import-not-at-top
  n = {split: len(wmt_fakes.make_fakes(12).expected[("de-en", split)])
       for split in ("train", "validation", "test")}
  assert re.search(rf"^tfds: .* \(now\): train {n['train']}, validation {n['validation']},"
                   rf" test {n['test']} examples", first.stdout, re.M), first.stdout
  assert re.search(r"^vocabulary: .*spm\.model \(trained now\)", first.stdout, re.M)
  for split, rows in n.items():
    match = re.search(rf"^tokenized {split}: (\S+) \(now\): {rows} rows", first.stdout, re.M)
    assert match, first.stdout
    assert os.path.isfile(os.path.join(match[1], "COMPLETE"))
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "prepare: nothing to do, everything was already prepared" in second.stdout
  assert "(now)" not in second.stdout and "Downloading" not in second.stdout + second.stderr


def test_prepare_parsing_datasets(tmp_path):
  """--mode=prepare on the parsing datasets: CRAFT (a tree directory made here) and the WSJ
  sample each get their TFDS splits, vocabulary and one tokenized store per split."""
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  data = Path(os.environ.get("TRANSFORMER_DATA_DIR", Path(REPO).parent / "shared" / "data"))
  wsj = data / "ptb_wsj_sample_nltk" / "combined"
  assert (wsj / "wsj_0001.mrg").exists(), f"{wsj} not found: set TRANSFORMER_DATA_DIR"
  craft = tmp_path / "craft"
  (craft / "train").mkdir(parents=True)
  (craft / "dev").mkdir()
  (craft / "train" / "a.tree").write_text(
      "( (S (NP-SBJ (NNS Mice)) (VP (VBD were) (VP (VBN analyzed))) (. .)) )\n"
      "( (HEADING (NP (NNS Results))) )\n"
      "( (S (NP-SBJ (NNS Cells)) (VP (VBD grew)) (. .)) )\n", encoding="utf-8")
  (craft / "dev" / "b.tree").write_text("( (S (NP-SBJ (NNS Rats)) (VP (VBD ran)) (. .)) )\n",
                                        encoding="utf-8")
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  cases = [("craft_treebank", craft, "train", "validation", {"train": 3, "validation": 1}),
           ("ptb_wsj_sample", wsj, "train[:50]", "validation[:5]",
            {"train[:50]": 50, "validation[:5]": 5})]
  for dataset, raw, train, dev, rows in cases:
    cmd = [sys.executable, "-m", "transformer.main", "--mode=prepare", "--task=parsing",
           f"--dataset={dataset}", f"--raw_data_dir={raw}", "--source_lang=en",
           "--target_lang=parse", f"--train_split={train}", f"--eval_split={dev}",
           f"--test_split={dev}", "--vocab_size=40", "--spm_model_type=word",
           f"--workdir={tmp_path / dataset}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^tfds: .* \(now\): ", r.stdout, re.M), r.stdout
    for split, n in rows.items():
      m = re.search(rf"^tokenized {re.escape(split)}: (\S+) \(now\): {n} rows", r.stdout, re.M)
      assert m, r.stdout
      assert os.path.isfile(os.path.join(m[1], "COMPLETE"))


_FAIL_UNDER_A_PROGRESS_BAR = r"""
import sys
import tqdm
from transformer import main, run

def prepare(cfg, workdir):
  bar = tqdm.tqdm(total=4, desc="Generating train examples...", mininterval=0)
  bar.update(1)  # drawn, ending with '\r', and never closed
  raise run.datasets.DataError("preparing it failed: boom")

run.prepare = prepare
sys.argv = ["transformer.main", "--mode=prepare", "--workdir=" + sys.argv[1]]
main.run_main()
"""


def test_error_line_starts_its_own_line_after_a_progress_bar(tmp_path):
  """`grep '^error:'` finds the error even when it follows a half-drawn progress bar."""
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-c", _FAIL_UNDER_A_PROGRESS_BAR, str(tmp_path / "w")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Generating train examples..." in r.stderr
  lines = r.stderr.split("\n")  # a log file's lines: '\r' does not end one
  assert [l for l in lines if l.startswith("error:")] == ["error: preparing it failed: boom"], lines
