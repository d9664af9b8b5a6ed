"""Section 5 checks: label smoothing, the learning-rate schedule, Adam, learning on real pairs."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from transformer import sharding, train
from transformer.config import EOS_ID, PAD_ID, ModelConfig, TrainConfig


def test_label_smoothed_loss_by_hand():
  # One sentence of 2 tokens + 1 pad over a vocabulary of 4.
  logits = np.array([[[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
  targets = np.array([[1, 2, PAD_ID]])
  eps, V = 0.1, 4
  total = 0.0
  for t in range(2):
    z = logits[0, t]
    logp = z - math.log(sum(math.exp(v) for v in z))
    q = [eps / (V - 1)] * V
    q[targets[0, t]] = 1 - eps
    total += -sum(qi * lp for qi, lp in zip(q, logp))
  want = total / 2  # averaged over the 2 non-pad tokens
  got, metrics = train.loss_and_metrics(jnp.asarray(logits), jnp.asarray(targets), eps)
  assert abs(float(got) - want) < 1e-5
  assert float(metrics["tokens"]) == 2.0
  nll = -(logits[0, 0, 1] - math.log(np.exp(logits[0, 0]).sum())) \
        - (logits[0, 1, 2] - math.log(np.exp(logits[0, 1]).sum()))
  assert abs(float(metrics["nll_sum"]) - nll) < 1e-5
  # eps = 0 is plain cross entropy.
  got0, _ = train.loss_and_metrics(jnp.asarray(logits), jnp.asarray(targets), 0.0)
  assert abs(float(got0) - nll / 2) < 1e-5


def test_learning_rate_at_paper_steps():
  d, warmup = 512, 4000
  for step, want in [(1, d ** -0.5 * 1 * warmup ** -1.5),
                     (4000, d ** -0.5 * 4000 ** -0.5),
                     (16000, d ** -0.5 * 16000 ** -0.5)]:
    assert math.isclose(float(train.learning_rate(step, d, warmup)), want, rel_tol=1e-6)
  sched = train.make_schedule(ModelConfig(d_model=512), TrainConfig(warmup_steps=4000))
  # optax counts updates from 0: update k uses the rate of paper step k + 1.
  assert math.isclose(float(sched(0)), d ** -0.5 * warmup ** -1.5, rel_tol=1e-6)
  assert math.isclose(float(sched(3999)), d ** -0.5 * 4000 ** -0.5, rel_tol=1e-6)


def test_first_adam_update_has_the_scheduled_size():
  # Bias-corrected Adam's first update is -lr * g / (|g| + eps) ~ -lr * sign(g).
  mcfg, tcfg = ModelConfig(d_model=512), TrainConfig(warmup_steps=4000)
  opt = train.make_optimizer(mcfg, tcfg)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, -0.25, 2.0])}
  updates, _ = opt.update(grads, opt.init(params), params)
  lr1 = 512 ** -0.5 * 4000 ** -1.5
  np.testing.assert_allclose(np.asarray(updates["w"]), -lr1 * np.sign([0.5, -0.25, 2.0]), rtol=1e-5)
  assert (tcfg.adam_b1, tcfg.adam_b2, tcfg.adam_eps) == (0.9, 0.98, 1e-9)


def test_gradient_accumulation_equals_one_big_batch():
  cfg = ModelConfig(vocab_size=40, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1, dropout_rate=0.0)
  mesh = sharding.make_mesh("data:1", jax.devices()[:1])
  rng = np.random.RandomState(0)
  src = rng.randint(4, 40, (4, 6)).astype(np.int32)
  tgt = rng.randint(4, 40, (4, 6)).astype(np.int32)
  big = train.Trainer(cfg, TrainConfig(warmup_steps=10), mesh)
  acc = train.Trainer(cfg, TrainConfig(warmup_steps=10, grad_accum_steps=2), mesh)
  s_big, s_acc = big.init_state(0), acc.init_state(0)
  # Micro-batches with 3 and 12 target tokens (padding): the update must weight them 3:12,
  # like the mean over the 15 tokens of the big batch, not 1:1.
  tgt[0, 2:] = 0
  tgt[1, 1:] = 0
  s_big, _ = big.train_step(s_big, {"inputs": src, "targets": tgt})
  params0 = acc.init_state(0).params
  for i, half in enumerate((slice(0, 2), slice(2, 4))):
    s_acc, _ = acc.train_step(s_acc, {"inputs": src[half], "targets": tgt[half]})
    if i == 0:  # no update after the first micro-batch
      for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(s_acc.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = 0.0
  for a, b, p0 in zip(jax.tree.leaves(s_big.params), jax.tree.leaves(s_acc.params),
                      jax.tree.leaves(params0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
  assert moved > 1e-4  # the update happened (Adam's first step moves weights by ~lr)


def test_token_weighted_accumulation_by_hand():
  # Inner SGD with rate 1: the update is minus the accumulated gradient.
  opt = train.token_weighted_accumulation(optax.sgd(1.0), every_k=3)
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  grads = [jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]), jnp.array([4.0, 4.0])]
  tokens = [1.0, 3.0, 4.0]
  for i, (g, n) in enumerate(zip(grads, tokens)):
    updates, state = opt.update({"w": g}, state, params, tokens=jnp.float32(n))
    if i < 2:
      np.testing.assert_array_equal(np.asarray(updates["w"]), [0.0, 0.0])
  # (1 * [1, 0] + 3 * [0, 2] + 4 * [4, 4]) / 8 = [17/8, 22/8]; the mean of means is [5/3, 2].
  np.testing.assert_allclose(np.asarray(updates["w"]), [-17 / 8, -22 / 8], rtol=1e-6)
  # The accumulator is reset: the next 3 calls start from zero.
  for g, n in zip(grads, tokens):
    updates, state = opt.update({"w": 2 * g}, state, params, tokens=jnp.float32(n))
  np.testing.assert_allclose(np.asarray(updates["w"]), [-17 / 4, -22 / 4], rtol=1e-6)


def test_tiny_model_overfits_real_sentence_pairs(tmp_path, multi30k_dir):
  from transformer import decode
  from transformer.data import pipeline, tokenizer as tokenizer_lib
  en = (multi30k_dir / "train.en").read_text(encoding="utf-8").splitlines()[:12]
  de = (multi30k_dir / "train.de").read_text(encoding="utf-8").splitlines()[:12]
  tokenizer_lib.train_sentencepiece(en + de, str(tmp_path / "spm.model"), vocab_size=200)
  tok = tokenizer_lib.Tokenizer.load(str(tmp_path / "spm.model"))
  examples = [{"source": s, "target": t, "id": i} for i, (s, t) in enumerate(zip(en, de))]
  tokenized = pipeline.tokenize_split(examples, tok)
  (batch,) = pipeline.make_eval_batches(tokenized, 12 * 64, [64])
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, d_ff=128, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
  mesh = sharding.make_mesh("data:1", jax.devices()[:1])
  trainer = train.Trainer(cfg, TrainConfig(warmup_steps=50, learning_rate_scale=1.0,
                                           label_smoothing=0.0), mesh)
  state = trainer.init_state(0)
  data = {"inputs": batch["inputs"], "targets": batch["targets"]}
  first = None
  for _ in range(150):
    state, m = trainer.train_step(state, data)
    first = first if first is not None else float(m["nll_sum"] / m["tokens"])
  final = float(m["nll_sum"] / m["tokens"])
  assert first > 4.0 and final < 0.05, (first, final)
  seqs, _ = decode.beam_search(state.params, batch["inputs"], model_cfg=cfg, beam_size=1,
                               alpha=0.6, max_decode_len_offset=10)
  hyps = {int(i): tok.decode(np.asarray(s).tolist()) for i, s in zip(batch["index"], seqs[:, 0])
          if i >= 0}
  exact = sum(hyps[i] == de[i] for i in range(12))
  assert exact >= 11, [(hyps[i], de[i]) for i in range(12) if hyps[i] != de[i]]


class _WordIds:
  """Independent toy tokenizer: one id in [4, 64) per whitespace word."""

  def encode(self, text):
    return [4 + sum(map(ord, w)) % 60 for w in text.split()]


def _real_pairs(multi30k_dir, n):
  en = (multi30k_dir / "val.en").read_text(encoding="utf-8").splitlines()[:n]
  de = (multi30k_dir / "val.de").read_text(encoding="utf-8").splitlines()[:n]
  return [{"source": s, "target": t, "id": i} for i, (s, t) in enumerate(zip(en, de))]


def test_epoch_over_buckets_compiles_once_per_bucket_shape(multi30k_dir):
  """Two epochs of bucketed training batches: one executable per [batch, length] shape."""
  from transformer.data import pipeline
  boundaries = [8, 12, 16, 24, 32]
  tokenized = pipeline.tokenize_split(_real_pairs(multi30k_dir, 300), _WordIds(), 32, 32)
  it = pipeline.make_train_iterator(tokenized, 256, boundaries)
  plan_batches = pipeline.TrainBatchPlan(tokenized, boundaries, 256, 1, 0).batches_per_epoch
  cfg = ModelConfig(vocab_size=64, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1)
  mesh = sharding.make_mesh("data:1", jax.devices()[:1])
  trainer = train.Trainer(cfg, TrainConfig(warmup_steps=10), mesh)
  state = trainer.init_state(0)
  shapes = []
  for _ in range(2 * plan_batches):
    batch = next(it)
    shapes.append(batch["inputs"].shape)
    assert batch["targets"].shape == batch["inputs"].shape
    state, _ = trainer.train_step(
        state, sharding.global_batch({k: batch[k] for k in ("inputs", "targets")}, mesh))
  distinct = set(shapes)
  assert len(shapes) > len(distinct) > 1  # batches repeat shapes, several buckets are used
  assert len(distinct) <= len(boundaries)
  assert trainer._train_step._cache_size() == len(distinct), (  # pylint: disable=protected-access
      trainer._train_step._cache_size(), sorted(distinct))  # pylint: disable=protected-access


class _Unigram(nn.Module):
  """Toy model: the same logits w + 1e-8 t at every target position. The gradient of t is
  1e-8 times that of w, so Adam's sqrt(v_hat) for t is ~1e-9, the size of the paper's eps."""
  vocab: int

  @nn.compact
  def __call__(self, inputs, targets, deterministic=True):
    del inputs, deterministic
    w = self.param("w", nn.initializers.normal(1e-3), (self.vocab,))
    t = self.param("t", nn.initializers.zeros, (self.vocab,))
    return jnp.broadcast_to(w + 1e-8 * t, targets.shape + (self.vocab,))


def test_three_adam_steps_through_the_train_step_by_hand():
  """Section 5.3: Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9 and the paper's rate,
  through `train_step` with the optimizer `Trainer` builds from the default config.

  The oracle is numpy: the smoothed loss's gradient softmax(z) - q averaged over tokens, then
  three bias-corrected Adam updates with the paper's constants written out here. Steps 2 and
  3 see different batches, so their updates depend on beta1 and beta2; the `t` parameter's
  updates depend on eps.
  """
  V, eps_ls = 5, 0.1
  mcfg, tcfg = ModelConfig(d_model=512), TrainConfig()
  model = _Unigram(V)
  params = model.init(jax.random.PRNGKey(0), None, jnp.zeros((1, 1), jnp.int32))["params"]
  optimizer = train.make_optimizer(mcfg, tcfg)
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=params,
                           opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
  batches = [np.array([[1, 2, 2, PAD_ID]]), np.array([[4, 4, 4, 3]]), np.array([[3, PAD_ID, PAD_ID, PAD_ID]])]
  w = np.asarray(params["w"], np.float64)
  t = np.zeros(V)
  m = {"w": np.zeros(V), "t": np.zeros(V)}
  v = {"w": np.zeros(V), "t": np.zeros(V)}
  b1, b2, eps = 0.9, 0.98, 1e-9  # the paper's values
  step_fn = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                      label_smoothing=eps_ls))
  for k, targets in enumerate(batches, start=1):
    state, _ = step_fn(state, {"inputs": jnp.asarray(targets), "targets": jnp.asarray(targets)})
    z = w + 1e-8 * t
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    real = [y for y in targets[0] if y != PAD_ID]
    g_w = np.zeros(V)
    for y in real:
      q = np.full(V, eps_ls / (V - 1))
      q[y] = 1 - eps_ls
      g_w += (p - q) / len(real)
    grads = {"w": g_w, "t": 1e-8 * g_w}
    lr = 512 ** -0.5 * min(k ** -0.5, k * 4000 ** -1.5)
    new = {}
    for name, value in (("w", w), ("t", t)):
      m[name] = b1 * m[name] + (1 - b1) * grads[name]
      v[name] = b2 * v[name] + (1 - b2) * grads[name] ** 2
      m_hat, v_hat = m[name] / (1 - b1 ** k), v[name] / (1 - b2 ** k)
      new[name] = value - lr * m_hat / (np.sqrt(v_hat) + eps)
    # Compare the updates (parameter changes), not the parameters: they are ~1e-7, and
    # float32 parameters of ~1e-3 resolve them to ~1e-10.
    want = new["w"] - w
    np.testing.assert_allclose(np.asarray(state.params["w"], np.float64) - w, want, rtol=1e-3,
                               atol=1e-3 * np.abs(want).max(), err_msg=f"w after step {k}")
    want = new["t"] - t
    np.testing.assert_allclose(np.asarray(state.params["t"], np.float64) - t, want, rtol=1e-3,
                               atol=1e-3 * np.abs(want).max(), err_msg=f"t after step {k}")
    w, t = np.asarray(state.params["w"], np.float64), np.asarray(state.params["t"], np.float64)


def test_skipped_nonfinite_step_and_the_tensors_it_names():
  """A step on NaN parameters with skip_nonfinite: finite is False, parameters and optimizer
  state are unchanged, and every gradient tensor's squared norm is NaN. A finite step's
  squared norms are the hand gradients' (see the test above), their sum the squared norm."""
  V, eps_ls = 5, 0.1
  model, mcfg, tcfg = _Unigram(V), ModelConfig(d_model=512), TrainConfig()
  params = model.init(jax.random.PRNGKey(0), None, jnp.zeros((1, 1), jnp.int32))["params"]
  optimizer = train.make_optimizer(mcfg, tcfg)
  step_fn = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                      label_smoothing=eps_ls, skip_nonfinite=True))
  targets = jnp.asarray([[1, 2, 2, PAD_ID]])
  batch = {"inputs": targets, "targets": targets}

  state = train.TrainState(step=jnp.array(0, jnp.int32), params=params,
                           opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))
  _, m = step_fn(state, batch)
  w = np.asarray(params["w"], np.float64)
  p = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
  g_w = np.zeros(V)
  for y in (1, 2, 2):
    q = np.full(V, eps_ls / (V - 1))
    q[y] = 1 - eps_ls
    g_w += (p - q) / 3
  want = [np.sum((1e-8 * g_w) ** 2), np.sum(g_w ** 2)]  # leaves in key order: t, w
  np.testing.assert_allclose(np.asarray(m["grad_sq_norms"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(m["grad_norm"]) ** 2, sum(want), rtol=1e-4)
  assert bool(m["finite"])

  nan_params = {"t": params["t"], "w": params["w"] * jnp.nan}
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=nan_params,
                           opt_state=optimizer.init(nan_params), rng=jax.random.PRNGKey(1))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  new, m = step_fn(state, batch)
  assert not bool(m["finite"]) and int(new.step) == 1
  assert np.isnan(np.asarray(m["grad_sq_norms"])).all()
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(a, np.asarray(b))  # NaNs compare equal here


def test_trainer_names_the_nonfinite_gradient_tensors():
  cfg = ModelConfig(vocab_size=40, d_model=16, d_ff=32, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1)
  trainer = train.Trainer(cfg, TrainConfig(), sharding.make_mesh("data:1", jax.devices()[:1]))
  n = len(jax.tree.leaves(trainer.abstract_state.params))
  sq = np.ones(n, np.float32)
  assert trainer.nonfinite_tensors({"grad_sq_norms": sq}) == []
  sq[0], sq[-1] = np.nan, np.inf  # leaves sort by path: decoder/... first, the embedding last
  assert trainer.nonfinite_tensors({"grad_sq_norms": sq}) == [
      "decoder/layer_0/cross_attention/key", "shared_embedding/embedding"]
