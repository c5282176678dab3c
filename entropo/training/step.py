"""The jitted pieces of an RL iteration: the pre-update pass and the update.

`Learner` compiles two functions over `(params, ...)` pytrees, where
`params = nnx.state(model, nnx.Param)` (with LoRA: the adapters
`nnx.state(model, nnx.LoRAParam)`, the rest passed as `frozen`), and leaves
every algorithmic choice to its `Algorithm` (algorithm.py):

* `pre_update(params, ref_params, tokens, ...)` -> `(batch, metrics)`: the
  trainer's own log-probs and entropy (`sequence_logps`: the fused head, no
  `[B, L, V]` logits, under the model's precision policy), the algorithm's
  advantages and importance weights, and the entropy-dynamics and
  sampler-vs-trainer metrics;
* `update(params, opt_state, batch, hyper, key)` -> one optax step on the
  algorithm's loss and its metrics.

The hyperparameters that controllers move (`hyper`: `zeta`, `clip_high`,
`entropy_coef`) are traced inputs, so changing them never recompiles.
Under a mesh the batch arrives sharded over `(data, fsdp)` and the
parameters by their logical axes; the loss is computed on global arrays, so
XLA inserts the collectives and the result equals a single-device step.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entropo import diagnostics
from entropo import fused
from entropo import masking
from entropo import packing as packing_lib
from entropo.models import lora as lora_lib

# Per-token arrays of a training batch, all [B, L - 1] (`tokens` and
# `attention_mask` are [B, L]).
BATCH_KEYS = ("tokens", "attention_mask", "mask", "advantages", "old_logps",
              "ref_logps", "importance_weights")
# The index arrays of a packed minibatch (`entropo.packing.PackPlan.arrays`);
# a batch that holds them runs the update's forward on packed rows.
PACK_KEYS = ("pack_source", "segment_ids", "unpack_index")
# The update's metric that says whether every parameter and optimizer-state
# array after the step is finite (1) or not (0); the loop's guard reads it
# (a finite loss and gradient can still give a NaN update, e.g. Adam's
# bias correction with b2 = 1), and it is not logged.
STATE_FINITE = "state_finite"


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, from the `optim` config section.

  Equal settings give the same object, so Learners of equal configurations
  compare equal and share their compiled steps (`Learner`)."""
  return _adamw(optim.learning_rate, optim.b1, optim.b2, optim.weight_decay,
                optim.max_grad_norm)


@functools.lru_cache(maxsize=16)
def _adamw(learning_rate, b1, b2, weight_decay, max_grad_norm):
  return optax.chain(
      optax.clip_by_global_norm(max_grad_norm),
      optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))


@functools.lru_cache(maxsize=16)
def warm_start_optimizer(learning_rate: float, steps: int
                         ) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay to 10 % over `steps`; one
  object per settings, so warm starts of one shape share `sft_step`."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), max(2, steps),
      learning_rate * 0.1)
  return optax.adamw(schedule, weight_decay=0.0)


def sequence_logps(model, tokens, attention_mask, *, head_grad=True,
                   packing=None):
  """`(logps, entropy)` of `tokens[:, 1:]`, each `[B, L - 1]` float32.

  Through the fused head (no `[B, L, V]` logits) under the model's precision
  policy: the trainer's own computation of log-probs. `head_grad=False`
  (a frozen head, as with LoRA) skips the head's gradient in the backward
  pass. `packing` (the `PACK_KEYS` arrays of an `entropo.packing` plan)
  runs the model and the head on packed rows and unpacks the result to the
  same `[B, L - 1]` layout (0 where the packed rows compute nothing: no
  valid loss position).
  """
  if packing is not None:
    return _packed_sequence_logps(model, tokens, packing,
                                  head_grad=head_grad)
  hidden = model(tokens, attention_mask=attention_mask)
  return fused.fused_logprobs_entropy(
      hidden[:, :-1], model.lm_head_matrix(), tokens[:, 1:],
      precision=model.precision, head_grad=head_grad)


def _packed_sequence_logps(model, tokens, packing, *, head_grad):
  """`sequence_logps` through packed rows `[R, W]` (see entropo.packing)."""
  packed = packing_lib.pack_tokens(tokens, packing["pack_source"])  # [R, W]
  hidden = model(packed, segment_ids=packing["segment_ids"])
  logps, entropy = fused.fused_logprobs_entropy(
      hidden[:, :-1], model.lm_head_matrix(), packed[:, 1:],
      precision=model.precision, head_grad=head_grad)  # [R, W - 1] each
  index = packing["unpack_index"]
  return packing_lib.unpack(logps, index), packing_lib.unpack(entropy, index)


class Learner:
  """Compiled pre-update pass and update for one model and one algorithm.

  `params` are the trained variables. With LoRA (`nnx.split(model,
  nnx.LoRAParam, ...)`) they are the adapters and every function also takes
  `frozen`, the other variables: gradients, optimizer state and updates
  cover the adapters alone. With `reference_without_adapters` the KL
  reference is the same model with its adapters switched off
  (`lora_disabled`), so no second copy of the weights is held and
  `ref_params` is ignored.

  `batch_rows` (minibatches by tokens, `train.minibatch_tokens`: any
  number of rows) keeps `seq_mean_token_sum_norm`'s constant at the whole
  batch's `batch_rows x norm` for a minibatch of any size; None (minibatches
  of rows, all of one size) divides by the minibatch's rows x norm.

  The settings are fixed at construction: Learners with equal settings
  (`_settings`: the same model structure, algorithm, optimizer settings and
  normalisers) share one pair of jitted steps, so a second trainer of a
  configuration in the same process compiles nothing new.
  """

  def __init__(self, graphdef, algorithm, optimizer: optax.GradientTransformation,
               *, max_new_tokens: int, group_size: int,
               reference_without_adapters: bool = False,
               batch_rows: int | None = None):
    self.graphdef = graphdef
    self.algorithm = algorithm
    self.optimizer = optimizer
    self.norm = algorithm.norm or float(max_new_tokens)
    self.batch_rows = batch_rows
    self.group_size = group_size
    self.reference_without_adapters = reference_without_adapters
    self.pre_update, self.update = _compiled_steps(self)

  def _settings(self) -> tuple:
    """Everything the jitted methods read from `self`: Learners with equal
    settings trace to the same programs."""
    return (self.graphdef, self.algorithm, self.optimizer, self.norm,
            self.batch_rows, self.group_size, self.reference_without_adapters)

  def model(self, params, frozen=None):
    """The model with trained variables `params` (and `frozen`, the rest
    with LoRA); `Trainer.model_at` is this with the run's frozen part."""
    if frozen is None:
      return nnx.merge(self.graphdef, params)
    return nnx.merge(self.graphdef, params, frozen)

  def _forward(self, params, tokens, attention_mask, frozen=None,
               packing=None):
    return sequence_logps(self.model(params, frozen), tokens,
                          attention_mask, packing=packing)

  def _reference_logps(self, params, ref_params, tokens, attention_mask,
                       frozen, packing=None):
    """The KL reference's log-probs, or None without a reference."""
    if self.reference_without_adapters:
      model = self.model(params, frozen)
      with lora_lib.lora_disabled(model):
        return sequence_logps(model, tokens, attention_mask,
                              packing=packing)[0]
    if ref_params is None:
      return None
    return self._forward(ref_params, tokens, attention_mask, frozen,
                         packing)[0]

  def _pre_update(self, params, ref_params, tokens, attention_mask, mask,
                  sampler_logps, rewards, hyper, frozen=None, packing=None):
    """The update batch (old log-probs, advantages) and pre-update metrics.

    `mask` and `sampler_logps` are `[B, L - 1]` (aligned with the targets
    `tokens[:, 1:]`), `rewards` is `[B]` with groups of `group_size` rows.
    `packing` (the `PACK_KEYS` arrays of a plan of the whole batch) runs
    the forwards on packed rows; the log-probs then are 0 off the positions
    packed rows compute, which only the loss mask's complement holds.
    """
    a = self.algorithm
    logps, entropy = self._forward(params, tokens, attention_mask, frozen,
                                   packing)
    adv = a.advantages(rewards, logps, entropy, mask, hyper,
                       group_size=self.group_size)
    ref_logps = self._reference_logps(params, ref_params, tokens,
                                      attention_mask, frozen, packing)
    if ref_logps is None:
      ref_logps = logps
    weights, correction_metrics = a.importance_weights(logps, sampler_logps,
                                                      mask)
    batch = dict(
        tokens=tokens, attention_mask=attention_mask, mask=mask,
        advantages=adv, ref_logps=ref_logps, importance_weights=weights,
        old_logps=sampler_logps if a.old_logps == "sampler" else logps)
    metrics = diagnostics.entropy_dynamics(logps, adv, mask, entropy=entropy)
    # rho = pi_trainer / pi_sampler: the ratio of the first update when the
    # old log-probs come from the sampler (identical parameters, so any
    # deviation from 1 is numerical: the two precisions, or the two codes).
    metrics.update(diagnostics.precision_mismatch(
        logps, sampler_logps, mask, clip_low=a.clip_low,
        clip_high=hyper["clip_high"]))
    metrics.update(diagnostics.sampler_mismatch(logps, sampler_logps, mask))
    metrics.update(correction_metrics)
    return batch, metrics

  def loss(self, params, batch: dict[str, jax.Array], hyper: dict[str, Any],
           key, frozen=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss of a (mini)batch and its metrics."""
    model = self.model(params, frozen)
    # With frozen weights (LoRA) the head is frozen: no head gradient.
    # A packed minibatch (PACK_KEYS) runs the forward on packed rows; the
    # loss below sees the same [B, L - 1] layout either way.
    packing = ({k: batch[k] for k in PACK_KEYS}
               if PACK_KEYS[0] in batch else None)
    logps, entropy = sequence_logps(model, batch["tokens"],
                                    batch["attention_mask"],
                                    head_grad=frozen is None, packing=packing)
    norm = self.norm
    rows = batch["tokens"].shape[0]
    if self.batch_rows is not None and rows != self.batch_rows:
      # seq_mean_token_sum_norm divides by rows x norm: the batch's B x norm.
      norm = self.norm * self.batch_rows / rows
    loss, metrics = self.algorithm.loss(logps, entropy, batch, hyper, key,
                                        norm=norm,
                                        precision=model.precision)
    metrics["loss"] = loss
    return loss, metrics

  def _update(self, params, opt_state, batch, hyper, key, frozen=None):
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (_, metrics), grads = grad_fn(params, batch, hyper, key, frozen)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics[STATE_FINITE] = jnp.all(jnp.stack([
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, opt_state))
        if jnp.issubdtype(x.dtype, jnp.inexact)]))
    return params, opt_state, masking.scalar_metrics(metrics)


# The jitted steps of recent Learners, by their settings, most recent last:
# the trainers of one process (a resumed run, a test suite, a notebook that
# rebuilds its trainer, a study's runs of one configuration) trace, lower and
# compile each step once instead of once per Learner.
_STEPS: list[tuple[tuple, tuple[Any, Any]]] = []
_STEPS_KEPT = 8


def _compiled_steps(learner: Learner) -> tuple[Any, Any]:
  """`(pre_update, update)` jitted, shared with an equal earlier Learner."""
  settings = learner._settings()  # pylint: disable=protected-access
  for i, (known, steps) in enumerate(_STEPS):
    if known == settings:
      _STEPS.append(_STEPS.pop(i))
      return steps
  steps = (jax.jit(learner._pre_update), jax.jit(learner._update))  # pylint: disable=protected-access
  _STEPS.append((settings, steps))
  del _STEPS[:-_STEPS_KEPT]
  return steps


@jax.jit
def finite_leaves(tree) -> dict[str, jax.Array]:
  """`{path: all finite}` of each floating leaf of `tree` (bool scalars)."""
  return {jax.tree_util.keystr(path): jnp.all(jnp.isfinite(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(leaf.dtype, jnp.inexact)}


def sft_loss(graphdef, params, tokens, attention_mask, loss_mask):
  """Token-mean cross-entropy of the `loss_mask` targets (warm start)."""
  logps, _ = sequence_logps(nnx.merge(graphdef, params), tokens,
                            attention_mask)
  return -masking.aggregate(logps, loss_mask[:, 1:], mode="token_mean")


@functools.partial(jax.jit, static_argnums=(0, 1))
def sft_step(graphdef, optimizer, params, opt_state, tokens, attention_mask,
             loss_mask):
  """One supervised step; returns `(params, opt_state, loss)`."""
  loss, grads = jax.value_and_grad(sft_loss, argnums=1)(
      graphdef, params, tokens, attention_mask, loss_mask)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss
