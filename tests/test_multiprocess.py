"""Multi-process training on localhost: 2 processes x 4 CPU devices == 1 process x 8 devices.

The test starts three interpreters running this file as a worker (see `_worker` below): two
that join through jax.distributed (coordinator 127.0.0.1:<free port>, via
`transformer.sharding.maybe_initialize_distributed`, exactly as `--coordinator_address`,
`--num_processes` and `--process_id` do), each with 4 host devices and half of the rows of a
fixed global batch, and one reference process with all 8 devices and all the rows. All build
`transformer.train.Trainer` on the same mesh data:2,fsdp:2,tensor:2 (so the batch, the
FSDP-sharded parameters and the tensor-parallel heads all cross the process boundary), take 2
training steps with dropout on, and print their losses as JSON. Both workers must report the
reference's losses, gradient norms and final parameter norm to fp32 tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests import processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "data:2,fsdp:2,tensor:2"
GLOBAL_ROWS, LENGTH, VOCAB = 16, 12, 64
MARK = "MULTIPROCESS_RESULT "


def _global_batch():
  """A fixed [16, 12] batch of token ids with EOS and padding (same in every process)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformer.config import EOS_ID, PAD_ID  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1234)
  batch = {}
  for key in ("inputs", "targets"):
    x = rng.integers(4, VOCAB, size=(GLOBAL_ROWS, LENGTH), dtype=np.int32)
    lengths = rng.integers(3, LENGTH + 1, size=GLOBAL_ROWS)
    for row, n in enumerate(lengths):
      x[row, n - 1] = EOS_ID
      x[row, n:] = PAD_ID
    batch[key] = x
  return batch


def _worker(process_id: int, num_processes: int, port: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on CPU: gloo (the default of jax 0.10.2; explicit here).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from transformer import sharding, train  # pylint: disable=g-import-not-at-top
  from transformer.config import MeshConfig, ModelConfig, TrainConfig  # pylint: disable=g-import-not-at-top

  mesh_cfg = MeshConfig(mesh=MESH)
  if num_processes > 1:
    mesh_cfg = MeshConfig(mesh=MESH, coordinator_address=f"127.0.0.1:{port}",
                          num_processes=num_processes, process_id=process_id)
  sharding.maybe_initialize_distributed(mesh_cfg)
  assert jax.process_count() == num_processes and jax.device_count() == 8, (
      jax.process_count(), jax.device_count())
  mesh = sharding.make_mesh(mesh_cfg)
  model_cfg = ModelConfig(vocab_size=VOCAB, num_encoder_layers=1, num_decoder_layers=1,
                          d_model=32, d_ff=64, num_heads=4, d_k=8, d_v=8, dropout_rate=0.1,
                          max_len=64)
  trainer = train.Trainer(model_cfg, TrainConfig(warmup_steps=4), mesh)
  state = trainer.init_state(seed=0)
  full = _global_batch()
  # This process's rows: the contiguous block [p*B/P, (p+1)*B/P), as run.py's _local_rows.
  p, n = jax.process_index(), jax.process_count()
  local = {k: v[p * GLOBAL_ROWS // n:(p + 1) * GLOBAL_ROWS // n] for k, v in full.items()}
  batch = sharding.global_batch(local, mesh)
  assert batch["inputs"].shape == (GLOBAL_ROWS, LENGTH), batch["inputs"].shape
  losses, nlls, grad_norms, tokens = [], [], [], []
  for _ in range(2):
    state, m = trainer.train_step(state, batch)
    losses.append(float(m["loss_sum"]) / float(m["tokens"]))
    nlls.append(float(m["nll_sum"]) / float(m["tokens"]))
    grad_norms.append(float(m["grad_norm"]))
    tokens.append(float(m["tokens"]))
  with sharding.mesh_context(mesh):
    param_norm = jax.jit(lambda t: jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(t))),
                         out_shardings=sharding.replicated(mesh))(state.params)
  result = {"process_index": p, "process_count": n, "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "losses": losses, "nlls": nlls,
            "grad_norms": grad_norms, "tokens": tokens, "param_norm": float(param_norm),
            "step": int(state.step)}
  print(MARK + json.dumps(result), flush=True)
  if num_processes > 1:
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------

def _start(process_id: int, num_processes: int, port: int, devices: int, log) -> subprocess.Popen:
  env = processes.environment(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                              PYTHONUNBUFFERED="1")
  return processes.start([sys.executable, os.path.abspath(__file__), str(process_id),
                          str(num_processes), str(port)], log, env)


def _result(proc: subprocess.Popen, output: str) -> dict:
  assert proc.returncode == 0, f"exit {proc.returncode}:\n" + output[-4000:]
  lines = [l for l in output.splitlines() if l.startswith(MARK)]
  assert len(lines) == 1, output[-4000:]
  return json.loads(lines[0][len(MARK):])


def test_two_processes_match_one_process(tmp_path):
  port = processes.free_port()
  t0 = time.time()
  logs = [tmp_path / name for name in ("worker0.log", "worker1.log", "reference.log")]
  procs = [_start(0, 2, port, 4, logs[0]), _start(1, 2, port, 4, logs[1]),
           _start(0, 1, 0, 8, logs[2])]
  processes.wait_all(procs, timeout=240)
  outputs = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
  w0, w1, ref = (_result(p, o) for p, o in zip(procs, outputs))
  seconds = time.time() - t0
  (tmp_path / "results.json").write_text(json.dumps({"workers": [w0, w1], "reference": ref,
                                                     "seconds": seconds}, indent=2))
  print(json.dumps({"worker0": w0["losses"], "worker1": w1["losses"],
                    "reference": ref["losses"], "seconds": round(seconds, 1)}))

  assert (w0["process_index"], w1["process_index"], ref["process_index"]) == (0, 1, 0)
  assert (w0["process_count"], w1["process_count"], ref["process_count"]) == (2, 2, 1)
  assert (w0["local_devices"], w1["local_devices"], ref["local_devices"]) == (4, 4, 8)
  assert w0["devices"] == w1["devices"] == ref["devices"] == 8
  assert w0["step"] == ref["step"] == 2
  # The global batch really was the whole batch in both layouts.
  assert w0["tokens"] == ref["tokens"]
  for w in (w0, w1):
    for key in ("losses", "nlls", "grad_norms"):
      for got, want in zip(w[key], ref[key]):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (key, w[key], ref[key])
    assert abs(w["param_norm"] - ref["param_norm"]) <= 1e-5 * ref["param_norm"]
  # The two steps differ (the update happened), so matching losses are not a constant.
  assert abs(ref["losses"][1] - ref["losses"][0]) > 1e-4, ref["losses"]


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
