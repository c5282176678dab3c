"""The RL trainer: warm start, then iterations of sample -> score -> update.

`train(config, workdir)` runs (or resumes) a whole experiment and returns
the final metrics. One iteration (see docs/training.md):

1. draw `prompts_per_batch` prompts, `group_size` completions each, from
   the KV-cache sampler; score them with the task's verifier;
2. with dynamic sampling, drop groups whose rewards are all equal and
   sample again (up to `max_resample` times) to refill the batch;
3. recompute old log-probs and entropy with the trainer's own forward
   (or take the sampler's), with optional truncated importance weights;
   advantages (RLOO / GRPO / Dr.GRPO), then the REPO variant;
4. `epochs` x `minibatches` optax steps on the configured objective;
5. step the controllers (zeta, epsilon_high, entropy coefficient) from
   the measured entropy; log; evaluate and checkpoint at their intervals.

Everything that decides the future of the run (parameters, optimizer and
controller states, PRNG key, data-iterator position, entropy target,
running sums) is checkpointed, so a resumed run continues exactly.

Several processes (`entropo.training.distributed`) run the same loop on one
mesh over all their devices. Every array the steps see is a global
`jax.Array`: each process loads and tokenizes only its rows of each global
batch (`pipeline.prompt_batches` with this process's slice), the sampler
and the steps run on the batch sharding, and each process scores its own
rows. Whatever decides control flow (rewards, verdicts, dynamic-sampling
choices, evaluation counts) is gathered to every process, so all of them
take the same decisions and meet in the same collectives. The batches, and
so the run, do not depend on the number of processes. Process 0 writes the
metrics, plots, `baseline.json` and `config.json`; every process takes part
in Orbax's checkpoint saves and restores; the data set and the warm start
are written by process 0 while the others wait.
"""

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import entropo
from entropo import controllers as controllers_lib
from entropo import sharding
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import from_pretrained
from entropo.models import load_tokenizer
from entropo.models import sample
from entropo.models import save_pretrained
from entropo import tasks as tasks_lib
from entropo.tasks import data as data_lib
from entropo.tasks import pipeline
from entropo.training import checkpoint as checkpoint_lib
from entropo.training import config as config_lib
from entropo.training import distributed
from entropo.training import logger as logger_lib
from entropo.training import step as step_lib


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


def make_task(task_config) -> tasks_lib.Task:
  settings = dict(task_config.settings)
  if task_config.name == "gsm8k":
    settings["path"] = task_config.path
  return tasks_lib.get_task(task_config.name, **settings)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[entropo] {message}", flush=True)


# ----------------------------------------------------------------- warm start


def warm_start(config, task, tokenizer, directory) -> pathlib.Path:
  """Trains the tiny model from scratch on correct solutions (SFT).

  Saves it as a Hugging Face directory (safetensors, config.json,
  tokenizer.json) at `directory`, which is reused if it already exists:
  every run of a study can start from the same warm-started policy. The
  warm start always trains in float32; the RL run loads it under its own
  precision preset.
  """
  directory = pathlib.Path(directory)
  if (directory / "config.json").is_file():
    _log(f"warm start: reusing {directory}")
    return directory
  ws, m = config.warm_start, config.model
  cfg = ModelConfig(
      vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size, num_layers=m.num_layers,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      max_position_embeddings=m.max_position_embeddings,
      rope_theta=m.rope_theta, tie_word_embeddings=True, family="qwen3",
      qk_norm=True)
  model = Transformer(cfg, precision="fp32", rngs=nnx.Rngs(config.seed))
  pairs = tasks_lib.warm_start_examples(
      task, seed=ws.seed, num_problems=ws.num_problems,
      samples_per_problem=ws.samples_per_problem, spread=ws.spread)
  max_len = config.data.max_prompt_len + config.sampling.max_new_tokens
  batches = iter(pipeline.sft_batches(
      pairs, tokenizer, batch_size=ws.batch_size, seed=ws.seed,
      max_len=max_len))
  optimizer = step_lib.warm_start_optimizer(ws.learning_rate, ws.steps)
  graphdef, params = nnx.split(model)
  opt_state = optimizer.init(params)
  losses = []
  bar = tqdm.tqdm(range(ws.steps), desc="warm start", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  for i in bar:
    b = next(batches)
    params, opt_state, loss = step_lib.sft_step(
        graphdef, optimizer, params, opt_state, jnp.asarray(b["tokens"]),
        jnp.asarray(b["mask"]), jnp.asarray(b["loss_mask"]))
    losses.append(float(loss))
    if i % 20 == 0:
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  nnx.update(model, params)
  save_pretrained(model, directory)
  tasks_lib.save_tokenizer(tokenizer, directory)
  (directory / "warm_start_loss.json").write_text(json.dumps(losses))
  final = f", final loss {losses[-1]:.4f}" if losses else ""
  _log(f"warm start: {ws.steps} steps{final} -> {directory}")
  return directory


# ------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Rollout:
  """One scored batch of completions.

  The sequences are `[B, L]` global arrays on the batch sharding; the
  rewards and verdicts of the whole batch are on the host, the same on
  every process.
  """

  tokens: jax.Array
  attention_mask: jax.Array
  completion_mask: jax.Array
  sampler_logps: jax.Array
  rewards: np.ndarray  # [B]
  reasons: list[str]  # [B]

  def arrays(self) -> tuple[jax.Array, ...]:
    return (self.tokens, self.attention_mask, self.completion_mask,
            self.sampler_logps)


@functools.partial(jax.jit, static_argnums=0)
def _gather_rows(sharding, parts, rows):
  """Rows `rows` of the concatenation of `parts` (pytrees of `[B, ...]`)."""
  whole = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  return jax.lax.with_sharding_constraint(
      jax.tree.map(lambda x: x[rows], whole), sharding)


class Trainer:
  """Holds the model, data, state and compiled steps of one run."""

  def __init__(self, config, workdir):
    config_lib.validate(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.algo = config.algo
    self.task = make_task(config.task)
    self.policy = entropo.get_precision(config.precision)
    self._init_model()
    m = config.mesh
    self.mesh = sharding.make_mesh(
        data=m.data, fsdp=m.fsdp, tensor=m.tensor,
        devices=jax.devices()[:m.data * m.fsdp * m.tensor])
    sharding.shard_model(self.model, self.mesh)
    self.graphdef, params = nnx.split(self.model)
    # Dimension 0 over (data, fsdp), the rest replicated: any rank.
    self.batch_sharding = sharding.batch_sharding(self.mesh, rank=1)
    self.batch_shards = m.data * m.fsdp
    self.optimizer = step_lib.make_optimizer(config.optim)
    self.learner = step_lib.Learner(
        self.graphdef, self.algo, self.optimizer,
        max_new_tokens=config.sampling.max_new_tokens,
        group_size=config.sampling.group_size)
    self.ref_params = params if self.algo.kl_coef > 0 else None
    self.zeta_ctl = controllers_lib.ZetaController(
        init_zeta=self.algo.zeta_init, zeta_min=self.algo.zeta_min,
        zeta_max=self.algo.zeta_max, law=self.algo.zeta_law,
        sign_flip=self.algo.zeta_sign_flip)
    self.clip_ctl = controllers_lib.ClipHighController(
        init_clip_high=self.algo.clip_high,
        clip_high_min=min(self.algo.clip_high_min, self.algo.clip_high),
        clip_high_max=max(self.algo.clip_high_max, self.algo.clip_high),
        factor=self.algo.clip_high_factor, law=self.algo.clip_high_law)
    self.coef_ctl = controllers_lib.EntropyCoefController(
        init_coef=self.algo.entropy_coef,
        coef_max=max(self.algo.entropy_coef_max, self.algo.entropy_coef),
        delta=self.algo.entropy_coef_delta, lr=self.algo.entropy_coef_law_lr,
        law="dual" if self.algo.entropy_control == "dual" else "step")
    self.state = self._on_mesh({
        "params": params,
        "opt_state": self.optimizer.init(params),
        "zeta": self.zeta_ctl.init(),
        "clip": self.clip_ctl.init(),
        "coef": self.coef_ctl.init(),
        "key": jax.random.key_data(jax.random.key(config.seed)),
    })
    self.meta = {"iteration": 0, "data_state": None, "initial_entropy": None,
                 "target_entropy": None, "cumulative_entropy": 0.0}
    self._init_data()
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.workdir / "checkpoints",
        max_to_keep=config.train.max_checkpoints)
    self._restore()
    self.timing = {"time/sample": 0.0, "time/score": 0.0}
    self.last_log_time = 0.0

  # -- setup

  def _on_mesh(self, tree):
    """`tree` with every array not yet on the mesh replicated over it.

    Scalars (optimizer count, controller states, PRNG key) become global
    arrays too, which multi-process steps and Orbax checkpoints need.
    """
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(getattr(x, "sharding", None),
                                  NamedSharding)
        else jax.device_put(x, replicated), tree)

  def _init_model(self):
    c = self.config
    if c.model.init_from:
      path = pathlib.Path(c.model.init_from)
      self.tokenizer = load_tokenizer(path)
    else:
      self.tokenizer = tasks_lib.char_tokenizer()
      path = distributed.on_primary_first(
          "warm start", warm_start, c, self.task, self.tokenizer,
          self.workdir / "warm_start")
    self.model = from_pretrained(path, precision=self.policy)
    self.warm_start_dir = path

  def _init_data(self):
    c = self.config
    data_dir = c.data.data_dir or str(self.workdir / "data")
    if c.task.name == "gsm8k":
      prepare = functools.partial(data_lib.prepare, self.task, data_dir,
                                  manual_dir=c.task.path)
    else:
      prepare = functools.partial(
          data_lib.prepare, self.task, data_dir, seed=c.data.seed,
          splits={"train": c.data.train_size, "test": c.data.eval_size})
    builder = distributed.on_primary_first("data", prepare)
    name = builder.builder_config.name
    self.train_source = data_lib.load(self.task, data_dir, "train",
                                      config_name=name)
    eval_source = data_lib.load(self.task, data_dir, "test", config_name=name)
    self.eval_records = [eval_source[i] for i in
                         range(min(len(eval_source), c.data.eval_size))]
    # This process loads the rows of each global batch its devices hold.
    size = c.sampling.prompts_per_batch * c.sampling.group_size
    rows = sharding.process_rows(self.mesh, size)
    local = rows.stop - rows.start
    self.batches = pipeline.prompt_batches(
        self.train_source, self.tokenizer,
        prompts_per_batch=c.sampling.prompts_per_batch,
        group_size=c.sampling.group_size, seed=c.seed,
        max_prompt_len=c.data.max_prompt_len,
        shard_index=rows.start // local, shard_count=size // local)
    self.data_iter = iter(self.batches)

  def _restore(self):
    step = self.checkpointer.latest_step()
    if step is None:
      return
    self.state, self.meta = self.checkpointer.restore(step, self.state)
    self.meta = dict(self.meta)
    if self.meta["data_state"] is not None:
      self.data_iter.set_state(self.meta["data_state"])
    _log(f"resumed from {self.checkpointer.directory} at iteration "
         f"{self.meta['iteration']}")

  def save(self) -> None:
    self.meta["data_state"] = self.data_iter.get_state()
    self.checkpointer.save(self.meta["iteration"], self.state,
                           json.loads(json.dumps(self.meta)))

  # -- sampling and scoring

  def model_at(self, params) -> Transformer:
    return nnx.merge(self.graphdef, params)

  def _sample(self, prompt_tokens, prompt_mask, key, **settings):
    """Samples from the current policy; the result on the batch sharding."""
    if not isinstance(key.sharding, NamedSharding):  # evaluation's keys
      # Replicated over the mesh, like the training keys, so that both
      # share one compiled sampler.
      key = jax.random.wrap_key_data(jax.device_put(
          np.asarray(jax.random.key_data(key)),
          NamedSharding(self.mesh, PartitionSpec())))
    result = sample(self.model_at(self.state["params"]), prompt_tokens,
                    prompt_mask, key=key,
                    max_new_tokens=self.config.sampling.max_new_tokens,
                    eos_id=self.tokenizer.eos_ids, **settings)
    return jax.device_put(result, self.batch_sharding)

  def rollout(self, batch: dict, key) -> Rollout:
    """Samples completions for a prompt batch and scores them.

    `batch` holds this process's rows of the global batch (the pipeline's
    slice); the rollout is global.
    """
    s = self.config.sampling
    t0 = time.perf_counter()
    size = s.prompts_per_batch * s.group_size
    result = self._sample(
        sharding.from_process_rows(self.mesh, batch["prompt_tokens"], size),
        sharding.from_process_rows(self.mesh, batch["prompt_mask"], size),
        key, temperature=s.temperature)
    tokens = sharding.local_rows(result.tokens)
    completion_mask = sharding.local_rows(result.completion_mask)
    t1 = time.perf_counter()
    rewards, reasons = self.gather_scores(
        *self.score(tokens, completion_mask, batch["problem"]), size)
    self.timing["time/sample"] += t1 - t0
    self.timing["time/score"] += time.perf_counter() - t1
    return Rollout(result.tokens, result.attention_mask,
                   result.completion_mask, result.logps, rewards, reasons)

  def score(self, tokens, completion_mask, problems):
    """Rewards and verdicts of completions (NumPy rows) by the verifier."""
    rewards, reasons = [], []
    eos = set(self.tokenizer.eos_ids)
    for row, mask, problem in zip(tokens, completion_mask, problems):
      ids = [int(t) for t in row[mask] if int(t) not in eos]
      reward = self.task.verify(str(problem), self.tokenizer.decode(ids))
      rewards.append(reward.score)
      reasons.append(reward.reason)
    return np.asarray(rewards, np.float32), reasons

  def gather_scores(self, rewards, reasons, size: int):
    """The whole batch's rewards and verdicts from each process's rows.

    Each process scores only the rows its devices hold; every process gets
    all `size` of them, so all take the same decisions.
    """
    if jax.process_count() == 1:
      return rewards, reasons
    codes = np.asarray([tasks_lib.REASONS.index(r) for r in reasons],
                       np.int32)
    rewards, codes = (sharding.to_host(sharding.from_process_rows(
        self.mesh, x, size)) for x in (rewards, codes))
    return rewards, [tasks_lib.REASONS[i] for i in codes]

  def collect(self, key) -> tuple[Rollout, dict]:
    """A full batch; with dynamic sampling, of informative groups only.

    Every process sees all rewards, so all choose the same groups.
    """
    s, a = self.config.sampling, self.algo
    g, want = s.group_size, s.prompts_per_batch
    draws, kept, degenerate = [], [], []  # groups as (draw, first row)
    while True:
      key, sub = jax.random.split(key)
      roll = self.rollout(next(self.data_iter), sub)
      if not a.dynamic_sampling:
        return roll, {"dynamic/draws": 1.0}
      groups = roll.rewards.reshape(-1, g)
      flat = np.all(groups == groups[:, :1], axis=1)
      for i in range(len(groups)):
        (degenerate if flat[i] else kept).append((len(draws), i * g))
      draws.append(roll)
      if len(kept) >= want or len(draws) > a.max_resample:
        break
    informative = min(len(kept), want)
    size = want * g
    rows = np.concatenate([np.arange(d * size + r, d * size + r + g)
                           for d, r in (kept + degenerate)[:want]])
    arrays = _gather_rows(self.batch_sharding,
                          [roll.arrays() for roll in draws], rows)
    rewards = np.concatenate([roll.rewards for roll in draws])[rows]
    reasons = sum((roll.reasons for roll in draws), [])
    return Rollout(*arrays, rewards, [reasons[i] for i in rows]), {
        "dynamic/draws": float(len(draws)),
        "dynamic/kept_fraction": informative / want}

  # -- one iteration

  def prepare(self, roll: Rollout) -> tuple[dict, dict]:
    """Trainer log-probs, advantages and REPO: the batch for the updates."""
    put = lambda x: jax.device_put(x, self.batch_sharding)  # noqa: E731
    rewards = roll.rewards
    return self.learner.prepare(
        self.state["params"], self.ref_params, put(roll.tokens),
        put(roll.attention_mask), put(roll.completion_mask[:, 1:]),
        put(roll.sampler_logps[:, 1:]),
        jax.make_array_from_callback(rewards.shape, self.batch_sharding,
                                     lambda index: rewards[index]),
        self.state["zeta"].zeta, self.state["clip"].clip_high)

  def update(self, batch: dict, key) -> dict:
    """`epochs` passes of `minibatches` optax steps; mean metrics."""
    a = self.algo
    n = batch["tokens"].shape[0]
    size = n // a.minibatches
    hyper = {"clip_high": self.state["clip"].clip_high,
             "entropy_coef": self.state["coef"].coef}
    sums: dict[str, float] = {}
    steps = 0
    for epoch in range(a.epochs):
      key, perm_key = jax.random.split(key)
      order = np.asarray(jax.random.permutation(perm_key, n)) if (
          a.minibatches > 1) else np.arange(n)
      for m in range(a.minibatches):
        rows = order[m * size:(m + 1) * size]
        mb = _gather_rows(self.batch_sharding, [batch], rows) if (
            a.minibatches > 1) else batch
        key, sub = jax.random.split(key)
        params, opt_state, metrics = self.learner.update(
            self.state["params"], self.state["opt_state"], mb, hyper, sub)
        metrics = {k: float(v) for k, v in metrics.items()}
        for name in ("loss", "grad_norm"):
          if not np.isfinite(metrics[name]):
            raise NonFiniteError(
                f"Non-finite {name}={metrics[name]} at iteration "
                f"{self.meta['iteration']} (epoch {epoch}, minibatch {m}); "
                f"stopping. The last good checkpoint in "
                f"{self.checkpointer.directory} is kept.")
        self.state["params"], self.state["opt_state"] = params, opt_state
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return {k: v / steps for k, v in sums.items()}

  def step_controllers(self, entropy: float) -> None:
    a, target = self.algo, self.meta["target_entropy"]
    if a.repo != "none":
      self.state["zeta"] = self.zeta_ctl.update(self.state["zeta"], entropy,
                                                target=target)
    if a.adapo:
      self.state["clip"] = self.clip_ctl.update(self.state["clip"], entropy,
                                                target=target)
    if a.entropy_control != "none":
      self.state["coef"] = self.coef_ctl.update(self.state["coef"], entropy,
                                                target=target)

  def iteration(self) -> dict[str, float]:
    """Runs one RL iteration and returns its metrics."""
    t0 = time.perf_counter()
    self.timing = {"time/sample": 0.0, "time/score": 0.0}
    key = jax.random.wrap_key_data(self.state["key"])
    key, collect_key, update_key = jax.random.split(key, 3)
    self.state["key"] = jax.random.key_data(key)
    roll, metrics = self.collect(collect_key)
    t1 = time.perf_counter()
    batch, dyn = self.prepare(roll)
    out = self.update(batch, update_key)
    t2 = time.perf_counter()
    metrics.update({k: float(v) for k, v in dyn.items()})
    # The iteration's entropy is the pre-update one from `prepare`.
    metrics.update({k: v for k, v in out.items()
                    if not k.startswith("entropy/")})
    entropy = metrics["entropy/mean"]
    metrics["controller/zeta"] = float(self.state["zeta"].zeta)
    metrics["controller/clip_high"] = float(self.state["clip"].clip_high)
    metrics["controller/entropy_coef"] = float(self.state["coef"].coef)
    self.step_controllers(entropy)
    initial = self.meta["initial_entropy"]
    self.meta["cumulative_entropy"] += entropy
    generated = int(jnp.sum(roll.completion_mask))
    metrics.update({
        "reward/mean": float(roll.rewards.mean()),
        "reward/pass@1": float(np.mean([r == "ok" for r in roll.reasons])),
        "entropy/change_pct": 100.0 * (entropy - initial) / initial,
        "entropy/cumulative": self.meta["cumulative_entropy"],
        "target_entropy": self.meta["target_entropy"],
        "completion/length": generated / len(roll.rewards),
        **self.timing,
        "time/train": t2 - t1,
        "throughput/generated_tokens_per_s": generated / max(
            self.timing["time/sample"], 1e-9),
        "throughput/train_tokens_per_s": float(jnp.sum(roll.attention_mask))
                                         * self.algo.epochs
                                         / max(t2 - t1, 1e-9),
    })
    for reason in tasks_lib.REASONS:
      metrics[f"reason/{reason}"] = float(np.mean(
          [r == reason for r in roll.reasons]))
    return metrics

  # -- evaluation

  def evaluate(self) -> dict[str, float]:
    """pass@k, reward and entropy on the held-out prompts.

    Every process builds the same evaluation batches; each scores the rows
    its devices hold, and the counts, entropies and lengths are gathered,
    so every process returns the same numbers.
    """
    c = self.config
    n = c.train.eval_samples
    records = self.eval_records
    key = jax.random.fold_in(jax.random.key(c.seed + 1), self.meta["iteration"])
    correct = np.zeros(len(records), np.int64)
    entropies, lengths = [], []
    chunk = max(1, 512 // n)  # prompts per sampler call
    for start in range(0, len(records), chunk):
      part = records[start:start + chunk]
      rows = np.repeat(np.arange(start, start + len(part)), n)
      batch = pipeline.prompt_batch(part, self.tokenizer, group_size=n,
                                    max_prompt_len=c.data.max_prompt_len)
      # Pad with copies of the last row so the batch splits over devices.
      size = -(-len(rows) // self.batch_shards) * self.batch_shards
      batch = {k: np.concatenate([v, np.repeat(v[-1:], size - len(v), 0)])
               for k, v in batch.items()}
      local = sharding.process_rows(self.mesh, size)
      result = self._sample(
          *(sharding.from_process_rows(self.mesh, batch[k][local], size)
            for k in ("prompt_tokens", "prompt_mask")),
          jax.random.fold_in(key, start), temperature=c.sampling.temperature)
      rewards, _ = self.gather_scores(*self.score(
          sharding.local_rows(result.tokens),
          sharding.local_rows(result.completion_mask),
          batch["problem"][local]), size)
      cmask = sharding.to_host(result.completion_mask)[:len(rows)]
      np.add.at(correct, rows,
                (rewards[:len(rows)] == 1.0).astype(np.int64))
      entropies.append(sharding.to_host(result.entropy)[:len(rows)][cmask])
      lengths.append(cmask.sum(1))
    out = {f"eval/pass@{k}": float(np.mean(entropo.pass_at_k(
        correct, n, int(k)))) for k in c.train.pass_k}
    out["eval/entropy"] = float(np.concatenate(entropies).mean())
    out["eval/length"] = float(np.concatenate(lengths).mean())
    return out

  # -- the loop

  def run(self) -> dict[str, float]:
    """Runs the remaining iterations; returns the last iteration's metrics.

    Record `i` of `metrics.jsonl` holds iteration i's training metrics and,
    at evaluation intervals, `eval/*` of the policy after i + 1 updates; the
    evaluation before RL is `baseline.json`. A KeyboardInterrupt saves the
    state as of the start of the interrupted iteration, so a rerun
    continues from there.
    """
    c = self.config
    logger = logger_lib.MetricLogger(
        self.workdir, total=c.train.iterations, start=self.meta["iteration"],
        tensorboard=c.train.tensorboard, progress=c.train.progress,
        enabled=jax.process_index() == 0)
    metrics: dict[str, float] = {}
    try:
      if self.meta["initial_entropy"] is None:
        self.baseline()
      while self.meta["iteration"] < c.train.iterations:
        it = self.meta["iteration"]
        snapshot = (dict(self.state), dict(self.meta),
                    self.data_iter.get_state())
        try:
          metrics = self.iteration()
        except KeyboardInterrupt:
          self.state, self.meta = snapshot[0], snapshot[1]
          self.data_iter.set_state(snapshot[2])
          self.save()
          _log(f"interrupted in iteration {it}; saved the state before it")
          raise
        self.meta["iteration"] = it + 1
        if (it + 1) % c.train.eval_every == 0 or it + 1 == c.train.iterations:
          t = time.perf_counter()
          metrics.update(self.evaluate())
          metrics["time/eval"] = time.perf_counter() - t
        t = time.perf_counter()
        logger.write(it, metrics)
        self.last_log_time = time.perf_counter() - t
        if (it + 1) % c.train.checkpoint_every == 0 or (
            it + 1 == c.train.iterations):
          self.save()
    finally:
      self.checkpointer.close()
      logger.close()
    if c.train.plots and jax.process_index() == 0:
      files = logger_lib.plot_run(self.workdir / "metrics.jsonl",
                                  self.workdir / "plots",
                                  baseline=self.meta.get("baseline"))
      _log(f"plots: {', '.join(str(f) for f in files)}")
    return metrics

  def baseline(self) -> None:
    """Evaluates the starting policy and fixes the entropy target."""
    evaluation = self.evaluate()
    h0 = evaluation["eval/entropy"]
    self.meta["baseline"] = evaluation
    self.meta["initial_entropy"] = h0
    self.meta["target_entropy"] = (self.algo.target_entropy
                                   or h0 * self.algo.target_scale)
    if jax.process_index() == 0:
      (self.workdir / "baseline.json").write_text(json.dumps(evaluation,
                                                             indent=2))
    _log(f"before RL: entropy {h0:.4f} nats/token, " + ", ".join(
        f"{k[5:]} {v:.3f}" for k, v in evaluation.items() if "pass" in k))


def train(config, workdir) -> dict[str, float]:
  """Runs (or resumes) the experiment of `config` in `workdir`."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(
        indent=2))
  trainer = Trainer(config, workdir)
  return trainer.run()
