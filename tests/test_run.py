"""Workflow error paths and input limits of transformer/run.py, in process (no subprocess)."""

import dataclasses
import functools
import json
import logging as std_logging
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from transformer import checkpoints, config as config_lib, decode, run, sharding
from transformer.config import EOS_ID, ModelConfig, TrainConfig
from transformer.data import pipeline
from transformer.decode import BeamSearcher
from transformer.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CFG = ModelConfig(vocab_size=40, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                  num_decoder_layers=1)


class _Vocab:
  """Stands in for the Tokenizer in `_check_same_model`: a path and a fingerprint."""
  path = "/w/spm.model"

  def fingerprint(self):
    return "a" * 64


def _setup(workdir):
  cfg = config_lib.Config(model=CFG, train=TrainConfig(warmup_steps=5))
  trainer = Trainer(CFG, cfg.train, sharding.make_mesh("data:1", jax.devices()[:1]))
  return types.SimpleNamespace(cfg=cfg, workdir=str(workdir), model_cfg=CFG, trainer=trainer,
                               tokenizer=_Vocab())


def _saved(setup, sha):
  d = {"model": dataclasses.asdict(setup.model_cfg),
       "vocabulary": {"requested_size": setup.cfg.model.vocab_size, "size": 40, "sha256": sha}}
  return d


def test_checkpoint_flag_names_a_saved_step(tmp_path):
  s = _setup(tmp_path)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  ckpt.save(3, s.trainer.init_state(0), {}, _saved(s, "a" * 64))
  ckpt.close()
  params, step = run._restore_params(s, "3")
  assert step == 3 and jax.tree.leaves(params)
  with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint for step 7 in .* have \[3\]"):
    run._restore_params(s, "7")
  with pytest.raises(config_lib.ConfigError,
                     match="--checkpoint must be latest, averaged or a step, got 'last'"):
    run._restore_params(s, "last")
  with pytest.raises(checkpoints.CheckpointError, match="and run --mode=average"):
    run._restore_params(s, "averaged")
  for error in (checkpoints.CheckpointError, config_lib.ConfigError):
    assert issubclass(error, run.USER_ERRORS)  # main prints one 'error:' line


def test_attention_needs_a_sentence(tmp_path):
  for sentence in ("", "   "):
    with pytest.raises(config_lib.ConfigError, match="--sentence is required"):
      run.attention(config_lib.Config(), str(tmp_path), sentence)
  assert not list(tmp_path.iterdir())


class _WordIds:
  def encode(self, text):
    return [4 + len(w) for w in text.split()]


def test_fit_max_len_cuts_only_long_sources_and_names_them(caplog):
  """Lines of 3, 7 and 2 words (+ EOS) with max_len 5: the second becomes its first 4 ids +
  EOS (a warning names line 2); the others are untouched, in order."""
  lines = ["a bb ccc", "a bb ccc dddd eeeee ffffff ggggggg", "x yy"]
  tokenized = pipeline.tokenize_split([{"source": l, "target": "", "id": i}
                                       for i, l in enumerate(lines)], _WordIds())
  with caplog.at_level(std_logging.WARNING):
    out = run.fit_max_len(tokenized, 5)
  assert [out.source(i).tolist() for i in range(3)] == [
      [5, 6, 7, EOS_ID], [5, 6, 7, 8, EOS_ID], [5, 6, EOS_ID]]
  assert out.index.tolist() == [0, 1, 2] and out.ids.tolist() == [0, 1, 2]
  assert [out.target(i).tolist() for i in range(3)] == [[EOS_ID]] * 3
  warnings = [r.getMessage() for r in caplog.records if r.levelno == std_logging.WARNING]
  assert warnings == ["line 2: 8 source tokens (with EOS), more than --max_len=5; translating"
                      " its first 4 tokens only"]
  assert run.fit_max_len(tokenized, 8) is tokenized  # nothing to cut


def test_directories_as_input_or_output_fail_before_any_work(tmp_path):
  """Checked before the vocabulary or a checkpoint is even looked for (the workdir is empty)."""
  workdir = tmp_path / "empty"
  workdir.mkdir()
  (tmp_path / "in.txt").write_text("a\n")
  with pytest.raises(config_lib.ConfigError, match=f"--input {tmp_path} is a directory"):
    run.translate(config_lib.Config(), str(workdir), input_path=str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=f"--output {tmp_path} is a directory"):
    run.translate(config_lib.Config(), str(workdir), input_path=str(tmp_path / "in.txt"),
                  output_path=str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=f"--output {tmp_path} is a directory"):
    run.evaluate(config_lib.Config(), str(workdir), output=str(tmp_path))
  assert not list(workdir.iterdir())


class _Records:
  """Stands in for the MetricsWriter: keeps the records."""

  def __init__(self):
    self.records = []

  def write(self, step, kind, metrics):
    self.records.append((step, kind, dict(metrics)))


def test_train_log_averages_the_window_and_skips_non_finite_steps(caplog):
  """Two micro-batches per step; the window of steps 1-2 holds 4 micro-batches, one of them
  (step 2's first) non-finite: it is skipped and counted, the others are summed by hand."""
  tcfg = TrainConfig(grad_accum_steps=2, nonfinite="skip", num_train_steps=10)
  s = types.SimpleNamespace(cfg=config_lib.Config(train=tcfg),
                            trainer=types.SimpleNamespace(schedule=lambda step: 0.5 * step))
  writer = _Records()
  log = run._TrainLog(s, writer)  # pylint: disable=protected-access
  micro = [(True, 4.0, 3.0, 2.0, 5.0), (True, 6.0, 5.0, 3.0, 1.0),
           (False, float("nan"), float("nan"), 7.0, 7.0), (True, 2.0, 1.0, 1.0, 2.0)]
  for finite, loss, nll, tokens, source in micro:
    log.add({"finite": np.bool_(finite), "loss_sum": np.float32(loss), "nll_sum": np.float32(nll),
             "tokens": np.float32(tokens), "source_tokens": np.float32(source)})
  with caplog.at_level(std_logging.WARNING):
    log.flush(2)
  assert [r.getMessage() for r in caplog.records] == [
      "step 2: non-finite loss/gradient, update skipped (1 so far)"]
  line = log.write(2, {"grad_norm": np.float32(1.5)})
  assert line["loss"] == pytest.approx((4 + 6 + 2) / (2 + 3 + 1))
  assert line["nll"] == pytest.approx((3 + 5 + 1) / (2 + 3 + 1))
  assert line["tokens_per_step"] == pytest.approx((6 + 8) / 1.5)  # 3 micro-batches = 1.5 steps
  assert line["lr"] == 0.5 and line["grad_norm"] == 1.5 and line["skipped_steps"] == 1
  assert writer.records == [(2, "train", line)]
  # A new window starts empty.
  log.add({"finite": np.bool_(True), "loss_sum": np.float32(1.0), "nll_sum": np.float32(1.0),
           "tokens": np.float32(4.0), "source_tokens": np.float32(0.0)})
  log.flush(3)
  assert log.write(3, {"grad_norm": np.float32(0.0)})["loss"] == pytest.approx(0.25)


# Runs transformer.main in process once per row of argv lists (one interpreter for the whole
# table); prints 'JSON [[exit code or "traceback", stderr], ...]'.
_MAIN_PER_ROW = r"""
import io, json, sys, traceback
from absl import flags
from transformer import main
results = []
for argv in json.loads(sys.argv[1]):
  err = sys.stderr = io.StringIO()
  try:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    main.main([argv[0]])
    code = 0
  except SystemExit as e:
    code = e.code
  except BaseException:  # what the test looks for: an exception that reached the user
    traceback.print_exc(file=err)
    code = "traceback"
  finally:
    sys.stderr = sys.__stderr__
  results.append([code, err.getvalue()])
print("JSON " + json.dumps(results))
"""

# The path flags each mode reads or writes: (flag, whether it names a directory).
_PATH_FLAGS = {"--workdir": True, "--tfds_data_dir": True, "--raw_data_dir": True,
               "--vocab_path": False, "--evalb_params": False}
_MODE_PATH_FLAGS = {
    "prepare": {}, "train": {}, "average": {},
    "evaluate": {"--output": False},
    "translate": {"--input": False, "--output": False},
    "plot": {"--output": False},
    "attention": {"--output": True},
}


def test_every_path_flag_of_every_mode_of_the_wrong_kind_is_one_error_line(tmp_path):
  """Path audit: each path flag of each mode given a file where a directory belongs, a
  directory where a file belongs, or a path under a file (its parent cannot be made): one
  `error:` line naming the flag, exit 2, no traceback, nothing created."""
  a_file, a_dir = tmp_path / "a_file", tmp_path / "a_dir"
  a_file.write_text("x\n")
  a_dir.mkdir()
  (tmp_path / "pairs.en").write_text("a b\n")
  (tmp_path / "pairs.de").write_text("c d\n")
  prefix = tmp_path / "pairs"
  base = ["--dataset=parallel_text", "--source_lang=en", "--target_lang=de",
          f"--parallel_text_splits=train={prefix},validation={prefix},test={prefix}",
          "--vocab_size=8", "--spm_model_type=word", "--num_train_steps=1", "--d_model=8",
          "--d_ff=8", "--num_heads=1", "--num_encoder_layers=1", "--num_decoder_layers=1",
          "--sentence=a b", f"--input={prefix}.en"]
  rows, argvs = [], []
  for mode, extra in _MODE_PATH_FLAGS.items():
    for flag, is_dir in {**_PATH_FLAGS, **extra}.items():
      for kind, value in (("wrong kind", a_file if is_dir else a_dir),
                          ("parent is a file", a_file / "sub" / "x")):
        args = {"--workdir": str(tmp_path / "work")}
        args[flag] = str(value)
        rows.append((mode, flag, kind))
        argvs.append(["transformer.main", f"--mode={mode}", *base,
                      *(f"{k}={v}" for k, v in args.items())])
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-c", _MAIN_PER_ROW, json.dumps(argvs)], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads([l for l in r.stdout.splitlines() if l.startswith("JSON ")][-1][5:])
  assert len(results) == len(rows) == 80  # 7 modes x 5 flags + 5 mode flags, x 2
  bad = []
  for (mode, flag, kind), (code, stderr) in zip(rows, results):
    errors = [l for l in stderr.split("\n") if l.startswith("error:")]
    ok = (code == 2 and "Traceback" not in stderr and len(errors) == 1
          and re.match(rf"error: {flag}[: ]", errors[0]))
    if not ok:
      bad.append(f"{mode} {flag} {kind}: {code} {stderr[-300:]!r}")
  assert not bad, "\n".join(bad)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "a_dir", "a_file", "pairs.de", "pairs.en"]  # no workdir, nothing prepared
  assert not list(a_dir.iterdir())

# ----------------------------------------------------------------------------
# A tiny trained workdir: decoding flags reach the search, resume past the end, SIGTERM
# ----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--flagfile=experiments/cpu/multi30k_en_de.flags", "--train_split=train[:1500]",
        "--eval_split=validation[:16]", "--test_split=test[:8]", "--vocab_size=300",
        "--num_encoder_layers=1", "--num_decoder_layers=1", "--d_model=32", "--d_ff=64",
        "--num_heads=2", "--d_k=16", "--d_v=16", "--tokens_per_batch=512",
        "--bucket_boundaries=32,64,128", "--warmup_steps=4", "--log_every_steps=1000",
        "--eval_every_steps=1000", "--eval_bleu_sentences=0", "--checkpoint_every_steps=1000"]
SOURCES = ["A man is riding a bike.", "Two dogs play in the snow.", "A girl in a red dress.",
           "People are walking down the street near a market."]


def _cfg(data_dir, *args):
  return config_lib.from_args([*TINY, f"--raw_data_dir={data_dir}", *args], cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, multi30k_dir):
  """A workdir trained for 12 steps (checkpoint 12): enough for hypotheses that end on
  their own, so that the decoding flags change them."""
  workdir = str(tmp_path_factory.mktemp("tiny") / "run")
  run.train(_cfg(multi30k_dir, "--num_train_steps=12"), workdir)
  return workdir


@pytest.fixture(scope="module")
def restored(trained, multi30k_dir):
  """(Setup, parameters) of the trained workdir's latest checkpoint."""
  s = run.setup(_cfg(multi30k_dir), trained, train_vocab=False)
  return s, run._restore_params(s, "latest")[0]  # pylint: disable=protected-access


def _direct_hyps(restored, cfg, sources=SOURCES, params=None, **search):
  """Best hypothesis of each source (a string, or token ids with EOS) from one direct
  `decode.beam_search` call with the decoding values of `cfg`, overridden by `search`
  (sources padded to 32 tokens, or 64 if one is longer)."""
  s, restored_params = restored
  search = {"beam_size": cfg.decode.beam_size, "alpha": cfg.decode.alpha,
            "max_decode_len_offset": cfg.decode.max_decode_len_offset, **search}
  ids = [s.tokenizer.encode(x) + [EOS_ID] if isinstance(x, str) else list(x) for x in sources]
  inputs = np.zeros((len(ids), 32 if max(map(len, ids)) <= 32 else 64), np.int32)
  for row, x in zip(inputs, ids):
    row[:len(x)] = x
  seqs, _ = jax.jit(functools.partial(decode.beam_search, model_cfg=s.model_cfg, **search))(
      restored_params if params is None else params, inputs)
  return [s.tokenizer.decode(seq.tolist()) for seq in np.asarray(seqs)[:, 0]]


def _translate(cfg, workdir, tmp_path, name):
  src, out = tmp_path / f"{name}.src", tmp_path / f"{name}.hyp"
  src.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
  run.translate(cfg, workdir, input_path=str(src), output_path=str(out))
  return out.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("flag,values,other", [
    ("alpha", (0.0, 3.0), ()), ("beam_size", (1, 4), ()),
    ("max_decode_len_offset", (2, 30), ("--alpha=3.0",))])  # alpha 3: long hypotheses win
def test_decoding_flags_reach_the_search(trained, restored, multi30k_dir, tmp_path, flag,
                                         values, other):
  """Two translations that differ only in --FLAG give, each, the hypotheses of a direct
  beam_search with that value; the two values give different hypotheses (else the flag
  could be dropped unnoticed)."""
  direct = {}
  for v in values:
    cfg = _cfg(multi30k_dir, f"--{flag}={v}", *other)
    direct[v] = _direct_hyps(restored, cfg, **{flag: v})
    assert _translate(cfg, trained, tmp_path, f"{flag}{v}") == direct[v], (flag, v)
  assert direct[values[0]] != direct[values[1]]


class _RecordedSearcher(BeamSearcher):
  """The BeamSearcher, keeping every instance built."""
  built: list = []

  def __post_init__(self):
    super().__post_init__()
    self.built.append(self)


def test_cache_segment_reaches_the_search(trained, restored, multi30k_dir, tmp_path,
                                          monkeypatch):
  """--cache_segment changes how the search runs, not what it finds. Lowered for sources
  padded to 24 tokens with --max_decode_len_offset=30 (54 positions), the search that
  translate built runs one while loop without it and four with --cache_segment=8 (cache
  widths 8, 16, 32 and 54); the hypotheses are the same."""
  monkeypatch.setattr(_RecordedSearcher, "built", [])
  monkeypatch.setattr(run, "BeamSearcher", _RecordedSearcher)
  hyps = {}
  for segment in (0, 8):
    cfg = _cfg(multi30k_dir, f"--cache_segment={segment}", "--max_decode_len_offset=30")
    hyps[segment] = _translate(cfg, trained, tmp_path, f"seg{segment}")
  assert hyps[0] == hyps[8] == _direct_hyps(restored, cfg, cache_segment=8)
  assert len(_RecordedSearcher.built) == 2
  abstract_params = restored[0].trainer.abstract_state.params
  loops = [searcher.lower(abstract_params, jax.ShapeDtypeStruct((8, 24), np.int32)
                          ).as_text().count("stablehlo.while")
           for searcher in _RecordedSearcher.built]
  assert loops[1] - loops[0] == 3, loops


def test_eval_beam_size_reaches_the_dev_decode(trained, restored, multi30k_dir, tmp_path,
                                               monkeypatch):
  """One more step with a dev decode at its end: with --eval_beam_size=1 and =3 (--beam_size
  stays 4) the dev hypotheses are those of a direct beam_search of that width."""
  calls = []

  def recorded(s, searcher, params, tokenized, progress=False):
    hyps = translate_tokenized(s, searcher, params, tokenized, progress)
    calls.append((params, [tokenized.source(i).tolist() for i in range(len(tokenized))], hyps))
    return hyps

  translate_tokenized = run.translate_tokenized
  monkeypatch.setattr(run, "translate_tokenized", recorded)
  direct = {}
  for beam in (1, 3):
    workdir = tmp_path / f"beam{beam}"
    shutil.copytree(trained, workdir)
    cfg = _cfg(multi30k_dir, "--num_train_steps=13", "--eval_bleu_sentences=4",
               f"--eval_beam_size={beam}", "--beam_size=4")
    run.train(cfg, str(workdir))
    params, sources, hyps = calls[-1]
    assert len(calls) == len(direct) + 1 and len(hyps) == 4
    direct[beam] = _direct_hyps(restored, cfg, sources, params, beam_size=beam)
    assert hyps == direct[beam], beam
  assert direct[1] != direct[3]


def test_num_train_steps_below_the_checkpoint_says_so(trained, multi30k_dir, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  with caplog.at_level(std_logging.WARNING):
    summary = run.train(_cfg(multi30k_dir, "--num_train_steps=5"), str(workdir))
  assert summary["steps"] == 0
  assert (f"nothing to train: {workdir} is already at step 12 (its latest checkpoint), at or"
          " past --num_train_steps=5; raise --num_train_steps to train on"
          ) in [r.getMessage() for r in caplog.records], caplog.records
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12"]

