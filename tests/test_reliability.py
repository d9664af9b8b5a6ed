"""Exact resume after SIGKILL, SIGTERM saves, damaged checkpoints, NaNs, clear errors, pictures."""

import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--flagfile=experiments/cpu/multi30k_en_de.flags", "--train_split=train[:1500]",
        "--eval_split=validation[:24]", "--test_split=test[:8]", "--vocab_size=400",
        "--num_encoder_layers=1", "--num_decoder_layers=1", "--d_model=32", "--d_ff=64",
        "--num_heads=2", "--d_k=16", "--d_v=16", "--tokens_per_batch=512",
        "--bucket_boundaries=32,64,128", "--warmup_steps=10", "--log_every_steps=2",
        "--eval_every_steps=1000", "--eval_bleu_sentences=0", "--checkpoint_every_steps=4",
        "--max_decode_len_offset=8"]


def _env():
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one device: these tests are about the workflow
  return env


def _cmd(workdir, data_dir, *args, program=("transformer.main",)):
  return [sys.executable, "-m", *program, *TINY, f"--raw_data_dir={data_dir}",
          f"--workdir={workdir}", *args]


def _main(workdir, data_dir, *args, stdin=None, program=("transformer.main",)):
  return subprocess.run(_cmd(workdir, data_dir, *args, program=program), cwd=REPO, env=_env(),
                        input=stdin, capture_output=True, text=True, timeout=600)


def _snapshot(path):
  """Every file under path with its size and mtime (an untouched workdir keeps all three)."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _params(workdir, step):
  """Parameters of checkpoint `step` as numpy arrays, read with Orbax."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return [np.asarray(x) for x in __import__("jax").tree.leaves(tree["params"])]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, multi30k_dir):
  """An uninterrupted 16-step run, the reference for several tests."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  r = _main(workdir, multi30k_dir, "--num_train_steps=16")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _wait_for(proc, done, what, stderr_path, timeout=300):
  """Polls done() every 0.2 s until it holds; fails with `what` and the log if the process
  ends or `timeout` seconds pass first."""
  deadline = time.time() + timeout
  while not done():
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      proc.wait(timeout=60)
      log = stderr_path.read_text(errors="replace")[-2000:]
      pytest.fail(f"{what}: not reached within {timeout} s (exit code {proc.returncode}):\n{log}")
    time.sleep(0.2)


def test_sigkill_then_restart_is_bitwise_identical(tmp_path, multi30k_dir, shared_run):
  """Killed after a checkpoint is on disk (at a seeded step), the restarted run resumes from
  that checkpoint and ends with the uninterrupted run's parameters, bit for bit."""
  workdir = tmp_path / "run"
  kill_after = random.Random(20).randint(9, 13)  # past the first checkpoint (step 4)
  err = tmp_path / "stderr.txt"
  with open(err, "w") as stderr:
    proc = subprocess.Popen(_cmd(workdir, multi30k_dir, "--num_train_steps=16"), cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)
  metrics = workdir / "metrics.jsonl"
  _wait_for(proc, lambda: (metrics.exists() and (workdir / "checkpoints" / "4").is_dir() and
                           f'"step": {kill_after - kill_after % 2}' in metrics.read_text()),
            f"step {kill_after - kill_after % 2} logged and checkpoint 4 saved", err)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  r = _main(workdir, multi30k_dir, "--num_train_steps=16")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step" in r.stderr, r.stderr[-3000:]
  for a, b in zip(_params(shared_run, 16), _params(workdir, 16)):
    np.testing.assert_array_equal(a, b)  # bitwise


def test_sigterm_saves_and_exits_then_resumes(tmp_path, multi30k_dir):
  workdir = tmp_path / "run"
  err = tmp_path / "stderr.txt"
  with open(err, "w") as stderr:
    proc = subprocess.Popen(_cmd(workdir, multi30k_dir, "--num_train_steps=100000"), cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)
  metrics = workdir / "metrics.jsonl"
  _wait_for(proc, lambda: metrics.exists() and '"step": 6' in metrics.read_text(),
            "step 6 logged", err)
  t = time.time()
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=60)
  err = err.read_text(errors="replace")
  assert time.time() - t < 30
  # Not finished: 128 + SIGTERM, so a launcher does not go on to average/evaluate.
  assert proc.returncode == 128 + signal.SIGTERM == 143, err[-3000:]
  import re
  m = re.search(r"SIGTERM: saved checkpoint at step (\d+)", err)
  assert m, err[-2000:]
  step = int(m.group(1))
  assert (workdir / "checkpoints" / str(step)).is_dir()
  r = _main(workdir, multi30k_dir, f"--num_train_steps={step + 2}")
  assert r.returncode == 0 and f"resumed from step {step}" in r.stderr, r.stderr[-3000:]


def test_sigterm_stops_at_the_next_step(tmp_path, multi30k_dir):
  """SIGTERM as soon as the device has finished step 6: the run saves and stops within 2
  steps of it, although one batch shape (compiled once) and a model of 256 dimensions let
  the host dispatch steps far ahead of the device."""
  r = _main(tmp_path / "run", multi30k_dir, "--d_model=256", "--d_ff=1024", "--num_heads=4",
            "--d_k=64", "--d_v=64", "--tokens_per_batch=4096", "--bucket_boundaries=64",
            "--max_source_length=64", "--max_target_length=64", "--log_every_steps=1000",
            "--checkpoint_every_steps=1000", "--num_train_steps=40",
            program=("tests.sigterm_main", "6"))
  assert r.returncode == 143, r.stderr[-3000:]  # stopped early: 128 + SIGTERM
  saved = [int(m) for m in re.findall(r"SIGTERM: saved checkpoint at step (\d+)", r.stderr)]
  assert len(saved) == 1 and 6 <= saved[0] <= 8, (saved, r.stderr[-2000:])
  assert os.listdir(tmp_path / "run" / "checkpoints") == [str(saved[0])]


def test_truncated_latest_checkpoint_falls_back(tmp_path, multi30k_dir):
  workdir = tmp_path / "run"
  r = _main(workdir, multi30k_dir, "--num_train_steps=8")
  assert r.returncode == 0, r.stderr[-3000:]
  # Truncate the largest file of the latest checkpoint (its array data).
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / "8") for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  r = _main(workdir, multi30k_dir, "--num_train_steps=10")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "checkpoint 8 is damaged" in r.stderr and "resumed from step 4" in r.stderr
  # One warning line: no traceback of the failed restore's reads.
  assert r.stderr.count("is damaged") == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert (workdir / "checkpoints" / "8.damaged").is_dir()  # kept for inspection


def test_nan_is_skipped_or_stops(tmp_path, multi30k_dir):
  workdir = tmp_path / "skip"
  r = _main(workdir, multi30k_dir, "--num_train_steps=6", "--nonfinite=skip",
            program=("tests.nan_main", "3"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 3: non-finite loss/gradient, update skipped (1 so far)" in r.stderr
  workdir = tmp_path / "stop"
  r = _main(workdir, multi30k_dir, "--num_train_steps=12", program=("tests.nan_main", "6"))
  assert r.returncode == 2
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite loss/gradient at step 6") and "kept" in last, last
  # NaN parameters. One layer per stack, post-LN: encoder 4 projections + 2 LayerNorms x 2 +
  # FFN 4 = 12 tensors, decoder 8 + 3 x 2 + 4 = 18, embedding 1: 31. All but the two FFN
  # input biases get NaN gradients: ReLU's derivative at NaN is 0 in JAX (x > 0 is False), so
  # d loss / d b_1 = upstream * 0 = 0 exactly, while every other path multiplies by NaN. 29.
  assert "non-finite gradients in 29 tensors, e.g. decoder/layer_0/cross_attention/" in last, last
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [4]  # the last good checkpoint, nothing written after the NaN


def _bad(workdir, data_dir, *args, flagfile_text=None, tmp_path=None):
  before = _snapshot(workdir)
  extra = []
  if flagfile_text is not None:
    ff = tmp_path / "bad.flags"
    ff.write_text(flagfile_text)
    extra = [f"--flagfile={ff}"]
  r = _main(workdir, data_dir, *extra, *args)
  assert r.returncode != 0
  assert _snapshot(workdir) == before  # nothing created, changed or removed
  return r.stderr.strip().splitlines()


@pytest.mark.parametrize("args,message", [
    (["--d_model=0"], "error: --d_model must be positive, got 0"),
    (["--warmup_steps=0"], "error: --warmup_steps must be positive, got 0"),
    (["--beam_size=0"], "error: --beam_size must be positive, got 0"),
    (["--alpha=-0.5"], "error: --alpha must be >= 0, got -0.5"),
    (["--raw_data_dir=/nonexistent/multi30k"], "/nonexistent/multi30k"),
    (["--max_source_length=1"], "error:"),
])
def test_bad_values_fail_cleanly(tmp_path, multi30k_dir, args, message):
  lines = _bad(tmp_path / "fresh", multi30k_dir, *args)
  assert message in lines[-1] and lines[-1].startswith("error:"), lines[-3:]


def test_unknown_flags_fail_cleanly(tmp_path, multi30k_dir):
  lines = _bad(tmp_path / "fresh", multi30k_dir, "--d_modle=64")
  assert any("Unknown command line flag 'd_modle'" in l for l in lines), lines[-3:]
  lines = _bad(tmp_path / "fresh", multi30k_dir, flagfile_text="--warmup_step=10\n",
               tmp_path=tmp_path)
  assert any("Unknown command line flag 'warmup_step'" in l for l in lines), lines[-3:]


def test_missing_file_and_mismatched_parallel_files(tmp_path, multi30k_dir):
  raw = tmp_path / "raw"
  raw.mkdir()
  for split in ("train", "val", "test_2016_flickr"):
    for lang in ("en", "de"):
      lines = (multi30k_dir / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:50]
      (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
  (raw / "val.de").unlink()
  lines = _bad(tmp_path / "fresh", raw)
  assert lines[-1].startswith("error:") and "val.de" in lines[-1], lines[-3:]
  # parallel_text whose two sides differ in length
  (tmp_path / "c.en").write_text("a\nb\nc\n")
  (tmp_path / "c.de").write_text("x\ny\n")
  lines = _bad(tmp_path / "fresh", raw, "--dataset=parallel_text",
               f"--parallel_text_splits=train={tmp_path}/c,validation={tmp_path}/c,test={tmp_path}/c")
  assert lines[-1].startswith("error:") and "3" in lines[-1] and "2" in lines[-1], lines[-3:]


def test_resume_mismatch_and_missing_checkpoint(tmp_path, multi30k_dir, shared_run):
  lines = _bad(shared_run, multi30k_dir, "--num_train_steps=20", "--d_model=64")
  assert lines[-1].startswith("error: checkpoint 16") and "d_model=32" in lines[-1], lines[-1]
  lines = _bad(shared_run, multi30k_dir, "--num_train_steps=20", "--vocab_size=500")
  assert "vocab_size=400" in lines[-1], lines[-1]
  # Written without --scan_layers: another parameter layout, refused like another shape.
  lines = _bad(shared_run, multi30k_dir, "--num_train_steps=20", "--scan_layers")
  assert "scan_layers=False but this run has scan_layers=True" in lines[-1], lines[-1]
  fresh = tmp_path / "empty"
  fresh.mkdir()
  for mode in ("evaluate", "translate"):
    lines = _bad(fresh, multi30k_dir, f"--mode={mode}")
    assert lines[-1].startswith("error: no vocabulary at") or "no checkpoint" in lines[-1], lines


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def test_plot_and_attention_write_pngs(shared_run, multi30k_dir, tmp_path):
  r = _main(shared_run, multi30k_dir, "--mode=plot", f"--output={tmp_path}/curves.png")
  assert r.returncode == 0, r.stderr[-2000:]
  assert _png_size(tmp_path / "curves.png") == (1100, 700)
  r = _main(shared_run, multi30k_dir, "--mode=attention", "--sentence=A dog runs.",
            f"--output={tmp_path}/att")
  assert r.returncode == 0, r.stderr[-2000:]
  for kind in ("encoder_self_attention", "decoder_self_attention", "decoder_cross_attention"):
    w, h = _png_size(tmp_path / "att" / f"attention_{kind}.png")
    assert w == 2 * h and h >= 176  # 1 layer (rows) x 2 heads (columns) of square cells


def test_damaged_workdir_files_and_a_file_as_workdir_fail_cleanly(tmp_path, multi30k_dir,
                                                                  shared_run):
  """What a new user can do to a workdir: each gives one 'error:' line, nothing changed."""
  afile = tmp_path / "afile"
  afile.write_text("not a directory\n")
  r = _main(afile, multi30k_dir, "--mode=train")
  assert r.returncode == 2 and afile.read_text() == "not a directory\n"
  assert r.stderr.strip().splitlines()[-1] == f"error: --workdir {afile} is a file, not a directory"
  workdir = tmp_path / "copy"
  shutil.copytree(shared_run, workdir)
  (workdir / "spm.model").write_bytes(b"damaged")
  for mode in ("translate", "train"):
    lines = _bad(workdir, multi30k_dir, f"--mode={mode}")
    assert lines[-1] == (f"error: {workdir}/spm.model is not a readable SentencePiece model"
                         " (damaged?); put back the run's spm.model or pass --vocab_path"), lines[-3:]
  shutil.copy(shared_run / "spm.model", workdir / "spm.model")
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / "16") for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  lines = _bad(workdir, multi30k_dir, "--mode=translate", "--checkpoint=16")
  # One error line, the last: no asyncio traceback of the failed restore's reads after it.
  errors = [l[l.index("error: "):] for l in lines if "error: " in l]
  assert len(errors) == 1 and lines[-1] == errors[0], lines[-12:]
  assert not any("Traceback" in l or "Event loop is closed" in l for l in lines), lines[-12:]
  assert errors[0].startswith(f"error: checkpoint 16 in {workdir}/checkpoints cannot be read ("
                              ) and "pass another --checkpoint=<step> (have [4, 8, 12, 16])" in errors[0], lines[-12:]
