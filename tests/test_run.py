"""Workflow error paths and input limits of transformer/run.py, in process (no subprocess)."""

import dataclasses
import logging as std_logging
import types

import jax
import numpy as np
import pytest

from transformer import checkpoints, config as config_lib, run, sharding
from transformer.config import EOS_ID, ModelConfig, TrainConfig
from transformer.data import pipeline
from transformer.train import Trainer

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
