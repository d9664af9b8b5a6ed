"""Section 5: loss, optimizer, learning-rate schedule, sharded train/eval steps, the loop.

`train_step(state, batch) -> (state, metrics)` is one pure function; `Trainer`
jit-compiles it with explicit shardings over the mesh and donates the state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from transformer import sharding
from transformer.config import PAD_ID, ModelConfig, TrainConfig
from transformer.model import Transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array         # uint32[2] base key; dropout key of step s = fold_in(rng, s)


def learning_rate(step, d_model: int, warmup_steps: int, scale: float = 1.0):
  """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), step >= 1."""
  step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
  return scale * d_model ** -0.5 * jnp.minimum(step ** -0.5, step * warmup_steps ** -1.5)


def make_schedule(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Callable:
  """optax count c (0-based, one per optimizer update) -> rate of paper step c + 1."""
  return lambda count: learning_rate(count + 1, model_cfg.d_model, train_cfg.warmup_steps,
                                     train_cfg.learning_rate_scale)


def make_optimizer(model_cfg: ModelConfig, train_cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam(beta1, beta2, eps) with the paper's schedule; optional gradient accumulation."""
  opt = optax.adam(make_schedule(model_cfg, train_cfg), b1=train_cfg.adam_b1,
                   b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
  if train_cfg.grad_accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=train_cfg.grad_accum_steps)
  return opt


def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float):
  """Label-smoothed cross entropy per token.

  The smoothed target puts 1 - eps on the reference token y and eps / (V - 1) on each
  other token. With log p_v = z_v - lse(z), only three reductions over the vocabulary
  are needed (lse, z_y, sum_v z_v), so the [batch, length, vocab] log-probabilities are
  never materialised.
  logits: [batch, length, vocab]; targets: [batch, length].
  Returns (loss [batch, length], nll [batch, length]) in float32.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - z_y                                     # -log p_y
  if label_smoothing == 0.0:
    return nll, nll
  off = label_smoothing / (vocab - 1)
  sum_log_p = jnp.sum(logits, axis=-1) - vocab * lse  # sum_v log p_v
  # -(1 - eps) log p_y - off * sum_{v != y} log p_v
  loss = (1.0 - label_smoothing) * nll - off * (sum_log_p + nll)
  return loss, nll


def loss_and_metrics(logits, targets, label_smoothing):
  """Mean smoothed loss over non-pad target tokens, plus sums for logging."""
  weights = (targets != PAD_ID).astype(jnp.float32)
  loss, nll = smoothed_cross_entropy(logits, targets, label_smoothing)
  num_tokens = jnp.sum(weights)
  mean_loss = jnp.sum(loss * weights) / jnp.maximum(num_tokens, 1.0)
  return mean_loss, {"loss_sum": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights),
                     "tokens": num_tokens}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, label_smoothing: float,
               skip_nonfinite: bool = False, debug_nan_step: int = 0):
  """One optimizer update on a batch {'inputs': [B, L], 'targets': [B, L]}.

  With skip_nonfinite, a step whose loss or gradients are not finite leaves the
  parameters and optimizer state unchanged (metrics['finite'] tells). debug_nan_step
  (1-based, 0 = never) poisons that step's loss, to exercise the non-finite paths.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["inputs"], batch["targets"],
                         deterministic=False, rngs={"dropout": dropout_rng})
    loss, metrics = loss_and_metrics(logits, batch["targets"], label_smoothing)
    if debug_nan_step:
      loss = loss * jnp.where(state.step + 1 == debug_nan_step, jnp.nan, 1.0)
      metrics["loss_sum"] = metrics["loss_sum"] * jnp.where(state.step + 1 == debug_nan_step,
                                                            jnp.nan, 1.0)
    return loss, metrics

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if skip_nonfinite:
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
  metrics["grad_norm"] = grad_norm
  metrics["finite"] = finite
  # Which gradient tensors went non-finite (for the diagnostic when a run stops).
  metrics["nonfinite_grads"] = {
      "/".join(str(getattr(k, "key", k)) for k in path): ~jnp.all(jnp.isfinite(g))
      for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  metrics["source_tokens"] = jnp.sum((batch["inputs"] != PAD_ID).astype(jnp.float32))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch: dict[str, jax.Array], *, model: nn.Module, label_smoothing: float):
  """Loss sums on a batch with dropout off."""
  logits = model.apply({"params": params}, batch["inputs"], batch["targets"], deterministic=True)
  return loss_and_metrics(logits, batch["targets"], label_smoothing)[1]


@dataclasses.dataclass
class Trainer:
  """The model, optimizer and jitted, sharded steps for one configuration and mesh."""
  model_cfg: ModelConfig
  train_cfg: TrainConfig
  mesh: Mesh

  def __post_init__(self):
    self.model = Transformer(self.model_cfg)
    self.optimizer = make_optimizer(self.model_cfg, self.train_cfg)
    self.schedule = make_schedule(self.model_cfg, self.train_cfg)
    abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
    self.state_shardings = sharding.boxed_shardings(abstract, self.mesh)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(abstract), self.state_shardings)
    batch_sh = sharding.batch_sharding(self.mesh)
    self._init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                         out_shardings=self.state_shardings)
    self._train_step = jax.jit(
        functools.partial(train_step, model=self.model, optimizer=self.optimizer,
                          label_smoothing=self.train_cfg.label_smoothing,
                          skip_nonfinite=self.train_cfg.nonfinite == "skip",
                          debug_nan_step=self.train_cfg.debug_nan_step),
        in_shardings=(self.state_shardings, batch_sh),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=(0,))
    self._eval_step = jax.jit(
        functools.partial(eval_step, model=self.model,
                          label_smoothing=self.train_cfg.label_smoothing),
        in_shardings=(self.state_shardings.params, batch_sh),
        out_shardings=sharding.replicated(self.mesh))

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    """Parameters (boxed with logical names) and optimizer state of a fresh model."""
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.ones((1, 8), jnp.int32)
    params = self.model.init(params_rng, dummy, dummy)["params"]
    return TrainState(step=jnp.array(0, jnp.int32), params=params,
                      opt_state=self.optimizer.init(params), rng=dropout_rng)

  def init_state(self, seed: int) -> TrainState:
    """The train state, created directly with its shardings (never whole on one host)."""
    with sharding.mesh_context(self.mesh):
      return self._init(jax.random.PRNGKey(seed))

  def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
    with sharding.mesh_context(self.mesh):
      return self._train_step(state, batch)

  def eval_step(self, params, batch: dict[str, jax.Array]):
    with sharding.mesh_context(self.mesh):
      return self._eval_step(params, batch)


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
