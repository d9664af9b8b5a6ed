"""launch/: sweep expansion and validation, a real 3-run sweep + report, SLURM arrays, scripts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from launch import report, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "sweeps", "tiny_dropout.json")
BASE = "experiments/cpu/multi30k_en_de.flags"


def _spec(tmp_path, **spec) -> str:
  spec.setdefault("base_flagfile", BASE)
  path = tmp_path / "spec.json"
  path.write_text(json.dumps(spec))
  return str(path)


def _no_launch(monkeypatch):
  """Any attempt to start a run fails the test."""
  def boom(*args, **kwargs):
    raise AssertionError(f"a run was launched: {args}")
  monkeypatch.setattr(sweep.Runner, "run", boom)


# ----------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_in_spec_order():
  runs = sweep.expand({"base_flagfile": BASE, "flags": {"num_train_steps": 10},
                       "grid": {"dropout_rate": [0.0, 0.3], "d_model": [32, 64]}})
  assert [r["name"] for r in runs] == [
      "dropout_rate=0.0__d_model=32", "dropout_rate=0.0__d_model=64",
      "dropout_rate=0.3__d_model=32", "dropout_rate=0.3__d_model=64"]
  assert [r["overrides"] for r in runs] == [
      {"dropout_rate": 0.0, "d_model": 32}, {"dropout_rate": 0.0, "d_model": 64},
      {"dropout_rate": 0.3, "d_model": 32}, {"dropout_rate": 0.3, "d_model": 64}]
  assert runs[3]["flags"] == [f"--flagfile={BASE}", "--num_train_steps=10",
                              "--dropout_rate=0.3", "--d_model=64"]


def test_zip_walks_lists_together_and_crosses_the_grid():
  runs = sweep.expand({
      "base_flagfile": BASE,
      "zip": {"d_model": [32, 64], "d_ff": [64, 128]},
      "grid": {"pre_layer_norm": [False, True]},
      "name_template": "d{d_model}_ff{d_ff}_preln{pre_layer_norm}"})
  assert [r["name"] for r in runs] == ["d32_ff64_prelnFalse", "d32_ff64_prelnTrue",
                                       "d64_ff128_prelnFalse", "d64_ff128_prelnTrue"]
  assert runs[0]["flags"] == [f"--flagfile={BASE}", "--d_model=32", "--d_ff=64",
                              "--nopre_layer_norm"]
  assert runs[3]["flags"] == [f"--flagfile={BASE}", "--d_model=64", "--d_ff=128",
                              "--pre_layer_norm"]
  # zip alone: one run per position; neither: one run called 'base'.
  only_zip = sweep.expand({"base_flagfile": BASE, "zip": {"seed": [1, 2, 3],
                                                          "shuffle_seed": [4, 5, 6]}})
  assert [r["name"] for r in only_zip] == ["seed=1__shuffle_seed=4", "seed=2__shuffle_seed=5",
                                           "seed=3__shuffle_seed=6"]
  assert [r["name"] for r in sweep.expand({"base_flagfile": BASE})] == ["base"]


def test_named_rows_state_only_what_differs_and_cross_the_grid():
  rows = [{"name": "base"}, {"name": "a_h1", "flags": {"num_heads": 1, "d_k": 128}},
          {"name": "e_learned", "flags": {"positional": "learned"}, "note": "row (E)"}]
  runs = sweep.expand({"base_flagfile": BASE, "flags": {"num_train_steps": 10}, "runs": rows})
  assert [r["name"] for r in runs] == ["base", "a_h1", "e_learned"]
  assert [r["overrides"] for r in runs] == [{}, {"num_heads": 1, "d_k": 128},
                                            {"positional": "learned"}]
  assert runs[1]["flags"] == [f"--flagfile={BASE}", "--num_train_steps=10", "--num_heads=1",
                              "--d_k=128"]
  # Crossed with a grid: every row at every seed, named row__grid.
  crossed = sweep.expand({"base_flagfile": BASE, "runs": rows[:2], "grid": {"seed": [1, 2]}})
  assert [r["name"] for r in crossed] == ["base__seed=1", "base__seed=2", "a_h1__seed=1",
                                          "a_h1__seed=2"]
  assert crossed[3]["overrides"] == {"num_heads": 1, "d_k": 128, "seed": 2}


def test_root_is_expanded_in_every_flag_value():
  runs = sweep.expand({"base_flagfile": BASE, "flags": {"tfds_data_dir": "{root}/_tfds"},
                       "runs": [{"name": "xx", "flags": {"vocab_path": "{root}/xx.model"}}],
                       "grid": {"raw_data_dir": ["{root}/a", "/data/b"]}}, "/abs/r")
  assert [r["flags"][1:] for r in runs] == [
      ["--tfds_data_dir=/abs/r/_tfds", "--vocab_path=/abs/r/xx.model", "--raw_data_dir=/abs/r/a"],
      ["--tfds_data_dir=/abs/r/_tfds", "--vocab_path=/abs/r/xx.model", "--raw_data_dir=/data/b"]]


def test_tiny_dropout_spec_expands_to_three_valid_runs(multi30k_dir):
  spec = sweep.load_spec(TINY)
  runs = sweep.expand(spec, "/root")
  assert [r["name"] for r in runs] == ["dropout0.0", "dropout0.1", "dropout0.3"]
  assert [r["overrides"] for r in runs] == [{"dropout_rate": v} for v in (0.0, 0.1, 0.3)]
  sweep.validate(runs, [f"--raw_data_dir={multi30k_dir}"])  # raises on a bad run
  from transformer import config  # pylint: disable=g-import-not-at-top
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    cfg = config.from_args(runs[2]["flags"])
  finally:
    os.chdir(cwd)
  assert (cfg.model.dropout_rate, cfg.model.d_model, cfg.model.num_encoder_layers) == (0.3, 32, 1)
  assert (cfg.data.train_split, cfg.train.num_train_steps, cfg.model.vocab_size) == (
      "train[:2000]", 10, 600)


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"dropot_rate": [0.1]}}, "run 'dropot_rate=0.1': Unknown command line flag 'dropot_rate'"),
    ({"grid": {"dropout_rate": [0.1, 1.5]}}, "run 'dropout_rate=1.5': --dropout_rate must be in [0, 1)"),
    ({"zip": {"d_model": [32, 64], "d_ff": [64]}}, '"zip": every list must have the same length'),
    ({"grid": {"d_model": [32]}, "name_template": "x{dropout_rate}"},
     '"name_template" uses {dropout_rate}'),
    ({"grid": {"d_model": [32, 64]}, "name_template": "same"}, "two runs are both named 'same'"),
    ({"grid": {"workdir": ["/x"]}}, "'workdir' is not allowed"),
    ({"steps": ["evaluate", "train"]}, '"steps" must keep the order'),
    ({"grids": {"d_model": [32]}}, "unknown spec key 'grids'"),
    ({"runs": [{"name": "x", "flags": {"label_smoothing": 1.0}}]},
     "run 'x': --label_smoothing must be in [0, 1)"),
    ({"runs": [{"name": "x", "flag": {}}]}, "unknown key 'flag'"),
    ({"runs": [{"name": "x"}, {"name": "x"}]}, "two runs are both named 'x'"),
    ({"runs": [{"name": "x", "flags": {"seed": 1}}], "grid": {"seed": [2]}},
     "'seed' is also in \"grid\" or \"zip\""),
    ({"base_flagfile": "experiments/nope.flags"},
     '"base_flagfile" experiments/nope.flags does not exist'),
])
def test_bad_spec_is_one_error_line_and_launches_nothing(tmp_path, capsys, monkeypatch, spec,
                                                         message):
  _no_launch(monkeypatch)
  root = tmp_path / "root"
  rc = sweep.main([_spec(tmp_path, **spec), f"--root={root}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1 and err.startswith("error: sweep "), err
  assert message in err, err
  assert not root.exists()  # nothing written, nothing started


def test_bad_json_and_missing_spec(tmp_path, capsys, monkeypatch):
  _no_launch(monkeypatch)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  assert sweep.main([str(bad), f"--root={tmp_path / 'r'}"]) == 2
  assert "is not valid JSON" in capsys.readouterr().err
  assert sweep.main([str(tmp_path / "missing.json"), f"--root={tmp_path / 'r'}"]) == 2
  assert "no sweep spec at" in capsys.readouterr().err
  assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------
# SLURM emission and dry runs
# ----------------------------------------------------------------------------

def test_slurm_array_has_one_task_per_run(tmp_path, capsys, monkeypatch, multi30k_dir):
  _no_launch(monkeypatch)
  root = tmp_path / "sweep"
  rc = sweep.main([TINY, f"--root={root}", "--slurm", f"--raw_data_dir={multi30k_dir}"])
  assert rc == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  script_path = root / "sweep.sbatch"
  assert f"sbatch {script_path}" in out
  script = script_path.read_text()
  assert "#SBATCH --array=0-2\n" in script
  assert "RUNS=(dropout0.0 dropout0.1 dropout0.3)" in script
  assert "#SBATCH --gpus-per-task=1" in script and "#SBATCH --time=00:30:00" in script
  assert '--only="$RUN"' in script and f"--raw_data_dir={multi30k_dir}" in script
  assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
  # Each run's resolved flags are written, and they are a usable flag file.
  from transformer import config  # pylint: disable=g-import-not-at-top
  for value in ("0.0", "0.1", "0.3"):
    lines = (root / f"dropout{value}" / "flags.txt").read_text().splitlines()
    assert f"--dropout_rate={value}" in lines
    assert lines[-1] == f"--workdir={root / f'dropout{value}'}"
    flagfile = tmp_path / f"config{value}.flags"
    flagfile.write_text("\n".join(l for l in lines if not l.startswith("--workdir")))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
      assert config.from_args([f"--flagfile={flagfile}"]).model.dropout_rate == float(value)
    finally:
      os.chdir(cwd)
  manifest = json.loads((root / "sweep.json").read_text())
  assert [r["name"] for r in manifest["runs"]] == ["dropout0.0", "dropout0.1", "dropout0.3"]
  # --parallel limits the array's concurrent tasks.
  assert sweep.main([TINY, f"--root={root}", "--slurm", "--dry_run", "--parallel=2"]) == 0
  assert "#SBATCH --array=0-2%2\n" in capsys.readouterr().out


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capsys, monkeypatch):
  _no_launch(monkeypatch)
  root = tmp_path / "sweep"
  assert sweep.main([TINY, f"--root={root}", "--dry_run"]) == 0
  out = capsys.readouterr().out
  cmds = [l for l in out.splitlines() if "-m transformer.main" in l]
  assert len(cmds) == 9  # 3 runs x train, average, evaluate
  assert cmds[0].endswith(f"--workdir={root}/dropout0.0 --mode=train")
  assert cmds[8].endswith(f"--workdir={root}/dropout0.3 --mode=evaluate --checkpoint=averaged")
  assert not root.exists()


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def test_report_from_hand_written_metrics(tmp_path, capsys):
  root = tmp_path / "sweep"
  runs = [{"name": "a", "overrides": {"dropout_rate": 0.0}},
          {"name": "b", "overrides": {"dropout_rate": 0.3}},
          {"name": "c", "overrides": {"dropout_rate": 0.5}}]  # never started
  (root / "a").mkdir(parents=True)
  (root / "b").mkdir()
  (root / "sweep.json").write_text(json.dumps({"runs": runs}))
  records = {
      "a": [{"step": 5, "kind": "train", "loss": 7.0, "nll": 6.9},
            {"step": 10, "kind": "train", "loss": 6.0, "nll": 5.5},
            {"step": 10, "kind": "eval", "nll": 5.25, "perplexity": 190.5, "bleu": 1.5},
            {"step": 10, "kind": "test_averaged", "sacrebleu": 2.25, "test_perplexity": 180.0}],
      "b": [{"step": 10, "kind": "train", "loss": 6.5, "nll": 6.0}],
  }
  for name, recs in records.items():
    (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs)
                                               + '{"step": 11, "kind": "tr')  # torn last line
  assert report.main([str(root)]) == 0
  out = capsys.readouterr().out
  table = [l for l in out.splitlines() if l.startswith("| ")]
  assert table[0] == ("| run | dropout_rate | train_step | train_loss | train_nll | dev_step"
                      " | dev_nll | dev_perplexity | dev_bleu | test_averaged_step"
                      " | test_averaged_sacrebleu | test_averaged_perplexity |")
  assert table[1] == "| a | 0.0 | 10 | 6 | 5.5 | 10 | 5.25 | 190.5 | 1.5 | 10 | 2.25 | 180 |"
  assert table[2] == "| b | 0.3 | 10 | 6.5 | 6 |  |  |  |  |  |  |  |"
  assert table[3] == "| c | 0.5 |  |  |  |  |  |  |  |  |  |  |"
  with open(root / "report" / "report.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["a", "b", "c"]
  assert rows[0]["test_averaged_sacrebleu"] == "2.25" and rows[2]["train_loss"] == ""
  assert (root / "report" / "report.md").read_text().count("\n| ") == 4
  assert report.main([str(tmp_path / "nothing-here")]) == 2


# ----------------------------------------------------------------------------
# The tiny sweep, end to end
# ----------------------------------------------------------------------------

def _env() -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per run (conftest asks for 8 for this process)
  return env


def test_tiny_sweep_runs_and_reports(tmp_path, multi30k_dir):
  root = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "launch.sweep", TINY, f"--root={root}",
         f"--raw_data_dir={multi30k_dir}", "--parallel=2"]
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  logs = "".join((p.read_text()[-2000:] for p in root.glob("*/*.log")))
  assert r.returncode == 0, r.stdout + r.stderr + logs
  for name in ("dropout0.0", "dropout0.1", "dropout0.3"):
    for step in ("train", "average", "evaluate"):
      assert f"[sweep] {name}: {step} done" in r.stdout, r.stdout
    status = json.loads((root / name / "status.json").read_text())
    assert list(status["steps"]) == ["train", "average", "evaluate"]
    assert (root / name / "averaged" / "10").is_dir()
  assert "3/3 runs finished" in r.stdout

  # Again: every run is finished, so nothing runs.
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("finished before, skipped") == 3, r.stdout
  assert " done in " not in r.stdout

  r = subprocess.run([sys.executable, "-m", "launch.report", str(root)], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  rows = [l for l in r.stdout.splitlines() if l.startswith("| dropout")]
  assert len(rows) == 3, r.stdout
  with open(root / "report" / "report.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert [t["run"] for t in table] == ["dropout0.0", "dropout0.1", "dropout0.3"]
  assert [float(t["dropout_rate"]) for t in table] == [0.0, 0.1, 0.3]
  for t in table:
    assert t["steps_done"] == "train+average+evaluate"
    assert int(t["train_step"]) == 10 and float(t["train_loss"]) > 0
    assert float(t["dev_perplexity"]) > 1 and float(t["dev_nll"]) > 0
    assert float(t["test_averaged_sacrebleu"]) >= 0 and float(t["test_averaged_perplexity"]) > 1
  # Dropout changes training: the three runs do not have the same training loss.
  assert len({t["train_loss"] for t in table}) == 3


_FAKE_MAIN = r"""#!/bin/sh
# Stands in for `python -m transformer.main`: logs its mode to the workdir, fails on request.
for a in "$@"; do
  case "$a" in --workdir=*) W="${a#*=}" ;; --mode=*) M="${a#*=}" ;; --dropout_rate=*) D="${a#*=}" ;; esac
done
echo "$M start $(date +%s.%N)" >> "$W/fake.log"
sleep 1
if [ "$D" = "0.3" ] && [ "$M" = "average" ] && [ -e "$W/../fail" ]; then echo "error: boom" >&2; exit 2; fi
echo "$M end $(date +%s.%N)" >> "$W/fake.log"
"""


def test_parallel_runs_failures_and_resume(tmp_path):
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_MAIN)
  fake.chmod(0o755)
  root = tmp_path / "sweep"
  root.mkdir()
  (root / "fail").touch()
  cmd = [sys.executable, "-m", "launch.sweep", TINY, f"--root={root}", "--parallel=3",
         f"--python={fake}"]
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "dropout0.3: average FAILED (exit 2" in r.stdout and "error: boom" in r.stdout
  assert "2/3 runs finished" in r.stdout and "failed: dropout0.3" in r.stdout
  # The three runs overlapped in time (3 steps of ~1 s each, 3 at a time).
  starts = [float((root / n / "fake.log").read_text().split()[2])
            for n in ("dropout0.0", "dropout0.1", "dropout0.3")]
  assert max(starts) - min(starts) < 0.9
  assert json.loads((root / "dropout0.3" / "status.json").read_text())["steps"].keys() == {"train"}
  # Resume: finished runs are skipped; the failed run continues from its failed step.
  (root / "fail").unlink()
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.count("finished before, skipped") == 2
  assert "dropout0.3: train" not in r.stdout
  assert "dropout0.3: average done" in r.stdout and "dropout0.3: evaluate done" in r.stdout
  modes = [l.split()[0] for l in (root / "dropout0.3" / "fake.log").read_text().splitlines()
           if " start " in l]
  assert modes == ["train", "average", "average", "evaluate"]
  # A run whose finished steps were made with other flags is not silently reused.
  r = subprocess.run(cmd + ["--seed=7"], cwd=REPO, env=_env(), capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2 and "already has finished steps made with other flags" in r.stderr


_FAKE_AFFINITY = r"""#!PYTHON
# Stands in for `python -m transformer.main`: records the cores it may use, and when it ran.
import json, os, sys, time
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
start = time.time()
time.sleep(1.0)
with open(os.path.join(workdir, "cpus.json"), "a") as f:
  f.write(json.dumps({"cpus": sorted(os.sched_getaffinity(0)), "start": start,
                      "end": time.time()}) + "\n")
"""


def test_cpus_per_run_pins_each_worker_to_its_own_cores(tmp_path):
  cores = sorted(os.sched_getaffinity(0))
  parallel = min(2, len(cores))
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_AFFINITY.replace("PYTHON", sys.executable, 1))
  fake.chmod(0o755)
  root = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "launch.sweep", TINY, f"--root={root}", f"--parallel={parallel}",
         "--cpus_per_run=1", f"--python={fake}"]
  r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  steps = []
  for name in ("dropout0.0", "dropout0.1", "dropout0.3"):
    lines = (root / name / "cpus.json").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert len(records) == 3  # train, average, evaluate
    # Every step of a run ran on the same single core, one of the first `parallel` cores.
    assert len({tuple(s["cpus"]) for s in records}) == 1
    assert records[0]["cpus"] in [[c] for c in cores[:parallel]]
    steps += records
  # Steps that overlapped in time ran on different cores.
  for i, a in enumerate(steps):
    for b in steps[i + 1:]:
      if a["start"] < b["end"] and b["start"] < a["end"]:
        assert a["cpus"] != b["cpus"], (a, b)
  # Asking for more cores than there are is one error line, and nothing runs.
  r = subprocess.run(cmd[:-3] + [f"--parallel={len(cores) + 1}", "--cpus_per_run=1"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().startswith("error:")
  assert f"needs {len(cores) + 1} cores; this process may use {len(cores)}" in r.stderr


@pytest.fixture(scope="module")
def unbroken_sweep(tmp_path_factory, multi30k_dir):
  """A one-run sweep (train 24 steps, evaluate) that nothing stops: (spec, its root, command)."""
  tmp = tmp_path_factory.mktemp("unbroken")
  tiny = json.loads(open(TINY, encoding="utf-8").read())
  flags = dict(tiny["flags"], num_train_steps=24, checkpoint_every_steps=8, eval_every_steps=8,
               log_every_steps=8, keep_checkpoints=5, dropout_rate=0.1,
               tfds_data_dir=str(tmp / "_tfds"), vocab_path=str(tmp / "spm.model"))
  spec = _spec(tmp, flags=flags, runs=[{"name": "base"}], steps=["train", "evaluate"],
               evaluate_checkpoint="latest")

  def sweep_cmd(root):
    return [sys.executable, "-m", "launch.sweep", spec, f"--root={root}",
            f"--raw_data_dir={multi30k_dir}"]

  r = subprocess.run(sweep_cmd(tmp / "whole"), cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  return tmp / "whole", sweep_cmd


@pytest.mark.parametrize("how", ["SIGKILL the sweep", "SIGTERM the training"])
def test_a_stopped_sweep_continues_to_the_same_results(tmp_path, unbroken_sweep, how):
  """Stop the sweep mid-training, run it again: the run's record equals an unbroken run's.

  SIGKILL takes the sweep and its training down. SIGTERM reaches the training alone (as a
  scheduler's notice): it saves, exits 143, and the sweep records its train as not finished
  and goes on to no later step of the run.
  """
  from launch import table3  # pylint: disable=g-import-not-at-top
  whole, sweep_cmd = unbroken_sweep
  broken = tmp_path / "broken"
  with open(tmp_path / "first.out", "w", encoding="utf-8") as out:
    proc = subprocess.Popen(sweep_cmd(broken), cwd=REPO, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 300
  first = broken / "base" / "checkpoints" / "8"
  while not first.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  status_started = json.loads((broken / "base" / "status.json").read_text())["running"]["started"]
  if how == "SIGKILL the sweep":
    os.killpg(proc.pid, 9)
    proc.wait(timeout=60)
  else:
    children = [int(c) for t in os.listdir(f"/proc/{proc.pid}/task")
                for c in open(f"/proc/{proc.pid}/task/{t}/children").read().split()]
    assert len(children) == 1, children  # python -m transformer.main --mode=train
    os.kill(children[0], 15)
    assert proc.wait(timeout=120) == 1  # a run not finished
    text = (tmp_path / "first.out").read_text()
    assert "base: train interrupted by SIGTERM (exit 143" in text, text
    assert "base: evaluate" not in text and "1/1 runs finished" not in text, text
  assert first.is_dir(), "the sweep did not write its first checkpoint within 300 s"
  assert not (broken / "base" / "checkpoints" / "24").exists(), "stopped too late to test resume"
  status = json.loads((broken / "base" / "status.json").read_text())
  assert status["steps"] == {}  # nothing finished
  killed_at = (broken / "base" / "train.log").stat().st_mtime
  r = subprocess.run(sweep_cmd(broken), cwd=REPO, env=_env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  log = (broken / "base" / "train.log").read_text()
  assert "resumed from step " in log and log.count("$ ") == 2  # both attempts' output
  # The train step's seconds count the stopped attempt too: start to its log's last write
  # (SIGKILL), or to its exit, measured by the sweep (SIGTERM).
  status = json.loads((broken / "base" / "status.json").read_text())
  lost = status["interrupted_seconds"]["train"]
  if how == "SIGKILL the sweep":
    assert abs(lost - (killed_at - status_started)) < 0.05, (lost, killed_at, status_started)
  else:
    assert 0 <= lost - (killed_at - status_started) < 10, (lost, killed_at, status_started)
  assert status["steps"]["train"]["seconds"] > lost > 0 and "running" not in status
  a = table3.read_run(str(whole / "base"))
  b = table3.read_run(str(broken / "base"))
  for key in ("step", "ppl", "dev_nll", "bleu", "bleu_tok", "train_nll", "curve", "params"):
    assert a[key] == b[key], (key, a[key], b[key])


# ----------------------------------------------------------------------------
# Shell scripts
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_shell_script_parses(script):
  r = subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_tpu_pod_dry_run_prints_gcloud_commands_for_all_workers(tmp_path):
  script = os.path.join(REPO, "launch", "tpu_pod.sh")
  env = {k: v for k, v in os.environ.items()
         if k not in ("TPU_NAME", "ZONE", "REPO_URL", "SKIP_SETUP", "DRY_RUN")}
  r = subprocess.run(["bash", script, "--dry-run", "--name=tf-base", "--zone=us-central2-b",
                      "--accelerator-type=v4-32", "--", "--flagfile=experiments/paper/base_en_de.flags",
                      "--workdir=/mnt/shared/base", "--mode=train"],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  create = [l for l in lines if l.startswith("+ gcloud compute tpus tpu-vm create tf-base")]
  assert create and "--accelerator-type=v4-32" in create[0] and "--zone=us-central2-b" in create[0]
  ssh = [l for l in lines if l.startswith("+ gcloud compute tpus tpu-vm ssh tf-base")]
  assert len(ssh) >= 3 and all("--worker=all" in l for l in ssh)  # copy, venv, run
  assert "pip\\ install\\ -q\\ -c\\ constraints.txt\\ -e\\ ." in ssh[-2]
  run = ssh[-1]
  assert "JAX_COORDINATOR_ADDRESS=" in run and "transformer.main" in run
  assert "--flagfile=experiments/paper/base_en_de.flags" in run and "--mode=train" in run
  # No TPU name -> one error line, exit 2.
  r = subprocess.run(["bash", script, "--dry-run", "--zone=z", "--", "--mode=train"], env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.strip().startswith("error: --name"), r.stderr


_FAKE_GCLOUD = r"""#!/bin/bash
# Stands in for gcloud: records its arguments; `ssh --command=C` runs C here (one 'worker').
echo "$*" >> "$FAKE_GCLOUD_LOG"
case "$4" in
  describe) echo 10.0.0.2 ;;
  ssh) for a in "$@"; do case "$a" in --command=*) bash -c "${a#--command=}" ;; esac; done ;;
esac
"""

_FAKE_VENV_PYTHON = r"""#!/bin/bash
{ echo "cwd=$PWD"; echo "coordinator=$JAX_COORDINATOR_ADDRESS"; printf 'arg=%s\n' "$@"; } > "$HOME/ran.txt"
"""


@pytest.mark.parametrize("detached", [False, True])
def test_tpu_pod_remote_command_survives_the_shells(tmp_path, detached):
  # The command string that tpu_pod.sh hands to `ssh --worker=all` is executed by a shell here,
  # with a fake ~/transformer/.venv/bin/python: the flags must arrive intact (spaces, quotes).
  home = tmp_path / "home"
  venv_bin = home / "transformer" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(_FAKE_VENV_PYTHON)
  (venv_bin / "python").chmod(0o755)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}",
             FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"))
  args = ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--name=tf", "--zone=z1",
          "--skip-setup"] + (["--log=logs/run 1.log"] if detached else []) + [
          "--", "--mode=train", "--workdir=/mnt/shared/my run", "--input=it's.txt"]
  r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  ran = home / "ran.txt"
  want = [f"cwd={home}/transformer", "coordinator=10.0.0.2:8476", "arg=-m",
          "arg=transformer.main", "arg=--mode=train", "arg=--workdir=/mnt/shared/my run",
          "arg=--input=it's.txt"]
  for _ in range(100):  # a detached run finishes in the background
    if ran.exists() and ran.read_text().splitlines() == want:
      break
    time.sleep(0.1)
  assert ran.exists(), f"the detached run wrote no {ran} within 10 s"
  assert ran.read_text().splitlines() == want
  calls = (tmp_path / "gcloud.log").read_text().splitlines()
  assert calls[0].startswith("compute tpus tpu-vm describe tf --zone=z1")
  assert calls[1].startswith("compute tpus tpu-vm ssh tf --zone=z1 --worker=all --command=")
  if detached:
    assert (home / "transformer" / "logs" / "run 1.log").exists()


def test_local_sh_dry_run_trains_averages_evaluates(tmp_path):
  env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(tmp_path / "w"),
                      "experiments/cpu/multi30k_en_de.flags", "--num_train_steps=3"],
                     cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  modes = [l.split(": ", 1)[0].split()[-1] for l in r.stdout.splitlines() if "transformer.main" in l]
  assert modes == ["train", "average", "evaluate"]
  assert r.stdout.count(f"--flagfile={REPO}/experiments/cpu/multi30k_en_de.flags "
                        "--num_train_steps=3") == 3
  assert "--checkpoint=averaged" in r.stdout.splitlines()[-1]
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "only-one-arg"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "usage:" in r.stderr


def test_local_sh_stops_after_a_train_stopped_by_sigterm(tmp_path):
  """transformer.main's 143 (a SIGTERM save) ends the script before average and evaluate."""
  fake = tmp_path / "fake_python"
  fake.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n'
                  'case "$*" in *--mode=train*) exit 143 ;; esac\n')
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), CALLS=str(tmp_path / "calls"))
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(tmp_path / "w"),
                      "experiments/cpu/multi30k_en_de.flags"],
                     cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 143, r.stdout + r.stderr
  assert "[local.sh] train stopped by SIGTERM, not finished" in r.stderr, r.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert len(calls) == 1 and calls[0].endswith("--mode=train"), calls
  assert "done in" not in r.stdout


def test_table3_paper_sweep_runs_each_row_from_its_own_flag_file():
  spec = sweep.load_spec(os.path.join(REPO, "experiments", "sweeps", "table3_paper.json"))
  runs = sweep.expand(spec)
  assert len(runs) == 20
  assert runs[1]["name"] == "a_h1"
  assert runs[1]["flags"] == ["--flagfile=experiments/paper/table3/a_h1.flags"]
  sweep.validate(runs, [])  # every row's flag file parses into a valid config
  from transformer import config  # pylint: disable=g-import-not-at-top
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    big = config.from_args(runs[-1]["flags"])
  finally:
    os.chdir(cwd)
  assert (big.model.d_model, big.model.num_heads, big.model.dropout_rate) == (1024, 16, 0.3)
  assert (big.data.test_split, big.decode.num_average) == ("validation", 1)
