r"""Entry point: flags -> frozen config -> library calls.

  python -m transformer.main --flagfile=experiments/cpu/multi30k_en_de.flags \
      --workdir=/tmp/m30k --mode=prepare|train|evaluate|translate|average

Modes:
  prepare    prepare the data of every split, train the vocabulary and tokenize each split
             once into a store next to the data (a second run does nothing)
  train      train (resuming from the workdir's latest checkpoint), evaluating on the dev split
  average    average the last --num_average checkpoints (or --average_window_steps of steps)
             into <workdir>/averaged
  evaluate   beam-search the --test_split, write hypotheses, print BLEU and perplexity
  translate  translate sentences from --input (default stdin) to --output (default stdout)
  plot       learning curves of <workdir>/metrics.jsonl -> <workdir>/plots/learning_curves.png
  attention  heatmaps of every layer/head for --sentence -> <workdir>/plots/attention_*.png
  diagnose   for step 0 and every checkpoint: dev NLL with true and shuffled sources, attention
             entropy and gradient norm of every layer (transformer/diagnostics.py)
  compile    compile the run's train/eval/decode programs for --topology (a TPU slice or GPU
             node, no accelerator needed): memory per device, fit, FLOPs, step time

Exit status: 0 done, 2 a user error (one `error:` line), 143 (128 + SIGTERM) a train stopped
by SIGTERM before --num_train_steps: its checkpoint is saved, the same command resumes it.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging

from transformer import config as config_lib
from transformer import host

FLAGS = flags.FLAGS
# The shell's status of a process ended by SIGTERM: a train that saved and stopped early.
EXIT_SIGTERM = 128 + signal.SIGTERM
config_lib.define_flags(FLAGS)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, vocabulary, metrics, outputs.")
flags.DEFINE_enum("mode", "train",
                  ["prepare", "train", "evaluate", "translate", "average", "plot", "attention",
                   "compile", "diagnose"],
                  "What to do.")
flags.DEFINE_string("checkpoint", "latest",
                    "Checkpoint for evaluate/translate: 'latest', 'averaged' or a step number.")
flags.DEFINE_string("input", None, "translate: input file (default stdin).")
flags.DEFINE_string("output", None, "translate: output file (default stdout);"
                    " evaluate: hypotheses file (default <workdir>/<split>.hyp).")
flags.DEFINE_string("sentence", "", "attention: the source sentence to draw.")
flags.DEFINE_string("topology", None, "compile: v4-8, v5p-8, v5e-8, v5e-16, v6e-8, a100-40gb-x8,"
                    " a100-80gb-x8 or h100-x8 (transformer/aot.py ACCELERATORS).")
flags.DEFINE_integer("num_slices", 1, "compile: TPU slices (multi-slice v5e-16).")
flags.DEFINE_float("mfu", 0.4, "compile: model FLOP utilisation assumed for step times.")
host.define_flag()


class _LineTracker:
  """sys.stderr that knows whether its last write ended a line (progress bars end with '\r')."""

  def __init__(self, stream):
    self._stream = stream
    self.mid_line = False

  def write(self, text):
    if text:
      self.mid_line = not text.endswith("\n")
    return self._stream.write(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _fail(message: str) -> None:
  """One `error:` line, on a line of its own even after a progress bar, and exit 2."""
  start = "\n" if getattr(sys.stderr, "mid_line", False) else ""
  print(f"{start}error: {message}", file=sys.stderr)
  sys.exit(2)


class _QuietLibraries:
  """Keeps library INFO chatter (Orbax, TFDS, Grain) out of the progress log; warnings pass."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/jax/_src/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self._NOISY)


def main(argv):
  if not isinstance(sys.stderr, _LineTracker):
    sys.stderr = _LineTracker(sys.stderr)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every option is a --flag")
  if FLAGS.mode == "compile":
    if not FLAGS.topology:
      _fail("--mode=compile needs --topology")
    # Compile for the accelerator from the host: keep JAX's own backend on the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  elif not FLAGS.workdir:
    _fail("--workdir is required")
  if FLAGS.workdir and os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    _fail(f"--workdir {FLAGS.workdir} is a file, not a directory")
  if host.cpu_unless_accelerator():  # installed TPU/GPU plugins are not probed on a CPU host
    logging.info("no TPU/GPU device files (%s): JAX_PLATFORMS=cpu; set JAX_PLATFORMS to"
                 " override", ", ".join(host.ACCELERATOR_DEVICE_FILES))
  if FLAGS.retain_freed_memory and not host.retain_freed_memory():  # before JAX's threads
    logging.warning("--retain_freed_memory: no glibc mallopt here; the allocator is unchanged")
  from transformer import run  # pylint: disable=g-import-not-at-top  (imports jax)
  try:
    cfg = config_lib.from_flags(FLAGS)
    run.check_paths(cfg, FLAGS.mode, FLAGS.workdir, FLAGS.input, FLAGS.output)
    if FLAGS.mode == "prepare":
      run.prepare(cfg, FLAGS.workdir)
    elif FLAGS.mode == "train":
      if run.train(cfg, FLAGS.workdir).get("preempted"):
        sys.exit(EXIT_SIGTERM)  # not finished: callers must not go on to average/evaluate
    elif FLAGS.mode == "average":
      run.average(cfg, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      run.evaluate(cfg, FLAGS.workdir, FLAGS.checkpoint, FLAGS.output)
    elif FLAGS.mode == "translate":
      run.translate(cfg, FLAGS.workdir, FLAGS.checkpoint, FLAGS.input, FLAGS.output)
    elif FLAGS.mode == "plot":
      run.plot(FLAGS.workdir, FLAGS.output)
    elif FLAGS.mode == "attention":
      run.attention(cfg, FLAGS.workdir, FLAGS.sentence, FLAGS.checkpoint, FLAGS.output)
    elif FLAGS.mode == "diagnose":
      run.diagnose(cfg, FLAGS.workdir)
    elif FLAGS.mode == "compile":
      from transformer import aot  # pylint: disable=g-import-not-at-top
      aot.run(cfg, FLAGS.topology, FLAGS.num_slices, FLAGS.mfu)
  except run.USER_ERRORS as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def run_main():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  app.run(main)


if __name__ == "__main__":
  run_main()
