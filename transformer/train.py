"""Section 5: loss, optimizer, learning-rate schedule, sharded train/eval steps, the loop.

`train_step(state, batch) -> (state, metrics)` is one pure function; `Trainer`
jit-compiles it with explicit shardings over the mesh and donates the state.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


class AccumulationState(NamedTuple):
  micro_step: jax.Array  # int32: micro-batches accumulated since the last update
  grad_sum: Any          # float32, like params: sum of token-summed micro-batch gradients
  tokens: jax.Array      # float32: their target tokens
  inner: Any             # the wrapped optimizer's state


def token_weighted_accumulation(inner: optax.GradientTransformation,
                                every_k: int) -> optax.GradientTransformationExtraArgs:
  """Gradient accumulation that weights micro-batches by their tokens.

  `update(grads, state, params, tokens=n)` takes the gradient of one micro-batch's mean
  loss and its n non-pad target tokens. Every `every_k`-th call applies `inner` to
  sum_i n_i grads_i / sum_i n_i, the gradient of the mean loss over all tokens of the k
  micro-batches (what one big batch would give); the other calls return zero updates.
  (optax.MultiSteps averages the k per-micro-batch means instead.)
  """
  def init(params):
    return AccumulationState(jnp.zeros([], jnp.int32),
                             jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
                             jnp.zeros([], jnp.float32), inner.init(params))

  def update(grads, state: AccumulationState, params=None, *, tokens, **extra_args):
    del extra_args
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) * tokens, state.grad_sum,
                            grads)
    total = state.tokens + tokens

    def apply(_):
      mean = jax.tree.map(lambda a, g: (a / jnp.maximum(total, 1.0)).astype(g.dtype),
                          grad_sum, grads)
      updates, inner_state = inner.update(mean, state.inner, params)
      return updates, AccumulationState(jnp.zeros([], jnp.int32),
                                        jax.tree.map(jnp.zeros_like, grad_sum),
                                        jnp.zeros([], jnp.float32), inner_state)

    def accumulate(_):
      return (jax.tree.map(jnp.zeros_like, grads),
              AccumulationState(state.micro_step + 1, grad_sum, total, state.inner))

    return jax.lax.cond(state.micro_step == every_k - 1, apply, accumulate, None)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(model_cfg: ModelConfig,
                   train_cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
  """Adam(beta1, beta2, eps) with the paper's schedule; optional gradient accumulation.

  `update` takes the keyword argument `tokens` (the micro-batch's target tokens).
  """
  opt = optax.adam(make_schedule(model_cfg, train_cfg), b1=train_cfg.adam_b1,
                   b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
  if train_cfg.grad_accum_steps > 1:
    return token_weighted_accumulation(opt, train_cfg.grad_accum_steps)
  return optax.with_extra_args_support(opt)


def smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float):
  """Label-smoothed cross entropy per token.

  The smoothed target puts 1 - eps on the reference token y and eps / (V - 1) on each
  of the V - 1 other ids, PAD, BOS, EOS and UNK included. The paper (section 5.4) gives no
  formula; this is tensor2tensor's form (the authors' code). Szegedy et al. (2016) spread
  eps / K over all K classes, y included, which is the same target with eps' = eps (V - 1)
  / V. PAD keeps its share although it is never a target, so the model learns to give it
  about eps / (V - 1) rather than 0 (beam search can emit PAD only if it outscores EOS and
  every real token). With log p_v = z_v - lse(z), only three reductions over the vocabulary
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
               optimizer: optax.GradientTransformationExtraArgs, label_smoothing: float,
               skip_nonfinite: bool = False):
  """One optimizer update on a batch {'inputs': [B, L], 'targets': [B, L]}.

  With skip_nonfinite, a step whose loss or gradients are not finite leaves the
  parameters and optimizer state unchanged (metrics['finite'] tells).
  metrics['grad_sq_norms'] is [num_tensors]: the squared norm of each gradient tensor in
  `jax.tree.leaves` order (the terms of the gradient norm; `Trainer.nonfinite_tensors` names
  the non-finite ones).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["inputs"], batch["targets"],
                         deterministic=False, rngs={"dropout": dropout_rng})
    return loss_and_metrics(logits, batch["targets"], label_smoothing)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # optax.tree.norm(grads), keeping its per-tensor terms.
  sq_norms = jax.tree.map(lambda g: jnp.sum(jnp.square(g)), grads)
  grad_norm = jnp.sqrt(jax.tree.reduce(operator.add, sq_norms, initializer=0))
  finite = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params,
                                        tokens=metrics["tokens"])
  params = optax.apply_updates(state.params, updates)
  if skip_nonfinite:
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
  metrics["grad_norm"] = grad_norm
  metrics["finite"] = finite
  metrics["grad_sq_norms"] = jnp.stack(jax.tree.leaves(sq_norms))
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
                          skip_nonfinite=self.train_cfg.nonfinite == "skip"),
        in_shardings=(self.state_shardings, batch_sh),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=(0,))
    self._eval_step = jax.jit(
        functools.partial(eval_step, model=self.model,
                          label_smoothing=self.train_cfg.label_smoothing),
        in_shardings=(self.state_shardings.params, batch_sh),
        out_shardings=sharding.replicated(self.mesh))

  def nonfinite_tensors(self, metrics: dict[str, Any]) -> list[str]:
    """Names ('encoder/layer_0/...') of the gradient tensors that were not finite in the
    fetched metrics of one step: those whose squared norm is NaN or Inf."""
    paths = jax.tree_util.tree_leaves_with_path(self.abstract_state.params)
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in paths]
    return sorted(n for n, sq in zip(names, np.asarray(metrics["grad_sq_norms"]))
                  if not np.isfinite(sq))

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

  def lower_train_step(self, batch: dict[str, jax.ShapeDtypeStruct]):
    """The jitted train step lowered for an abstract batch (ahead-of-time compilation)."""
    with sharding.mesh_context(self.mesh):
      return self._train_step.lower(self.abstract_state, batch)

  def lower_eval_step(self, batch: dict[str, jax.ShapeDtypeStruct]):
    """The jitted eval step lowered for an abstract batch (ahead-of-time compilation)."""
    with sharding.mesh_context(self.mesh):
      return self._eval_step.lower(self.abstract_state.params, batch)


def count_params(params_or_config: Any) -> int:
  """Number of parameters: of a pytree of arrays (or ShapeDtypeStructs), or of
  Transformer(config) for a ModelConfig, from shapes only (nothing is allocated)."""
  tree = params_or_config
  if isinstance(tree, ModelConfig):
    tokens = jnp.ones((1, 8), jnp.int32)
    tree = jax.eval_shape(lambda: Transformer(params_or_config).init(
        jax.random.PRNGKey(0), tokens, tokens))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
