"""Orbax checkpoints: save/restore continues identically; averaging is the parameter mean;
damaged checkpoints are set aside; a checkpoint restores only into a compatible run."""

import dataclasses
import gc
import logging as std_logging
import os
import sys
import threading
import time

import jax
import numpy as np
import pytest

from transformer import checkpoints, sharding
from transformer.config import Config, ConfigError, ModelConfig, TrainConfig
from transformer.train import Trainer

CFG = ModelConfig(vocab_size=40, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                  num_decoder_layers=1, dropout_rate=0.1)


def _batch(seed):
  rng = np.random.RandomState(seed)
  src = rng.randint(4, 40, (4, 6)).astype(np.int32)
  tgt = rng.randint(4, 40, (4, 6)).astype(np.int32)
  src[:, -1] = tgt[:, -1] = 1
  return {"inputs": src, "targets": tgt}


def _trainer():
  return Trainer(CFG, TrainConfig(warmup_steps=5), sharding.make_mesh("data:1", jax.devices()[:1]))


def test_save_restore_next_step_identical(tmp_path):
  tr = _trainer()
  state = tr.init_state(0)
  for i in range(3):
    state, _ = tr.train_step(state, _batch(i))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  ckpt.save(3, state, {"next_index": 3}, {"note": "x"})
  ckpt.close()
  # Continue the original run by one step (dropout on: the RNG must be restored too).
  want_state, want_m = tr.train_step(state, _batch(3))
  want = jax.tree.map(np.asarray, want_state)
  # A fresh process would build a new Trainer and restore from disk.
  tr2 = _trainer()
  ckpt2 = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  assert ckpt2.steps() == [3]
  restored, data_state, config = ckpt2.restore(3, tr2.abstract_state)
  assert data_state == {"next_index": 3} and config == {"note": "x"}
  assert int(restored.step) == 3
  got_state, got_m = tr2.train_step(restored, _batch(3))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got_state)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert float(want_m["loss_sum"]) == float(got_m["loss_sum"])


def test_keeps_last_n_and_averages_parameters(tmp_path):
  tr = _trainer()
  state = tr.init_state(0)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  saved = {}
  for i in range(1, 6):
    state, _ = tr.train_step(state, _batch(i))
    ckpt.save(i, state, {}, {})
    saved[i] = jax.tree.map(np.asarray, state.params)
  ckpt.wait()
  assert ckpt.steps() == [3, 4, 5]
  avg, _ = checkpoints.average_checkpoints(ckpt, [3, 4, 5], tr.abstract_state)
  ckpt.close()
  want = jax.tree.map(lambda a, b, c: (a.astype(np.float64) + b + c) / 3, saved[3], saved[4], saved[5])
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(avg.params)):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-7)
  # The averaged state keeps the last step's counters.
  assert int(avg.step) == 5


def test_average_window_in_checkpoints_or_steps():
  steps = list(range(100, 1501, 100))  # the Multi30k run: every 100 steps
  # The paper's base recipe: the last 5 checkpoints.
  assert checkpoints.select_average_steps(steps, 5) == [1100, 1200, 1300, 1400, 1500]
  # A window in steps: (1000, 1500] -> the same 5; (1250, 1500] -> 3.
  assert checkpoints.select_average_steps(steps, 5, window_steps=500) == [1100, 1200, 1300,
                                                                         1400, 1500]
  assert checkpoints.select_average_steps(steps, 5, window_steps=250) == [1300, 1400, 1500]
  # Irregular steps (time-based saves, a SIGTERM save at 1437), unsorted input.
  assert checkpoints.select_average_steps([1437, 1000, 1200, 1400], 2, window_steps=300) == [
      1200, 1400, 1437]
  assert checkpoints.select_average_steps([1437, 1000, 1200, 1400], 2) == [1400, 1437]
  assert checkpoints.select_average_steps([], 5, window_steps=10) == []


def test_averaging_no_steps_is_a_checkpoint_error(tmp_path):
  tr = _trainer()
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoints to average"):
    checkpoints.average_checkpoints(ckpt, [], tr.abstract_state)
  ckpt.close()
  assert checkpoints.select_average_steps([], 5) == []


def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_restored(tmp_path):
  tr = _trainer()
  state = tr.init_state(0)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  for i in (1, 2):
    ckpt.save(i, state, {"next_index": i}, {})
    ckpt.wait()
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ckpt" / "2") for f in fs]
  biggest = max(files, key=os.path.getsize)  # the array data of step 2
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  step, (restored, data_state, _) = ckpt.restore_latest_good(tr.abstract_state)
  assert (step, data_state) == (1, {"next_index": 1}) and jax.tree.leaves(restored.params)
  assert ckpt.steps() == [1] and (tmp_path / "ckpt" / "2.damaged").is_dir()
  ckpt.close()
  empty = checkpoints.Checkpointer(str(tmp_path / "empty"), keep=3)
  assert empty.restore_latest_good(tr.abstract_state) == (None, None)
  empty.close()


def test_a_failed_restore_leaves_no_async_reads_behind(tmp_path, monkeypatch):
  """A checkpoint of 12 arrays (24 MiB) whose largest data file is deleted: each restore
  fails with one exception (10 times: the leftover reads are a race), and none of the other arrays' reads ends up later as an
  asyncio traceback ('Event loop is closed', 'Future exception was never retrieved')."""
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = {f"w{i}": np.random.RandomState(i).rand(512, 1024).astype(np.float32)
           for i in range(12)}
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in state.items()}
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  ckpt.save(1, state, {}, {})
  ckpt.wait()
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ckpt" / "1" / "state")
           for f in fs]
  os.remove(max(files, key=os.path.getsize))
  # Where such tracebacks go: unraisable exceptions (a callback into a closed loop, a
  # coroutine closed with its error), thread exceptions, asyncio's logger.
  noise = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: noise.append(repr(u.exc_value)))
  monkeypatch.setattr(threading, "excepthook", lambda a: noise.append(repr(a.exc_value)))
  handler = std_logging.Handler()
  handler.emit = lambda record: noise.append(record.getMessage())
  std_logging.getLogger("asyncio").addHandler(handler)
  try:
    for _ in range(10):
      with pytest.raises(Exception, match="reading array"):
        ckpt.restore(1, abstract)
      gc.collect()
    ckpt.close()
    time.sleep(1)  # reads left running would have ended by now
    gc.collect()
  finally:
    std_logging.getLogger("asyncio").removeHandler(handler)
  assert not noise, noise[:3]


class _Vocab:
  """Stands in for the Tokenizer: a path, a size and a fingerprint."""
  path, vocab_size = "/w/spm.model", 40

  def __init__(self, sha="a" * 64):
    self.sha = sha

  def fingerprint(self):
    return self.sha


def _check(saved, model_cfg, vocab=None):
  cfg = Config(model=CFG)
  checkpoints.check_compatible(saved, cfg, model_cfg, vocab or _Vocab(), "checkpoint 4")


def test_resume_with_another_vocabulary_is_refused():
  saved = checkpoints.saved_config(Config(model=CFG), CFG, _Vocab())
  assert saved["vocabulary"] == {"requested_size": 40, "size": 40, "sha256": "a" * 64}
  _check(saved, CFG)  # the same vocabulary: fine
  with pytest.raises(ConfigError,
                     match="checkpoint 4 was trained with another vocabulary than /w/spm.model"):
    _check(saved, CFG, _Vocab("b" * 64))
  other = dict(saved, vocabulary=dict(saved["vocabulary"], requested_size=50))
  with pytest.raises(ConfigError, match="checkpoint 4 was written with vocab_size=50 but this"
                     " run has vocab_size=40"):
    _check(other, CFG)


@pytest.mark.parametrize("field,value,ok", [
    ("d_model", 32, False), ("num_heads", 4, False), ("d_k", 4, False), ("max_len", 64, False),
    ("positional_encoding", "learned", False), ("share_embeddings", False, False),
    ("pre_layer_norm", True, False), ("param_dtype", "bfloat16", False),
    ("scan_layers", True, False),
    # Not part of the parameters' shapes or layout: a run may change them on resume.
    ("dropout_rate", 0.3, True), ("dtype", "bfloat16", True), ("attention_impl", "einsum", True),
    ("remat", True, True)])
def test_model_fields_that_must_match(field, value, ok):
  saved = checkpoints.saved_config(Config(model=CFG), CFG, _Vocab())
  mine = dataclasses.replace(CFG, **{field: value})
  if ok:
    _check(saved, mine)
  else:
    with pytest.raises(ConfigError, match=f"checkpoint 4 was written with {field}="
                       f"{getattr(CFG, field)} but this run has {field}={value}; use a new"):
      _check(saved, mine)


def test_a_field_missing_from_an_older_checkpoint_had_its_default():
  saved = checkpoints.saved_config(Config(model=CFG), CFG, _Vocab())
  del saved["model"]["scan_layers"]
  _check(saved, CFG)
  with pytest.raises(ConfigError, match="scan_layers=None but this run has scan_layers=True"):
    _check(saved, dataclasses.replace(CFG, scan_layers=True))
