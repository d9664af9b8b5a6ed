"""Workflows behind `main.py`'s modes: prepare, train (with periodic eval), average, evaluate,
translate.

Everything here takes the frozen `Config` and a workdir; nothing reads flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from transformer import checkpoints, evaluate as evaluate_lib, io_utils, sharding, tasks
from transformer.config import EOS_ID, Config, ConfigError, ModelConfig
from transformer.data import datasets, pipeline, store, tokenizer as tokenizer_lib
from transformer.decode import BeamSearcher
from transformer.metrics_writer import MetricsWriter
from transformer.train import Trainer, count_params


class NonFiniteError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient and --nonfinite=stop."""


USER_ERRORS = (ConfigError, checkpoints.CheckpointError, datasets.DataError, store.StoreError,
               FileNotFoundError, ValueError, NonFiniteError,
               # a path of the wrong kind that `check_paths` could not foresee
               NotADirectoryError, IsADirectoryError, FileExistsError)


def check_paths(cfg: Config, mode: str, workdir: Optional[str], input_path: Optional[str] = None,
                output_path: Optional[str] = None) -> None:
  """Each path flag that `mode` reads or writes names a directory or a file as it should, or
  can be created as one (its nearest existing ancestor is a directory): a ConfigError before
  any work. Inputs that are missing are reported where they are read."""
  dirs = {"--workdir": workdir, "--tfds_data_dir": cfg.data.tfds_data_dir,
          "--raw_data_dir": cfg.data.raw_data_dir}
  files = {"--vocab_path": cfg.data.vocab_path, "--evalb_params": cfg.data.evalb_params}
  if mode == "translate":
    files["--input"] = input_path
  if mode in ("evaluate", "translate", "plot"):
    files["--output"] = output_path
  elif mode == "attention":
    dirs["--output"] = output_path
  for paths, directory in ((dirs, True), (files, False)):
    for flag, path in paths.items():
      problem = path and io_utils.path_problem(path, directory)
      if problem:
        raise ConfigError(f"{flag}: {problem}")


# ----------------------------------------------------------------------------
# Setup shared by all modes
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  cfg: Config
  workdir: str
  mesh: Any
  tokenizer: tokenizer_lib.Tokenizer
  model_cfg: ModelConfig
  trainer: Trainer

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0


def _searcher(s: Setup, beam_size: int = 0) -> BeamSearcher:
  """The jitted beam search (beam_size > 0 overrides --beam_size), constrained as the task
  says (parsing with --tree_constraints: only well-formed trees)."""
  constraint = tasks.get(s.cfg.data.task).constraint(s.cfg, s.tokenizer)
  decode_cfg = (dataclasses.replace(s.cfg.decode, beam_size=beam_size) if beam_size > 0
                else s.cfg.decode)
  return BeamSearcher(s.model_cfg, decode_cfg, s.mesh, s.trainer.state_shardings.params,
                      constraint)


def _data_dir(cfg: Config, workdir: str) -> str:
  return cfg.data.tfds_data_dir or os.path.join(workdir, "tfds")


def _vocab_path(cfg: Config, workdir: str) -> str:
  return cfg.data.vocab_path or os.path.join(workdir, "spm.model")


def setup(cfg: Config, workdir: str, train_vocab: bool) -> Setup:
  """Mesh, tokenizer (trained on the train split if absent) and the jitted Trainer."""
  sharding.maybe_initialize_distributed(cfg.mesh)
  mesh = sharding.make_mesh(cfg.mesh)
  vocab_path = _vocab_path(cfg, workdir)
  if not os.path.exists(vocab_path) and not train_vocab:
    raise checkpoints.CheckpointError(
        f"no vocabulary at {vocab_path}: train first (--mode=train) or pass --vocab_path")

  if train_vocab:  # validates (and prepares) the data before anything is written to workdir
    train_examples = _chief_first(lambda: tasks.get(cfg.data.task).get_split(
        cfg.data, cfg.data.train_split, _data_dir(cfg, workdir)))
    os.makedirs(workdir, exist_ok=True)

  tok = _chief_first(lambda: tokenizer_lib.load_or_train(
      vocab_path, lambda: train_examples.sentences(), cfg.model.vocab_size,
      model_type=cfg.data.spm_model_type, character_coverage=cfg.data.spm_character_coverage,
      max_sentences=cfg.data.spm_max_sentences, seed=cfg.train.seed,
      split_by_unicode_script=cfg.data.spm_split_by_unicode_script))
  # hard_vocab_limit=False may give fewer pieces than asked for on small corpora.
  model_cfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
  if tok.vocab_size != cfg.model.vocab_size:
    logging.info("vocabulary: %d pieces (asked for %d)", tok.vocab_size, cfg.model.vocab_size)
  trainer = Trainer(model_cfg, cfg.train, mesh)
  return Setup(cfg, workdir, mesh, tok, model_cfg, trainer)


def _chief_first(fn):
  """Runs fn on process 0, then (after a barrier) on the others: shared-filesystem writes
  (TFDS preparation, SentencePiece training) happen once; the others then just load."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("transformer:chief_first")
  return result if jax.process_index() == 0 else fn()


def _saved_config(s: Setup) -> dict:
  return checkpoints.saved_config(s.cfg, s.model_cfg, s.tokenizer)


def _check_same_model(saved: dict, s: Setup, where: str) -> None:
  checkpoints.check_compatible(saved, s.cfg, s.model_cfg, s.tokenizer, where)


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a global batch (rows split evenly over processes)."""
  n, p = jax.process_count(), jax.process_index()
  rows = len(next(iter(batch.values())))
  return {k: v[p * rows // n:(p + 1) * rows // n] for k, v in batch.items()}


# ----------------------------------------------------------------------------
# Evaluation helpers (also used during training)
# ----------------------------------------------------------------------------

def eval_loss(s: Setup, params, tokenized) -> dict[str, float]:
  """Per-token NLL and perplexity of a tokenized split (teacher forcing, no dropout).

  Pairs with a side longer than --max_len do not fit the model: they are left out, with a
  warning that counts them ('tokens' counts the target tokens scored)."""
  max_len = s.model_cfg.max_len
  fits = (tokenized.source_lengths <= max_len) & (tokenized.target_lengths <= max_len)
  if not fits.all():
    logging.warning("perplexity: %d of %d pairs are longer than --max_len=%d and left out",
                    int((~fits).sum()), len(tokenized), max_len)
    if not fits.any():
      return {"nll": float("nan"), "perplexity": float("nan"), "tokens": 0.0}
    tokenized = _rows(tokenized, np.flatnonzero(fits))
  batches = pipeline.make_eval_batches(tokenized, s.cfg.data.eval_tokens_per_batch,
                                       _boundaries(s.cfg), sharding.batch_size_multiple(s.mesh))
  nll, tokens = 0.0, 0.0
  for batch in batches:
    gb = sharding.global_batch(_local_rows({k: batch[k] for k in ("inputs", "targets")}), s.mesh)
    m = s.trainer.eval_step(params, gb)
    nll += float(m["nll_sum"])
    tokens += float(m["tokens"])
  return {"nll": nll / max(tokens, 1.0), "perplexity": evaluate_lib.perplexity(nll, int(tokens)),
          "tokens": tokens}


def _rows(tokenized: pipeline.TokenizedSplit, rows: np.ndarray,
          max_len: Optional[int] = None) -> pipeline.TokenizedSplit:
  """The rows `rows` of `tokenized`; with max_len, each side cut to its first max_len - 1
  tokens + EOS."""
  def side(get, lengths):
    cut = [get(int(i)) for i in rows]
    if max_len is not None:
      cut = [r if len(r) <= max_len else np.append(r[:max_len - 1], EOS_ID).astype(r.dtype)
             for r in cut]
    flat = np.concatenate(cut) if cut else np.zeros(0, np.int32)
    return flat, np.asarray([len(r) for r in cut], lengths.dtype)
  src, src_len = side(tokenized.source, tokenized.source_lengths)
  tgt, tgt_len = side(tokenized.target, tokenized.target_lengths)
  # A new in-memory split: `tokenized` may be a TokenizedSplit or a store's StoredSplit.
  return pipeline.TokenizedSplit(source_tokens=src, source_lengths=src_len,
                                 target_tokens=tgt, target_lengths=tgt_len,
                                 index=np.asarray(tokenized.index)[rows],
                                 ids=np.asarray(tokenized.ids)[rows],
                                 counts=dict(tokenized.counts))


def fit_max_len(tokenized: pipeline.TokenizedSplit, max_len: int) -> pipeline.TokenizedSplit:
  """Sources longer than --max_len (the model's longest position) cut to its first max_len - 1
  tokens + EOS, with a warning naming each such line (its 'id' + 1): the other lines are
  translated as usual. Targets (unused by the search) are cut the same way."""
  long = np.flatnonzero(tokenized.source_lengths > max_len)
  for i in long:
    logging.warning("line %d: %d source tokens (with EOS), more than --max_len=%d; translating"
                    " its first %d tokens only", int(tokenized.ids[i]) + 1,
                    int(tokenized.source_lengths[i]), max_len, max_len - 1)
  if not long.size and not (tokenized.target_lengths > max_len).any():
    return tokenized
  return _rows(tokenized, np.arange(len(tokenized)), max_len)


def translate_tokenized(s: Setup, searcher: BeamSearcher, params, tokenized,
                        progress: bool = False) -> list[str]:
  """Beam-search every source of `tokenized`; hypotheses in the original order. Sources
  longer than --max_len are cut to it (see `fit_max_len`)."""
  tokenized = fit_max_len(tokenized, s.model_cfg.max_len)
  beam = searcher.decode_cfg.beam_size
  batches = pipeline.make_eval_batches(tokenized, max(s.cfg.decode.decode_tokens_per_batch // beam, 1),
                                       _boundaries(s.cfg), sharding.batch_size_multiple(s.mesh))
  outputs: list[list[str]] = []  # per batch, per row (padding rows included)
  done, start = 0, time.time()
  for batch in batches:
    gb = sharding.global_batch(_local_rows({"inputs": batch["inputs"]}), s.mesh)
    seqs, _ = searcher(params, gb["inputs"])
    seqs = np.asarray(multihost_utils.process_allgather(seqs, tiled=True))
    outputs.append([s.tokenizer.decode(seq.tolist()) for seq in seqs])
    done += int((batch["index"] >= 0).sum())
    if progress:
      print(f"translated {done}/{len(tokenized)} sentences"
            f" ({done / (time.time() - start):.1f}/s)", file=sys.stderr, flush=True)
  return pipeline.restore_order(batches, outputs, len(tokenized))


def _boundaries(cfg: Config) -> str:
  return cfg.data.bucket_boundaries  # '8,16,...' or 'auto:K[:M]' (pipeline.parse_boundaries)


def _store_root(cfg: Config, workdir: str) -> str:
  """Tokenized stores live next to the prepared TFDS data (see transformer/data/store.py)."""
  return os.path.join(_data_dir(cfg, workdir), "tokenized")


def _open_store(cfg: Config, workdir: str, split: str, tok: tokenizer_lib.Tokenizer):
  """(examples, store directory, meta, built now) of `split`: the chief builds a missing store
  (in --tokenize_workers processes, each reading its own rows); the others then open it."""
  data_dir = _data_dir(cfg, workdir)
  get_split = tasks.get(cfg.data.task).get_split
  examples = _chief_first(lambda: get_split(cfg.data, split, data_dir))
  workers = cfg.data.tokenize_workers or store.default_workers()
  opener = functools.partial(get_split, cfg.data, split, data_dir)
  directory, meta, built = _chief_first(lambda: store.open_or_build(
      examples, tok, _store_root(cfg, workdir), workers=workers, opener=opener,
      fallback_root=os.path.join(workdir, "tokenized"), may_build=jax.process_index() == 0))
  return examples, directory, meta, built


def _tokenize(s: Setup, split: str, train: bool):
  """(examples, tokenized split read from its store); training drops too long/empty pairs.
  A split the task does not store is read and tokenized in memory on every call."""
  task = tasks.get(s.cfg.data.task)
  if not task.is_stored(split):
    examples = task.get_split(s.cfg.data, split, _data_dir(s.cfg, s.workdir))
    if train:
      return examples, pipeline.tokenize_split(
          examples, s.tokenizer, s.cfg.data.max_source_length, s.cfg.data.max_target_length,
          drop_empty=True)
    return examples, pipeline.tokenize_split(examples, s.tokenizer)
  examples, directory, _, _ = _open_store(s.cfg, s.workdir, split, s.tokenizer)
  if train:
    return examples, store.StoredSplit(directory, s.cfg.data.max_source_length,
                                       s.cfg.data.max_target_length, drop_empty=True)
  return examples, store.StoredSplit(directory)


# ----------------------------------------------------------------------------
# --mode=prepare
# ----------------------------------------------------------------------------

def _split_names(cfg: Config) -> list[str]:
  return list(dict.fromkeys((cfg.data.train_split, cfg.data.eval_split, cfg.data.test_split)))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


_THERE, _NOW, _OTHER = "already there", "now", "by another process"


def _made(was_there: bool, made_here: bool) -> str:
  """Who made a part that exists now: nobody (_THERE), this process, or another one."""
  return _THERE if was_there else _NOW if made_here else _OTHER


def _say(made: str, verb: str) -> str:
  """How the prepare report names who made a part: 'now' ('trained now' for the
  vocabulary), 'already there', or '<verb> by another process while this one waited'."""
  if made == _OTHER:
    return f"{verb} by another process while this one waited"
  return "trained now" if made == _NOW and verb == "trained" else made


def prepare(cfg: Config, workdir: str) -> dict[str, Any]:
  """Everything a training job reads, made once: the TFDS data of every split the run uses,
  the SentencePiece model (trained unless it exists) and each split's tokenized store.

  Run it where the data can be downloaded, with the --tfds_data_dir/--vocab_path (or the
  --workdir) the training job will use. Several processes: the chief does the work, the
  others wait and then check that they can read the result. A second run changes nothing.
  """
  sharding.maybe_initialize_distributed(cfg.mesh)
  t0 = time.time()
  data_dir, vocab_path = _data_dir(cfg, workdir), _vocab_path(cfg, workdir)
  splits = _split_names(cfg)
  task = tasks.get(cfg.data.task)
  builder = task.make_builder(cfg.data, data_dir)
  # Who made each part: this process ('now'), another one that it waited for, or none.
  uses_tfds = any(task.is_stored(split) for split in splits)  # not only directory splits
  made = {"tfds": _made(builder.is_prepared() or not uses_tfds,
                        uses_tfds and _chief_first(lambda: datasets.prepare(builder)))}
  examples = {}
  for split in splits:
    examples[split] = _chief_first(lambda split=split: task.get_split(cfg.data, split, data_dir))
  vocab_there = os.path.exists(vocab_path)
  made["vocab"] = _made(vocab_there, _chief_first(lambda: tokenizer_lib.train_unless_present(
      vocab_path, lambda: examples[cfg.data.train_split].sentences(), cfg.model.vocab_size,
      model_type=cfg.data.spm_model_type, character_coverage=cfg.data.spm_character_coverage,
      max_sentences=cfg.data.spm_max_sentences, seed=cfg.train.seed,
      split_by_unicode_script=cfg.data.spm_split_by_unicode_script)))
  tok = tokenizer_lib.Tokenizer.load(vocab_path)
  report: dict[str, Any] = {
      "tfds_data_dir": os.path.abspath(data_dir), "tfds_prepared_now": made["tfds"] == _NOW,
      "vocab_path": os.path.abspath(vocab_path), "vocab_trained_now": made["vocab"] == _NOW,
      "vocab_size": tok.vocab_size, "vocab_sha256": tok.fingerprint(), "stores": []}
  for split in splits:
    if not task.is_stored(split):
      continue  # read and tokenized when used (see _tokenize)
    there = store.existing(examples[split], tok, _store_root(cfg, workdir),
                           os.path.join(workdir, "tokenized")) is not None
    _, directory, meta, built = _open_store(cfg, workdir, split, tok)
    store.StoredSplit(directory)  # every process can read it
    report["stores"].append({"split": split, "path": directory, "built_now": built,
                             "made": _made(there, built),
                             "rows": meta["rows"], "source_tokens": meta["source_tokens"],
                             "target_tokens": meta["target_tokens"],
                             "bytes": sum(meta["file_bytes"].values())})
  report["seconds"] = round(time.time() - t0, 3)
  report["did_nothing"] = not (report["tfds_prepared_now"] or report["vocab_trained_now"]
                               or any(x["built_now"] for x in report["stores"]))
  waited = _OTHER in [made["tfds"], made["vocab"]] + [x["made"] for x in report["stores"]]
  if jax.process_index() == 0:
    rows = ", ".join(f"{split} {len(examples[split])}" for split in splits)
    print(f"tfds: {report['tfds_data_dir']} ({_say(made['tfds'], 'prepared')}): {rows} examples,"
          f" {_dir_bytes(builder.data_dir)} bytes")  # this dataset's prepared files only
    print(f"vocabulary: {report['vocab_path']} ({_say(made['vocab'], 'trained')}):"
          f" {tok.vocab_size} pieces, sha256 {tok.fingerprint()[:16]}")
    for x in report["stores"]:
      print(f"tokenized {x['split']}: {x['path']} ({_say(x['made'], 'built')}): {x['rows']}"
            f" rows, {x['source_tokens']} + {x['target_tokens']} tokens, {x['bytes']} bytes")
    if report["did_nothing"] and waited:
      print("prepare: nothing to do, another process prepared what was missing")
    elif report["did_nothing"]:
      print("prepare: nothing to do, everything was already prepared")
    else:
      print(f"prepare: done in {report['seconds']:.1f} s; train with the same --tfds_data_dir"
            f" and --vocab_path (or --workdir)")
  return report


# ----------------------------------------------------------------------------
# --mode=train
# ----------------------------------------------------------------------------

class _Preemption:
  """SIGTERM (what TPU/GPU schedulers send) -> save at the current step and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _agreed(flags: tuple[bool, ...]) -> tuple[bool, ...]:
  """Each flag OR-ed over all processes, so that all stop training at the same step.

  SIGTERM (and each process's --max_train_minutes clock) can reach the processes of a job at
  different steps; one that saved and left alone would leave the others waiting in the next
  step's collectives (and its checkpoint half-written) until the scheduler's SIGKILL.
  """
  if jax.process_count() == 1:
    return flags
  # [processes, flags]
  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
  return tuple(bool(v) for v in gathered.reshape(-1, len(flags)).max(axis=0))


def train(cfg: Config, workdir: str) -> dict[str, float]:
  """Trains to --num_train_steps, resuming from the newest good checkpoint in workdir.

  A step is one optimizer update (--grad_accum_steps micro-batches). Checkpoints hold the
  train state (with its RNG), the data-iterator state and the config, so a restarted run
  continues exactly as if it had never stopped.
  """
  fresh = not os.path.exists(workdir)
  try:
    return _train(cfg, workdir)
  except USER_ERRORS:
    # A run that fails before its first checkpoint leaves no half-made workdir behind.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if fresh and not (os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _train(cfg: Config, workdir: str) -> dict[str, float]:
  s = setup(cfg, workdir, train_vocab=True)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=cfg.train.keep_checkpoints)
  try:  # pending async saves finish (and are closed) however the loop ends
    return _train_loop(s, ckpt)
  finally:
    ckpt.close()


class _TrainLog:
  """The train metrics between two log lines.

  Step metrics stay on the device until a log, eval or save step (`flush`), so that the loop
  never waits for a step to finish; a non-finite step is then skipped or stops the run before
  anything is saved. `write` logs the window's averages and starts a new window.
  """

  def __init__(self, s: Setup, writer: MetricsWriter):
    self._s, self._tcfg, self._writer = s, s.cfg.train, writer
    self._pending: list[dict[str, Any]] = []  # one per micro-batch since the last flush
    self.skipped = 0
    self._window = {"loss_sum": 0.0, "nll_sum": 0.0, "tokens": 0.0, "source_tokens": 0.0,
                    "steps": 0.0}
    self.restart_clock()

  def restart_clock(self) -> None:
    """Time from now on counts towards tokens/s (eval time does not)."""
    self._start = time.time()

  def add(self, metrics: dict[str, Any]) -> None:
    self._pending.append(metrics)

  def flush(self, step: int) -> None:
    """Fetches pending step metrics; handles non-finite steps before anything is saved."""
    accum = self._tcfg.grad_accum_steps
    for i, m in enumerate(jax.device_get(self._pending)):
      bad_step = step - len(self._pending) // accum + i // accum + 1
      if not bool(m["finite"]):
        if self._tcfg.nonfinite == "stop":
          tensors = self._s.trainer.nonfinite_tensors(m)
          raise NonFiniteError(
              f"non-finite loss/gradient at step {bad_step} (loss {float(m['loss_sum'])},"
              f" non-finite gradients in {len(tensors)} tensors, e.g. {', '.join(tensors[:3])});"
              f" stopped without saving, the last good checkpoint is kept"
              f" (use --nonfinite=skip to skip such steps)")
        self.skipped += 1
        logging.warning("step %d: non-finite loss/gradient, update skipped (%d so far)",
                        bad_step, self.skipped)
        continue
      for k in ("loss_sum", "nll_sum", "tokens", "source_tokens"):
        self._window[k] += float(m[k])
      self._window["steps"] += 1.0 / accum
    self._pending = []

  def write(self, step: int, last_metrics: dict[str, Any]) -> dict[str, float]:
    """Logs and records the window ending at `step` (flushed); returns the line's values."""
    window, elapsed = self._window, time.time() - self._start
    lr = float(self._s.trainer.schedule(max(step - 1, 0)))
    line = {"loss": window["loss_sum"] / max(window["tokens"], 1),
            "nll": window["nll_sum"] / max(window["tokens"], 1), "lr": lr,
            "target_tokens_per_s": window["tokens"] / elapsed,
            "source_tokens_per_s": window["source_tokens"] / elapsed,
            "tokens_per_step": (window["tokens"] + window["source_tokens"]) / max(window["steps"], 1),
            "grad_norm": float(last_metrics["grad_norm"]), "steps_per_s": window["steps"] / elapsed,
            "skipped_steps": self.skipped}
    eta = (self._tcfg.num_train_steps - step) / max(line["steps_per_s"], 1e-9)
    logging.info("step %d | loss %.4f | nll %.4f | lr %.3g | %.0f tgt tok/s | %.2f steps/s"
                 " | ETA %s", step, line["loss"], line["nll"], lr,
                 line["target_tokens_per_s"], line["steps_per_s"], _fmt_time(eta))
    self._writer.write(step, "train", line)
    self._window = {k: 0.0 for k in window}
    self.restart_clock()
    return line


class _DevEval:
  """The periodic evaluation: dev perplexity, and the task's metric (BLEU, F1) on the first
  --eval_bleu_sentences dev examples (the task's `dev_subset`) decoded by `searcher`."""

  def __init__(self, s: Setup, examples, tokenized, searcher: BeamSearcher,
               writer: MetricsWriter):
    self._s, self._tokenized, self._searcher, self._writer = s, tokenized, searcher, writer
    self._task = tasks.get(s.cfg.data.task)
    n = min(s.cfg.train.eval_bleu_sentences, len(examples))
    self._decoded = self._task.dev_subset(examples, n)
    self._decoded_tok = (pipeline.tokenize_split(self._decoded, s.tokenizer) if self._decoded
                         else None)

  def __call__(self, step: int, params) -> dict[str, float]:
    """Logs and records the evaluation of `params` at `step`; returns its values."""
    cfg = self._s.cfg
    ev = eval_loss(self._s, params, self._tokenized)
    quality = ""
    if self._decoded:
      hyps = translate_tokenized(self._s, self._searcher, params, self._decoded_tok)
      metrics, quality = self._task.dev_score(cfg, hyps, self._decoded,
                                              self._searcher.decode_cfg.beam_size)
      ev.update(metrics)
    logging.info("eval step %d | %s nll %.4f | ppl %.2f%s", step, cfg.data.eval_split,
                 ev["nll"], ev["perplexity"], quality)
    self._writer.write(step, "eval", ev)
    return ev


def _train_loop(s: Setup, ckpt: checkpoints.Checkpointer) -> dict[str, float]:
  cfg, workdir, tcfg = s.cfg, s.workdir, s.cfg.train
  if ckpt.steps():
    _check_same_model(ckpt.restore_config(ckpt.steps()[-1]), s,
                      f"checkpoint {ckpt.steps()[-1]} in {workdir}")

  _, train_tok = _tokenize(s, cfg.data.train_split, train=True)
  train_iter = pipeline.make_train_iterator(
      train_tok, cfg.data, batch_multiple=sharding.batch_size_multiple(s.mesh),
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_examples, eval_tok = _tokenize(s, cfg.data.eval_split, train=False)

  latest, restored = ckpt.restore_latest_good(s.trainer.abstract_state)
  if restored is None:
    state = s.trainer.init_state(tcfg.seed)
    logging.info("initialised a new model")
  else:
    state, data_state, _ = restored
    pipeline.restore_iterator(train_iter, data_state)
    logging.info("resumed from step %d", latest)
  num_params = count_params(state.params)
  writer = MetricsWriter(workdir, enabled=s.is_chief)
  if s.is_chief:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(_saved_config(s), f, indent=2)
  logging.info("model: %d parameters; mesh %s; %d devices", num_params, dict(s.mesh.shape),
               jax.device_count())
  dev_eval = _DevEval(s, eval_examples, eval_tok, _searcher(s, tcfg.eval_beam_size), writer)

  accum = tcfg.grad_accum_steps  # micro-batches per optimizer update
  step = int(state.step) // accum  # state.step counts micro-batches
  if step >= tcfg.num_train_steps:
    logging.warning("nothing to train: %s is already at step %d (its latest checkpoint), at or"
                    " past --num_train_steps=%d; raise --num_train_steps to train on",
                    workdir, step, tcfg.num_train_steps)
  if accum > 1:
    logging.info("gradient accumulation: %d micro-batches of ~%d tokens per update (~%d tokens)",
                 accum, cfg.data.tokens_per_batch, accum * cfg.data.tokens_per_batch)
  start_step, t0 = step, time.time()
  log = _TrainLog(s, writer)
  summary: dict[str, float] = {"num_params": num_params}
  preempted = False
  in_flight = None  # the previous step's metrics: not yet waited for
  with _Preemption() as preemption:
    while step < tcfg.num_train_steps:
      for _ in range(accum):
        batch = next(train_iter)
        gb = sharding.global_batch({k: batch[k] for k in ("inputs", "targets")}, s.mesh)
        state, metrics = s.trainer.train_step(state, gb)
        log.add(metrics)
      step += 1
      # Dispatch is asynchronous: unchecked, the host runs up to a log/save step ahead of the
      # device, and a SIGTERM is then only acted on after all those steps have run. Waiting
      # for the previous step keeps one step queued behind the running one, no more.
      if in_flight is not None:
        jax.block_until_ready(in_flight)
      in_flight = metrics
      preempted, out_of_time = _agreed((
          preemption.requested,
          tcfg.max_train_minutes > 0 and (time.time() - t0) / 60 >= tcfg.max_train_minutes))
      last = step == tcfg.num_train_steps or out_of_time or preempted
      do_log = step % tcfg.log_every_steps == 0 or last
      do_eval = step % tcfg.eval_every_steps == 0 or (last and not preempted)
      do_save = step % tcfg.checkpoint_every_steps == 0 or last
      if do_log or do_eval or do_save:
        log.flush(step)
      if do_log:
        summary.update(log.write(step, metrics))
      if do_eval:
        summary.update({f"eval_{k}": v for k, v in dev_eval(step, state.params).items()})
        log.restart_clock()
      if do_save:
        ckpt.save(step, state, pipeline.iterator_state(train_iter), _saved_config(s))
      if preempted:
        ckpt.wait()
        logging.warning("SIGTERM%s: saved checkpoint at step %d; run the same command to resume",
                        "" if preemption.requested else " (to another process)", step)
        break
      if out_of_time:
        logging.info("stopping at step %d: --max_train_minutes=%g reached", step,
                     tcfg.max_train_minutes)
        break
  writer.close()
  summary.update({"train_seconds": time.time() - t0, "steps": step - start_step,
                  "preempted": preempted})
  logging.info("training done: %d steps in %s", step - start_step, _fmt_time(time.time() - t0))
  return summary


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------
# --mode=average / evaluate / translate
# ----------------------------------------------------------------------------

def _restore_params(s: Setup, which: str):
  """Parameters of 'latest', 'averaged' or a step number."""
  sub = "averaged" if which == "averaged" else "checkpoints"
  directory = os.path.join(s.workdir, sub)
  if not os.path.isdir(directory):
    raise checkpoints.CheckpointError(f"no checkpoint in {directory}: train first"
                                      + (" and run --mode=average" if which == "averaged" else ""))
  ckpt = checkpoints.Checkpointer(directory, keep=10**6, create=False)
  try:  # closed on every path: an open manager's threads outlive a failed restore at exit
    steps = ckpt.steps()
    if not steps:
      raise checkpoints.CheckpointError(f"no checkpoint in {directory}: train first")
    if which in ("latest", "averaged"):
      step = steps[-1]
    else:
      try:
        step = int(which)
      except ValueError:
        raise ConfigError(f"--checkpoint must be latest, averaged or a step, got {which!r}"
                          ) from None
      if step not in steps:
        raise checkpoints.CheckpointError(
            f"no checkpoint for step {step} in {directory}; have {steps}")
    damaged = (f"checkpoint {step} in {directory} cannot be read ({{}}); pass another"
               f" --checkpoint=<step> (have {steps})")
    try:
      saved = ckpt.restore_config(step)
    except Exception as e:  # pylint: disable=broad-except  (any read failure = damaged)
      raise checkpoints.CheckpointError(damaged.format(type(e).__name__)) from e
    _check_same_model(saved, s, f"checkpoint {step} in {directory}")
    try:
      state, _, _ = ckpt.restore(step, s.trainer.abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoints.CheckpointError(damaged.format(type(e).__name__)) from e
  finally:
    ckpt.close()
  logging.info("restored %s checkpoint of step %d", sub, step)
  return state.params, step


def average(cfg: Config, workdir: str) -> int:
  """Averages the last --num_average checkpoints (or those of the last --average_window_steps
  steps) into <workdir>/averaged/<last step>."""
  s = setup(cfg, workdir, train_vocab=False)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise checkpoints.CheckpointError(f"no checkpoint in {directory}: train first")
  ckpt = checkpoints.Checkpointer(directory, keep=10**6, create=False)
  steps = checkpoints.select_average_steps(ckpt.steps(), cfg.decode.num_average,
                                           cfg.decode.average_window_steps)
  if not steps:
    raise checkpoints.CheckpointError(f"no checkpoint in {directory}: train first")
  _check_same_model(ckpt.restore_config(steps[-1]), s, f"checkpoint {steps[-1]} in {directory}")
  state, config = checkpoints.average_checkpoints(ckpt, steps, s.trainer.abstract_state)
  ckpt.close()
  out = checkpoints.Checkpointer(os.path.join(workdir, "averaged"), keep=1)
  out.save(steps[-1], state, {"averaged_steps": steps}, config)
  out.close()
  logging.info("averaged steps %s into %s/averaged/%d", steps, workdir, steps[-1])
  print(f"averaged {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}) ->"
        f" {os.path.join(workdir, 'averaged', str(steps[-1]))}")
  return steps[-1]


def _check_paths(input_path: Optional[str], output_path: Optional[str]) -> None:
  """--input must be a file and --output must not be a directory (checked before any work)."""
  if input_path is not None and os.path.isdir(input_path):
    raise ConfigError(f"--input {input_path} is a directory, not a file")
  if output_path is not None and os.path.isdir(output_path):
    raise ConfigError(f"--output {output_path} is a directory, not a file")


def evaluate(cfg: Config, workdir: str, which: str = "latest",
             output: Optional[str] = None) -> dict[str, Any]:
  """Beam-searches --test_split, writes hypotheses, prints BLEU (three conventions) and perplexity."""
  _check_paths(None, output)
  s = setup(cfg, workdir, train_vocab=False)
  params, step = _restore_params(s, which)
  examples, tokenized = _tokenize(s, cfg.data.test_split, train=False)
  searcher = _searcher(s)
  t0 = time.time()
  hyps = translate_tokenized(s, searcher, params, tokenized)
  decode_seconds = time.time() - t0
  split_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.data.test_split).strip("_")  # test[:24] -> test_24
  prefix = os.path.join(workdir, split_name)
  out_path = output or f"{prefix}.{which}.hyp"
  task = tasks.get(cfg.data.task)
  report: dict[str, Any] = {"split": cfg.data.test_split, "checkpoint": which, "step": step,
                            "sentences": len(hyps), "decode_seconds": decode_seconds}
  report.update(task.score(cfg, hyps, examples))
  report.update({f"test_{k}": v for k, v in eval_loss(s, params, tokenized).items()})
  if s.is_chief:
    evaluate_lib.write_lines(out_path, hyps)
    task.write_outputs(cfg, prefix, which, hyps, examples)
    with open(f"{prefix}.{which}.json", "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    MetricsWriter(workdir).write(step, f"test_{which}", {k: v for k, v in report.items()
                                                        if isinstance(v, (int, float))})
  print(f"hypotheses: {out_path}")
  print(f"perplexity ({cfg.data.test_split}): {report['test_perplexity']:.3f}")
  for line in task.report_lines(cfg, report, which, step):
    print(line)
  return report


def translate(cfg: Config, workdir: str, which: str = "latest", input_path: Optional[str] = None,
              output_path: Optional[str] = None) -> list[str]:
  """Translates lines of --input (or stdin) to --output (or stdout), in order."""
  if input_path is not None and not os.path.exists(input_path):
    raise FileNotFoundError(f"--input {input_path} does not exist")
  _check_paths(input_path, output_path)
  s = setup(cfg, workdir, train_vocab=False)
  params, _ = _restore_params(s, which)
  stream = open(input_path, "rb") if input_path else sys.stdin.buffer
  with stream:
    lines = [raw.decode("utf-8", errors="replace").rstrip("\r\n") for raw in stream]
  examples = [{"source": line, "target": "", "id": i} for i, line in enumerate(lines)]
  hyps: list[str] = []
  if lines:  # no input lines: no output lines (a filter on empty input)
    tokenized = pipeline.tokenize_split(examples, s.tokenizer)
    hyps = translate_tokenized(s, _searcher(s), params, tokenized, progress=True)
  hyps = tasks.get(cfg.data.task).output_lines(cfg, hyps, examples)
  if s.is_chief:
    if output_path:
      evaluate_lib.write_lines(output_path, hyps)
    else:
      for h in hyps:
        sys.stdout.write(h + "\n")
      sys.stdout.flush()
  return hyps


# ----------------------------------------------------------------------------
# --mode=plot / attention
# ----------------------------------------------------------------------------

def plot(workdir: str, output: Optional[str] = None) -> str:
  """Learning curves of <workdir>/metrics.jsonl as a PNG (default <workdir>/plots/)."""
  from transformer import visualize  # pylint: disable=g-import-not-at-top  (imports matplotlib)
  out = visualize.plot_run(workdir, output)
  print(out)
  return out


def attention(cfg: Config, workdir: str, sentence: str, which: str = "latest",
              output_dir: Optional[str] = None) -> list[str]:
  """Heatmaps of every layer and head for one source sentence and its beam-search translation."""
  from transformer import visualize  # pylint: disable=g-import-not-at-top  (imports matplotlib)
  if not sentence.strip():
    raise ConfigError("--sentence is required for --mode=attention")
  s = setup(cfg, workdir, train_vocab=False)
  params, step = _restore_params(s, which)
  src = np.asarray([s.tokenizer.encode(sentence) + [EOS_ID]], np.int32)
  seq, _ = _searcher(s)(params, sharding.global_batch({"inputs": src}, s.mesh)["inputs"])
  hyp = np.asarray(seq)[0].tolist()
  hyp = hyp[:hyp.index(EOS_ID) + 1] if EOS_ID in hyp else hyp
  paths = visualize.plot_attention_maps(s.model_cfg, params, src[0], np.asarray(hyp, np.int32),
                                        s.tokenizer.id_to_piece, step,
                                        output_dir or os.path.join(workdir, "plots"))
  print(f"source: {sentence}\ntranslation: {s.tokenizer.decode(hyp)}")
  for p in paths:
    print(p)
  return paths


# ----------------------------------------------------------------------------
# --mode=diagnose
# ----------------------------------------------------------------------------

def diagnose(cfg: Config, workdir: str, max_batches: int = 0) -> list[dict[str, float]]:
  """`diagnostics.probe_batch` on the dev split (--eval_split) for the fresh model (step 0,
  --seed) and every checkpoint of the workdir: one record per step, appended to metrics.jsonl
  as kind 'diagnose' and printed as a table. max_batches > 0 probes only the first batches."""
  from transformer import diagnostics  # pylint: disable=g-import-not-at-top
  s = setup(cfg, workdir, train_vocab=False)
  _, tokenized = _tokenize(s, cfg.data.eval_split, train=False)
  tokenized = fit_max_len(tokenized, s.model_cfg.max_len)
  batches = pipeline.make_eval_batches(tokenized, cfg.data.eval_tokens_per_batch,
                                       _boundaries(cfg), sharding.batch_size_multiple(s.mesh))
  batches = batches[:max_batches] if max_batches > 0 else batches
  probe = jax.jit(functools.partial(diagnostics.probe_batch, s.trainer.model,
                                    label_smoothing=cfg.train.label_smoothing))
  directory = os.path.join(workdir, "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=10**6, create=False)
  try:
    steps = ckpt.steps() if os.path.isdir(directory) else []
  finally:
    ckpt.close()
  writer = MetricsWriter(workdir, enabled=s.is_chief)
  records = []
  for step in [0] + steps:
    params = (s.trainer.init_state(cfg.train.seed).params if step == 0
              else _restore_params(s, str(step))[0])
    results = []
    with sharding.mesh_context(s.mesh):
      for batch in batches:
        gb = sharding.global_batch(_local_rows({k: batch[k] for k in ("inputs", "targets")}),
                                   s.mesh)
        results.append(jax.device_get(probe(params, gb)))
    rec = diagnostics.combine(results)
    writer.write(step, "diagnose", rec)
    records.append({"step": step, **rec})
    layers = sorted(k for k in rec if k.startswith("grad_norm/"))
    print(f"step {step}: dev nll {rec['nll']:.3f}, with shuffled sources {rec['nll_shuffled']:.3f}"
          f" (source gain {rec['source_gain']:.3f} nats/token); encoder position similarity"
          f" {rec['encoder_similarity']:.3f}")
    print("  grad norm  " + "  ".join(f"{k[10:]} {rec[k]:.3g}" for k in layers))
    ents = sorted(k for k in rec if k.startswith("entropy/"))
    print("  entropy    " + "  ".join(f"{k[8:]} {rec[k]:.2f}" for k in ents))
  return records
