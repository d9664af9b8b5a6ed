"""Benchmark checks: fixed-length decoding, one compilation, and compare's arithmetic.

No torch needed: the peer (benchmarks/peer.py) runs in its own venv; here only its error
without torch and the driver's logic on hand-made JSON are checked.
"""

import dataclasses
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import compare, decode, search_overhead, shapes
from transformer import sharding
from transformer.config import EOS_ID, PAD_ID, ModelConfig
from transformer.model import Transformer

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=24, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                  num_decoder_layers=2, max_len=32)


def _one_device_mesh():
  return sharding.make_mesh("data:-1", jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny_model():
  """(mesh, params, shardings) of CFG, initialised once for this module."""
  mesh = _one_device_mesh()
  return (mesh,) + decode.init_params(CFG, mesh)


# ----------------------------------------------------------------------------
# benchmarks.decode: fixed work
# ----------------------------------------------------------------------------

def test_check_fixed_length():
  good = np.array([[5, 0, 7, 1, 0], [9, 9, 9, 1, 0]])  # PAD as a word is allowed
  assert shapes.check_fixed_length(good, 4) is None
  assert "1 of 2" in shapes.check_fixed_length(np.array([[5, 1, 0, 0], [5, 6, 7, 1]]), 4)
  assert shapes.check_fixed_length(np.array([[5, 6, 7, 8]]), 4) is not None   # no EOS
  assert shapes.check_fixed_length(np.array([[5, 6, 7, 1, 4]]), 4) is not None  # too long
  assert shapes.check_fixed_length(np.array([[5, 1]]), 4) is not None          # too short


@pytest.mark.parametrize("pre_ln", [False, True])
def test_eos_logit_is_exactly_set(pre_ln, tiny_model):
  cfg = dataclasses.replace(CFG, pre_layer_norm=pre_ln)
  params = (decode.init_params(cfg, _one_device_mesh())[0] if pre_ln else tiny_model[1])
  params2 = decode.forbid_eos(params, cfg)
  src = jnp.asarray(shapes.random_sentences(cfg.vocab_size, 3, 7, np.random.RandomState(1)))
  tgt = jnp.asarray(shapes.random_sentences(cfg.vocab_size, 3, 5, np.random.RandomState(2)))
  logits = np.asarray(jax.jit(Transformer(cfg).apply)({"params": params2}, src, tgt))
  np.testing.assert_allclose(logits[..., EOS_ID], decode.EOS_LOGIT, rtol=0, atol=1e-3)
  others = np.delete(logits, EOS_ID, axis=-1)
  assert np.all(np.isfinite(others)) and np.abs(others).max() < 50
  # The caller's parameters are untouched.
  emb = params["shared_embedding"]["embedding"]
  assert float(jnp.abs(emb[EOS_ID]).sum()) > 0 and float(jnp.abs(emb[:, 0]).sum()) > 0


def test_forbid_eos_makes_every_sentence_out_len_tokens(tiny_model):
  mesh, params, shardings = tiny_model
  src_len, out_len, batch = 5, 9, 3
  searcher = decode.make_searcher(CFG, mesh, shardings, beam=4, alpha=0.6, src_len=src_len,
                                  out_len=out_len)
  src = jnp.asarray(shapes.decode_batches(CFG.vocab_size, 1, batch, src_len)[0])
  # Control: a model that prefers EOS ends every sentence at once, so the check can fail.
  eager = jax.device_put(decode.set_eos_logit(params, CFG, 1000.0), shardings)
  seqs, _ = searcher(eager, src)
  assert np.all(np.asarray(seqs)[:, 0] == EOS_ID)
  assert shapes.check_fixed_length(np.asarray(seqs), out_len) is not None
  # The same model with EOS forbidden: out_len - 1 words, then EOS, for every sentence.
  seqs, scores = searcher(jax.device_put(decode.forbid_eos(eager, CFG), shardings), src)
  seqs = np.asarray(seqs)
  assert seqs.shape == (batch, out_len)
  assert shapes.check_fixed_length(seqs, out_len) is None
  assert np.all(seqs[:, -1] == EOS_ID) and not np.any(seqs[:, :-1] == EOS_ID)
  assert np.all(np.isfinite(np.asarray(scores)))
  assert decode.jit_cache_size(searcher) == 1  # same shapes: one compilation for both models


def test_decode_run_compiles_once_and_counts_right():
  r = decode.run("tiny", src_len=8, out_len=5, warmup=1, reps=3, devices=jax.devices()[:1])
  assert r["compilations"] == 1
  assert r["backend_compiles_during_timed"] == 0
  assert r["outputs_checked"] == 4 and len(r["batch_times_s"]) == 3
  assert (r["batch"], r["src_len"], r["out_len"], r["beam"]) == (2, 8, 5, 4)
  assert r["sentences_per_s"] == pytest.approx(2 / r["median_batch_s"])
  assert r["output_tokens_per_s"] == pytest.approx(2 * 5 / r["median_batch_s"])
  assert r["median_batch_s"] == pytest.approx(float(np.median(r["batch_times_s"])), rel=1e-3,
                                              abs=1e-4)


def test_shapes_match_the_former_train_throughput_configs():
  def cfg(name):
    return ModelConfig(**shapes.model_config_kwargs(shapes.SHAPES[name]))
  assert cfg("small") == ModelConfig(vocab_size=8000, num_encoder_layers=3, num_decoder_layers=3,
                                     d_model=256, d_ff=1024, num_heads=4)
  assert cfg("base") == ModelConfig(vocab_size=37000)
  assert cfg("big") == ModelConfig(vocab_size=37000, d_model=1024, d_ff=4096, num_heads=16,
                                   dropout_rate=0.3)
  s = shapes.SHAPES["small"]
  assert (s.train_batch, s.train_length, s.decode_batch, s.src_len, s.out_len) == (64, 24, 64,
                                                                                     24, 24)
  src, tgt = shapes.train_batch(100, 3, 6)
  assert np.all(src[:, -1] == EOS_ID) and np.all(tgt[:, -1] == EOS_ID)
  assert np.all(src != PAD_ID) and np.all(tgt != PAD_ID)


# ----------------------------------------------------------------------------
# benchmarks.compare
# ----------------------------------------------------------------------------

def _train_result(step_s, batch=64, length=24, **kw):
  return {"batch": batch, "length": length, "median_step_s": step_s, **kw}


def test_compare_train_ratios_by_hand():
  work = {"batch": 64, "length": 24}
  runs = {"ours": [_train_result(t) for t in (0.5, 0.4, 0.6)],
          "peer": [_train_result(t) for t in (1.0, 2.0, 1.5)]}
  out = compare.summarize("train", work, runs)
  ours, peer = out["variants"]["ours"], out["variants"]["peer"]
  assert ours["median_step_s"] == 0.5 and peer["median_step_s"] == 1.5
  assert ours["target_tokens_per_s"] == pytest.approx(64 * 24 / 0.5)
  assert peer["target_tokens_per_s"] == pytest.approx(64 * 24 / 1.5)
  assert out["ratios"] == {"ours/peer": pytest.approx(3.0)}
  assert out["per_round_ratios"]["ours/peer"] == pytest.approx([2.0, 5.0, 2.5])


def test_compare_decode_ratios_and_bf16_pair():
  work = {"batch": 16, "src_len": 24, "out_len": 24, "beam": 4}
  def res(t):
    return {**work, "median_batch_s": t}
  runs = {"ours": [res(2.0)], "peer": [res(8.0)], "ours_bf16": [res(1.0)],
          "peer_bf16": [res(5.0)]}
  out = compare.summarize("decode", work, runs)
  assert out["variants"]["ours"]["sentences_per_s"] == pytest.approx(8.0)
  assert out["ratios"] == {"ours/peer": pytest.approx(4.0),
                           "ours_bf16/peer_bf16": pytest.approx(5.0)}


def test_compare_rejects_a_different_workload():
  runs = {"ours": [_train_result(0.5)], "peer": [_train_result(0.5, length=32)]}
  with pytest.raises(compare.CompareError, match="peer measured"):
    compare.summarize("train", {"batch": 64, "length": 24}, runs)


def test_compare_gives_both_sides_the_same_shapes_and_alternates():
  vs = compare.variants("train", peer_compile=True, bf16=True)
  assert [v.name for v in vs] == ["ours", "peer", "peer_compile", "ours_bf16", "peer_bf16"]
  work = compare.workload("train", "small")
  assert work == {"batch": 64, "length": 24}
  seen = []

  def fake_runner(cmd):
    seen.append(cmd)
    shape_args = [a for a in cmd if a.startswith(("--batch=", "--length="))]
    assert shape_args == ["--batch=64", "--length=24"]
    t = 1.0 if "benchmarks.peer" in cmd else 0.5
    return _train_result(t, **{"dtype": "x"})

  out = compare.compare("train", "small", work, vs, rounds=2, warmup=3, steps=10, reps=5,
                        peer_python="/p/python", runner=fake_runner)
  names = {cmd: name for name, cmd in out["commands"].items()}
  order = ["ours", "peer", "peer_compile", "ours_bf16", "peer_bf16"]
  assert [names[shlex.join(c)] for c in seen] == order + order[::-1]  # round 2 reversed
  assert seen[0][0] == sys.executable and "--nomeasure_peak" in seen[0]
  assert "--compile" in out["commands"]["peer_compile"]
  assert "--dtype=bfloat16" in out["commands"]["ours_bf16"]
  assert "--bf16" in out["commands"]["peer_bf16"]
  assert out["ratios"]["ours/peer"] == pytest.approx(2.0)
  assert out["ratios"]["ours/peer_compile"] == pytest.approx(2.0)
  with pytest.raises(compare.CompareError, match="only supported"):
    compare.variants("decode", peer_compile=True, bf16=False)


def test_compare_reports_a_failed_run_and_a_missing_peer_venv():
  with pytest.raises(compare.CompareError, match="exit 3.*error: boom"):
    compare.run_json([sys.executable, "-c", "import sys; print('error: boom', file=sys.stderr);"
                      " sys.exit(3)"])
  r = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--config=tiny",
                      "--peer_python=/nonexistent/bin/python"], cwd=REPO, capture_output=True,
                     text=True, check=False)
  assert r.returncode == 2
  assert r.stderr.strip() == ("error: no peer python at /nonexistent/bin/python; create the"
                              " peer venv with: bash benchmarks/peer_setup.sh"
                              " (or pass --peer_python=...)")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_peer_without_torch_says_how_to_get_it():
  r = subprocess.run([sys.executable, "-m", "benchmarks.peer", "--config=tiny"], cwd=REPO,
                     capture_output=True, text=True, check=False)
  assert r.returncode != 0
  assert r.stderr.startswith("error: benchmarks.peer needs torch and transformers")
  assert "bash benchmarks/peer_setup.sh" in r.stderr


def test_peer_setup_files():
  assert subprocess.run(["bash", "-n", str(REPO / "benchmarks/peer_setup.sh")]).returncode == 0
  pins = [l for l in (REPO / "benchmarks/peer_requirements.txt").read_text().splitlines()
          if l and not l.startswith("#")]
  assert pins and all("==" in l for l in pins)
  assert any(l.startswith("transformers==") for l in pins)


def test_dropout_benchmark_prints_json():
  import json  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, "-m", "benchmarks.dropout", "--masks=2", "--shape=4,8,6",
                      "--rounds=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  ms = out["median_ms"]
  assert set(ms) == {"bernoulli", "ours", "none"} and all(v > 0 for v in ms.values())
  assert out["mask_cost_ms"]["ours"] == pytest.approx(ms["ours"] - ms["none"])


def test_checkouts_alternates_and_takes_ratios_of_medians():
  from benchmarks import checkouts  # pylint: disable=g-import-not-at-top
  seen = []
  times = {"old": iter([1.0, 3.0, 2.0]), "new": iter([2.0, 2.0, 5.0])}

  def runner(path):
    seen.append(path)
    return next(times[path])

  out = checkouts.measure("old", "new", rounds=3, runner=runner)
  assert seen == ["old", "new", "new", "old", "old", "new"]
  assert out["a"]["median_s"] == 2.0 and out["b"]["median_s"] == 2.0
  assert out["ratio_b_over_a"] == 1.0
  assert out["ratio_per_round"] == pytest.approx([2.0, 2 / 3, 2.5])


def test_checkouts_rejects_a_directory_that_is_no_checkout(tmp_path):
  r = subprocess.run([sys.executable, "-m", "benchmarks.checkouts", f"--a={REPO}",
                      f"--b={tmp_path}"], cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 1
  assert r.stderr.strip() == f"error: --b={str(tmp_path)!r} is not a checkout of this repository"


def test_search_overhead_counts_the_runs_and_their_overlap(tmp_path):
  """Two trials of 0.5 s on two workers: both ran, at once; the runs' seconds (0.5 each, on
  the cores they were pinned to) are not counted as the search's overhead."""
  r = search_overhead.measure(trials=2, workers=2, run_seconds=0.5, tmp=str(tmp_path))
  assert r["trials"] == 2 and r["wall_s"] > 0.5
  # (workers x wall - the runs' seconds) / trials: positive, and below the wall time (the
  # runs' own seconds, ~0.5 each, are measured inside them and rounded: no tighter bound).
  assert 0 < r["overhead_s_per_trial"] < r["wall_s"]
  # Whether the two runs overlapped depends on the machine's load: only bounds here (the
  # benchmark reports the measured overlap).
  assert 0 <= r["both_running_fraction"] <= 1
  occupied = r["core_occupied_fraction"].values()
  assert all(0 <= f <= 1 for f in occupied)
  assert sum(occupied) >= 2 * 0.5 / r["wall_s"] * 0.99 - 0.002  # both runs' 0.5 s at least
