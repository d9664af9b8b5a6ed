r"""Sweeps: a base flag file x flag overrides -> named runs, each in its own workdir.

  python -m launch.sweep SPEC.json --root=DIR [--parallel=N [--cpus_per_run=K]] [--dry_run]
                         [--slurm] [--only=NAME|INDEX] [extra --flags for every run...]

A spec is JSON (see experiments/sweeps/):

  {
    "description": "free text",
    "base_flagfile": "experiments/cpu/multi30k_en_de.flags",   # relative to the repo root
    "flags": {"num_train_steps": 10, "tfds_data_dir": "{root}/_tfds"},  # every run; not in names
    "grid": {"dropout_rate": [0.0, 0.1, 0.3], "d_model": [32, 64]},    # cartesian product
    "zip": {"warmup_steps": [100, 200], "learning_rate_scale": [1, 2]}, # lists walked together
    "runs": [{"name": "a_h1", "flags": {"num_heads": 1, "d_k": 128}}, ...],  # named rows
    "name_template": "drop{dropout_rate}_d{d_model}",            # optional, str.format
    "steps": ["train", "average", "evaluate"],                   # default ["train"]
    "evaluate_checkpoint": "averaged",                           # default: averaged if averaged
    "slurm": {"time": "24:00:00", "gpus-per-task": 1}            # extra #SBATCH options
  }

Runs are every named row of "runs" (a table such as the paper's Table 3, each row stating only
the flags it changes, or its own "base_flagfile"; "note" is free text) crossed with every zip
tuple and every grid point (any of the three may be absent; with none, one run named 'base').
A row's name is its run name, followed by the grid/zip name when there is a grid or zip. Flag
values are JSON numbers, strings or booleans (true -> --flag, false -> --noflag); '{root}' in
any flag's string value (in "flags", "grid", "zip" or a row) becomes the absolute --root. The
default name joins 'flag=value' with '__'. Arguments after the known options (e.g.
--raw_data_dir=...) are appended to every run's flags and are not part of the names.

Every run's flags are validated with `transformer.config.from_args` before anything starts:
a bad spec ends with one 'error:' line and exit status 2, having launched nothing.
Each run gets ROOT/<name>/ with flags.txt (a flag file: `python -m transformer.main
--flagfile=ROOT/<name>/flags.txt --mode=...` from the repo root repeats it), run.json (its
overrides), one <step>.log per step and status.json (the steps that finished, with times).
Steps that finished are skipped, so the same command resumes a sweep; `train` itself resumes
from the run's latest checkpoint (a train stopped by SIGTERM exits 143: not finished), and a
step's seconds in status.json count every attempt (`interrupted_seconds`: those of attempts
that were killed or failed). ROOT/sweep.json lists the runs in order (for launch.report).

On a CPU machine, --parallel=N --cpus_per_run=K runs N runs at a time, worker i pinned to its
own K cores (cores iK..iK+K-1 of those this process may use), so runs do not share cores and a
run computes with the same number of threads whichever worker takes it (XLA:CPU sizes its
thread pool from the cores it may use, and its float results can depend on that number).

--slurm writes ROOT/sweep.sbatch, a job array with one task per run (each task calls this
module with --only=<its run>), and prints the sbatch command instead of running anything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("train", "average", "evaluate")
# transformer.main's exit status after SIGTERM stopped a train early (its checkpoint saved).
INTERRUPTED = 128 + signal.SIGTERM
SPEC_KEYS = ("description", "base_flagfile", "flags", "grid", "zip", "runs", "name_template",
             "steps", "evaluate_checkpoint", "slurm")
# Flags that belong to the launcher, not to a spec: each run's --workdir and --mode are its own.
_RESERVED = ("workdir", "mode", "flagfile", "checkpoint", "input", "output")


class SpecError(ValueError):
  """A problem with the sweep spec or its runs (reported as one line)."""


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
  old = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(old)


# ----------------------------------------------------------------------------
# Spec -> runs
# ----------------------------------------------------------------------------

def flag_arg(name: str, value: Any) -> str:
  """('dropout_rate', 0.1) -> '--dropout_rate=0.1'; booleans -> --name / --noname."""
  if isinstance(value, bool):
    return f"--{name}" if value else f"--no{name}"
  if isinstance(value, (int, float, str)):
    return f"--{name}={value_str(value)}"
  raise SpecError(f"flag {name!r}: value {value!r} must be a number, string or boolean")


def value_str(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _safe_name(name: str) -> str:
  name = re.sub(r"[^A-Za-z0-9._=+-]", "_", name).strip("._")
  if not name:
    raise SpecError("a run name is empty after removing unsafe characters")
  return name


def default_name(overrides: dict[str, Any]) -> str:
  if not overrides:
    return "base"
  return "__".join(f"{k}={value_str(v)}" for k, v in overrides.items())


def load_spec(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise SpecError(f"no sweep spec at {path}") from None
  except json.JSONDecodeError as e:
    raise SpecError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(spec, dict):
    raise SpecError(f"{path}: the spec must be a JSON object")
  return spec


def _check_flag_name(where: str, flag: str) -> None:
  """A spec's flag is written without dashes and is not one the launcher sets."""
  if flag.startswith("-") or flag in _RESERVED:
    raise SpecError(f"{where}: {flag!r} is not allowed (write flag names without dashes;"
                    f" {', '.join(_RESERVED)} are set by the launcher)")


def _check_overrides(spec: dict, key: str) -> dict[str, list]:
  table = spec.get(key) or {}
  if not isinstance(table, dict):
    raise SpecError(f'"{key}" must be an object of flag -> list of values')
  for flag, values in table.items():
    _check_flag_name(f'"{key}"', flag)
    if not isinstance(values, list) or not values:
      raise SpecError(f'"{key}": {flag!r} needs a non-empty list of values')
    for v in values:
      flag_arg(flag, v)  # type check
  return table


def base_and_common(spec: dict[str, Any], root: str,
                    keys: tuple[str, ...]) -> tuple[str, list[str]]:
  """Checks the spec's keys, "base_flagfile" and "flags": (base flag file, --flag=value of flags)."""
  unknown = sorted(set(spec) - set(keys))
  if unknown:
    raise SpecError(f"unknown spec key {unknown[0]!r}; known keys: {', '.join(keys)}")
  base = spec.get("base_flagfile")
  if not isinstance(base, str) or not base:
    raise SpecError('"base_flagfile" (a flag file path relative to the repo root) is required')
  common = spec.get("flags") or {}
  if not isinstance(common, dict):
    raise SpecError('"flags" must be an object of flag -> value')
  for flag in common:
    _check_flag_name('"flags"', flag)
  return base, [flag_arg(k, at_root(v, root)) for k, v in common.items()]


def at_root(value: Any, root: str) -> Any:
  """A flag value with '{root}' in a string replaced by the sweep's absolute root."""
  return value.replace("{root}", root) if isinstance(value, str) else value


def expand(spec: dict[str, Any], root: str = "ROOT") -> list[dict[str, Any]]:
  """The runs of a spec, in order: [{'name', 'overrides', 'flags'}] (flags without workdir/mode).

  Checks the spec's shape; does not validate the flags (see `validate`).
  """
  base, common_args = base_and_common(spec, root, SPEC_KEYS)
  grid = _check_overrides(spec, "grid")
  zipped = _check_overrides(spec, "zip")
  both = sorted(set(grid) & set(zipped))
  if both:
    raise SpecError(f"flag {both[0]!r} is in both \"grid\" and \"zip\"")
  lengths = {len(v) for v in zipped.values()}
  if len(lengths) > 1:
    raise SpecError('"zip": every list must have the same length, got '
                    + ", ".join(f"{k}: {len(v)}" for k, v in zipped.items()))
  zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
  grid_rows = [dict(zip(grid, row)) for row in itertools.product(*grid.values())]
  named_rows = _named_rows(spec, set(grid) | set(zipped))
  template = spec.get("name_template")
  if template is not None and not isinstance(template, str):
    raise SpecError('"name_template" must be a string such as "drop{dropout_rate}"')
  steps = _steps(spec)
  _evaluate_checkpoint(spec, steps)

  runs, seen = [], {}
  for (row_name, row_flags, row_base), zrow, grow in itertools.product(named_rows, zip_rows,
                                                                      grid_rows):
    swept = {**zrow, **grow}
    overrides = {**row_flags, **swept}
    if row_name is not None and not swept:
      name = row_name
    elif template is None:
      name = default_name(swept)
    else:
      try:
        name = template.format(**overrides)
      except KeyError as e:
        raise SpecError(f'"name_template" uses {{{e.args[0]}}}, which is not a grid or zip'
                        f" flag ({', '.join(overrides) or 'none'})") from None
      except (ValueError, IndexError) as e:
        raise SpecError(f'"name_template" {template!r}: {e}') from None
    if row_name is not None and swept:
      name = f"{row_name}__{name}"
    name = _safe_name(name)
    if name in seen:
      raise SpecError(f"two runs are both named {name!r} ({seen[name]} and {overrides});"
                      " make \"name_template\" use every grid/zip flag")
    seen[name] = overrides
    flags = [f"--flagfile={row_base or base}", *common_args,
             *(flag_arg(k, at_root(v, root)) for k, v in overrides.items())]
    runs.append({"name": name, "overrides": overrides, "flags": flags})
  return runs


def _named_rows(spec: dict, swept: set[str]
                ) -> list[tuple[Optional[str], dict[str, Any], Optional[str]]]:
  """[(name, {flag: value}, base_flagfile or None)] of "runs", or [(None, {}, None)]."""
  rows = spec.get("runs")
  if rows is None:
    return [(None, {}, None)]
  if not isinstance(rows, list) or not rows:
    raise SpecError('"runs" must be a non-empty list of {"name": ..., "flags": {...}} objects')
  out = []
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
      raise SpecError(f'"runs"[{i}] must be an object with a "name" string')
    extra_keys = sorted(set(row) - {"name", "flags", "base_flagfile", "note"})
    if extra_keys:
      raise SpecError(f'"runs"[{i}] ({row["name"]}): unknown key {extra_keys[0]!r}; a row has'
                      ' "name", "flags" and optional "base_flagfile" and "note"')
    row_base = row.get("base_flagfile")
    if row_base is not None and (not isinstance(row_base, str) or not row_base):
      raise SpecError(f'"runs"[{i}] ({row["name"]}): "base_flagfile" must be a path string')
    flags = row.get("flags") or {}
    if not isinstance(flags, dict):
      raise SpecError(f'"runs"[{i}] ({row["name"]}): "flags" must be an object of flag -> value')
    for flag, value in flags.items():
      _check_flag_name(f'"runs"[{i}] ({row["name"]})', flag)
      if flag in swept:
        raise SpecError(f'"runs"[{i}] ({row["name"]}): {flag!r} is also in "grid" or "zip"')
      flag_arg(flag, value)  # type check
    out.append((row["name"], flags, row_base))
  return out


def _steps(spec: dict) -> list[str]:
  steps = spec.get("steps", ["train"])
  if (not isinstance(steps, list) or not steps
      or any(s not in STEPS for s in steps) or len(set(steps)) != len(steps)):
    raise SpecError(f'"steps" must be a list of distinct steps among {", ".join(STEPS)};'
                    f" got {steps!r}")
  if [s for s in STEPS if s in steps] != steps:
    raise SpecError(f'"steps" must keep the order {" -> ".join(STEPS)}; got {steps!r}')
  return steps


def _evaluate_checkpoint(spec: dict, steps: list[str]) -> str:
  which = spec.get("evaluate_checkpoint", "averaged" if "average" in steps else "latest")
  which = str(which)
  if which not in ("latest", "averaged") and not which.isdigit():
    raise SpecError(f'"evaluate_checkpoint" must be latest, averaged or a step; got {which!r}')
  if which == "averaged" and "evaluate" in steps and "average" not in steps:
    raise SpecError('"evaluate_checkpoint": "averaged" needs "average" in "steps"')
  return which


def validate(runs: list[dict], extra: list[str]) -> None:
  """Every run's flags through transformer.config.from_args (from the repo root)."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from transformer import config as config_lib  # pylint: disable=g-import-not-at-top
  with _cwd(REPO):
    for run in runs:
      base = run["flags"][0].split("=", 1)[1]
      if not os.path.isfile(base):
        raise SpecError(f'"base_flagfile" {base} does not exist (paths are relative to the'
                        f" repository root {REPO})")
      try:
        config_lib.from_args(run["flags"] + extra)
      except (absl_flags.Error, config_lib.ConfigError, ValueError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecError(f"run {run['name']!r}: {message}") from None


# ----------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------

def step_command(python: str, run: dict, extra: list[str], workdir: str, step: str,
                 checkpoint: str) -> list[str]:
  cmd = [python, "-m", "transformer.main", *run["flags"], *extra, f"--workdir={workdir}",
         f"--mode={step}"]
  if step == "evaluate":
    cmd.append(f"--checkpoint={checkpoint}")
  return cmd


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _flags_text(run: dict, extra: list[str], workdir: str) -> str:
  return "\n".join([f"# sweep run {run['name']}: run from the repository root", *run["flags"],
                    *extra, f"--workdir={workdir}"]) + "\n"


def prepare_root(spec_path: str, spec: dict, runs: list[dict], extra: list[str], root: str,
                 python: str) -> None:
  """Writes ROOT/sweep.json and each run's flags.txt and run.json.

  A run directory whose finished steps were made with other flags is an error (checked for
  every run before anything is written).
  """
  for run in runs:
    workdir = os.path.join(root, run["name"])
    old = _read_json(os.path.join(workdir, "run.json"))
    status = _read_json(os.path.join(workdir, "status.json")) or {}
    if old is not None and status.get("steps") and old.get("flags") != run["flags"] + extra:
      raise SpecError(f"run {run['name']!r} in {root} already has finished steps made with other"
                      " flags; use another --root or remove that run directory")
  os.makedirs(root, exist_ok=True)
  _write_json(os.path.join(root, "sweep.json"), {
      "spec": os.path.abspath(spec_path), "description": spec.get("description", ""),
      "steps": _steps(spec), "extra_flags": extra, "python": python,
      "runs": [{"name": r["name"], "overrides": r["overrides"]} for r in runs]})
  for run in runs:
    write_run_files(run, extra, os.path.join(root, run["name"]))


def write_run_files(run: dict, extra: list[str], workdir: str, **record: Any) -> None:
  """Writes workdir/flags.txt (the run's flag file) and workdir/run.json (+ `record`)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "flags.txt"), "w", encoding="utf-8") as f:
    f.write(_flags_text(run, extra, workdir))
  _write_json(os.path.join(workdir, "run.json"), {
      "name": run["name"], "overrides": run["overrides"], "flags": run["flags"] + extra,
      **record})


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  # Sweep runs are single-process jobs. Inside a SLURM allocation (e.g. a job-array task) the
  # current transformer.sharding.maybe_initialize_distributed calls jax.distributed.initialize()
  # whenever SLURM_JOB_ID is set, which fails outside `srun` (no SLURM_STEP_* variables) and,
  # under srun, binds the process to GPU SLURM_LOCALID only. Hiding the job id keeps both off.
  env.pop("SLURM_JOB_ID", None)
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


class Runner:
  """Executes the steps of runs, skipping the steps a run's status.json says are finished."""

  die_with_parent = False  # see start_step

  def __init__(self, spec: dict, extra: list[str], root: str, python: str,
               cpu_sets: Optional[list[set[int]]] = None):
    self.steps = _steps(spec)
    self.checkpoint = _evaluate_checkpoint(spec, self.steps)
    self.extra, self.root, self.python = extra, root, python
    self._lock = threading.Lock()
    # Free core sets, one per worker: a run takes one for all its steps and gives it back.
    self._cpus: Optional[queue.Queue] = None
    if cpu_sets:
      self._cpus = queue.Queue()
      for cpus in cpu_sets:
        self._cpus.put(cpus)

  def say(self, message: str) -> None:
    with self._lock:
      print(f"[sweep] {message}", flush=True)

  def run(self, run: dict) -> bool:
    if self._cpus is None:
      return self._run(run, None)
    cpus = self._cpus.get()
    try:
      return self._run(run, cpus)
    finally:
      self._cpus.put(cpus)

  def _run(self, run: dict, cpus: Optional[set[int]]) -> bool:
    name, workdir = run["name"], os.path.join(self.root, run["name"])
    status_path = os.path.join(workdir, "status.json")
    status = _read_json(status_path) or {"steps": {}}
    todo = [s for s in self.steps if s not in status["steps"]]
    if not todo:
      self.say(f"{name}: finished before, skipped")
      return True
    for step in todo:
      cmd = step_command(self.python, run, self.extra, workdir, step, self.checkpoint)
      log = os.path.join(workdir, f"{step}.log")
      where = f", cpus {','.join(map(str, sorted(cpus)))}" if cpus else ""
      self.say(f"{name}: {step} ... (log {log}{where})")
      # An attempt that was killed ran from its start to its log's last write; the step's
      # seconds count every attempt (the log is appended to, so each attempt's output stays).
      earlier = status.pop("running", None)
      if earlier and earlier["step"] == step and os.path.exists(log):
        self._add_interrupted(status, step, os.path.getmtime(log) - earlier["started"])
      t0 = time.time()
      status["running"] = {"step": step, "started": t0}
      _write_json(status_path, status)
      with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = self._wait(start_step(cmd, f, cpus, self.die_with_parent), run, step)
      seconds = time.time() - t0
      del status["running"]
      if rc is None:
        self._add_interrupted(status, step, seconds)
        _write_json(status_path, status)
        self.say(f"{name}: {step} stopped after {seconds:.1f} s")
        return False
      if rc != 0:
        self._add_interrupted(status, step, seconds)
        _write_json(status_path, status)
        if rc == INTERRUPTED:
          self.say(f"{name}: {step} interrupted by SIGTERM (exit {rc}, {seconds:.1f} s): not"
                   " finished, its checkpoint is saved; run the sweep again to resume it")
        else:
          self.say(f"{name}: {step} FAILED (exit {rc}, {seconds:.1f} s): {_last_error(log)}")
        return False
      lost = status.get("interrupted_seconds", {}).get(step, 0.0)
      status["steps"][step] = {"seconds": round(seconds + lost, 2), "finished": time.time()}
      _write_json(status_path, status)
      self.say(f"{name}: {step} done in {seconds:.1f} s")
    return True

  def _wait(self, proc: subprocess.Popen, run: dict, step: str) -> Optional[int]:
    """Waits for a step's process: its exit status, or None where it was stopped on purpose."""
    del run, step
    return proc.wait()

  @staticmethod
  def _add_interrupted(status: dict, step: str, seconds: float) -> None:
    lost = status.setdefault("interrupted_seconds", {})
    lost[step] = round(lost.get(step, 0.0) + max(0.0, seconds), 2)


def start_step(cmd: list[str], log, cpus: Optional[set[int]] = None,
               die_with_parent: bool = False) -> subprocess.Popen:
  """Starts one step of a run from the repo root, output to the open file `log`.

  The child is pinned to `cpus` between fork and exec, before it starts any thread. With
  `die_with_parent` (Linux), it gets SIGKILL when the thread that started it dies, so a
  killed worker leaves no training behind.
  """
  def setup() -> None:
    if cpus:
      os.sched_setaffinity(0, cpus)
    if die_with_parent:
      _set_parent_death_signal(signal.SIGKILL)
  return subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, preexec_fn=setup)


def _set_parent_death_signal(sig: int) -> None:
  import ctypes  # pylint: disable=g-import-not-at-top
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)


def _last_error(log: str) -> str:
  with open(log, encoding="utf-8", errors="replace") as f:
    lines = [l.strip() for l in f if l.strip()]
  for line in reversed(lines):
    if line.startswith("error:") or "Error" in line:
      return line[:300]
  return (lines[-1][:300] if lines else "no output") + f" (see {log})"


# ----------------------------------------------------------------------------
# SLURM job array
# ----------------------------------------------------------------------------

_SLURM_DEFAULTS = {"ntasks": 1, "gpus-per-task": 1, "cpus-per-task": 8, "time": "24:00:00"}


def slurm_header(spec_path: str, spec: dict, tasks: int, root: str,
                 parallel: Optional[int] = None) -> list[str]:
  """#!/bin/bash and the #SBATCH lines of a job array of `tasks` tasks (spec's "slurm" options)."""
  options = dict(_SLURM_DEFAULTS)
  options.update(spec.get("slurm") or {})
  job = _safe_name(os.path.splitext(os.path.basename(spec_path))[0])
  array = f"0-{tasks - 1}" + (f"%{parallel}" if parallel else "")
  lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --array={array}",
           f"#SBATCH --output={root}/slurm-%A_%a.out"]
  return lines + [f"#SBATCH --{k}={v}" for k, v in options.items()]


def slurm_setup() -> list[str]:
  """A task's first commands: strict mode, the repo root, $PYTHON (the repo's venv by default)."""
  return ["set -euo pipefail", f"cd {shlex.quote(REPO)}",
          'PYTHON="${PYTHON:-' + os.path.join(REPO, ".venv", "bin", "python") + '}"']


def slurm_script(spec_path: str, spec: dict, runs: list[dict], extra: list[str], root: str,
                 parallel: Optional[int] = None) -> str:
  """A job array: task i runs the steps of run i through this module (--only=<name>)."""
  lines = slurm_header(spec_path, spec, len(runs), root, parallel)
  lines += [f"# Sweep {os.path.abspath(spec_path)}: {len(runs)} runs, one array task each:"]
  lines += [f"#   {i}: {r['name']}" for i, r in enumerate(runs)]
  lines += [
      "# Submit: sbatch " + shlex.quote(os.path.join(root, "sweep.sbatch")),
      "# Report: python -m launch.report " + shlex.quote(root),
      *slurm_setup(),
      "RUNS=(" + " ".join(shlex.quote(r["name"]) for r in runs) + ")",
      'RUN="${RUNS[$SLURM_ARRAY_TASK_ID]}"',
      'echo "array task $SLURM_ARRAY_TASK_ID on $(hostname): run $RUN"',
      "# Steps that finished are skipped, so resubmitting the array resumes the sweep.",
      "exec \"$PYTHON\" -m launch.sweep " + shlex.quote(os.path.abspath(spec_path))
      + " --root=" + shlex.quote(root) + ' --only="$RUN"'
      + "".join(" " + shlex.quote(a) for a in extra),
  ]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _cpu_sets(parallel: int, cpus_per_run: int, slurm: bool) -> Optional[list[set[int]]]:
  """--cpus_per_run: one disjoint set of cores per worker, from the cores this process may use."""
  if cpus_per_run == 0:
    return None
  if cpus_per_run < 0:
    raise SpecError(f"--cpus_per_run must be >= 1 (or 0: no pinning), got {cpus_per_run}")
  if slurm:
    raise SpecError("--cpus_per_run pins local runs; with --slurm use the spec's cpus-per-task")
  cores = sorted(os.sched_getaffinity(0))
  if parallel * cpus_per_run > len(cores):
    raise SpecError(f"--parallel={parallel} x --cpus_per_run={cpus_per_run} needs"
                    f" {parallel * cpus_per_run} cores; this process may use {len(cores)}")
  return [set(cores[i * cpus_per_run:(i + 1) * cpus_per_run]) for i in range(parallel)]


def _select(runs: list[dict], only: Optional[str]) -> list[dict]:
  if only is None:
    return runs
  for i, run in enumerate(runs):
    if run["name"] == only or only == str(i):
      return [run]
  raise SpecError(f"--only={only}: no such run; runs are {', '.join(r['name'] for r in runs)}")


def _prepared(args, spec, runs, extra, root) -> bool:
  """prepare_root, reporting a bad spec as one error line (False) instead of raising."""
  try:
    prepare_root(args.spec, spec, runs, extra, root, args.python)
  except SpecError as e:
    print(f"error: sweep {args.spec}: {e}", file=sys.stderr)
    return False
  return True


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m launch.sweep", allow_abbrev=False,
      description="Expand a sweep spec into runs, validate them, and run them (or emit SLURM).",
      epilog="Unknown --flags are appended to every run's flags (e.g. --raw_data_dir=...).")
  parser.add_argument("spec", help="sweep spec (JSON)")
  parser.add_argument("--root", required=True, help="directory of the runs' workdirs")
  parser.add_argument("--parallel", type=int, default=1,
                      help="runs at a time (local); with --slurm, the array's task limit")
  parser.add_argument("--cpus_per_run", type=int, default=0,
                      help="local: pin each of the --parallel workers to its own K cores")
  parser.add_argument("--dry_run", "--dry-run", action="store_true",
                      help="print the runs and their commands; write and run nothing")
  parser.add_argument("--slurm", action="store_true",
                      help="write ROOT/sweep.sbatch (a job array) instead of running")
  parser.add_argument("--only", default=None, help="run only this run (name or index)")
  parser.add_argument("--python", default=sys.executable, help="interpreter for the runs")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  try:
    bad = [a for a in extra if not a.startswith("--")]
    if bad:
      raise SpecError(f"unexpected argument {bad[0]!r}; extra run flags look like --name=value")
    if args.parallel < 1:
      raise SpecError(f"--parallel must be >= 1, got {args.parallel}")
    cpu_sets = _cpu_sets(args.parallel, args.cpus_per_run, args.slurm)
    for a in extra:
      if a.lstrip("-").split("=")[0] in _RESERVED and not a.startswith("--flagfile"):
        raise SpecError(f"{a}: --workdir/--mode/--checkpoint are set by the sweep")
    root = os.path.abspath(args.root)
    spec = load_spec(args.spec)
    runs = expand(spec, root)
    validate(runs, extra)
    selected = _select(runs, args.only)
  except SpecError as e:
    print(f"error: sweep {args.spec}: {e}", file=sys.stderr)
    return 2

  runner = Runner(spec, extra, root, args.python, cpu_sets)
  if args.slurm:
    script = slurm_script(args.spec, spec, runs, extra, root,
                          args.parallel if args.parallel > 1 else None)
    if args.dry_run:
      sys.stdout.write(script)
      return 0
    if not _prepared(args, spec, runs, extra, root):
      return 2
    path = os.path.join(root, "sweep.sbatch")
    with open(path, "w", encoding="utf-8") as f:
      f.write(script)
    os.chmod(path, 0o755)
    print(f"wrote {path}: a job array of {len(runs)} tasks")
    print(f"submit with: sbatch {shlex.quote(path)}")
    return 0

  if args.dry_run:
    print(f"{len(runs)} runs validated; steps: {', '.join(runner.steps)}; root {root}")
    for run in selected:
      workdir = os.path.join(root, run["name"])
      print(f"\n# {run['name']}  {json.dumps(run['overrides'])}")
      for step in runner.steps:
        print(shlex.join(step_command(args.python, run, extra, workdir, step,
                                      runner.checkpoint)))
    return 0

  if not _prepared(args, spec, runs, extra, root):
    return 2
  t0 = time.time()
  runner.say(f"{len(selected)} of {len(runs)} runs, {args.parallel} at a time, under {root}")
  if args.parallel == 1:
    ok = [runner.run(r) for r in selected]
  else:
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      ok = list(pool.map(runner.run, selected))
  failed = [r["name"] for r, good in zip(selected, ok) if not good]
  runner.say(f"{len(selected) - len(failed)}/{len(selected)} runs finished in"
             f" {time.time() - t0:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
  runner.say(f"report: python -m launch.report {shlex.quote(root)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
