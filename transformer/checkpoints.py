"""Orbax checkpoints: train state + data-iterator state + config, resume, averaging.

Layout of a workdir:
  checkpoints/<step>/{state,data,config}   saved every K steps, the last N kept
  averaged/<step>/{state,data,config}      mean parameters of the last n checkpoints
Restores go through abstract targets with shardings, so a checkpoint written on one
mesh restores onto any other mesh (or one device). A checkpoint restores only into a run
with the same vocabulary and the same values of the model fields marked
`restore="must_match"` in transformer/config.py (`check_compatible`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from typing import Any, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint._src import asyncio_utils

from transformer.config import Config, ConfigError, ModelConfig, must_match_fields

ITEMS = ("state", "data", "config")


class CheckpointError(RuntimeError):
  """A user-facing checkpoint problem (one line)."""


def _run_in_a_new_loop_then_drain(coro):
  """Runs `coro` to completion in a new event loop, as Orbax's restore does; if it fails, the
  loop's other tasks (the reads of the other arrays, still in flight) are run to their end,
  their errors retrieved, before the loop is closed. Closed at once, their reads would later
  complete into a closed loop: 'Event loop is closed' and 'Future exception was never
  retrieved' tracebacks long after the failure was handled."""
  loop = asyncio.new_event_loop()
  asyncio.set_event_loop(loop)
  try:
    try:
      return loop.run_until_complete(coro)
    except BaseException:
      pending = asyncio.all_tasks(loop)
      if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
      raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


@contextlib.contextmanager
def _failed_reads_drained():
  """Orbax's synchronous calls (restore) run in _run_in_a_new_loop_then_drain meanwhile."""
  original = asyncio_utils._run_sync_via_new_loop  # pylint: disable=protected-access
  asyncio_utils._run_sync_via_new_loop = _run_in_a_new_loop_then_drain  # pylint: disable=protected-access
  try:
    yield
  finally:
    asyncio_utils._run_sync_via_new_loop = original  # pylint: disable=protected-access


class Checkpointer:
  """A CheckpointManager over `directory` holding composite (state, data, config) items."""

  def __init__(self, directory: str, keep: int = 20, create: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Optional[dict], config: dict) -> bool:
    """Starts an async save of `step`; `wait()` blocks until it is on disk."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}),
                              config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, config) of `step`, placed with abstract_state's shardings."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    with _failed_reads_drained():
      restored = self.manager.restore(step, args=args)
    return restored.state, restored.data, restored.config

  def restore_config(self, step: int) -> dict:
    with _failed_reads_drained():
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored.config

  def restore_latest_good(self, abstract_state: Any
                          ) -> tuple[Optional[int], Optional[tuple[Any, dict, dict]]]:
    """(step, (state, data_state, config)) of the newest checkpoint that reads back, or
    (None, None); damaged ones are moved aside (`set_aside`), not deleted."""
    for step in reversed(self.steps()):
      try:
        return step, self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (any read failure = damaged)
        aside = self.set_aside(step)
        logging.warning("checkpoint %d is damaged (%s: %s); moved to %s, trying the previous one",
                        step, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                        aside)
    return None, None

  def set_aside(self, step: int) -> str:
    """Renames a damaged checkpoint to <step>.damaged[.n] (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst, n = src + ".damaged", 0
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.damaged.{n}"
    os.rename(src, dst)
    self.manager.reload()
    return dst

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class Vocabulary(Protocol):
  """What the compatibility check needs of a tokenizer."""
  path: str
  vocab_size: int

  def fingerprint(self) -> str: ...


def saved_config(cfg: Config, model_cfg: ModelConfig, vocab: Vocabulary) -> dict:
  """The run's config as saved with each checkpoint: the actual model (its vocab_size is the
  vocabulary's) and the vocabulary's requested size, size and fingerprint."""
  d = json.loads(cfg.to_json())
  d["model"] = dataclasses.asdict(model_cfg)
  d["vocabulary"] = {"requested_size": cfg.model.vocab_size, "size": vocab.vocab_size,
                     "sha256": vocab.fingerprint()}
  return d


def check_compatible(saved: dict, cfg: Config, model_cfg: ModelConfig, vocab: Vocabulary,
                     where: str) -> None:
  """Restoring into another architecture or vocabulary is a ConfigError, not a silent reshape.

  `saved` is a checkpoint's `saved_config`; the model fields compared are those marked
  restore="must_match" in ModelConfig. A field missing from an older checkpoint had its
  default (e.g. scan_layers=False).
  """
  mine = dataclasses.asdict(model_cfg)
  defaults = dataclasses.asdict(ModelConfig())
  diff = [k for k in must_match_fields(ModelConfig)
          if saved["model"].get(k, defaults[k]) != mine[k]]
  saved_vocab = saved.get("vocabulary", {})
  if saved_vocab and saved_vocab.get("requested_size") != cfg.model.vocab_size:
    raise ConfigError(f"{where} was written with vocab_size={saved_vocab.get('requested_size')}"
                      f" but this run has vocab_size={cfg.model.vocab_size}; use a new --workdir"
                      " or the checkpoint's flags")
  if saved_vocab and saved_vocab.get("sha256") != vocab.fingerprint():
    raise ConfigError(f"{where} was trained with another vocabulary than {vocab.path};"
                      " use the checkpoint's spm.model (--vocab_path) or a new --workdir")
  if diff:
    k = diff[0]
    raise ConfigError(f"{where} was written with {k}={saved['model'].get(k)} but this run has"
                      f" {k}={mine[k]}; use a new --workdir or the checkpoint's flags")


def select_average_steps(steps: Sequence[int], num_average: int,
                         window_steps: int = 0) -> list[int]:
  """The checkpoints to average: the last `num_average`, or (window_steps > 0) every step in
  (latest - window_steps, latest]. E.g. steps 100..1500 every 100, window 500 -> 1100..1500."""
  steps = sorted(steps)
  if not steps:
    return []
  if window_steps > 0:
    return [s for s in steps if s > steps[-1] - window_steps]
  return steps[-num_average:]


def average_checkpoints(ckpt: Checkpointer, steps: Sequence[int], abstract_state: Any):
  """Mean parameters of `steps` (the paper averages the last 5 / 20 checkpoints).

  Returns the state of the last step with its params replaced by the running mean
  (accumulated in float32, one checkpoint in memory at a time), and that step's config.
  """
  if not steps:
    raise CheckpointError("no checkpoints to average")
  mean = None
  for n, step in enumerate(steps, start=1):
    state, _, config = ckpt.restore(step, abstract_state)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), state.params)
    mean = params if mean is None else jax.tree.map(lambda m, p: m + (p - m) / n, mean, params)
    logging.info("averaging: added step %d (%d/%d)", step, n, len(steps))
  mean = jax.tree.map(lambda m, p: m.astype(p.dtype), mean, state.params)
  return state.replace(params=mean), config
