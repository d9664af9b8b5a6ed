"""launch/slurm.sbatch and `launch.sweep --slurm` on a real one-node SLURM cluster (CPU only).

A session-scoped cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd on 127.0.0.1) runs:
- `sbatch launch/slurm.sbatch` with 2 tasks: srun starts two processes that join through
  jax.distributed from SLURM's variables, train the same first steps as one process with the
  same 2 devices, then average and evaluate; the job exits 0;
- the same job stopped mid-training (SIGTERM to one process, then `scancel --signal=TERM`):
  both processes save the same step and exit 143, the job ends there (no average/evaluate);
  resubmitted with MODES=train it resumes and ends with the uninterrupted run's parameters;
- a sweep's job array: every run finishes, a resubmitted array skips them, launch.report reads
  them;
- a search's job array: both tasks are workers of one study, its trials run once each, and
  `launch.search report` reads it.
Teardown asserts that no daemon of the cluster is left. Skipped, with the reason, only where
slurm-wlm/munge are not installed or the tests do not run as root (.ci/run installs them).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from tests import processes, slurm_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = "experiments/cpu/multi30k_en_de.flags"
STEPS = 40
# A tiny model on Multi30k train[:2000] (as experiments/sweeps/tiny_dropout.json), logging
# every step; checkpoints every 20 steps and on SIGTERM.
TINY = {"train_split": "train[:2000]", "eval_split": "validation[:40]", "test_split": "test[:8]",
        "vocab_size": 600, "num_encoder_layers": 1, "num_decoder_layers": 1, "d_model": 32,
        "d_ff": 64, "num_heads": 2, "d_k": 16, "d_v": 16, "tokens_per_batch": 1024,
        "bucket_boundaries": "16,32,64,128", "warmup_steps": 10, "num_train_steps": STEPS,
        "log_every_steps": 1, "eval_every_steps": STEPS, "eval_bleu_sentences": 0,
        "checkpoint_every_steps": 20, "num_average": 2, "max_decode_len_offset": 5,
        "beam_size": 1}
# What the test node lacks that the script asks for (8 GPUs, 8 CPUs per task).
ON_THIS_NODE = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def _skip_reason() -> str:
  if os.geteuid() != 0:
    return "the SLURM tests start slurmd, which needs root"
  absent = slurm_cluster.missing()
  if absent:
    return (f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge; .ci/run"
            " does)")
  return ""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
  reason = _skip_reason()
  if reason:
    # In the warnings summary of every pytest run, not only with -rs.
    warnings.warn(f"skipping the SLURM tests: {reason}")
    pytest.skip(reason)
  # One persistent XLA compilation cache for the session: the jobs compile the same steps.
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  c = slurm_cluster.Cluster(str(tmp_path_factory.mktemp("slurm")), job_env=cache)
  try:
    c.start()
    yield c
  finally:
    left = c.stop()
    assert not left, f"SLURM/munge daemons left running: {left}"


@pytest.fixture(scope="session")
def shared(tmp_path_factory, multi30k_dir):
  """Flags every run here shares: the raw data, one prepared TFDS dir and one vocabulary."""
  d = tmp_path_factory.mktemp("slurm_data")
  return {"raw_data_dir": str(multi30k_dir), "tfds_data_dir": str(d / "tfds"),
          "vocab_path": str(d / "spm.model")}


def _flags(values: dict) -> list[str]:
  return [f"--{k}={v}" for k, v in values.items()]


def _submit(cluster, workdir, out, *, modes="train average evaluate", flags=(), wait=True):
  """sbatch launch/slurm.sbatch from the repo root (REPO = the submit directory)."""
  env = cluster.env(FLAGFILE=FLAGFILE, WORKDIR=str(workdir), MODES=modes, PYTHON=sys.executable)
  cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *ON_THIS_NODE,
         f"--output={out}", "launch/slurm.sbatch", *flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _train_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _params(checkpoint_state_dir) -> dict[str, np.ndarray]:
  """The parameters of a saved train state, as numpy, by path."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(checkpoint_state_dir).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(checkpoint_state_dir, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
      state["params"])}


@pytest.fixture(scope="session")
def two_tasks(cluster, shared, tmp_path_factory):
  """One uninterrupted 2-task job: train, average, evaluate. (workdir, job output, sbatch)."""
  d = tmp_path_factory.mktemp("two_tasks")
  t0 = time.time()
  r = _submit(cluster, d / "run", d / "job.out", flags=_flags({**TINY, **shared}))
  out = (d / "job.out").read_text(errors="replace") if (d / "job.out").exists() else ""
  print(f"2-task job: {time.time() - t0:.0f} s")
  return d / "run", out, r


def test_sbatch_two_tasks_join_and_train_as_one_process(two_tasks, shared, tmp_path):
  workdir, out, r = two_tasks
  assert r.returncode == 0, r.stdout + r.stderr + out[-6000:]
  assert "2 processes" in out and "[slurm] evaluate took" in out, out[-3000:]
  # Both processes saw one 2-process job of 2 devices (jax.distributed from SLURM_* only).
  assert out.count("mesh {'data': 2, 'fsdp': 1, 'tensor': 1}; 2 devices") == 2, out[-3000:]
  assert (workdir / "averaged" / str(STEPS)).is_dir()
  assert re.search(rf"BLEU en->de test\[:8\] \(averaged step {STEPS}", out), out[-3000:]
  two = _train_losses(workdir)
  assert sorted(two) == list(range(1, STEPS + 1))

  # One process with the same 2 (host) devices and the same global batches, first 3 steps.
  ref = tmp_path / "one_process"
  env = processes.environment(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-m", "transformer.main", f"--flagfile={FLAGFILE}",
         *_flags({**TINY, **shared, "num_train_steps": 3}), f"--workdir={ref}", "--mode=train"]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  one = _train_losses(ref)
  assert sorted(one) == [1, 2, 3]
  for step, loss in one.items():
    assert abs(two[step] - loss) <= 1e-5 * abs(loss), (step, two[step], loss)
  assert abs(one[3] - one[1]) > 1e-3  # the steps trained: equal losses are not a constant


def _wait_for(predicate, timeout: float, what: str) -> None:
  t0 = time.time()
  while not predicate():
    assert time.time() - t0 < timeout, f"not within {timeout:.0f} s: {what}"
    time.sleep(0.2)


def _task_pid(cluster, job: str, task: int) -> int:
  """The pid of global task `task` of the job's first step (scontrol listpids)."""
  for line in cluster.run("scontrol", "listpids", job).stdout.splitlines()[1:]:
    pid, _, step, _, global_id = line.split()[:5]
    if step == "0" and global_id == str(task):
      return int(pid)
  raise AssertionError(f"no task {task} in step {job}.0")


def interrupt(cluster, job: str, out, after_step: int) -> None:
  """Once both processes logged `after_step`: SIGTERM to task 0 alone, then (0.5 s, a few
  steps, later) to every task (`scancel --signal=TERM`: not to the batch script), as a
  preemption notice that reaches one node first. The job then ends by itself."""
  _wait_for(lambda: out.exists()
            and out.read_text(errors="replace").count(f"step {after_step} |") == 2,
            600, f"step {after_step} of job {job}\n" + (out.read_text() if out.exists() else ""))
  os.kill(_task_pid(cluster, job, 0), signal.SIGTERM)
  time.sleep(0.5)
  cluster.run("scancel", "--signal=TERM", job)
  _wait_for(lambda: job not in cluster.jobs(), 300, f"job {job} to end after SIGTERM")


def test_sigterm_mid_training_stops_the_job_then_resubmit_resumes_to_the_same_parameters(
    cluster, two_tasks, shared, tmp_path):
  whole, _, r = two_tasks
  assert r.returncode == 0, r.stdout + r.stderr
  workdir, out = tmp_path / "run", tmp_path / "job.out"
  flags = _flags({**TINY, **shared})
  r = _submit(cluster, workdir, out, flags=flags, wait=False)
  assert r.returncode == 0, r.stderr
  job = r.stdout.strip().split(";")[0]
  interrupt(cluster, job, out, after_step=10)
  first = out.read_text(errors="replace")
  # Not finished: transformer.main exits 143, and the script stops before average/evaluate.
  assert "ExitCode=143:0" in cluster.run("scontrol", "show", "job", job).stdout, first[-4000:]
  assert "[slurm] train stopped by SIGTERM" in first and "[slurm] train took" not in first
  assert "[slurm] average" not in first and not (workdir / "averaged").exists(), first[-4000:]
  # Both processes stopped at the same step and saved it (not a periodic checkpoint).
  saved = re.findall(r"SIGTERM.*: saved checkpoint at step (\d+)", first)
  assert len(saved) == 2 and saved[0] == saved[1], first[-4000:]
  step = int(saved[0])
  assert 10 < step < 20 and (workdir / "checkpoints" / str(step)).is_dir(), first[-4000:]

  r = _submit(cluster, workdir, out, modes="train", flags=flags)
  text = out.read_text(errors="replace")
  assert r.returncode == 0, r.stderr + text[-4000:]
  assert text.count(f"resumed from step {step}") == 2, text[-4000:]
  a = _params(whole / "checkpoints" / str(STEPS) / "state")
  b = _params(workdir / "checkpoints" / str(STEPS) / "state")
  assert a.keys() == b.keys() and len(a) > 10
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sweep_array_runs_every_run_resubmission_skips_them_report_reads_them(
    cluster, shared, tmp_path):
  spec = tmp_path / "tiny.json"
  spec.write_text(json.dumps({
      "base_flagfile": FLAGFILE,
      "flags": {**TINY, **shared, "num_train_steps": 2, "log_every_steps": 1,
                "eval_every_steps": 2, "checkpoint_every_steps": 2},
      "grid": {"dropout_rate": [0.0, 0.3]}, "name_template": "dropout{dropout_rate}",
      "steps": ["train"], "slurm": {"cpus-per-task": 1, "gpus-per-task": 0}}))
  root = tmp_path / "sweep"
  env = cluster.env(PYTHON=sys.executable)
  r = subprocess.run([sys.executable, "-m", "launch.sweep", str(spec), f"--root={root}",
                      "--slurm"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  script = root / "sweep.sbatch"
  assert f"sbatch {script}" in r.stdout

  def submit():
    r = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    job = r.stdout.strip().split(";")[0]
    outs = {i: (root / f"slurm-{job}_{i}.out").read_text(errors="replace") for i in (0, 1)}
    assert r.returncode == 0, r.stderr + "".join(outs.values())
    return outs

  outs = submit()
  names = ["dropout0.0", "dropout0.3"]
  for i, name in enumerate(names):
    assert f"run {name}" in outs[i] and f"[sweep] {name}: train done" in outs[i], outs[i]
    status = json.loads((root / name / "status.json").read_text())
    assert list(status["steps"]) == ["train"]
  # Resubmitted: both runs are finished, so each task skips its run.
  outs = submit()
  for i, name in enumerate(names):
    assert f"[sweep] {name}: finished before, skipped" in outs[i], outs[i]
    assert " done in " not in outs[i]

  r = subprocess.run([sys.executable, "-m", "launch.report", str(root)], cwd=REPO,
                     env=processes.environment(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert len([l for l in r.stdout.splitlines() if l.startswith("| dropout")]) == 2, r.stdout
  with open(root / "report" / "report.csv", newline="", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [t["run"] for t in table] == names
  for name, t in zip(names, table):
    metrics = [json.loads(l) for l in (root / name / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["kind"] == "train"][-1]
    assert t["steps_done"] == "train" and int(t["train_step"]) == last["step"] == 2
    assert float(t["train_loss"]) == pytest.approx(last["loss"], rel=1e-6)
  assert table[0]["train_loss"] != table[1]["train_loss"]  # dropout changed training


def test_search_array_tasks_are_workers_of_one_study(cluster, shared, tmp_path):
  """`launch.search --slurm`'s array of 2 tasks: both work on the study in R/study.journal;
  the budget's 3 trials each run once and complete; `report` writes best.flags."""
  # 3-step trials of the tiny model that differ only by --seed (a runtime value: one compiled
  # program, then the session's XLA cache), dev nll at step 3.
  spec = tmp_path / "tiny_search.json"
  spec.write_text(json.dumps({
      "base_flagfile": FLAGFILE,
      "flags": {**TINY, **shared, "num_train_steps": 3, "eval_every_steps": 3,
                "checkpoint_every_steps": 3},
      "space": {"seed": {"type": "int", "low": 1, "high": 1000}},
      "objective": {"metric": "nll", "direction": "minimize"}, "budget": {"trials": 3},
      "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
      "steps": ["train"], "slurm": {"cpus-per-task": 1, "gpus-per-task": 0}}))
  root = tmp_path / "search"
  env = cluster.env(PYTHON=sys.executable)
  r = subprocess.run([sys.executable, "-m", "launch.search", str(spec), f"--root={root}",
                      "--workers=2", "--slurm"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  script = root / "search.sbatch"
  r = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=600)
  job = r.stdout.strip().split(";")[0]
  outs = [(root / f"slurm-{job}_{i}.out").read_text(errors="replace") for i in (0, 1)]
  assert r.returncode == 0, r.stderr + "".join(outs)

  import optuna  # pylint: disable=g-import-not-at-top
  from launch import search  # pylint: disable=g-import-not-at-top
  study = optuna.load_study(study_name="tiny_search",
                            storage=search.open_storage(str(root / "study.journal")))
  trials = study.get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE"] * 3, outs
  # Both tasks were workers: each ran a trial, and says so in its output.
  pids = {t.user_attrs["pid"] for t in trials}
  assert len(pids) == 2, outs
  for pid in pids:
    assert sum(f"[search {pid}] trial " in o for o in outs) == 1, outs
  runs = [t.user_attrs["run"] for t in trials]
  assert len(set(runs)) == 3
  for t in trials:  # trained once (one command in its log), to the budget's steps
    workdir = root / t.user_attrs["run"]
    assert (workdir / "train.log").read_text().count("$ ") == 1
    evals = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [3] and t.value == evals[0]["nll"]
    assert f"--seed={t.params['seed']}" in (workdir / "flags.txt").read_text().splitlines()

  r = subprocess.run([sys.executable, "-m", "launch.search", "report", str(root)], cwd=REPO,
                     env=processes.environment(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  best = min(trials, key=lambda t: t.value)
  flags = (root / "best.flags").read_text().splitlines()
  assert f"--seed={best.params['seed']}" in flags, flags

