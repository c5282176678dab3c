"""The RL loop: iterations of sample -> score -> update, with checkpoints.

`train(config, workdir)` runs (or resumes) a whole experiment and returns
the final metrics. One iteration (see docs/training.md):

1. `Rollouts.collect` (rollouts.py): `prompts_per_batch` prompts,
   `group_size` completions each, from the KV-cache sampler, scored by the
   task's verifier; with dynamic sampling, degenerate groups are dropped
   and the batch refilled;
2. `Learner.pre_update` (step.py): old log-probs and entropy from the
   trainer's own forward (or the sampler's), importance weights, and the
   `Algorithm`'s advantages (algorithm.py);
3. `epochs` x `minibatches` optax steps on the algorithm's loss (with
   `train.packing`, steps 2 and 3 run the model on packed rows:
   `entropo.packing`; with `train.minibatch_tokens`, the minibatches are
   formed by tokens);
4. the algorithm's controllers step from the measured entropy; metrics are
   logged (logger.py); evaluation (evaluation.py) and checkpoints at their
   intervals.

Everything that decides the future of the run (parameters, optimizer and
controller states, PRNG key, data-iterator position, entropy target,
running sums) is checkpointed, so a resumed run continues exactly: it is
`Trainer.state` and `Trainer.meta`, typed and documented in state.py.

With `model.lora_rank > 0` the policy is the `init_from` model with LoRA
adapters (`entropo.models.add_lora`): only the adapters are trained,
optimized and checkpointed, the base weights stay frozen (read from
`init_from` at every launch), the sampler samples the adapted policy and
the KL reference is the model with its adapters switched off.

Several processes (`entropo.training.distributed`) run the same loop on one
mesh; `BatchPlacement` (placement.py) holds what differs between one
process and several. The batches, and so the run, do not depend on the
number of processes. Process 0 writes the metrics, plots, `baseline.json`
and `config.json`; every process takes part in Orbax's checkpoint saves and
restores; the data set and the warm start are written by process 0 while
the others wait.
"""

import pathlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from entropo import sharding
from entropo import tasks as tasks_lib
from entropo.models import Transformer
from entropo.models import with_precision
from entropo.tasks import pipeline
from entropo.training.algorithm import CLIPPED_OBJECTIVES
from entropo.training.algorithm import inert_band
from entropo.training.algorithm import on_policy_single_step
from entropo.training import checkpoint as checkpoint_lib
from entropo.training import config as config_lib
from entropo.training import datasets
from entropo.training import distributed
from entropo.training import evaluation
from entropo.training import guards
from entropo.training import logger as logger_lib
from entropo.training import minibatches as minibatches_lib
from entropo.training import rollouts as rollouts_lib
from entropo.training import step as step_lib
from entropo.training.placement import BatchPlacement
from entropo.training.state import LaunchCounts
from entropo.training.state import RunMeta
from entropo.training.state import TrainState
from entropo.training.warm_start import initial_policy


NonFiniteError = guards.NonFiniteError


class Trainer:
  """Holds the model, data, state and compiled steps of one run."""

  def __init__(self, config, workdir):
    # The typed, validated form of the ConfigDict (run_config.py).
    self.config = config = config_lib.validate(config)
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.algorithm = config.algorithm
    self.interrupts = guards.DeferredInterrupts()  # active in `run`
    self.task = config_lib.make_task(config.task)
    # A multi-turn environment: rows are episodes (rollouts.AgentRollouts).
    self.agent = isinstance(self.task, tasks_lib.AgentTask)
    self.precision = config.precision
    # The sampler's preset (`sampling.precision`); the trainer's by default.
    self.sampler_precision = config.sampler_precision
    self._init_model()
    m = config.mesh
    self.mesh = sharding.make_mesh(
        data=m.data, fsdp=m.fsdp, tensor=m.tensor,
        devices=jax.devices()[:m.data * m.fsdp * m.tensor])
    sharding.shard_model(self.model, self.mesh)
    self.lora = config.model.lora_rank > 0
    # With LoRA only the adapters train; the base weights are `frozen`,
    # never in the optimizer or the checkpoints (they are `init_from`'s).
    self.graphdef, params, *frozen = nnx.split(
        self.model, *((nnx.LoRAParam, ...) if self.lora else ()))
    self.frozen = frozen[0] if frozen else None
    self.placement = BatchPlacement(self.mesh)
    self.minibatches = minibatches_lib.Minibatches(
        self.placement, self.algorithm.minibatches,
        config.train.minibatch_tokens, config.train.packing,
        config.train.row_buckets)
    self.optimizer = step_lib.make_optimizer(config.optim)
    kl = self.algorithm.kl_coef > 0
    self.learner = step_lib.Learner(
        self.graphdef, self.algorithm, self.optimizer,
        max_new_tokens=self._completion_budget(),
        group_size=config.sampling.group_size,
        reference_without_adapters=kl and self.lora,
        batch_rows=config.sampling.batch_size if (
            config.train.minibatch_tokens) else None)
    # The KL reference: the starting weights (full fine-tuning) or the base
    # model, i.e. the same weights with the adapters off (LoRA).
    self.ref_params = params if kl and not self.lora else None
    self.fixed_hyper = self.placement.replicate(
        self.algorithm.fixed_hyperparameters())
    # What decides the rest of the run (state.py): arrays and JSON values.
    self.state = self.placement.replicate(TrainState(
        params=params,
        opt_state=self.optimizer.init(params),
        controllers=self.algorithm.init_controllers(),
        key=jax.random.key_data(jax.random.key(config.seed))))
    self.meta = RunMeta()
    self._init_data()
    kind = rollouts_lib.Rollouts
    extra = {}
    if self.agent:
      kind, extra = rollouts_lib.AgentRollouts, {"agent": config.agent}
    self.rollouts = kind(
        self.task, self.tokenizer, self.placement, config.sampling,
        dynamic_sampling=self.algorithm.dynamic_sampling,
        max_resample=self.algorithm.max_resample, **extra)
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.workdir / "checkpoints",
        max_to_keep=config.train.max_checkpoints)
    self._restore()
    self.clipping = LaunchCounts()

  # -- setup

  def _completion_budget(self) -> int:
    """The policy's tokens per sequence, at most (the constant of
    `seq_mean_token_sum_norm` when `algo.norm` is 0)."""
    c = self.config
    if self.agent:
      return c.agent.max_turns * c.agent.max_action_tokens
    return c.sampling.max_new_tokens

  def _init_model(self):
    self.model, self.tokenizer, self.warm_start_dir = initial_policy(
        self.config, self.task, self.workdir, self.precision)

  def _init_data(self):
    c = self.config
    data_dir = c.data.data_dir or str(self.workdir / "data")
    builder = distributed.on_primary_first(
        "data", datasets.write_dataset, c, self.task, data_dir)
    self.train_source = datasets.load_split(self.task, data_dir, builder,
                                            "train")
    self.eval_records = datasets.held_out_records(c, self.task, data_dir,
                                                  builder)
    # This process loads the rows of each global batch its devices hold.
    size = c.sampling.prompts_per_batch * c.sampling.group_size
    rows = self.placement.local_slice(size)
    local = rows.stop - rows.start
    self.batches = pipeline.prompt_batches(
        self.train_source, self.tokenizer,
        prompts_per_batch=c.sampling.prompts_per_batch,
        group_size=c.sampling.group_size, seed=c.seed,
        max_prompt_len=c.data.max_prompt_len,
        shard_index=rows.start // local, shard_count=size // local)
    self.data_iter = iter(self.batches)

  def _restore(self):
    found = self.checkpointer.restore_latest(self.state.to_tree())
    if found is None:
      return
    _, tree, meta = found
    self.state, self.meta = TrainState.from_tree(tree), RunMeta.from_json(meta)
    if self.meta.data_state is not None:
      self.data_iter.set_state(self.meta.data_state)
    logger_lib.log(f"resumed from {self.checkpointer.directory} at "
                   f"iteration {self.meta.iteration}")

  def save(self) -> None:
    """Checkpoints the state; raises NonFiniteError instead of saving a
    NaN/inf parameter or optimizer moment."""
    guards.check_finite_state(self.state.to_tree(), self.meta.iteration - 1,
                              self.checkpoint_note)
    self.meta = self.meta.replace(data_state=self.data_iter.get_state())
    self.checkpointer.save(self.meta.iteration, self.state.to_tree(),
                           self.meta.to_json())

  # -- one iteration

  def model_at(self, params) -> Transformer:
    """The model with trained variables `params` (and the frozen rest)."""
    return self.learner.model(params, self.frozen)

  def policy(self) -> Transformer:
    """The current policy pi_theta as a model."""
    return self.model_at(self.state.params)

  def hyperparameters(self) -> dict:
    """The current value of every hyperparameter a controller may move."""
    return self.algorithm.hyperparameters(self.state.controllers,
                                          self.fixed_hyper)

  def sampler(self) -> Transformer:
    """pi_theta under the sampler's precision (`sampling.precision`): the
    policy itself when it equals the trainer's."""
    return with_precision(self.policy(), self.sampler_precision)

  def collect(self, key) -> tuple[rollouts_lib.Rollout, dict]:
    """A full, scored batch of rollouts (see `Rollouts.collect`)."""
    return self.rollouts.collect(self.sampler(), self.data_iter, key)

  def pre_update(self, roll: rollouts_lib.Rollout) -> tuple[dict, dict]:
    """Trainer log-probs, advantages and REPO: the batch for the updates."""
    put = self.placement.put
    attention_mask = put(roll.attention_mask)
    loss_mask = put(roll.completion_mask[:, 1:])
    packing = self.minibatches.packed({"attention_mask": attention_mask,
                            "mask": loss_mask})
    packing = {k: packing[k] for k in step_lib.PACK_KEYS} if (
        self.config.train.packing) else None
    return self.learner.pre_update(
        self.state.params, self.ref_params, put(roll.tokens),
        attention_mask, loss_mask, put(roll.sampler_logps[:, 1:]),
        self.placement.from_host(roll.rewards), self.hyperparameters(),
        self.frozen, packing)

  def update(self, batch: dict, key) -> dict:
    """`epochs` passes of `minibatches` optax steps (or of minibatches by
    tokens: `train.minibatch_tokens`); mean metrics."""
    a = self.algorithm
    hyper = self.hyperparameters()
    sums: dict[str, float] = {}
    steps = skipped = 0
    for epoch in range(a.epochs):
      key, perm_key = jax.random.split(key)
      for m, rows in enumerate(self.minibatches.rows(
          batch, perm_key, iteration=self.meta.iteration)):
        mb = self.minibatches.packed(self.minibatches.gather(batch, rows))
        key, sub = jax.random.split(key)
        params, opt_state, metrics = self.learner.update(
            self.state.params, self.state.opt_state, mb, hyper, sub,
            self.frozen)
        metrics = {k: float(v) for k, v in metrics.items()}
        state_finite = metrics.pop(step_lib.STATE_FINITE, 1.0) == 1.0
        where = f"epoch {epoch}, minibatch {m}"
        if self._non_finite(metrics, ("loss", "grad_norm"), where) or (
            not state_finite and guards.non_finite_update(
                iteration=self.meta.iteration, where=where,
                skip=self.config.train.skip_non_finite,
                checkpoints=self.checkpoint_note)):
          skipped += 1  # the update is not applied
          continue
        self.state = self.state.replace(params=params, opt_state=opt_state)
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + v
        steps += 1
    self.meta = self.meta.replace(
        skipped_minibatches=self.meta.skipped_minibatches + skipped)
    out = {k: v / steps for k, v in sums.items()}
    if self.config.train.minibatch_tokens:
      out["train/optimizer_steps"] = float(steps + skipped)
    if self.config.train.skip_non_finite:
      out["train/skipped_minibatches"] = float(skipped)
      out["train/skipped_minibatches_total"] = float(
          self.meta.skipped_minibatches)
    return out

  def _non_finite(self, metrics: dict, names, where: str) -> bool:
    return guards.non_finite(
        metrics, names, iteration=self.meta.iteration, where=where,
        skip=self.config.train.skip_non_finite,
        checkpoints=self.checkpoint_note)

  def checkpoint_note(self) -> str:
    """What a rerun would resume from (for the guards' messages)."""
    return guards.checkpoint_note(self.checkpointer.directory,
                                  self.checkpointer.latest_step(),
                                  self.config.train.checkpoint_every)

  def iteration(self) -> dict[str, float]:
    """Runs one RL iteration and returns its metrics."""
    timing = self.rollouts.reset_timing()
    key = jax.random.wrap_key_data(self.state.key)
    key, collect_key, update_key = jax.random.split(key, 3)
    self.state = self.state.replace(key=jax.random.key_data(key))
    roll, metrics = self.collect(collect_key)
    self.interrupts.check()
    t1 = time.perf_counter()
    batch, dyn = self.pre_update(roll)
    # A non-finite entropy means the policy itself is broken: no batch to
    # skip, and the controllers must not step from it.
    self._non_finite({k: float(v) for k, v in dyn.items()},
                     ("entropy/mean",), where="")
    out = self.update(batch, update_key)
    self.interrupts.check()
    t2 = time.perf_counter()
    metrics.update({k: float(v) for k, v in dyn.items()})
    # The iteration's entropy is the pre-update one from `pre_update`.
    metrics.update({k: v for k, v in out.items()
                    if not k.startswith("entropy/")})
    entropy = metrics["entropy/mean"]
    metrics.update({f"controller/{k}": float(v)
                    for k, v in self.hyperparameters().items()})
    self.state = self.state.replace(
        controllers=self.algorithm.step_controllers(
            self.state.controllers, entropy, target=self.meta.target_entropy))
    initial = self.meta.initial_entropy
    self.meta = self.meta.replace(
        cumulative_entropy=self.meta.cumulative_entropy + entropy)
    metrics.update(logger_lib.rollout_metrics(roll))
    generated = int(jnp.sum(roll.completion_mask))
    metrics.update({
        "entropy/change_pct": 100.0 * (entropy - initial) / initial,
        "entropy/cumulative": self.meta.cumulative_entropy,
        "target_entropy": self.meta.target_entropy,
        **timing,
        "time/train": t2 - t1,
        "throughput/generated_tokens_per_s": generated / max(
            timing["time/sample"], 1e-9),
        "throughput/train_tokens_per_s": float(jnp.sum(roll.attention_mask))
                                         * self.algorithm.epochs
                                         / max(t2 - t1, 1e-9),
    })
    return metrics

  # -- evaluation

  def evaluate(self) -> dict[str, float]:
    """pass@k, reward and entropy on the held-out prompts (evaluation.py),
    sampled like the rollouts, under the sampler's precision."""
    c = self.config
    key = jax.random.fold_in(jax.random.key(c.seed + 1),
                             self.meta.iteration)
    return evaluation.evaluate(
        self.sampler(), self.eval_records, self.rollouts, key,
        samples=c.train.eval_samples, pass_k=c.train.pass_k,
        max_prompt_len=c.data.max_prompt_len,
        temperature=c.sampling.temperature)

  def baseline(self) -> None:
    """Evaluates the starting policy and fixes the entropy target."""
    evaluation_ = self.evaluate()
    h0 = evaluation_["eval/entropy"]
    self.meta = self.meta.replace(
        baseline=evaluation_, initial_entropy=h0,
        target_entropy=(self.algorithm.target_entropy
                        or h0 * self.algorithm.target_scale))
    logger_lib.write_baseline(self.workdir, evaluation_)
    logger_lib.log(f"before RL: entropy {h0:.4f} nats/token, " + ", ".join(
        f"{k[5:]} {v:.3f}" for k, v in evaluation_.items() if "pass" in k))

  # -- the loop

  def run(self) -> dict[str, float]:
    """Runs the remaining iterations; returns the last iteration's metrics.

    Record `i` of `metrics.jsonl` holds iteration i's training metrics and,
    at evaluation intervals, `eval/*` of the policy after i + 1 updates; the
    evaluation before RL is `baseline.json`. A KeyboardInterrupt saves the
    state as of the start of the interrupted iteration, so a rerun
    continues from there. A rerun of a finished run trains nothing and
    returns the metrics of its last logged iteration.
    """
    c = self.config
    inert = inert_band(self.algorithm)
    if inert and jax.process_index() == 0 and not c.train.minibatch_tokens:
      logger_lib.warn(inert)
    logger = logger_lib.MetricLogger(
        self.workdir, total=c.train.iterations, start=self.meta.iteration,
        tensorboard=c.train.tensorboard, progress=c.train.progress,
        enabled=jax.process_index() == 0)
    metrics: dict[str, float] = {}
    if self.meta.iteration >= c.train.iterations:
      records = logger_lib.read_jsonl(self.workdir / "metrics.jsonl")
      metrics = {k: v for k, v in records[-1].items()
                 if k != "iteration"} if records else {}
      logger_lib.log(f"{self.workdir} is complete at iteration "
                     f"{self.meta.iteration} (train.iterations = "
                     f"{c.train.iterations}); nothing to train")
    with self.interrupts:
      try:
        if self.meta.initial_entropy is None:
          self.baseline()
        while self.meta.iteration < c.train.iterations:
          it = self.meta.iteration
          metrics = self._guarded_iteration()
          self.meta = self.meta.replace(iteration=it + 1)
          last = it + 1 == c.train.iterations
          if (it + 1) % c.train.eval_every == 0 or last:
            t = time.perf_counter()
            metrics.update(self.evaluate())
            metrics["time/eval"] = time.perf_counter() - t
          logger.write(it, metrics)
          self._count_clipping(metrics)
          if (it + 1) % c.train.checkpoint_every == 0 or last:
            self._save_through_interrupt()
      finally:
        self.checkpointer.close()
        logger.close()
    self._warn_if_never_clipped()
    if c.train.plots and jax.process_index() == 0:
      files = logger_lib.plot_run(self.workdir / "metrics.jsonl",
                                  self.workdir / "plots",
                                  baseline=self.meta.baseline)
      logger_lib.log(f"plots: {', '.join(str(f) for f in files)}")
    return metrics

  def _count_clipping(self, metrics: dict) -> None:
    self.clipping.iterations += 1
    self.clipping.clipped |= any(
        metrics.get(k, 0.0) > 0 for k in ("pg/clipfrac_high",
                                          "pg/clipfrac_low"))

  def _warn_if_never_clipped(self, at_least: int = 10) -> None:
    """A clip-based method that clipped no token in `at_least` iterations
    or more of this launch (when not on-policy, where that is certain and
    `inert_band` says so at the start) had a band with no effect."""
    a = self.algorithm
    if (a.objective in CLIPPED_OBJECTIVES
        and not on_policy_single_step(a)
        and self.clipping.iterations >= at_least
        and not self.clipping.clipped and jax.process_index() == 0):
      logger_lib.warn(
          f"algo {a.name!r} clipped no token in {self.clipping.iterations}"
          f" iterations (pg/clipfrac_high and pg/clipfrac_low were 0): its "
          f"band [1 - clip_low, 1 + clip_high] had no effect on this run")

  def _save_through_interrupt(self) -> None:
    """`save()`, finishing the checkpoint when a Ctrl-C arrives during it;
    then stops (KeyboardInterrupt), saying the checkpoint is complete."""
    with guards.held_interrupts() as held:
      self.save()
      if held:
        self.checkpointer.wait()
    if held:
      self.checkpointer.wait()
      logger_lib.log(
          f"interrupted while saving the checkpoint of iteration "
          f"{self.meta.iteration}; finished the save first "
          f"({self.checkpointer.directory / str(self.meta.iteration)}), "
          f"so a rerun resumes from it")
      raise KeyboardInterrupt

  def _guarded_iteration(self) -> dict[str, float]:
    """`iteration()`; on KeyboardInterrupt, saves the state before it."""
    # (Both are frozen: the iteration replaces them, never changes them.)
    snapshot = (self.state, self.meta, self.data_iter.get_state())
    try:
      self.interrupts.check()  # a Ctrl-C since the last iteration
      return self.iteration()
    except KeyboardInterrupt:
      self.state, self.meta = snapshot[0], snapshot[1]
      self.data_iter.set_state(snapshot[2])
      it = self.meta.iteration
      if self.checkpointer.latest_step() == it:
        logger_lib.log(f"interrupted in iteration {it}; the checkpoint of "
                       f"the state before it exists already")
        raise
      with guards.held_interrupts():
        self.save()
        self.checkpointer.wait()
      logger_lib.log(f"interrupted in iteration {it}; saved the state "
                     f"before it ({self.checkpointer.directory / str(it)})")
      raise
