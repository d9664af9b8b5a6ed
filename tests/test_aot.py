"""Ahead-of-time compilation for TPU slices and GPU nodes (needs the [tpu] and [gpu] extras)."""

import os
import subprocess
import sys

import pytest

from benchmarks.train_throughput import train_flops as benchmark_train_flops
from transformer import aot, config as config_lib
from transformer.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not (aot.installed("libtpu") and any(aot.installed(m) for m in aot.CUDA_PLUGINS)):
  raise RuntimeError("tests/test_aot.py needs the compilers for TPU and GPU:"
                     " pip install -c constraints.txt -e '.[test,tpu,gpu]'")

# A tiny model; one 64-token bucket, 512 tokens (8 rows) per device on 8 devices.
TINY = ["--vocab_size=512", "--num_encoder_layers=2", "--num_decoder_layers=2", "--d_model=64",
        "--d_ff=128", "--num_heads=4", "--bucket_boundaries=64", "--max_source_length=64",
        "--max_target_length=64", "--tokens_per_batch=4096", "--eval_tokens_per_batch=4096",
        "--decode_tokens_per_batch=2048", "--max_decode_len_offset=8"]


def _cfg(*extra):
  return config_lib.from_args(TINY + list(extra))


# Wide enough that matmuls dominate the FLOPs (the benchmark formula counts only matmuls
# and attention); one layer per stack, unscanned, so that XLA counts every layer.
WIDE = ["--vocab_size=2048", "--num_encoder_layers=1", "--num_decoder_layers=1",
        "--d_model=256", "--d_ff=1024", "--num_heads=4", "--bucket_boundaries=64",
        "--max_source_length=64", "--max_target_length=64", "--tokens_per_batch=8192"]


@pytest.fixture(scope="module")
def gpu_data_parallel():
  return aot.compile_programs(_cfg("--scan_layers"), "a100-40gb-x8",
                              programs=("train", "eval", "decode"))


@pytest.fixture(scope="module")
def tpu_wide():
  cfg = config_lib.from_args(WIDE)
  return cfg, aot.compile_programs(cfg, "v5e-8", programs=("train",))


def _tiny_params(d=64, f=128, v=512, n=2):
  """Parameters of the TINY model, counted by hand from the paper's architecture."""
  attention = 4 * d * d            # W^Q, W^K, W^V, W^O, no biases (h * d_k = d)
  layer_norm = 2 * d               # scale and bias; post-LN: no final norm
  ffn = d * f + f + f * d + d      # two dense layers with biases
  encoder = n * (attention + ffn + 2 * layer_norm)
  decoder = n * (2 * attention + ffn + 3 * layer_norm)
  return v * d + encoder + decoder  # one shared embedding / softmax matrix


BATCH_BYTES = 2 * (64 // 8) * 64 * 4  # inputs and targets, 8 of 64 rows per device, int32


def test_compiles_for_a_gpu_node(gpu_data_parallel):
  gpu = gpu_data_parallel
  assert gpu["devices"] == 8 and gpu["platform"] == "cuda"
  assert gpu["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # data:-1 -> 8
  for name, p in gpu["programs"].items():
    assert p["fits"] and "oom" not in p, name
    assert 0 < p["total_bytes"] < 2 ** 30
  # Rows: 4096 tokens // 64 = 64 (train, eval); decode 2048 // beam 4 = 512 tokens -> 8.
  assert [gpu["programs"][n]["batch"] for n in ("train", "eval", "decode")] == [64, 64, 8]
  # Data parallel on a GPU (no tile padding): the train step's arguments are exactly the
  # replicated state (params, Adam's mu and nu; step, rng, Adam's and the schedule's step
  # counts) and 1/8 of the batch.
  params = _tiny_params()
  assert gpu["param_bytes_per_device"] == 4 * params
  scalars = 4 + 8 + 4 + 4
  train = gpu["programs"]["train"]
  assert train["argument_bytes"] == 3 * 4 * params + scalars + BATCH_BYTES
  assert train["alias_bytes"] == 3 * 4 * params + scalars  # the donated state, in place
  assert gpu["programs"]["eval"]["argument_bytes"] == 4 * params + BATCH_BYTES
  # Eval runs inside training: the optimizer state stays in memory meanwhile.
  assert gpu["programs"]["eval"]["resident_bytes"] == 2 * 4 * params + scalars


def test_compiles_for_two_tpu_slices(tpu_wide):
  _, v5e = tpu_wide
  assert v5e["devices"] == 8 and v5e["programs"]["train"]["fits"]
  v4 = aot.compile_programs(_cfg("--scan_layers"), "v4-8", programs=("eval",))
  # v4-8: 4 chips, each one megacore device; --mesh=data:-1 resolves to 4.
  assert v4["devices"] == 4 and v4["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  p = v4["programs"]["eval"]
  assert p["fits"] and p["batch"] == 64 and p["argument_bytes"] >= 4 * _tiny_params()


def test_fsdp_divides_the_per_device_state(gpu_data_parallel):
  fsdp = aot.compile_programs(_cfg("--scan_layers", "--mesh=data:1,fsdp:8,tensor:1"),
                              "a100-40gb-x8", programs=("eval",))
  dp = gpu_data_parallel
  assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  ratio = fsdp["param_bytes_per_device"] / dp["param_bytes_per_device"]
  assert 1 / 8 <= ratio < 1 / 8 * 1.1  # all but the d_ff biases split 8 ways
  # What XLA allocates for the eval step's parameters (same rows per device either way).
  args = [r["programs"]["eval"]["argument_bytes"] - BATCH_BYTES for r in (fsdp, dp)]
  assert args[1] == 4 * _tiny_params()
  assert 1 / 8 <= args[0] / args[1] < 1 / 8 * 1.1


def test_tpu_train_flops_match_the_benchmark_formula(tpu_wide):
  cfg, report = tpu_wide
  p = report["programs"]["train"]
  assert (p["batch"], p["length"]) == (128, 64)
  expected = benchmark_train_flops(cfg.model, 128, 64, 64) / 8  # per device
  assert p["xla_flops"] == pytest.approx(expected, rel=0.10)
  est = aot.estimate(report, cfg, mfu=0.5)["estimate"]
  assert est["step_seconds"] == pytest.approx(p["model_flops"] / (0.5 * 197e12))


def test_oversized_config_fails_naming_what_to_change(capsys):
  # A 2M x 1024 embedding: params + Adam state ~24 GiB per device, v5e has 16 GiB.
  cfg = _cfg("--scan_layers", "--vocab_size=2000000", "--d_model=1024")
  with pytest.raises(ConfigError) as e:
    aot.run(cfg, "v5e-8", programs=("train",))
  message = str(e.value)
  assert "\n" not in message and message.startswith("train program does not fit v5e-8")
  for hint in ("fsdp:-1", "--remat", "--tokens_per_batch=2048 --grad_accum_steps=2"):
    assert hint in message
  assert "DOES NOT FIT (compiler: RESOURCE_EXHAUSTED" in capsys.readouterr().out


def test_missing_compiler_names_the_extra(monkeypatch):
  monkeypatch.setattr(aot, "installed", lambda module: False)
  with pytest.raises(ConfigError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
    aot.compile_devices(aot.accelerator("v5e-8"))
  with pytest.raises(ConfigError, match=r"needs the CUDA plugin: pip install -e '\.\[gpu\]'"):
    aot.compile_devices(aot.accelerator("h100-x8"))
  with pytest.raises(ConfigError, match="unknown"):
    aot.accelerator("v3-8")
  with pytest.raises(ConfigError, match="num_slices"):
    aot.compile_devices(aot.accelerator("v5e-8"), num_slices=2)


def test_largest_bucket_shapes():
  cfg = _paper_cfg("base_en_de")
  shapes = aot.program_shapes(cfg, batch_multiple=8)
  # 25000 // 256 = 97 -> 96 rows (multiple of 8); eval 25000 tokens; decode 4096 // 4.
  assert shapes == {"train": (96, 256), "eval": (96, 256), "decode": (8, 256)}


def _paper_cfg(name):
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    return config_lib.from_args([f"--flagfile=experiments/paper/{name}.flags"])
  finally:
    os.chdir(cwd)


def test_cli_unknown_topology_is_one_error_line():
  r = subprocess.run([sys.executable, "-m", "transformer.main", "--mode=compile",
                      "--topology=v9-8", *TINY], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 2
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: --topology='v9-8' is unknown; one of " + ", ".join(aot.ACCELERATORS)]
