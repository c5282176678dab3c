"""Experiment configuration: defaults, algorithm presets and validation.

A run is described by one `ml_collections.ConfigDict` (`default_config()`),
with sections `task`, `model`, `warm_start`, `data`, `sampling`, `algo`,
`optim`, `train`, `mesh` and `precision`. Algorithms are named presets of
the `algo` section (`ALGORITHMS`), combined with `+`: `"dapo+repo_r"` is
DAPO with REPO-R advantages. `validate(config)` rejects a bad configuration
before any compute, naming the field.
"""

import jax
import ml_collections

from entropo import precision as precision_lib
from entropo import tasks as tasks_lib
from entropo.training import algorithm as algorithm_lib

ConfigDict = ml_collections.ConfigDict

# Base algorithms: each sets the whole advantage / objective part of `algo`.
_BASE = dict(
    # Advantage estimator: rloo, grpo or dr_grpo (GRPO without the std).
    advantage="grpo",
    # GRPO's std: per group, over the batch, or none.
    grpo_scale="group",
    # Objective (entropo.objectives.OBJECTIVES) and its ratio band.
    objective="ppo",
    clip_low=0.2,
    clip_high=0.2,  # epsilon_high; ADAPO's controller starts here
    band="additive",  # or "reciprocal" (LOOP's [1/(1+lo), 1+hi])
    dual_clip=0.0,  # c > 1 caps negative-advantage losses at -A c; 0: off
    # Loss aggregation (entropo.AGGREGATION_MODES) and the constant of
    # seq_mean_token_sum_norm (0: max_new_tokens).
    agg="seq_mean_token_mean",
    norm=0.0,
    # DAPO's dynamic sampling: drop groups whose rewards are all equal and
    # sample again, up to algo.max_resample times, to refill the batch.
    dynamic_sampling=False,
    # KL penalty to the starting policy (0: off) and its estimator.
    kl_coef=0.0,
    kl_estimator="k3",
    # Entropy bonus coefficient (0: off unless algo.entropy_control is on).
    entropy_coef=0.0,
    # Clip-Cov: fraction of tokens detached; KL-Cov: fraction penalised and
    # the coefficient of |log pi - log pi_old| (Cui et al., 2505.22617).
    clip_cov_ratio=2e-4,
    kl_cov_ratio=2e-3,
    kl_cov_coef=1.0)
ALGORITHMS = {
    # REINFORCE with a leave-one-out baseline, on-policy (Ahmadian et al.).
    "rloo": dict(advantage="rloo", objective="reinforce", agg="token_mean"),
    # GRPO (Shao et al.): group-normalised advantages, symmetric PPO clip,
    # per-sequence token means. No KL term (as in the paper's comparisons).
    "grpo": dict(),
    # Dr.GRPO (Liu et al.): no std, token sums over a constant normaliser.
    "dr_grpo": dict(advantage="dr_grpo", agg="seq_mean_token_sum_norm"),
    # LOOP (the paper's authors' PPO): RLOO advantages, band [1/1.1, 1.1].
    "loop": dict(advantage="rloo", clip_low=0.1, clip_high=0.1,
                 band="reciprocal", agg="token_mean"),
    # DAPO (Yu et al.): clip-higher, token-level loss, dynamic sampling.
    "dapo": dict(clip_high=0.28, agg="token_mean", dynamic_sampling=True),
    # GSPO (Zheng et al.): sequence-level ratio, very narrow band.
    "gspo": dict(objective="gspo", clip_low=3e-4, clip_high=4e-4),
    "gspo_token": dict(objective="gspo_token", clip_low=3e-4,
                       clip_high=4e-4),
    # GRPO plus a fixed entropy bonus, or one adapted toward the target.
    "entropy_bonus": dict(entropy_coef=5e-3),
    "entropy_adaptive": dict(entropy_control="step"),
    # Cui et al.: covariance-selected tokens detached / KL-penalised.
    "clip_cov": dict(objective="clip_cov"),
    "kl_cov": dict(objective="kl_cov"),
    # ADAPO: DAPO with epsilon_high adapted toward the target entropy.
    "adapo": dict(clip_high=0.28, agg="token_mean", dynamic_sampling=True,
                  adapo=True),
}
# Modifiers stack on any base algorithm: "grpo+repo_r".
MODIFIERS = {
    "repo": dict(repo="repo", zeta_init=1e-3, zeta_min=1e-4, zeta_max=0.05),
    "repo_r": dict(repo="repo_r", zeta_init=1e-3, zeta_min=1e-4,
                   zeta_max=0.05),
    "repo_d": dict(repo="repo_d", zeta_init=1e-1, zeta_min=1e-3,
                   zeta_max=10.0),
}


def _algo_defaults() -> dict:
  """Every field of the `algo` section; `entropo.training.Algorithm` reads
  and validates them."""
  return dict(
      name="grpo",  # the preset, e.g. "dapo+repo_r"
      **_BASE,
      # REPO (Petrenko, Lipkin et al.): the variant (none, repo, repo_r,
      # repo_d) and its zeta controller (entropo.ZetaController): starting
      # value, bounds, law (doubling or pi), sign flip, PI gains.
      repo="none", zeta_init=1e-3, zeta_min=1e-4, zeta_max=0.05,
      zeta_law="doubling", zeta_sign_flip=True, zeta_kp=2.0, zeta_ki=0.2,
      # REPO-R on positive advantages only.
      repo_positive_only=False,
      # ADAPO: adapt epsilon_high (entropo.ClipHighController) from
      # algo.clip_high within [clip_high_min, clip_high_max] (widened to
      # include clip_high); law multiplicative (by factor) or pi (gains).
      adapo=False, clip_high_min=0.2, clip_high_max=0.4,
      clip_high_factor=1.1, clip_high_law="multiplicative",
      clip_high_kp=2.0, clip_high_ki=0.2,
      # Adaptive entropy-bonus coefficient (entropo.EntropyCoefController):
      # none, step (+/- delta) or dual (ascent at rate lr), from
      # algo.entropy_coef up to entropy_coef_max.
      entropy_control="none", entropy_coef_max=0.1,
      entropy_coef_delta=1e-3, entropy_coef_law_lr=0.01,
      # Where the importance ratio's denominator comes from (trainer or
      # sampler), and truncated importance weights between trainer and
      # sampler (a cap >= 1; 0: off).
      old_logps="trainer", tis_cap=0.0,
      # Target entropy of the controllers: 0 means "the entropy measured
      # before RL starts", times `target_scale`.
      target_entropy=0.0, target_scale=1.0,
      # Optax steps per iteration: epochs x minibatches.
      epochs=1, minibatches=1,
      # Dynamic sampling's extra draws per iteration, at most.
      max_resample=4,
  )


def algorithm(name: str) -> dict:
  """The `algo` fields of `name` (`"dapo"`, `"grpo+repo_r"`, ...)."""
  base, *mods = name.split("+")
  if base not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {base!r}; choose one of "
                     f"{sorted(ALGORITHMS)} (optionally +"
                     f"{'/+'.join(sorted(MODIFIERS))}).")
  fields = _algo_defaults()
  fields.update(ALGORITHMS[base])
  for mod in mods:
    if mod not in MODIFIERS:
      raise ValueError(f"Unknown algorithm modifier {mod!r} in {name!r}; "
                       f"choose one of {sorted(MODIFIERS)}.")
    fields.update(MODIFIERS[mod])
  fields["name"] = name
  return fields


def default_config(algo: str = "grpo+repo_r") -> ConfigDict:
  """The tiny-model countdown run that `make demo` launches."""
  c = ConfigDict()
  c.seed = 0
  c.precision = "fp32"
  c.task = ConfigDict(dict(name="countdown", settings=ConfigDict(
      dict(num_count=3, max_value=12, max_target=50)), path=""))
  c.model = ConfigDict(dict(
      init_from="", hidden_size=128, intermediate_size=384, num_layers=3,
      num_heads=4, num_kv_heads=2, max_position_embeddings=64,
      rope_theta=10000.0))
  c.warm_start = ConfigDict(dict(
      steps=600, batch_size=64, learning_rate=3e-3, num_problems=4000,
      samples_per_problem=4, spread=0.6, seed=1_000_003))
  # `data.seed` generates the problems (train and held-out splits); the
  # run's `seed` shuffles them and drives sampling, so runs that differ only
  # in `seed` share one dataset and one held-out set.
  c.data = ConfigDict(dict(train_size=20_000, eval_size=64, max_prompt_len=16,
                           data_dir="", seed=0))
  c.sampling = ConfigDict(dict(
      prompts_per_batch=16, group_size=8, max_new_tokens=16,
      temperature=1.0))
  c.algo = ConfigDict(algorithm(algo))
  c.optim = ConfigDict(dict(learning_rate=1e-4, b1=0.9, b2=0.99,
                            weight_decay=0.0, max_grad_norm=1.0))
  c.train = ConfigDict(dict(
      iterations=60, eval_every=20, eval_samples=16, pass_k=(1, 4, 16),
      checkpoint_every=20, max_checkpoints=2, log_every=1,
      tensorboard=True, plots=True, progress=True))
  c.mesh = ConfigDict(dict(data=1, fsdp=1, tensor=1))
  return c


def _fail(field: str, message: str):
  raise ValueError(f"Invalid config: {field}: {message}")


def _choice(config, field, options):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in options:
    _fail(field, f"{value!r} is not one of {list(options)}")


def _positive(config, field, *, allow_zero=False, integer=False):
  value = config
  for part in field.split("."):
    value = value[part]
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  if not ok or isinstance(value, bool) or value < 0 or (
      value == 0 and not allow_zero):
    kind = "int" if integer else "number"
    sign = ">= 0" if allow_zero else "> 0"
    _fail(field, f"must be a {kind} {sign}; got {value!r}")


def validate(config: ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of `config`."""
  try:
    precision_lib.get_precision(config.precision)
  except ValueError as e:
    _fail("precision", str(e))
  a = config.algo
  algorithm_lib.Algorithm.from_config(a)
  s = config.sampling
  for field in ("prompts_per_batch", "group_size", "max_new_tokens"):
    _positive(config, f"sampling.{field}", integer=True)
  _positive(config, "sampling.temperature")
  if s.group_size < 2:
    _fail("sampling.group_size", f"group-relative advantages need >= 2 "
          f"completions per prompt; got {s.group_size}")
  batch = s.prompts_per_batch * s.group_size
  if batch % a.minibatches:
    _fail("algo.minibatches", f"{a.minibatches} does not divide the batch "
          f"of {batch} sequences (prompts_per_batch x group_size)")
  devices = config.mesh.data * config.mesh.fsdp
  if (batch // a.minibatches) % devices:
    _fail("mesh.data", f"the minibatch of {batch // a.minibatches} "
          f"sequences does not split over data x fsdp = {devices} devices")
  for field in ("data", "fsdp", "tensor"):
    _positive(config, f"mesh.{field}", integer=True)
  size = config.mesh.data * config.mesh.fsdp * config.mesh.tensor
  if size > jax.device_count():
    _fail("mesh", f"data x fsdp x tensor = {size} exceeds the "
          f"{jax.device_count()} devices")
  processes = jax.process_count()
  if processes > 1 and size != jax.device_count():
    _fail("mesh", f"a run of {processes} processes uses all "
          f"{jax.device_count()} devices; data x fsdp x tensor = {size}")
  if s.prompts_per_batch % processes:
    _fail("sampling.prompts_per_batch", f"{s.prompts_per_batch} prompts do "
          f"not split over {processes} processes (each loads an equal slice "
          f"of every batch, whole groups)")
  for field in ("iterations", "eval_every", "eval_samples", "checkpoint_every",
                "log_every"):
    _positive(config, f"train.{field}", integer=True)
  if any(k > config.train.eval_samples or k < 1 for k in config.train.pass_k):
    _fail("train.pass_k", f"every k must be in [1, eval_samples="
          f"{config.train.eval_samples}]; got {tuple(config.train.pass_k)}")
  _positive(config, "data.seed", allow_zero=True, integer=True)
  _positive(config, "optim.learning_rate")
  _positive(config, "warm_start.steps", allow_zero=True, integer=True)
  if not 0 <= config.warm_start.spread <= 1:
    _fail("warm_start.spread", f"must be in [0, 1]; got "
          f"{config.warm_start.spread}")
  name = config.task.name
  if name not in tasks_lib.TASKS:
    _fail("task.name", f"{name!r} is not one of {sorted(tasks_lib.TASKS)}")
  if tasks_lib.TASKS[name].file_backed and not config.task.path:
    _fail("task.path", f"the {name} task reads local JSONL files; set "
          "--config.task.path=<dir with train.jsonl and test.jsonl>")
  if tasks_lib.TASKS[name].file_backed and not config.model.init_from:
    _fail("model.init_from", "the tiny warm start is for the tasks "
          f"generated in code; start {name} from a Hugging Face checkpoint "
          "with --init_from=<dir>")


def make_task(task_config) -> tasks_lib.Task:
  """The task of the `task` config section (a file-backed one gets `path`)."""
  settings = dict(task_config.settings)
  if tasks_lib.TASKS[task_config.name].file_backed:
    settings["path"] = task_config.path
  return tasks_lib.get_task(task_config.name, **settings)
