"""Orbax checkpoints: save/restore continues identically; averaging is the parameter mean."""

import jax
import numpy as np
import pytest

from transformer import checkpoints, sharding
from transformer.config import ModelConfig, TrainConfig
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
  assert ckpt2.latest_step() == 3
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
