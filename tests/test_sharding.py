"""One code path on any mesh: same numbers on 1 device and on 8 (forced host) devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from transformer import checkpoints, decode, sharding
from transformer.config import ConfigError, DecodeConfig, ModelConfig, TrainConfig
from transformer.train import Trainer

# Every sharded dimension divisible by 8: vocab 64, d_model 32, heads 8, d_ff 64.
CFG = ModelConfig(vocab_size=64, d_model=32, d_ff=64, num_heads=8, d_k=4, d_v=4,
                  num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1)
TCFG = TrainConfig(warmup_steps=4, learning_rate_scale=1.0)


def _batches(n=2):
  rng = np.random.RandomState(0)
  out = []
  for _ in range(n):
    src = rng.randint(4, 64, (16, 8)).astype(np.int32)
    tgt = rng.randint(4, 64, (16, 8)).astype(np.int32)
    src[:, -1] = tgt[:, -1] = 1
    src[:3, 5:] = 0  # some padding
    out.append({"inputs": src, "targets": tgt})
  return out


def _run(mesh_spec, devices, steps=2):
  mesh = sharding.make_mesh(mesh_spec, devices)
  tr = Trainer(CFG, TCFG, mesh)
  state = tr.init_state(0)
  losses = []
  for b in _batches(steps):
    state, m = tr.train_step(state, sharding.global_batch(b, mesh))
    losses.append(float(m["loss_sum"] / m["tokens"]))
  return tr, state, losses


def test_parse_mesh():
  assert sharding.parse_mesh("data:-1,fsdp:2,tensor:1", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert sharding.parse_mesh("tensor:8", 8) == {"data": 1, "fsdp": 1, "tensor": 8}
  for bad in ("data:3", "data:-1,fsdp:-1", "model:2", "data:x"):
    with pytest.raises(ConfigError):
      sharding.parse_mesh(bad, 8)


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  _, state, losses = _run("data:1", jax.devices()[:1])
  return jax.tree.map(np.asarray, state.params), losses


@pytest.mark.parametrize("mesh_spec", ["data:8", "fsdp:8", "data:2,fsdp:2,tensor:2", "tensor:8"])
def test_two_steps_match_single_device(reference, mesh_spec):
  ref_params, ref_losses = reference
  tr, state, losses = _run(mesh_spec, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Parameters: Adam divides each element's gradient by its own RMS, so an element whose
  # gradient is ~0 turns a float summation-order difference into up to ~1e-4 of the step
  # size (lr ~0.02 here): atol 1e-5 (one element of 1024 moved 2.9e-6 with the dropout
  # masks of commit 72fa1e3; the losses, which depend on every mask, agree to 1e-5).
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), a, rtol=2e-4, atol=1e-5)


def test_partition_specs_follow_the_rules():
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2", jax.devices())
  tr = Trainer(CFG, TCFG, mesh)
  state = tr.init_state(0)
  p = state.params
  spec = lambda x: x.sharding.spec
  assert spec(p["shared_embedding"]["embedding"]) == P("tensor", "fsdp")      # (vocab, embed)
  attn = p["encoder"]["layer_0"]["self_attention"]
  for name in ("query", "key", "value"):
    assert spec(attn[name]) == P("fsdp", "tensor", None)                        # (embed, heads, kv)
  assert spec(attn["out"]) == P("tensor", None, "fsdp")                         # (heads, kv, embed)
  ffn = p["decoder"]["layer_1"]["ffn"]
  assert spec(ffn["wi"]["kernel"]) == P("fsdp", "tensor")                       # (embed, mlp)
  assert spec(ffn["wi"]["bias"]) == P("tensor")
  assert spec(ffn["wo"]["kernel"]) == P("tensor", "fsdp")                       # (mlp, embed)
  assert spec(p["encoder"]["layer_0"]["attention_block"]["norm"]["scale"]) == P("fsdp")
  # Adam moments are sharded like their parameters (ZeRO-3), the step is replicated.
  mu = state.opt_state[0].mu
  assert spec(mu["shared_embedding"]["embedding"]) == P("tensor", "fsdp")
  assert spec(state.step) == P()
  # Each device holds 1/4 of the embedding (vocab/2 x embed/2).
  shard = p["shared_embedding"]["embedding"].addressable_shards[0].data
  assert shard.shape == (32, 16)


def test_checkpoint_moves_between_meshes(tmp_path):
  tr_a, state_a, _ = _run("data:2,fsdp:2,tensor:2", jax.devices(), steps=1)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), keep=2)
  ckpt.save(1, state_a, {}, {})
  ckpt.close()
  next_batch = _batches(2)[1]
  ref_state, ref_m = tr_a.train_step(state_a, sharding.global_batch(next_batch, tr_a.mesh))
  for spec, devices in (("tensor:8", jax.devices()), ("data:1", jax.devices()[:1])):
    mesh = sharding.make_mesh(spec, devices)
    tr = Trainer(CFG, TCFG, mesh)
    ck = checkpoints.Checkpointer(str(tmp_path / "c"), keep=2)
    state, _, _ = ck.restore(1, tr.abstract_state)
    ck.close()
    assert state.params["shared_embedding"]["embedding"].sharding.mesh.shape == mesh.shape
    state, m = tr.train_step(state, sharding.global_batch(next_batch, mesh))
    assert abs(float(m["loss_sum"]) - float(ref_m["loss_sum"])) < 1e-4
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_beam_search_sharded_equals_single_device():
  _, state, _ = _run("data:1", jax.devices()[:1], steps=2)
  params = jax.tree.map(np.asarray, state.params)
  inputs = _batches(1)[0]["inputs"][:8]
  dcfg = DecodeConfig(beam_size=3, alpha=0.6, max_decode_len_offset=4)
  outs = []
  for spec, devices in (("data:1", jax.devices()[:1]), ("data:2,fsdp:2,tensor:2", jax.devices()),
                        ("data:8", jax.devices())):
    mesh = sharding.make_mesh(spec, devices)
    tr = Trainer(CFG, TCFG, mesh)
    sharded = jax.device_put(params, tr.state_shardings.params)
    searcher = decode.BeamSearcher(CFG, dcfg, mesh, tr.state_shardings.params)
    seqs, scores = searcher(sharded, sharding.global_batch({"inputs": inputs}, mesh)["inputs"])
    outs.append((np.asarray(seqs), np.asarray(scores)))
  for seqs, scores in outs[1:]:
    np.testing.assert_array_equal(seqs, outs[0][0])
    np.testing.assert_allclose(scores, outs[0][1], atol=1e-4)


def test_scan_over_layers_shards_the_stacked_parameters_and_matches_one_device():
  """--scan_layers: stacked parameters [N, ...] keep their per-layer sharding (the 'layers'
  axis is replicated) and 2 steps on data2 x fsdp2 x tensor2 equal 2 steps on one device."""
  import dataclasses
  cfg = dataclasses.replace(CFG, scan_layers=True)
  def run(mesh):
    tr = Trainer(cfg, TCFG, mesh)
    state = tr.init_state(0)
    losses = []
    for b in _batches(2):
      state, m = tr.train_step(state, sharding.global_batch(b, mesh))
      losses.append(float(m["loss_sum"] / m["tokens"]))
    return state, losses
  one_state, one_losses = run(sharding.make_mesh("data:1", jax.devices()[:1]))
  state, losses = run(sharding.make_mesh("data:2,fsdp:2,tensor:2", jax.devices()))
  attn = state.params["encoder"]["layers"]["self_attention"]
  assert attn["query"].shape == (2, 32, 8, 4)
  assert attn["query"].sharding.spec == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, kv)
  assert state.params["decoder"]["layers"]["ffn"]["wo"]["kernel"].sharding.spec == P(
      None, "tensor", "fsdp")
  assert state.opt_state[0].mu["encoder"]["layers"]["self_attention"]["query"].sharding.spec == (
      P(None, "fsdp", "tensor", None))
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_dropout_mask_is_the_same_on_any_mesh_and_drawn_per_shard():
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from transformer.ops import dropout  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh("data:8", jax.devices()[:8])
  sh = NamedSharding(mesh, P("data"))
  key = jax.random.PRNGKey(0)
  fn = jax.jit(lambda x, k: dropout(x, 0.1, k), in_shardings=(sh, None), out_shardings=sh)
  x = jax.device_put(jnp.ones((64, 6, 20)), sh)
  np.testing.assert_array_equal(np.asarray(fn(x, key)),
                                np.asarray(dropout(jnp.ones((64, 6, 20)), 0.1, key)))
  # Each device computes the counters of its own 64 / 8 = 8 rows only.
  hlo = fn.lower(x, key).compile().as_text()
  assert "u32[8]{0} iota()" in hlo and "u32[64]{0} iota()" not in hlo
