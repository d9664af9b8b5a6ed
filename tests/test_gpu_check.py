"""benchmarks/gpu_check.py: the trace comparison by hand, and its --smoke run on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_compare_trace_by_hand():
  ref = {"steps": [1, 2, 3], "losses": [9.0, 8.5, 8.0], "vocab_sha256": "a"}
  close = {"steps": [1, 2, 3], "losses": [9.001, 8.49, 8.0], "vocab_sha256": "a"}
  r = gpu_check.compare_trace(close, ref, tolerance=0.02)
  assert r["ok"] and r["at_step"] == 2 and abs(r["max_abs_diff"] - 0.01) < 1e-12
  assert abs(r["mean_abs_diff"] - 0.011 / 3) < 1e-12 and r["same_vocab"]
  far = {"steps": [1, 2, 3], "losses": [9.0, 8.5, 8.2], "vocab_sha256": "b"}
  r = gpu_check.compare_trace(far, ref, tolerance=0.02)
  assert not r["ok"] and r["at_step"] == 3 and not r["same_vocab"]
  short = {"steps": [1, 2], "losses": [9.0, 8.5], "vocab_sha256": "a"}
  assert "missing" in gpu_check.compare_trace(short, ref, tolerance=0.02)["error"]


def test_committed_traces_are_float32_highest_on_the_cpu():
  for smoke in (False, True):
    with open(REPO / gpu_check.TRACE_FILES[smoke], encoding="utf-8") as f:
      t = json.load(f)
    assert t["platform"] == "cpu" and t["matmul_precision"] == "highest"
    assert t["steps"] == list(range(1, len(t["steps"]) + 1)) and len(t["losses"]) == len(t["steps"])
  assert len(t["steps"]) < 10  # the smoke trace


def test_smoke_runs_every_part_on_the_cpu(tmp_path, multi30k_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU machine
  p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke",
                      f"--out={tmp_path}", "--budget_s=3600"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=1800, check=False)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  line, table = p.stdout.strip().split("\n", 1)
  r = json.loads(line)
  assert json.loads((tmp_path / "gpu_check.json").read_text()) == r
  parts = r["parts"]
  assert r["ok"] and r["smoke"] and set(parts) == {"correctness", "trace", "main_job", "speed",
                                                  "decode"}
  assert parts["correctness"]["passed"] >= 1 and "failed" not in parts["correctness"]
  # The CPU against its own committed trace: same vocabulary, (nearly) the same losses.
  for key in ("fp32_highest", "fp32_default"):
    t = parts["trace"][key]
    assert t["same_vocab"] and t["max_abs_diff"] <= 1e-3, t
  m = parts["main_job"]
  assert m["sentences"] == 8 and 0 <= m["sacrebleu"] <= 100 and m["step"] == 4
  for s in parts["speed"]["points"]:
    assert s["bytes"] <= 0.9 * s["budget_bytes"] and s["rows"] >= 4 and s["mfu"] > 0
  assert {(s["config"], s["dtype"]) for s in parts["speed"]["points"]} == {
      ("tiny", "bfloat16"), ("tiny", "float32")}
  assert len(parts["decode"]["points"]) == 2
  assert all(d["sentences_per_s"] > 0 for d in parts["decode"]["points"])
  assert table.startswith("| part |") and "main job" in table


def test_bad_input_is_one_error_line(tmp_path):
  for args, message in ((["--parts=speed,fly"], "error: --parts: unknown ['fly']"),
                        ([f"--bundle={tmp_path}"], "error: no Multi30k at")):
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith(message), p.stderr
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1
