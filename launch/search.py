r"""Hyperparameter search (Optuna): sampled trials that are sweep runs, pruned at dev evaluations.

  python -m launch.search SPEC.json --root=R [--workers=N [--cpus_per_run=K]] [--storage=URL]
                          [--slurm] [--confirm_seeds=S [--confirm_top_k=K]] [extra --flags...]
  python -m launch.search report R [--out=R/report] [--storage=URL]

A spec is JSON (see experiments/sweeps/*search*.json):

  {
    "description": "free text",
    "base_flagfile": "experiments/cpu/multi30k_en_de.flags",   # relative to the repo root
    "flags": {"eval_every_steps": 500},                          # every trial; '{root}' -> R
    "space": {                                                   # sampled in this order
      "dropout_rate": {"type": "float", "low": 0.1, "high": 0.4},
      "learning_rate_scale": {"type": "float", "low": 0.5, "high": 4, "log": true},
      "layers": {"type": "int", "low": 3, "high": 5,
                 "flags": ["num_encoder_layers", "num_decoder_layers"]},  # one value, two flags
      "attention_dropout": {"type": "categorical", "choices": [0.0, 0.1]},
      "d_k": {"type": "int", "low": 16, "high": 64, "step": 16,
              "if": {"attention_dropout": [0.1]}}                # conditional on earlier values
    },
    "objective": {"metric": "bleu", "direction": "maximize"},   # a key of metrics.jsonl 'eval'
    "budget": {"trials": 40, "minutes": 600},   # either or both: trials finished, pruned or
                                                # running; minutes of each worker, per start
    "sampler": {"name": "tpe", "seed": 0},                       # tpe | random; trial n: seed + n
    "pruner": {"name": "median", "n_warmup_steps": 1000},        # median | successive_halving
                                                                 # | hyperband | none (+ kwargs)
    "study_name": "name (default: the spec's file name)",
    "enqueue": [{"dropout_rate": 0.3}],   # points tried first (e.g. a published recipe), once;
                                          # parameters left out are sampled
    "steps": ["train"], "slurm": {...}                           # as in launch.sweep
  }

A trial is a sweep run (launch.sweep's machinery): R/trial_NNNN/ with flags.txt, run.json
(+ the trial number), status.json and <step>.log, trained by the same `transformer.main`
subprocess. Every dev evaluation the run writes to metrics.jsonl is reported to the pruner; a
pruned trial's process gets SIGTERM, which saves a checkpoint and exits, so a longer budget can
continue it. The trial's value is its last dev evaluation.

The study lives in R/study.journal (Optuna's journal storage: append-only text, one lock file
made with O_CREAT|O_EXCL, safe for local processes and NFSv3+), or in --storage=URL (an RDB).
Rerunning the command continues the study. SIGTERM to the command (or a worker) stops each
running trial through SIGTERM (a checkpoint) and queues it again; so does a SIGTERM that reaches
a trial's training alone (it exits 143, not finished). A RUNNING trial whose worker died (its
pid is gone on this host, or, from another host, its heartbeat file in R/workers/ is older
than HEARTBEAT_STALE_S) is marked FAIL and enqueued again with the same parameters and run
directory, so its training resumes from its checkpoint; it is never counted twice.

--workers=N starts N worker processes, each pinned to its own --cpus_per_run cores.
--slurm writes R/search.sbatch, a job array whose tasks are workers of the same study.
--confirm_seeds=S reruns the top --confirm_top_k completed trials with S more seeds
(R/<run>_seed<i>/) and writes R/confirm.json: the winner by the mean, with the spread.
`report` writes R/report/: report.md (trials, best, importances, confirmation), trials.csv,
history.png and parallel_coordinate.png, and R/best.flags (the best trial's flags).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from launch import sweep
from launch.sweep import SpecError

SPEC_KEYS = ("description", "base_flagfile", "flags", "space", "objective", "budget", "sampler",
             "pruner", "study_name", "steps", "evaluate_checkpoint", "slurm", "enqueue")
JOURNAL = "study.journal"
HEARTBEAT_S = 20.0
HEARTBEAT_STALE_S = 120.0
POLL_S = 0.5
STOPPED = sweep.INTERRUPTED  # a worker's exit status after SIGTERM
# Keys of a dev evaluation record (metrics.jsonl, kind 'eval'): always, and with
# --eval_bleu_sentences > 0 per task.
_EVAL_ALWAYS = ("nll", "perplexity")
_EVAL_DECODED = {"translation": ("bleu",), "parsing": ("f1", "exact_match")}
_PRUNERS = ("median", "successive_halving", "hyperband", "none")
_SAMPLERS = ("tpe", "random")


def _optuna():
  import optuna  # pylint: disable=g-import-not-at-top
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  return optuna


# ----------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------

def check_spec(spec: dict[str, Any]) -> None:
  """The spec's shape, ranges and choices (flags are validated by `validate`)."""
  sweep.base_and_common(spec, "ROOT", SPEC_KEYS)
  space = spec.get("space")
  if not isinstance(space, dict) or not space:
    raise SpecError('"space" (an object of parameter -> range) is required')
  seen: list[str] = []
  for name, p in space.items():
    where = f'"space": {name!r}'
    if not isinstance(p, dict):
      raise SpecError(f"{where} must be an object with a \"type\"")
    kind = p.get("type")
    allowed = {"type", "flags", "if"}
    if kind in ("float", "int"):
      allowed |= {"low", "high", "log", "step"}
      low, high = p.get("low"), p.get("high")
      number = (int,) if kind == "int" else (int, float)
      if (not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool)
          or isinstance(high, bool)):
        raise SpecError(f"{where}: \"low\" and \"high\" must be {kind}s")
      if not low < high:
        raise SpecError(f"{where}: bad range, low {low} must be below high {high}")
      if p.get("log") and low <= 0:
        raise SpecError(f"{where}: bad range, a log range needs low > 0 (got {low})")
      if "step" in p and (not isinstance(p["step"], number) or p["step"] <= 0 or p.get("log")):
        raise SpecError(f"{where}: \"step\" must be a positive {kind} (and not with log)")
    elif kind == "categorical":
      allowed |= {"choices"}
      choices = p.get("choices")
      if not isinstance(choices, list) or not choices:
        raise SpecError(f"{where}: \"choices\" must be a non-empty list")
      for c in choices:
        sweep.flag_arg(name, c)
    else:
      raise SpecError(f"{where}: \"type\" must be float, int or categorical, not {kind!r}")
    extra = sorted(set(p) - allowed)
    if extra:
      raise SpecError(f"{where}: unknown key {extra[0]!r}")
    for flag in _param_flags(name, p):
      sweep._check_flag_name(where, flag)  # pylint: disable=protected-access
      if flag in (spec.get("flags") or {}):
        raise SpecError(f"{where}: flag {flag!r} is also fixed in \"flags\"")
    for other, values in (p.get("if") or {}).items():
      if other not in seen or not isinstance(values, list):
        raise SpecError(f"{where}: \"if\" must name earlier parameters with lists of values")
    seen.append(name)
  enqueue = spec.get("enqueue", [])
  if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
    raise SpecError('"enqueue" must be a list of objects of parameter -> value')
  for point in enqueue:
    for name, value in point.items():
      p = space.get(name)
      if p is None:
        raise SpecError(f'"enqueue": {name!r} is not a parameter of "space"')
      if p["type"] == "categorical":
        ok = value in p["choices"]
      else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (p["type"] == "float" or isinstance(value, int))
              and p["low"] <= value <= p["high"])
      if not ok:
        raise SpecError(f'"enqueue": {name}={value!r} is outside its range or choices')
  objective = spec.get("objective")
  if (not isinstance(objective, dict) or not isinstance(objective.get("metric"), str)
      or objective.get("direction") not in ("minimize", "maximize")
      or set(objective) - {"metric", "direction"}):
    raise SpecError('"objective" must be {"metric": <dev eval key>, "direction":'
                    ' "minimize" | "maximize"}')
  budget = spec.get("budget")
  if (not isinstance(budget, dict) or not budget or set(budget) - {"trials", "minutes"}
      or any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0
             for v in budget.values())):
    raise SpecError('"budget" must be {"trials": N and/or "minutes": M}, positive numbers')
  sampler = dict(spec.get("sampler") or {})
  if sampler.get("name", "tpe") not in _SAMPLERS:
    raise SpecError(f'"sampler": name must be one of {", ".join(_SAMPLERS)}')
  pruner = dict(spec.get("pruner") or {})
  if pruner.get("name", "median") not in _PRUNERS:
    raise SpecError(f'"pruner": name must be one of {", ".join(_PRUNERS)}')
  sweep._steps(spec)  # pylint: disable=protected-access


def _param_flags(name: str, p: dict) -> list[str]:
  flags = p.get("flags", [name])
  if not isinstance(flags, list) or not flags or not all(isinstance(f, str) for f in flags):
    raise SpecError(f'"space": {name!r}: "flags" must be a non-empty list of flag names')
  return flags


def _common_args(spec: dict, root: str) -> list[str]:
  base, common = sweep.base_and_common(spec, root, SPEC_KEYS)
  return [f"--flagfile={base}", *common]


def make_run(spec: dict, root: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
  """A sweep run ({'name', 'overrides', 'flags'}) of sampled parameter values."""
  flags = _common_args(spec, root)
  for pname, value in params.items():
    for flag in _param_flags(pname, spec["space"][pname]):
      flags.append(sweep.flag_arg(flag, value))
  return {"name": name, "overrides": dict(params), "flags": flags}


def probe_runs(spec: dict, root: str) -> list[dict]:
  """One run per end of every range and per choice, the rest at their lower ends / first choices:
  every flag and every value the search can set is validated before any trial."""
  def ends(p):
    if p["type"] == "categorical":
      return list(p["choices"])
    return [p["low"], p["high"]]
  first = {n: ends(p)[0] for n, p in spec["space"].items()}
  runs = []
  for name, p in spec["space"].items():
    for value in ends(p):
      runs.append(make_run(spec, root, f"probe_{name}={value}", {**first, name: value}))
  return runs


def check_objective(spec: dict, run: dict, extra: list[str]) -> None:
  """The objective is a key that the dev evaluations of these flags write."""
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  with sweep._cwd(sweep.REPO):  # pylint: disable=protected-access
    cfg = config_lib.from_args(run["flags"] + extra)
  keys = list(_EVAL_ALWAYS)
  if cfg.train.eval_bleu_sentences > 0:
    keys += _EVAL_DECODED.get(cfg.data.task, ())
  metric = spec["objective"]["metric"]
  if metric not in keys:
    raise SpecError(f'"objective": no dev evaluation writes {metric!r} with these flags'
                    f" (they write {', '.join(keys)}; BLEU/F1 need --eval_bleu_sentences > 0)")


def storage_url(args, root: str) -> str:
  return args.storage or os.path.join(root, JOURNAL)


def _shown(url: str) -> str:
  """The storage URL without its password (search.json may be committed)."""
  if "://" not in url:
    return url
  import sqlalchemy  # pylint: disable=g-import-not-at-top
  return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def writable(directory: str, what: str) -> None:
  """Makes `directory` if missing and checks that a file can be made in it."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".probe.{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.unlink(probe)
  except OSError as e:
    raise SpecError(f"{what} cannot be written: {e.strerror or e}") from None


def open_storage(url: str):
  """The study storage: an RDB URL, else a journal file (made if missing)."""
  optuna = _optuna()
  if "://" in url:
    import sqlalchemy  # pylint: disable=g-import-not-at-top
    try:
      return optuna.storages.RDBStorage(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
      raise SpecError(f"--storage={url}: {str(e).splitlines()[0]}") from None
  from optuna.storages import journal  # pylint: disable=g-import-not-at-top
  writable(os.path.dirname(url) or ".", f"storage {url}")  # the lock file is made beside it
  try:
    with open(url, "a", encoding="utf-8"):
      pass
  except OSError as e:
    raise SpecError(f"storage {url} cannot be written: {e.strerror or e}") from None
  return journal.JournalStorage(journal.JournalFileBackend(
      url, lock_obj=journal.JournalFileOpenLock(url)))


def _sampler(spec: dict, trial_number: int = 0):
  """The spec's sampler, its seed (if any) offset by the number of the trial it will sample.

  One seed per trial number: workers, and a worker that starts again, never replay each
  other's draws, and the draws do not depend on which worker asks.
  """
  optuna = _optuna()
  s = dict(spec.get("sampler") or {})
  name = s.pop("name", "tpe")
  if isinstance(s.get("seed"), int):
    s["seed"] += trial_number
  try:
    if name == "random":
      return optuna.samplers.RandomSampler(**s)
    return optuna.samplers.TPESampler(**s)
  except TypeError as e:
    raise SpecError(f'"sampler": {e}') from None


def _pruner(spec: dict):
  optuna = _optuna()
  p = dict(spec.get("pruner") or {})
  name = p.pop("name", "median")
  cls = {"median": optuna.pruners.MedianPruner, "none": optuna.pruners.NopPruner,
         "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
         "hyperband": optuna.pruners.HyperbandPruner}[name]
  try:
    return cls(**p)
  except (TypeError, ValueError) as e:
    raise SpecError(f'"pruner": {e}') from None


def study_name(spec_path: str, spec: dict) -> str:
  return spec.get("study_name") or os.path.splitext(os.path.basename(spec_path))[0]


def load_study(spec_path: str, spec: dict, url: str):
  optuna = _optuna()
  return optuna.create_study(
      storage=open_storage(url), study_name=study_name(spec_path, spec), load_if_exists=True,
      direction=spec["objective"]["direction"], sampler=_sampler(spec), pruner=_pruner(spec))


# ----------------------------------------------------------------------------
# A worker
# ----------------------------------------------------------------------------

def _pid_start(pid: int) -> Optional[str]:
  """The start time of a process (field 22 of /proc/PID/stat), or None when it is gone."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


class Heartbeat:
  """R/workers/<host>-<pid>: touched every HEARTBEAT_S seconds while this worker lives."""

  def __init__(self, root: str):
    self.path = os.path.join(root, "workers", f"{socket.gethostname()}-{os.getpid()}")
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self) -> None:
    while True:
      with open(self.path, "w", encoding="utf-8") as f:
        f.write(f"{time.time()}\n")
      if self._stop.wait(HEARTBEAT_S):
        return

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    os.unlink(self.path)


def worker_alive(attrs: dict, root: str) -> bool:
  """Whether the worker that a RUNNING trial's user attributes name still runs."""
  host, pid = attrs.get("host"), attrs.get("pid")
  if host is None or pid is None:
    return False
  if host == socket.gethostname():
    return _pid_start(pid) == attrs.get("pid_start")
  try:
    beat = os.path.getmtime(os.path.join(root, "workers", f"{host}-{pid}"))
  except OSError:
    return False
  return time.time() - beat < HEARTBEAT_STALE_S


def recover_dead_trials(study, root: str, say) -> list[int]:
  """Marks RUNNING trials of dead workers FAIL and enqueues each again (same params, same run).

  Of several workers recovering the same trial, only the one whose FAIL lands first enqueues.
  """
  optuna = _optuna()
  recovered = []
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    if worker_alive(t.user_attrs, root):
      continue
    if "pid" not in t.user_attrs and time.time() - t.datetime_start.timestamp() < HEARTBEAT_STALE_S:
      continue  # just asked for; its worker has not written its attributes yet
    if not requeue(study, t):
      continue
    say(f"trial {t.number}: its worker {t.user_attrs.get('host')}:{t.user_attrs.get('pid')}"
        " is gone; marked failed and queued again")
    recovered.append(t.number)
  return recovered


def requeue(study, t) -> bool:
  """Marks a running trial FAIL and enqueues it again (same params and run); False where it
  had finished already (another worker got there first)."""
  optuna = _optuna()
  try:
    study._storage.set_trial_state_values(  # pylint: disable=protected-access
        t._trial_id, optuna.trial.TrialState.FAIL)  # pylint: disable=protected-access
  except optuna.exceptions.UpdateFinishedTrialError:
    return False
  study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "run": t.user_attrs.get("run")})
  return True


def sample(trial, space: dict) -> dict[str, Any]:
  """Values of the space's parameters for this trial (conditionals only where their "if" holds)."""
  params: dict[str, Any] = {}
  for name, p in space.items():
    cond = p.get("if") or {}
    if any(params.get(other) not in values for other, values in cond.items()):
      continue
    if p["type"] == "float":
      params[name] = trial.suggest_float(name, p["low"], p["high"], log=p.get("log", False),
                                         step=p.get("step"))
    elif p["type"] == "int":
      params[name] = trial.suggest_int(name, p["low"], p["high"], log=p.get("log", False),
                                       step=p.get("step", 1))
    else:
      params[name] = trial.suggest_categorical(name, p["choices"])
  return params


def _records(workdir: str, kind: str) -> list[dict]:
  from transformer.metrics_writer import read_metrics  # pylint: disable=g-import-not-at-top
  return read_metrics(workdir, kind, missing_ok=True)  # none before the run writes the file


def eval_values(workdir: str, metric: str) -> list[tuple[int, float]]:
  """(step, value) of the run's dev evaluations, one per step (the latest record of a step)."""
  by_step = {r["step"]: r[metric] for r in _records(workdir, "eval") if metric in r}
  return sorted(by_step.items())


def seconds_per_step(workdir: str) -> Optional[float]:
  """The median training seconds per step of a run (its train records' 1 / steps_per_s), which
  sizes a full-length run of its settings; None before its first train record."""
  per_step = [1.0 / r["steps_per_s"] for r in _records(workdir, "train") if r.get("steps_per_s")]
  return round(statistics.median(per_step), 4) if per_step else None


class TrialRunner(sweep.Runner):
  """A sweep Runner whose train step reports dev evaluations to a trial and stops when pruned."""

  die_with_parent = True  # a worker killed with -9 leaves no training behind

  def __init__(self, spec: dict, extra: list[str], root: str, python: str):
    super().__init__(spec, extra, root, python)
    self.metric = spec["objective"]["metric"]
    self.trial = None
    self.pruned_at: Optional[int] = None
    self.interrupted = False  # its training exited 143: stopped by a SIGTERM not from here
    self.stop = threading.Event()  # SIGTERM to the worker: stop the run, retry it later

  def say(self, message: str) -> None:
    with self._lock:
      print(f"[search {os.getpid()}] {message}", flush=True)

  def _wait(self, proc: subprocess.Popen, run: dict, step: str) -> Optional[int]:
    if step != "train" or self.trial is None:
      return proc.wait()
    workdir, reported = os.path.join(self.root, run["name"]), set()
    while True:
      rc = proc.poll()
      for s, value in eval_values(workdir, self.metric):
        if s in reported:
          continue
        reported.add(s)
        self.trial.report(value, s)
        if self.trial.should_prune():
          self.say(f"{run['name']}: pruned at step {s} ({self.metric} {value:.4g});"
                   " stopping it (SIGTERM)")
          self.pruned_at = s
          if rc is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
          return None
      if rc is not None:
        self.interrupted = rc == sweep.INTERRUPTED
        return rc
      if self.stop.is_set():
        proc.send_signal(signal.SIGTERM)  # the run saves a checkpoint and exits
        proc.wait()
        return None
      time.sleep(POLL_S)

  def run_trial(self, study, trial, spec: dict) -> None:
    """Runs one asked trial to its end and tells the study (COMPLETE, PRUNED or FAIL)."""
    optuna = _optuna()
    params = sample(trial, spec["space"])
    name = trial.user_attrs.get("run") or f"trial_{trial.number:04d}"
    trial.set_user_attr("run", name)
    run = make_run(spec, self.root, name, params)
    sweep.write_run_files(run, self.extra, os.path.join(self.root, name), trial=trial.number)
    self.trial, self.pruned_at, self.interrupted = trial, None, False
    t0 = time.time()
    try:
      ok = self.run(run)
    finally:
      self.trial = None
    values = eval_values(os.path.join(self.root, name), self.metric)
    if (self.stop.is_set() or self.interrupted) and not ok and self.pruned_at is None:
      requeue(study, trial)
      state = "stopped by SIGTERM; queued again, to continue from its checkpoint"
    elif self.pruned_at is not None:
      study.tell(trial, state=optuna.trial.TrialState.PRUNED)
      state = f"PRUNED at step {self.pruned_at}"
    elif ok and values:
      study.tell(trial, values[-1][1])
      state = f"COMPLETE, {self.metric} {values[-1][1]:.4g} at step {values[-1][0]}"
    else:
      study.tell(trial, state=optuna.trial.TrialState.FAIL)
      state = "FAILED" + ("" if values else f" (no dev {self.metric} written)")
    self.say(f"trial {trial.number} ({name}): {state} in {time.time() - t0:.1f} s")


@contextlib.contextmanager
def _held(lock):
  lock.acquire()
  try:
    yield
  finally:
    lock.release()


def _count(study, states) -> int:
  return len(study.get_trials(deepcopy=False, states=states))


def run_worker(spec_path: str, spec: dict, root: str, url: str, extra: list[str],
               python: str) -> int:
  """Asks for, runs and tells trials until the budget is spent."""
  from optuna.storages import journal  # pylint: disable=g-import-not-at-top
  optuna = _optuna()
  TS = optuna.trial.TrialState  # pylint: disable=invalid-name
  study = load_study(spec_path, spec, url)
  runner = TrialRunner(spec, extra, root, python)
  budget = spec["budget"]
  deadline = time.time() + 60 * budget["minutes"] if "minutes" in budget else math.inf
  # Counting and asking happen under one lock, so N workers never start more than the budget.
  ask_lock = journal.JournalFileOpenLock(os.path.join(root, "search.ask"))
  signal.signal(signal.SIGTERM, lambda signum, frame: runner.stop.set())
  with Heartbeat(root):
    while time.time() < deadline and not runner.stop.is_set():
      with _held(ask_lock):
        recover_dead_trials(study, root, runner.say)
        if ("trials" in budget and _count(study, (TS.COMPLETE, TS.PRUNED, TS.RUNNING))
            >= budget["trials"]):
          break
        study.sampler = _sampler(spec, trial_number=len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        # Who runs it, written before the lock is released (so it is not taken for dead).
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("pid_start", _pid_start(os.getpid()))
      runner.run_trial(study, trial, spec)
  return STOPPED if runner.stop.is_set() else 0


# ----------------------------------------------------------------------------
# Confirmation with more seeds
# ----------------------------------------------------------------------------

def _seed(flags: list[str]) -> int:
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  with sweep._cwd(sweep.REPO):  # pylint: disable=protected-access
    return config_lib.from_args(flags).train.seed


def confirm(study, spec: dict, root: str, extra: list[str], python: str, seeds: int, top_k: int,
            cpu_sets, workers: int) -> dict:
  """Reruns the top_k completed trials with `seeds` more seeds; the winner has the best mean."""
  optuna = _optuna()
  maximize = spec["objective"]["direction"] == "maximize"
  metric = spec["objective"]["metric"]
  done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  top = sorted(done, key=lambda t: t.value, reverse=maximize)[:top_k]
  runs, rows = [], []
  for t in top:
    base = make_run(spec, root, t.user_attrs["run"], t.params)
    seed0 = _seed(base["flags"] + extra)
    row = {"trial": t.number, "run": base["name"], "params": t.params,
           "seeds": [seed0], "runs": [base["name"]]}
    for i in range(1, seeds + 1):
      run = dict(base, name=f"{base['name']}_seed{seed0 + i}",
                 flags=base["flags"] + [f"--seed={seed0 + i}"])
      sweep.write_run_files(run, extra, os.path.join(root, run["name"]), confirms=t.number)
      runs.append(run)
      row["seeds"].append(seed0 + i)
      row["runs"].append(run["name"])
    rows.append(row)
  runner = sweep.Runner(spec, extra, root, python, cpu_sets)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(runner.run, runs))
  for row in rows:
    values = [eval_values(os.path.join(root, r), metric) for r in row["runs"]]
    row["values"] = [v[-1][1] if v else None for v in values]
    got = [v for v in row["values"] if v is not None]
    row["mean"] = statistics.fmean(got) if got else None
    row["std"] = statistics.stdev(got) if len(got) > 1 else 0.0
    row["complete"] = len(got) == len(row["runs"])
  ranked = [r for r in rows if r["complete"]]
  ranked.sort(key=lambda r: r["mean"], reverse=maximize)
  result = {"metric": metric, "direction": spec["objective"]["direction"], "seeds": seeds,
            "trials": rows, "winner": ranked[0]["trial"] if ranked else None}
  sweep._write_json(os.path.join(root, "confirm.json"), result)  # pylint: disable=protected-access
  return result


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def best_flags_text(root: str, run_name: str, note: str) -> str:
  """The best run's flags as a flag file (its --workdir left out: give your own)."""
  with open(os.path.join(root, run_name, "run.json"), encoding="utf-8") as f:
    flags = json.load(f)["flags"]
  return "\n".join([f"# {note}", "# Run from the repository root: python -m transformer.main"
                    f" --flagfile={os.path.join(root, 'best.flags')} --workdir=DIR --mode=train",
                    *flags]) + "\n"


def report(root: str, out: str, storage: Optional[str] = None) -> int:
  with open(os.path.join(root, "search.json"), encoding="utf-8") as f:
    meta = json.load(f)
  if storage:
    meta["storage"] = storage
  elif ":***@" in meta["storage"]:
    raise SpecError(f"the study is in {meta['storage']}: give --storage=URL with its password")
  optuna = _optuna()
  spec = sweep.load_spec(meta["spec"])
  study = optuna.load_study(study_name=meta["study_name"], storage=open_storage(meta["storage"]))
  trials = study.get_trials(deepcopy=False)
  if not trials:
    raise SpecError(f"the study {meta['study_name']} in {meta['storage']} has no trials yet")
  os.makedirs(out, exist_ok=True)
  names = list(spec["space"])
  metric = spec["objective"]["metric"]
  columns = ["trial", "state", metric, "step", *names, "seconds", "s/step", "run", "retry_of"]
  rows = []
  for t in trials:
    run = t.user_attrs.get("run")
    last = t.last_step
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
    value = t.value if t.value is not None else (t.intermediate_values.get(last) if last is not None else None)
    rows.append({"trial": t.number, "state": t.state.name, metric: value, "step": last,
                 **t.params, "seconds": round(seconds, 1) if seconds is not None else None,
                 "s/step": seconds_per_step(os.path.join(root, run)) if run else None,
                 "run": run, "retry_of": t.user_attrs.get("retry_of")})
  lines = [f"# Search {meta['study_name']}", "", f"{meta.get('description', '')}", "",
           f"Objective: {spec['objective']['direction']} dev `{metric}` (last evaluation of a"
           " run; a pruned trial shows its last reported value).", "",
           "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
  with open(os.path.join(out, "trials.csv"), "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  if complete:
    best = study.best_trial
    lines += ["", f"**Best trial**: {best.number} ({best.user_attrs['run']}), {metric}"
              f" {best.value:.4g}, {json.dumps(best.params)}"]
    winner, note = best, f"best trial {best.number} of study {meta['study_name']}: {metric} {best.value:.6g}"
    confirmed = sweep._read_json(os.path.join(root, "confirm.json"))  # pylint: disable=protected-access
    if confirmed and confirmed.get("winner") is not None:
      lines += ["", f"**Confirmation** with {confirmed['seeds']} more seeds (winner by the mean):",
                "", f"| trial | seeds | {metric} per seed | mean | std |", "|---|---|---|---|---|"]
      for r in confirmed["trials"]:
        lines.append(f"| {r['trial']} | {' '.join(map(str, r['seeds']))} |"
                     f" {' '.join(_fmt(v) for v in r['values'])} | {_fmt(r['mean'])} |"
                     f" {_fmt(r['std'])} |")
      winner = study.trials[confirmed["winner"]]
      row = next(r for r in confirmed["trials"] if r["trial"] == winner.number)
      note = (f"trial {winner.number} of study {meta['study_name']}, the winner of the"
              f" confirmation: {metric} mean {row['mean']:.6g} ± {row['std']:.2g} over seeds"
              f" {row['seeds']}")
      lines += ["", f"**Winner**: trial {winner.number} (mean {row['mean']:.4g} ± {row['std']:.2g})"]
    with open(os.path.join(root, "best.flags"), "w", encoding="utf-8") as f:
      f.write(best_flags_text(root, winner.user_attrs["run"], note))
    lines += ["", f"`{os.path.join(root, 'best.flags')}` reproduces trial {winner.number}."]
  if len(complete) >= 2 and len(names) >= 1:
    try:
      importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
      lines += ["", f"Parameter importances: not computed ({e})"]
    else:
      lines += ["", "| parameter | importance (fANOVA) |", "|---|---|"]
      lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
  else:
    lines += ["", "Parameter importances: need 2 or more completed trials."]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import warnings  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as vis  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    for png, plot in (("history.png", vis.plot_optimization_history),
                      ("parallel_coordinate.png", vis.plot_parallel_coordinate)):
      ax = plot(study)
      fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
      fig.savefig(os.path.join(out, png), dpi=100, bbox_inches="tight")
      matplotlib.pyplot.close(fig)
  lines += ["", "![history](history.png)", "", "![parallel coordinates](parallel_coordinate.png)"]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  sys.stdout.write(text)
  print(f"\nwrote {out}/report.md, trials.csv, history.png, parallel_coordinate.png"
        + (f" and {root}/best.flags" if complete else ""))
  return 0


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def slurm_script(spec_path: str, spec: dict, root: str, workers: int, storage: Optional[str],
                 extra: list[str]) -> str:
  """A job array of `workers` tasks, each one worker of the same study."""
  lines = sweep.slurm_header(spec_path, spec, workers, root)
  lines += [f"# Search {os.path.abspath(spec_path)}: {workers} workers of study"
            f" {study_name(spec_path, spec)} ({storage or os.path.join(root, JOURNAL)})",
            "# Submit: sbatch " + shlex.quote(os.path.join(root, "search.sbatch")),
            "# Report: python -m launch.search report " + shlex.quote(root),
            *sweep.slurm_setup(),
            'echo "array task $SLURM_ARRAY_TASK_ID on $(hostname): a worker of the study"',
            "# Resubmitting continues the study; trials of dead workers are retried.",
            "exec \"$PYTHON\" -m launch.search " + shlex.quote(os.path.abspath(spec_path))
            + " --root=" + shlex.quote(root) + " --worker"
            + (" --storage=" + shlex.quote(storage) if storage else "")
            + "".join(" " + shlex.quote(a) for a in extra)]
  return "\n".join(lines) + "\n"


def _spawn_workers(argv_base: list[str], cpu_sets, workers: int) -> int:
  """N worker processes (each pinned to its cores); SIGTERM/SIGINT are passed on to them."""
  procs = []
  for i in range(workers):
    cpus = cpu_sets[i] if cpu_sets else None
    pin = (lambda c=cpus: os.sched_setaffinity(0, c)) if cpus else None
    procs.append(subprocess.Popen(argv_base + ["--worker"], cwd=sweep.REPO, preexec_fn=pin))

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, h in old.items():
      signal.signal(s, h)
  return max(codes, key=abs)


def main(argv: Optional[list[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["report"]:
    parser = argparse.ArgumentParser(prog="python -m launch.search report", allow_abbrev=False)
    parser.add_argument("root")
    parser.add_argument("--out", default=None, help="default ROOT/report")
    parser.add_argument("--storage", default=None, help="the search's --storage URL")
    args = parser.parse_args(argv[1:])
    root = os.path.abspath(args.root)
    try:
      if not os.path.exists(os.path.join(root, "search.json")):
        raise SpecError(f"{root} holds no search (no search.json)")
      return report(root, os.path.abspath(args.out or os.path.join(root, "report")), args.storage)
    except SpecError as e:
      print(f"error: search report: {e}", file=sys.stderr)
      return 2

  parser = argparse.ArgumentParser(
      prog="python -m launch.search", allow_abbrev=False,
      description="Optuna search over a sweep spec's flags; trials are sweep runs.",
      epilog="Unknown --flags are appended to every trial's flags (e.g. --raw_data_dir=...).")
  parser.add_argument("spec", help="search spec (JSON)")
  parser.add_argument("--root", required=True, help="directory of the study and its trials")
  parser.add_argument("--workers", type=int, default=1, help="worker processes (or array tasks)")
  parser.add_argument("--cpus_per_run", type=int, default=0,
                      help="pin each local worker to its own K cores")
  parser.add_argument("--storage", default=None, help="RDB URL (default: R/study.journal)")
  parser.add_argument("--slurm", action="store_true",
                      help="write R/search.sbatch (a job array of --workers workers)")
  parser.add_argument("--confirm_seeds", type=int, default=0,
                      help="after the search, rerun the top trials with S more seeds")
  parser.add_argument("--confirm_top_k", type=int, default=3)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--python", default=sys.executable, help="interpreter for the runs")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  root = os.path.abspath(args.root)
  try:
    bad = [a for a in extra if not a.startswith("--")]
    if bad:
      raise SpecError(f"unexpected argument {bad[0]!r}; extra run flags look like --name=value")
    for a in extra:
      if a.lstrip("-").split("=")[0] in sweep._RESERVED:  # pylint: disable=protected-access
        raise SpecError(f"{a}: --workdir/--mode/--checkpoint/--flagfile are set by the search")
    if args.workers < 1 or args.confirm_seeds < 0 or args.confirm_top_k < 1:
      raise SpecError("--workers and --confirm_top_k must be >= 1, --confirm_seeds >= 0")
    cpu_sets = sweep._cpu_sets(args.workers, args.cpus_per_run, args.slurm)  # pylint: disable=protected-access
    spec = sweep.load_spec(args.spec)
    check_spec(spec)
    url = storage_url(args, root)
    if not args.worker:
      probes = probe_runs(spec, root)
      sweep.validate(probes, extra)
      check_objective(spec, probes[0], extra)
      writable(root, f"--root={root}")
    study = load_study(args.spec, spec, url)
    if not args.worker:
      for point in spec.get("enqueue", []):  # once: an equal queued or finished trial is kept
        study.enqueue_trial(point, skip_if_exists=True)
  except SpecError as e:
    print(f"error: search {args.spec}: {e}", file=sys.stderr)
    return 2
  if args.worker:
    return run_worker(args.spec, spec, root, url, extra, args.python)
  sweep._write_json(os.path.join(root, "search.json"), {  # pylint: disable=protected-access
      "spec": os.path.abspath(args.spec), "description": spec.get("description", ""),
      "study_name": study.study_name, "storage": _shown(url), "extra_flags": extra,
      "python": args.python})
  if args.slurm:
    path = os.path.join(root, "search.sbatch")
    with open(path, "w", encoding="utf-8") as f:
      f.write(slurm_script(args.spec, spec, root, args.workers, args.storage, extra))
    os.chmod(path, 0o755)
    print(f"wrote {path}: a job array of {args.workers} workers of study {study.study_name}")
    print(f"submit with: sbatch {shlex.quote(path)}")
    return 0
  t0 = time.time()
  base = [sys.executable, "-m", "launch.search", os.path.abspath(args.spec), f"--root={root}",
          f"--python={args.python}", *([f"--storage={args.storage}"] if args.storage else []),
          *extra]
  print(f"[search] study {study.study_name} in {url}: {args.workers} workers", flush=True)
  rc = _spawn_workers(base, cpu_sets, args.workers)
  if rc == STOPPED:
    print("error: search stopped by SIGTERM; run the same command to continue", file=sys.stderr)
    return STOPPED
  if rc != 0:
    print(f"error: search: a worker exited with status {rc}", file=sys.stderr)
    return 1
  if args.confirm_seeds:
    result = confirm(study, spec, root, extra, args.python, args.confirm_seeds,
                     args.confirm_top_k, cpu_sets, args.workers)
    print(f"[search] confirmation: winner trial {result['winner']}"
          f" (see {os.path.join(root, 'confirm.json')})", flush=True)
  states = {}
  for t in study.get_trials(deepcopy=False):
    states[t.state.name] = states.get(t.state.name, 0) + 1
  print(f"[search] {time.time() - t0:.1f} s; trials: "
        + ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items())), flush=True)
  print(f"[search] report: python -m launch.search report {shlex.quote(root)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
