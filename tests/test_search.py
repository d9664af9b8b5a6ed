"""launch/search.py: an Optuna study whose trials are sweep runs (workers, pruning, kill -9 and
resume, SLURM array, bad specs, report and best.flags).

Trials are trained by a stand-in for `python -m transformer.main` (--python=FAKE) that writes
dev evaluations to metrics.jsonl as a run does, resumes from its last evaluation, and stops on
SIGTERM; the flags are validated by the real transformer.config.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import optuna
import pytest

from launch import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "experiments/cpu/multi30k_en_de.flags"

# Dev nll at step s: 1 + 10 * dropout_rate + 1/s (lower dropout is better); a dropout of 0.5
# is a diverging run (nll 100). SECONDS_PER_STEP between evaluations; SIGTERM stops it with
# transformer.main's status 143 (not finished).
_FAKE = r"""#!PYTHON
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv if a.startswith("--") and "=" in a)
workdir, steps = args["workdir"], int(args.get("num_train_steps", 4))
drop = float(args.get("dropout_rate", 0.1))
path = os.path.join(workdir, "metrics.jsonl")
done = set()
if os.path.exists(path):
  done = {json.loads(l)["step"] for l in open(path) if l.strip()}
def log(line):
  with open(os.path.join(workdir, "fake.log"), "a") as f:
    f.write(line + "\n")
def stop(signum, frame):
  log(f"sigterm {os.getpid()}")
  sys.exit(143)
signal.signal(signal.SIGTERM, stop)
log(f"start {os.getpid()} {os.getppid()} {time.time()} {sorted(os.sched_getaffinity(0))}")
for s in range(1, steps + 1):
  if s in done:
    continue
  time.sleep(SECONDS)
  nll = 100.0 if drop >= 0.5 else 1 + 10 * drop + 1 / s
  with open(path, "a") as f:
    f.write(json.dumps({"step": s, "kind": "train", "steps_per_s": float(s)}) + "\n")
    f.write(json.dumps({"step": s, "kind": "eval", "nll": nll, "perplexity": 2.0}) + "\n")
log(f"end {os.getpid()} {time.time()}")
"""


def _fake(tmp_path, seconds=0.2) -> str:
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE.replace("PYTHON", sys.executable, 1).replace("SECONDS", str(seconds)))
  fake.chmod(0o755)
  return str(fake)


def _spec(tmp_path, **spec) -> str:
  spec.setdefault("base_flagfile", BASE)
  spec.setdefault("flags", {"num_train_steps": 4, "eval_every_steps": 1})
  spec.setdefault("space", {"dropout_rate": {"type": "float", "low": 0.0, "high": 0.4}})
  spec.setdefault("objective", {"metric": "nll", "direction": "minimize"})
  spec.setdefault("budget", {"trials": 4})
  spec.setdefault("sampler", {"name": "random", "seed": 0})
  path = tmp_path / "search.json"
  path.write_text(json.dumps(spec))
  return str(path)


def _env() -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _run(args, timeout=120):
  return subprocess.run([sys.executable, "-m", "launch.search", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _study(root):
  meta = json.loads((root / "search.json").read_text())
  return optuna.load_study(study_name=meta["study_name"],
                           storage=search.open_storage(meta["storage"]))


def _last_nll(workdir) -> float:
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in lines if r["kind"] == "eval"][-1]["nll"]


def _alive(pid: int) -> bool:
  return search._pid_start(pid) is not None  # pylint: disable=protected-access


def test_two_workers_pinned_report_and_best_flags(tmp_path):
  root = tmp_path / "r"
  cores = sorted(os.sched_getaffinity(0))
  pin = ["--cpus_per_run=1"] if len(cores) >= 2 else []
  spec = _spec(tmp_path, space={
      "dropout_rate": {"type": "float", "low": 0.0, "high": 0.4},
      "label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]},
      "layers": {"type": "int", "low": 1, "high": 2,
                 "flags": ["num_encoder_layers", "num_decoder_layers"]}})
  r = _run([spec, f"--root={root}", "--workers=2", *pin, f"--python={_fake(tmp_path, 0.3)}"])
  assert r.returncode == 0, r.stdout + r.stderr
  study = _study(root)
  trials = study.get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE"] * 4
  # Each trial draws from its own seed: the two workers do not sample the same point.
  assert len({t.params["dropout_rate"] for t in trials}) == 4
  starts = {}
  for t in trials:
    workdir = root / t.user_attrs["run"]
    # The trial's value is its run's last dev evaluation; its flags.txt sets what it sampled.
    assert t.value == _last_nll(workdir)
    flags = (workdir / "flags.txt").read_text().splitlines()
    assert f"--dropout_rate={t.params['dropout_rate']!r}" in flags
    assert f"--num_encoder_layers={t.params['layers']}" in flags
    assert f"--num_decoder_layers={t.params['layers']}" in flags
    start = (workdir / "fake.log").read_text().split("\n")[0].split(" ", 4)
    starts[t.number] = (int(start[2]), float(start[3]), json.loads(start[4]))
  workers = {s[0] for s in starts.values()}
  assert len(workers) == 2  # two worker processes each ran trials
  if pin:  # each worker's runs ran on its own single core
    assert {tuple(s[2]) for s in starts.values()} == {(cores[0],), (cores[1],)}
    by_worker = {w: {tuple(s[2]) for s in starts.values() if s[0] == w} for w in workers}
    assert all(len(c) == 1 for c in by_worker.values())
  first = sorted(s[1] for s in starts.values())
  assert first[1] - first[0] < 1.0  # the first two trials ran at the same time

  r = _run(["report", str(root)])
  assert r.returncode == 0, r.stdout + r.stderr
  for png in ("history.png", "parallel_coordinate.png"):
    assert (root / "report" / png).read_bytes()[:4] == b"\x89PNG"
  with open(root / "report" / "trials.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4 and {t["state"] for t in table} == {"COMPLETE"}
  # The fake logs steps_per_s = s at steps 1-4: seconds per step 1, 1/2, 1/3, 1/4, median 5/12.
  assert all(abs(float(t["s/step"]) - 5 / 12) < 1e-4 for t in table)
  assert "importance" in r.stdout
  # best.flags is the flag file of the run with the lowest final dev nll, read from the runs.
  best_run = min((root / t.user_attrs["run"] for t in trials), key=_last_nll)
  recorded = json.loads((best_run / "run.json").read_text())["flags"]
  lines = [l for l in (root / "best.flags").read_text().splitlines() if not l.startswith("#")]
  assert lines == recorded and not any(l.startswith("--workdir") for l in lines)
  from transformer import config  # pylint: disable=g-import-not-at-top
  assert (config.from_args([f"--flagfile={root}/best.flags"], cwd=REPO)
          == config.from_args(recorded, cwd=REPO))


def _enqueue(root, spec_path, *dropouts):
  """Creates the study as the search will, with these trials first in line."""
  spec = json.loads(open(spec_path).read())
  study = search.load_study(spec_path, spec, str(root / search.JOURNAL))
  for d in dropouts:
    study.enqueue_trial({"dropout_rate": d})


def test_a_bad_trial_is_pruned_and_its_process_stops(tmp_path):
  root = tmp_path / "r"
  spec = _spec(tmp_path, budget={"trials": 2}, flags={"num_train_steps": 20},
               space={"dropout_rate": {"type": "float", "low": 0.0, "high": 0.5}},
               pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
  _enqueue(root, spec, 0.0, 0.5)
  # 0.2 s a step: the worker reads the metrics every POLL_S (0.5 s), so the pruned run has
  # seconds to spare before it could write all 20 steps.
  r = _run([spec, f"--root={root}", f"--python={_fake(tmp_path, 0.2)}"])
  assert r.returncode == 0, r.stdout + r.stderr
  trials = _study(root).get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
  assert trials[1].intermediate_values == {1: 100.0}
  log = (root / "trial_0001" / "fake.log").read_text().splitlines()
  pid = int(log[0].split()[1])
  assert log[-1] == f"sigterm {pid}" and not _alive(pid)  # stopped through SIGTERM, early
  assert _last_nll(root / "trial_0001") == 100.0
  assert len((root / "trial_0001" / "metrics.jsonl").read_text().splitlines()) < 20
  assert "trial_0001: pruned at step 1" in r.stdout
  status = json.loads((root / "trial_0001" / "status.json").read_text())
  assert status["steps"] == {} and "train" in status["interrupted_seconds"]


def _search_at_step_2(tmp_path, root, trials: int, **popen):
  """Starts a search of `trials` 6-step fake trials; returns (its command, its process) once
  trial 0 has written 2 evaluations."""
  spec = _spec(tmp_path, budget={"trials": trials}, flags={"num_train_steps": 6})
  cmd = [sys.executable, "-m", "launch.search", spec, f"--root={root}",
         f"--python={_fake(tmp_path, 0.4)}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), **popen)
  metrics = root / "trial_0000" / "metrics.jsonl"
  deadline = time.time() + 60
  while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.time() < deadline:
    time.sleep(0.1)
  return cmd, proc


@pytest.mark.parametrize("how", ["kill -9 the worker", "SIGTERM the search"])
def test_a_stopped_worker_then_resume_loses_and_doubles_nothing(tmp_path, how):
  root = tmp_path / "r"
  cmd, proc = _search_at_step_2(tmp_path, root, 2, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
  metrics = root / "trial_0000" / "metrics.jsonl"
  start = (root / "trial_0000" / "fake.log").read_text().split()
  train_pid, worker_pid = int(start[1]), int(start[2])
  if how == "kill -9 the worker":
    os.kill(worker_pid, 9)  # the worker, not the launcher
    assert proc.wait(timeout=30) == 1
  else:  # the launcher passes it on; the worker stops its run through SIGTERM
    os.kill(proc.pid, 15)
    assert proc.wait(timeout=30) == search.STOPPED
    assert (root / "trial_0000" / "fake.log").read_text().splitlines()[-1] == f"sigterm {train_pid}"
  deadline = time.time() + 10
  while _alive(train_pid) and time.time() < deadline:
    time.sleep(0.1)
  assert not _alive(train_pid), "the killed worker's training kept running"
  steps_before = len(metrics.read_text().splitlines())
  assert 2 <= steps_before < 6
  states = [t.state.name for t in _study(root).get_trials()]
  assert states == (["RUNNING"] if how == "kill -9 the worker" else ["FAIL", "WAITING"])

  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  if how == "kill -9 the worker":  # found dead on the next start
    assert "trial 0: its worker" in r.stdout and "marked failed and queued again" in r.stdout
  trials = _study(root).get_trials()
  assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
  # The retry is trial 0 again: same parameters, same run directory, resumed from its evals.
  assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0
  assert trials[1].user_attrs["run"] == "trial_0000" and trials[2].user_attrs["run"] == "trial_0002"
  assert trials[2].params != trials[0].params  # the restarted worker does not replay its draws
  records = [x for x in map(json.loads, metrics.read_text().splitlines()) if x["kind"] == "eval"]
  assert [x["step"] for x in records] == [1, 2, 3, 4, 5, 6]  # none lost, none doubled
  assert trials[1].intermediate_values == {x["step"]: x["nll"] for x in records}
  # Again: the budget is spent, nothing runs.
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and len(_study(root).get_trials()) == 3, r.stdout + r.stderr


def test_a_sigterm_to_a_training_alone_queues_its_trial_again(tmp_path):
  """A scheduler's SIGTERM to the training (exit 143): the trial is not complete; the worker
  retries it, resumed from its evaluations, and the study counts it once."""
  root = tmp_path / "r"
  _, proc = _search_at_step_2(tmp_path, root, 1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
  metrics = root / "trial_0000" / "metrics.jsonl"
  os.kill(int((root / "trial_0000" / "fake.log").read_text().split()[1]), 15)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert "trial 0 (trial_0000): stopped by SIGTERM; queued again" in out, out
  trials = _study(root).get_trials()
  assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
  assert trials[1].user_attrs == {**trials[1].user_attrs, "retry_of": 0, "run": "trial_0000"}
  records = [x for x in map(json.loads, metrics.read_text().splitlines()) if x["kind"] == "eval"]
  assert [x["step"] for x in records] == [1, 2, 3, 4, 5, 6]  # none lost, none doubled
  assert trials[1].value == records[-1]["nll"]


def test_slurm_writes_an_array_of_workers_and_starts_nothing(tmp_path):
  root = tmp_path / "r"
  spec = _spec(tmp_path, slurm={"time": "01:00:00", "cpus-per-task": 2})
  r = _run([spec, f"--root={root}", "--workers=3", "--slurm", "--raw_data_dir=/data/m30k"])
  assert r.returncode == 0, r.stdout + r.stderr
  script = (root / "search.sbatch").read_text()
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash" and "#SBATCH --array=0-2" in lines
  assert "#SBATCH --time=01:00:00" in lines and "#SBATCH --cpus-per-task=2" in lines
  assert f"cd {REPO}" in lines
  assert lines[-1] == (f'exec "$PYTHON" -m launch.search {spec} --root={root} --worker'
                       " --raw_data_dir=/data/m30k")
  assert subprocess.run(["bash", "-n", str(root / "search.sbatch")]).returncode == 0
  assert _study(root).get_trials() == [] and not list(root.glob("trial_*"))


@pytest.mark.parametrize("change,message", [
    ({"spaces": {}}, "unknown spec key 'spaces'"),
    ({"space": {"dropout_rate": {"type": "float", "low": 0.3, "high": 0.1}}},
     "bad range, low 0.3 must be below high 0.1"),
    ({"space": {"learning_rate_scale": {"type": "float", "low": 0.0, "high": 2, "log": True}}},
     "a log range needs low > 0"),
    ({"space": {"dropout_rate": {"type": "categorical", "choices": []}}}, "non-empty list"),
    ({"space": {"dropuot_rate": {"type": "float", "low": 0.0, "high": 0.3}}}, "dropuot_rate"),
    ({"space": {"dropout_rate": {"type": "float", "low": 0.0, "high": 1.5}}},
     "probe_dropout_rate=1.5"),
    ({"objective": {"metric": "bleu", "direction": "maximize"},
      "flags": {"eval_bleu_sentences": 0}}, "no dev evaluation writes 'bleu'"),
    ({"objective": {"metric": "nll", "direction": "down"}}, '"objective" must be'),
    ({"budget": {}}, '"budget" must be'),
    ({"pruner": {"name": "asha"}}, '"pruner": name must be one of'),
    ({"enqueue": [{"dropout": 0.1}]}, "'dropout' is not a parameter"),
    ({"enqueue": [{"dropout_rate": 0.9}]}, "dropout_rate=0.9 is outside"),
])
def test_bad_spec_is_one_error_line_before_any_trial(tmp_path, change, message):
  root = tmp_path / "r"
  r = _run([_spec(tmp_path, **change), f"--root={root}", f"--python={_fake(tmp_path)}"])
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
  assert message in r.stderr, r.stderr
  assert not list(root.glob("trial_*")) if root.exists() else True


def test_enqueued_points_run_first_and_once(tmp_path):
  root = tmp_path / "r"
  spec = _spec(tmp_path, enqueue=[{"dropout_rate": 0.37}, {"dropout_rate": 0.05}],
               budget={"trials": 3})
  r = _run([spec, f"--root={root}", f"--python={_fake(tmp_path, 0.05)}"])
  assert r.returncode == 0, r.stdout + r.stderr
  trials = _study(root).get_trials()
  assert [t.params["dropout_rate"] for t in trials[:2]] == [0.37, 0.05]
  assert trials[2].params["dropout_rate"] not in (0.37, 0.05)  # sampled
  # The flags of the enqueued trial are what it was given; a rerun enqueues nothing again.
  assert "--dropout_rate=0.37" in (root / trials[0].user_attrs["run"] / "flags.txt").read_text()
  r = _run([spec, f"--root={root}", f"--python={_fake(tmp_path, 0.05)}"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert len(_study(root).get_trials()) == 3


def test_unwritable_storage_is_one_error_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  r = _run([_spec(tmp_path), f"--root={blocker}/r", f"--python={_fake(tmp_path)}"])
  assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
  assert "cannot be written" in r.stderr, r.stderr
  r = _run([_spec(tmp_path), f"--root={tmp_path}/r", "--storage=nosuchdb://x/y"])
  assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1


def test_confirm_seeds_picks_the_winner_by_the_mean(tmp_path):
  root = tmp_path / "r"
  # The fake's nll does not depend on the seed, so each trial's seeds agree (std 0) and the
  # winner is the trial with the lowest dropout.
  spec = _spec(tmp_path, budget={"trials": 3}, flags={"num_train_steps": 2})
  r = _run([spec, f"--root={root}", "--confirm_seeds=2", "--confirm_top_k=2",
            f"--python={_fake(tmp_path, 0.05)}"])
  assert r.returncode == 0, r.stdout + r.stderr
  trials = _study(root).get_trials()
  result = json.loads((root / "confirm.json").read_text())
  best_two = sorted(trials, key=lambda t: t.params["dropout_rate"])[:2]
  assert [row["trial"] for row in result["trials"]] == [t.number for t in best_two]
  assert result["winner"] == best_two[0].number
  row = result["trials"][0]
  assert row["seeds"] == [0, 1, 2] and row["std"] == 0.0
  assert row["mean"] == pytest.approx(1 + 10 * best_two[0].params["dropout_rate"] + 1 / 2)
  seed_flags = (root / f"{row['run']}_seed2" / "flags.txt").read_text().splitlines()
  assert "--seed=2" in seed_flags
  r = _run(["report", str(root)])
  assert r.returncode == 0 and "**Winner**: trial" in r.stdout, r.stdout + r.stderr


def test_a_real_tiny_search_with_two_workers(tmp_path, multi30k_dir):
  """transformer.main trains the trials (a 1+1-layer model, 10 steps, dev nll at 5 and 10)."""
  tiny = json.loads(open(os.path.join(REPO, "experiments", "sweeps", "tiny_dropout.json")).read())
  flags = dict(tiny["flags"], eval_every_steps=5, checkpoint_every_steps=5)
  spec = _spec(tmp_path, flags=flags, budget={"trials": 2},
               space={"dropout_rate": {"type": "float", "low": 0.0, "high": 0.3}})
  root = tmp_path / "r"
  r = _run([spec, f"--root={root}", "--workers=2", f"--raw_data_dir={multi30k_dir}"],
           timeout=900)
  logs = "".join(p.read_text()[-2000:] for p in root.glob("*/*.log"))
  assert r.returncode == 0, r.stdout + r.stderr + logs
  trials = _study(root).get_trials()
  assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
  from transformer import config  # pylint: disable=g-import-not-at-top
  for t in trials:
    workdir = root / t.user_attrs["run"]
    evals = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [5, 10]
    assert t.value == evals[-1]["nll"] and t.intermediate_values == {5: evals[0]["nll"],
                                                                     10: evals[1]["nll"]}
    assert (workdir / "checkpoints" / "10").is_dir()
    lines = (workdir / "flags.txt").read_text().splitlines()
    assert lines[-1] == f"--workdir={workdir}"  # a flag file of transformer.main
    cfg = config.from_args([l for l in lines[:-1] if not l.startswith("#")], cwd=REPO)
    assert cfg.model.dropout_rate == t.params["dropout_rate"] and cfg.train.num_train_steps == 10


def test_rdb_storage_url(tmp_path):
  """--storage=URL (SQLite here; PostgreSQL/MySQL on clusters) holds the study instead of R."""
  root, db = tmp_path / "r", tmp_path / "study.db"
  spec = _spec(tmp_path, budget={"trials": 2}, flags={"num_train_steps": 2})
  r = _run([spec, f"--root={root}", f"--storage=sqlite:///{db}", f"--python={_fake(tmp_path, 0.05)}"])
  assert r.returncode == 0, r.stdout + r.stderr
  assert not (root / search.JOURNAL).exists() and db.stat().st_size > 0
  study = optuna.load_study(study_name="search", storage=f"sqlite:///{db}")
  assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
  r = _run(["report", str(root)])
  assert r.returncode == 0 and (root / "best.flags").exists(), r.stdout + r.stderr


@pytest.mark.parametrize("name", ["multi30k_search.json", "parsing_search.json"])
def test_committed_search_specs_are_valid(name):
  """The experiments' specs pass the checks a search makes before its first trial: shape and
  ranges, every range end and choice as flags, enqueued points, and an objective that the
  dev evaluations write."""
  path = os.path.join(REPO, "experiments", "sweeps", name)
  spec = search.sweep.load_spec(path)
  search.check_spec(spec)
  probes = search.probe_runs(spec, "/nonexistent/root")
  assert len(probes) >= 2 * len(spec["space"])
  search.sweep.validate(probes, [])
  search.check_objective(spec, probes[0], [])
  for point in spec.get("enqueue", []):
    search.sweep.validate([search.make_run(spec, "/nonexistent/root", "enqueued", point)], [])
