r"""Input pipeline: prepare, first start (build the tokenized store), restart, batches/s.

  nice python -m benchmarks.input_pipeline [--pairs=4500000] [--workdir=/tmp/input_pipeline]
      [--nolegacy] [--batches=300]

Writes a synthetic parallel corpus of --pairs sentence pairs (WMT14-like lengths: log-normal
with a mean of ~25 words and a tail to 250; words drawn from a Zipf-distributed vocabulary of
--words invented words per language) as <workdir>/corpus/train.{en,de}, then runs each phase
in its own process (so each has its own peak RSS) on --dataset=parallel_text:

  prepare             TFDS preparation (array_record) + SentencePiece training (as --mode=prepare
                      does before it tokenizes)
  first_start         what a training start does when the store is missing: build it
                      (--tokenize_workers processes), open it, make the train iterator at the
                      paper's batch size (experiments/paper/recipe.flags: tokens_per_batch,
                      bucket_boundaries, max lengths) and take its first batch
  restart             the same with the store present
  legacy_first_start  the same on the in-memory path every start took before the store
  legacy_restart        (datasets.get_split + pipeline.tokenize_split); both are measured
  iterate             batches/s of one process's train iterator over --batches batches
  iterate_2proc       two processes at once (process_index 0 and 1 of 2), each collating only
                      its rows of every global batch

Prints one JSON object: seconds and peak RSS (MiB, the process's ru_maxrss; for first_start
also the encoding workers') per phase, batches/s, store sizes and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("pairs", 4_500_000, "Sentence pairs in the synthetic training corpus.")
flags.DEFINE_string("workdir", "/tmp/input_pipeline", "Corpus, TFDS data, vocabulary and store.")
flags.DEFINE_integer("words", 40_000, "Invented words per language (Zipf-distributed).")
flags.DEFINE_integer("vocab_size", 37_000, "SentencePiece vocabulary (the paper's En-De size).")
flags.DEFINE_integer("spm_max_sentences", 1_000_000, "Sentences sampled to train SentencePiece.")
flags.DEFINE_integer("tokenize_workers", 0, "Processes building the store (0: min(CPUs, 8)).")
flags.DEFINE_integer("batches", 300, "Timed batches per iterate phase (after 20 warm-up).")
flags.DEFINE_bool("legacy", True, "Also time the in-memory tokenize_split path.")
flags.DEFINE_list("phases", ["prepare", "first_start", "restart", "iterate", "iterate_2proc"],
                  "Phases to run (the legacy ones follow --legacy); e.g. restart,iterate to"
                  " measure again on an existing store.")
flags.DEFINE_string("phase", "", "Internal: run one phase and print its result.")
flags.DEFINE_integer("process_index", 0, "Internal: iterate phase's process index.")
flags.DEFINE_integer("process_count", 1, "Internal: iterate phase's process count.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "PHASE_RESULT "
_SEED = 20170612


# ----------------------------------------------------------------------------
# Synthetic corpus.


def _invented_words(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
  """(bytes of all words each followed by a space, [count] start, [count] length with space)."""
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzaeiounrst", dtype=np.uint8)
  lengths = np.clip(rng.geometric(0.22, size=count), 1, 14) + 1  # + the space
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  buf = letters[rng.integers(0, len(letters), size=int(lengths.sum()))]
  buf[starts + lengths - 1] = ord(" ")
  return buf, starts, lengths


def _sentences(rng, words, cdf, lengths) -> bytes:
  """One line per entry of `lengths` (words per line) of Zipf-drawn words."""
  buf, wstart, wlen = words
  ids = np.searchsorted(cdf, rng.random(int(lengths.sum())), side="right")
  nbytes = wlen[ids]
  out_start = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
  gather = np.repeat(wstart[ids] - out_start, nbytes) + np.arange(int(nbytes.sum()))
  line = buf[gather]
  last_word = np.cumsum(lengths) - 1
  line[out_start[last_word] + nbytes[last_word] - 1] = ord("\n")  # trailing space -> newline
  return line.tobytes()


def make_corpus(directory: str, pairs: int, num_words: int) -> dict:
  """<directory>/train.{en,de}; reused when it was made with the same parameters."""
  params = {"pairs": pairs, "words": num_words, "seed": _SEED, "format": 1}
  done = os.path.join(directory, "DONE.json")
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      info = json.load(f)
    if info["params"] == params:
      return info
  os.makedirs(directory, exist_ok=True)
  t0 = time.time()
  rng = np.random.default_rng(_SEED)
  zipf = 1.0 / (np.arange(num_words) + 2.7) ** 1.07
  cdf = np.cumsum(zipf / zipf.sum())
  cdf[-1] = 1.0
  vocab = {lang: _invented_words(rng, num_words) for lang in ("en", "de")}
  words = {"en": 0, "de": 0}
  with open(os.path.join(directory, "train.en"), "wb") as fe, \
       open(os.path.join(directory, "train.de"), "wb") as fd:
    for start in range(0, pairs, 200_000):
      m = min(200_000, pairs - start)
      # WMT14 En-De-like: mean ~25 words, median ~21, a few up to 250.
      src = np.clip(np.rint(rng.lognormal(3.05, 0.62, size=m)), 1, 250).astype(np.int64)
      tgt = np.clip(np.rint(src * rng.lognormal(-0.02, 0.18, size=m)), 1, 250).astype(np.int64)
      fe.write(_sentences(rng, vocab["en"], cdf, src))
      fd.write(_sentences(rng, vocab["de"], cdf, tgt))
      words["en"] += int(src.sum())
      words["de"] += int(tgt.sum())
  info = {"params": params, "seconds": round(time.time() - t0, 1),
          "mean_words": {k: v / pairs for k, v in words.items()},
          "bytes": {lang: os.path.getsize(os.path.join(directory, f"train.{lang}"))
                    for lang in ("en", "de")}}
  with open(done, "w", encoding="utf-8") as f:
    json.dump(info, f)
  return info


# ----------------------------------------------------------------------------
# Phases (each in its own process).


def _recipe() -> dict[str, str]:
  """The paper's batching flags from experiments/paper/recipe.flags."""
  out = {}
  with open(os.path.join(REPO, "experiments", "paper", "recipe.flags"), encoding="utf-8") as f:
    for line in f:
      if line.startswith("--") and "=" in line:
        k, v = line[2:].strip().split("=", 1)
        out[k] = v
  return out


def _data_cfg():
  from transformer.config import DataConfig  # pylint: disable=g-import-not-at-top
  r = _recipe()
  return DataConfig(
      dataset="parallel_text", source_lang="en", target_lang="de",
      parallel_text_splits=f"train={os.path.join(FLAGS.workdir, 'corpus', 'train')}",
      tfds_data_dir=os.path.join(FLAGS.workdir, "tfds"),
      vocab_path=os.path.join(FLAGS.workdir, "spm.model"),
      spm_max_sentences=FLAGS.spm_max_sentences, tokenize_workers=FLAGS.tokenize_workers,
      tokens_per_batch=int(r["tokens_per_batch"]), bucket_boundaries=r["bucket_boundaries"],
      max_source_length=int(r["max_source_length"]), max_target_length=int(r["max_target_length"]))


def _iterator(tokenized, cfg, process_index=0, process_count=1):
  from transformer.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_train_iterator(tokenized, cfg, batch_multiple=process_count,
                                      process_index=process_index, process_count=process_count)


def _phase(name: str) -> dict:
  from transformer.data import datasets, pipeline, store, tokenizer  # pylint: disable=g-import-not-at-top
  cfg = _data_cfg()
  t0 = time.time()
  out: dict = {}
  if name == "prepare":
    examples = datasets.get_split(cfg, "train", cfg.tfds_data_dir)
    out["tfds_seconds"] = time.time() - t0
    t1 = time.time()
    tokenizer.load_or_train(cfg.vocab_path, examples.sentences, FLAGS.vocab_size,
                            max_sentences=cfg.spm_max_sentences)
    out["spm_seconds"] = time.time() - t1
    out["rows"] = len(examples)
  elif name in ("first_start", "restart", "iterate"):
    examples = datasets.get_split(cfg, "train", cfg.tfds_data_dir)
    tok = tokenizer.Tokenizer.load(cfg.vocab_path)
    workers = cfg.tokenize_workers or store.default_workers()
    root = os.path.join(cfg.tfds_data_dir, "tokenized")
    directory, meta, built = store.open_or_build(
        examples, tok, root, workers=workers,
        opener=_Opener(cfg, "train"))
    if name == "first_start" and not built:
      raise RuntimeError(f"first_start found a store at {directory}")
    out.update(store_built_now=built, store_workers=workers, store_dir=directory,
               store_bytes=sum(meta["file_bytes"].values()), store_build_seconds=time.time() - t0
               if built else 0.0, source_tokens=meta["source_tokens"],
               target_tokens=meta["target_tokens"])
    tokenized = store.StoredSplit(directory, cfg.max_source_length, cfg.max_target_length,
                                  drop_empty=True)
  elif name in ("legacy_first_start", "legacy_restart"):
    examples = datasets.get_split(cfg, "train", cfg.tfds_data_dir)
    tok = tokenizer.Tokenizer.load(cfg.vocab_path)
    tokenized = pipeline.tokenize_split(examples, tok, cfg.max_source_length,
                                        cfg.max_target_length, drop_empty=True)
  else:
    raise ValueError(f"unknown phase {name!r}")
  if name != "prepare":
    it = _iterator(tokenized, cfg, FLAGS.process_index, FLAGS.process_count)
    batch = next(it)
    out["seconds_to_first_batch"] = time.time() - t0
    out["kept_pairs"] = len(tokenized)
    if name == "iterate":
      for _ in range(19):
        next(it)
      rows = tokens = 0
      t1 = time.time()
      for _ in range(FLAGS.batches):
        batch = next(it)
        rows += int((batch["index"] >= 0).sum())
        tokens += int((batch["inputs"] != 0).sum() + (batch["targets"] != 0).sum())
      dt = time.time() - t1
      out.update(batches=FLAGS.batches, batches_per_s=FLAGS.batches / dt, rows_per_s=rows / dt,
                 non_pad_tokens_per_batch=tokens / FLAGS.batches,
                 process_index=FLAGS.process_index, process_count=FLAGS.process_count)
  out["seconds"] = time.time() - t0
  # Encoding workers (spawned: their ru_maxrss also counts this process's RSS when started).
  out["children_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  out["peak_rss_mib"] = _vm_hwm_mib()
  return out


def _vm_hwm_mib() -> float:
  """This process's peak RSS since exec (VmHWM; ru_maxrss would include the forking parent's)."""
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


class _Opener:
  """Picklable () -> the train split, for the store's worker processes."""

  def __init__(self, cfg, split):
    self.cfg, self.split = cfg, split

  def __call__(self):
    from transformer.data import datasets  # pylint: disable=g-import-not-at-top
    return datasets.get_split(self.cfg, self.split, self.cfg.tfds_data_dir)


# ----------------------------------------------------------------------------
# Driver.


def _start(name: str, log: str, process_index: int = 0, process_count: int = 1):
  args = [sys.executable, "-m", "benchmarks.input_pipeline", f"--phase={name}",
          f"--process_index={process_index}", f"--process_count={process_count}"]
  args += [f"--{k}={getattr(FLAGS, k)}" for k in ("pairs", "workdir", "words", "vocab_size",
                                                 "spm_max_sentences", "tokenize_workers",
                                                 "batches")]
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  with open(log, "w", encoding="utf-8") as f:
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _finish(proc, log: str) -> dict:
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  with open(log, encoding="utf-8", errors="replace") as f:
    text = f.read()
  lines = [l for l in text.splitlines() if l.startswith(MARK)]
  if proc.returncode != 0 or len(lines) != 1:
    raise RuntimeError(f"phase failed (exit {proc.returncode}), log {log}:\n{text[-3000:]}")
  result = json.loads(lines[0][len(MARK):])
  result["ru_maxrss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux; includes the driver at fork
  return result


def _run(name: str, logs: str) -> dict:
  log = os.path.join(logs, f"{name}.log")
  return _finish(_start(name, log), log)


def _cpu_model() -> str:
  """/proc/cpuinfo's model name; platform.processor() where there is no /proc (e.g. macOS)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    return platform.processor()
  return platform.processor()


def main(argv):
  del argv
  if FLAGS.phase:
    print(MARK + json.dumps(_phase(FLAGS.phase)), flush=True)
    return
  if FLAGS.pairs <= 0 or FLAGS.batches <= 0:
    raise app.UsageError("--pairs and --batches must be positive")
  logs = os.path.join(FLAGS.workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  corpus = make_corpus(os.path.join(FLAGS.workdir, "corpus"), FLAGS.pairs, FLAGS.words)
  phases = {}
  for name in ("prepare", "first_start", "restart"):
    if name in FLAGS.phases:
      phases[name] = _run(name, logs)
  if FLAGS.legacy:
    phases["legacy_first_start"] = _run("legacy_first_start", logs)
    phases["legacy_restart"] = _run("legacy_restart", logs)
  if "iterate" in FLAGS.phases:
    phases["iterate"] = _run("iterate", logs)
  if "iterate_2proc" in FLAGS.phases:
    procs = [(_start("iterate", os.path.join(logs, f"iterate_2proc_{p}.log"), p, 2),
              os.path.join(logs, f"iterate_2proc_{p}.log")) for p in range(2)]
    phases["iterate_2proc"] = [_finish(p, log) for p, log in procs]
  r = _recipe()
  print(json.dumps({
      "benchmark": "input_pipeline", "pairs": FLAGS.pairs, "corpus": corpus,
      "vocab_size": FLAGS.vocab_size, "spm_max_sentences": FLAGS.spm_max_sentences,
      "tokens_per_batch": int(r["tokens_per_batch"]), "bucket_boundaries": r["bucket_boundaries"],
      "prepare_seconds": phases.get("prepare", {}).get("seconds"),
      "first_start_seconds": phases.get("first_start", {}).get("seconds_to_first_batch"),
      "restart_seconds": phases.get("restart", {}).get("seconds_to_first_batch"),
      "legacy_first_start_seconds": phases.get("legacy_first_start", {}).get(
          "seconds_to_first_batch"),
      "legacy_restart_seconds": phases.get("legacy_restart", {}).get("seconds_to_first_batch"),
      "batches_per_s": phases.get("iterate", {}).get("batches_per_s"),
      "batches_per_s_2proc": [x["batches_per_s"] for x in phases.get("iterate_2proc", [])],
      "peak_rss_mib": {k: ([x["peak_rss_mib"] for x in v] if isinstance(v, list)
                           else v["peak_rss_mib"]) for k, v in phases.items()},
      "phases": phases, "cpu": _cpu_model(), "cpus": os.cpu_count()}, indent=None))


if __name__ == "__main__":
  app.run(main)
