"""Experiment configuration: defaults, algorithm presets and validation.

A run is described by one `ml_collections.ConfigDict` (`default_config()`),
with sections `task`, `model`, `warm_start`, `data`, `sampling`, `algo`,
`optim`, `train`, `mesh` and `precision`. Algorithms are named presets of
the `algo` section (`ALGORITHMS`), combined with `+`: `"dapo+repo_r"` is
DAPO with REPO-R advantages. `validate(config)` rejects a bad configuration
before any compute, naming the field. `RESUMABLE` lists the fields a
resumed run may change; `config_changes` finds the others.
"""

import json
import os

import ml_collections

from entropo import controllers as controllers_lib
from entropo import objectives as objectives_lib
from entropo import tasks as tasks_lib
from entropo.training import run_config as run_config_lib
from entropo.training import sections as sections_lib
from entropo.training import validation

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
    # Entropy bonus coefficient (0: off unless algo.entropy_coef_control.on).
    entropy_coef=0.0,
    # Every registered objective's settings (Clip-Cov's clip_cov_ratio,
    # KL-Cov's kl_cov_ratio, ...), named, documented and bounded where the
    # objective is defined (entropo/objectives/; `python -m
    # entropo.objectives` prints them).
    **objectives_lib.registry.config_defaults())
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
    # Its band, like ADAPO's and GSPO's, binds only with several optax steps
    # per batch (algo.epochs or algo.minibatches > 1): at the defaults (one
    # step) every ratio is 1 and the band changes nothing, so dapo and adapo
    # train the same run; the trainer warns (algorithm.inert_band).
    "dapo": dict(clip_high=0.28, agg="token_mean", dynamic_sampling=True),
    # GSPO (Zheng et al.): sequence-level ratio, very narrow band.
    "gspo": dict(objective="gspo", clip_low=3e-4, clip_high=4e-4),
    "gspo_token": dict(objective="gspo_token", clip_low=3e-4,
                       clip_high=4e-4),
    # GRPO plus a fixed entropy bonus, or one adapted toward the target.
    "entropy_bonus": dict(entropy_coef=5e-3),
    "entropy_adaptive": dict(entropy_coef_control=dict(on=True)),
    # Cui et al.: covariance-selected tokens detached / KL-penalised.
    "clip_cov": dict(objective="clip_cov"),
    "kl_cov": dict(objective="kl_cov"),
    # ADAPO: DAPO with epsilon_high adapted toward the target entropy.
    "adapo": dict(clip_high=0.28, agg="token_mean", dynamic_sampling=True,
                  clip_high_control=dict(on=True)),
}
# Modifiers stack on any base algorithm: "grpo+repo_r".
MODIFIERS = {
    "repo": dict(repo="repo", zeta=dict(init=1e-3, min=1e-4, max=0.05)),
    "repo_r": dict(repo="repo_r", zeta=dict(init=1e-3, min=1e-4, max=0.05)),
    "repo_d": dict(repo="repo_d", zeta=dict(init=1e-1, min=1e-3, max=10.0)),
    # Sampler/trainer mismatch corrections (docs/api.md, "Corrections"):
    # token TIS with cap 2 (Yao et al. 2025), IcePop's token masking to
    # [0.5, 5] (arXiv:2510.18855), sequence-level MIS with cap 2 (Liu, Li
    # et al. 2025), geometric-mean rejection to [0.999, 1.001] with the
    # 1e-4 token veto (verl's rollout_rs="geometric" recipe).
    "tis": dict(correction="truncate", correction_level="token",
                correction_high=2.0),
    "icepop": dict(correction="mask", correction_level="token",
                   correction_low=0.5, correction_high=5.0),
    "seq_mis": dict(correction="mask", correction_level="sequence",
                    correction_low=0.0, correction_high=2.0),
    "geo_rs": dict(correction="reject", correction_level="geometric",
                   correction_low=0.999, correction_high=1.001,
                   correction_veto=1e-4),
}


def _algo_defaults() -> dict:
  """Every field of the `algo` section; `entropo.training.Algorithm` reads
  and validates them."""
  return dict(
      name="grpo",  # the preset, e.g. "dapo+repo_r"
      **_BASE,
      # REPO (Petrenko, Lipkin et al.): the variant (none, repo, repo_r,
      # repo_d); its zeta is the section algo.zeta (below).
      repo="none",
      # REPO-R on positive advantages only; REPO-R keeping each advantage's
      # sign (clamping at 0 where |zeta log pi| > 1).
      repo_positive_only=False, repo_sign_clamp=True,
      # The controllers' sections, one per registered controller
      # (entropo/controllers/; `python -m entropo.controllers` prints them):
      # algo.zeta (REPO's zeta: start, bounds, law, gains),
      # algo.clip_high_control (ADAPO: epsilon_high adapted from
      # algo.clip_high) and algo.entropy_coef_control (the entropy bonus's
      # coefficient adapted from algo.entropy_coef). Each field is
      # documented where its controller is defined.
      **controllers_lib.registry.config_defaults(),
      # Where the importance ratio's denominator comes from (trainer or
      # sampler), and truncated importance weights between trainer and
      # sampler (a cap >= 1; 0: off; the same as correction="truncate"
      # with correction_high=tis_cap at the token level).
      old_logps="trainer", tis_cap=0.0,
      # Sampler/trainer mismatch correction (entropo.mismatch_correction,
      # docs/api.md): a stop-gradient weight of r = pi_old / pi_sampler on
      # each token's term. Mode: none, truncate (min(R, high): TIS),
      # mask (R inside [low, high], else 0: IcePop, MIS) or reject (1
      # inside, else 0).
      correction="none",
      # The ratio R the mode acts on: token (r_t), sequence (prod_t r_t)
      # or geometric (exp mean_t log r_t).
      correction_level="token",
      # The band [low, high] (truncate uses high only).
      correction_low=0.0, correction_high=2.0,
      # Reject a whole sequence if one of its tokens has r_t < veto (0: off)
      # or its mean per-token KL(sampler || trainer) exceeds max_kl nats
      # (0: off).
      correction_veto=0.0, correction_max_kl=0.0,
      # Target entropy of the controllers: 0 means "the entropy measured
      # before RL starts", times `target_scale`.
      target_entropy=0.0, target_scale=1.0,
      # Optax steps per iteration: epochs x minibatches.
      epochs=1, minibatches=1,
      # Dynamic sampling's extra draws per iteration, at most.
      max_resample=4,
  )


def preset(name: str) -> dict:
  """The `algo` fields of preset `name` (`"dapo"`, `"grpo+repo_r"`, ...)."""
  base, *mods = name.split("+")
  if base not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {base!r}; choose one of "
                     f"{sorted(ALGORITHMS)} (optionally +"
                     f"{'/+'.join(sorted(MODIFIERS))}).")
  fields = _algo_defaults()
  _merge(fields, ALGORITHMS[base])
  for mod in mods:
    if mod not in MODIFIERS:
      raise ValueError(f"Unknown algorithm modifier {mod!r} in {name!r}; "
                       f"choose one of {sorted(MODIFIERS)}.")
    _merge(fields, MODIFIERS[mod])
  fields["name"] = name
  return fields


def _merge(fields: dict, update: dict) -> None:
  """`fields.update(update)`, a nested section updated field by field."""
  for key, value in update.items():
    if isinstance(value, dict) and isinstance(fields.get(key), dict):
      fields[key] = {**fields[key], **value}
    else:
      fields[key] = value


# The old name of `preset`, kept for code that imports it from this module
# (`entropo.training.algorithm` is the module of `Algorithm`).
algorithm = preset


class AlgoSection(ConfigDict):
  """The `algo` section of a config: the fields of one preset.

  Its `name` labels the preset the section was built from; setting another
  name afterwards would change no other field, so it is refused, naming
  `algo.name` (build the config with the preset instead:
  `default_config("dapo")`, `--config=...countdown.py:dapo`).
  """

  def __setitem__(self, key, value):
    if key == "name" and "name" in self and value != self["name"]:
      validation.fail(
          "algo.name", f"is the label of the preset this section was built "
          f"from ({self['name']!r}); setting it to {value!r} would change "
          f"no other field: build the config with that preset instead "
          f"(default_config({value!r}), or --config=<file>.py:{value})")
    super().__setitem__(key, value)


def default_config(algo: str = "grpo+repo_r") -> ConfigDict:
  """The tiny-model countdown run that `make demo` launches.

  Each section's fields, defaults and comments are those of its dataclass
  in sections.py (`algo`: `_algo_defaults` above).
  """
  c = ConfigDict()
  c.seed = 0  # shuffles the data and drives sampling
  c.precision = "fp32"  # a preset of entropo.PRESETS
  for name, section in sections_lib.SECTIONS.items():
    c[name] = ConfigDict(sections_lib.defaults(section))
    if name == "sampling":
      c.algo = AlgoSection(preset(algo))
  return c


def validate(config: ConfigDict) -> run_config_lib.RunConfig:
  """The typed config; raises ValueError naming the first invalid field."""
  _check_known(config, {"seed", "precision", "algo",
                        *sections_lib.SECTIONS}, "")
  _check_algo_known(config.algo)
  try:
    preset(config.algo.name)
  except ValueError as e:
    validation.fail("algo.name", str(e))
  return run_config_lib.RunConfig.from_config(config)


def _check_known(values, known, prefix: str) -> None:
  """Every key of `values` is one of `known` (else: did you mean)."""
  unknown = sorted(set(values.keys()) - set(known))
  if unknown:
    new = moved(f"{prefix}{unknown[0]}")
    if new:
      validation.fail(f"{prefix}{unknown[0]}", f"moved to {new}")
    validation.fail(f"{prefix}{unknown[0]}", f"no such field"
                    f"{validation.did_you_mean(unknown[0], known)}; the "
                    f"fields are {sorted(known)}")


def _check_algo_known(algo) -> None:
  """Every field of `algo` and of its controllers' sections is known; an
  old flat controller field is refused naming where it moved."""
  defaults = _algo_defaults()
  _check_known(algo, defaults, "algo.")
  for name in controllers_lib.CONTROLLERS:
    if name in algo and hasattr(algo[name], "keys"):
      _check_known(algo[name], defaults[name], f"algo.{name}.")


def upgrade(saved: dict) -> dict:
  """A saved config (a parsed config.json) from before the controllers'
  sections, its flat controller fields moved into them (same values)."""
  if not isinstance(saved.get("algo"), dict):
    return saved
  return {**saved, "algo": controllers_lib.registry.upgrade(saved["algo"])}


def moved(field: str) -> str | None:
  """Where an old flat controller field is now (`algo.zeta_max` ->
  `algo.zeta.max`), or None."""
  section, _, name = field.partition(".")
  new = controllers_lib.registry.moved_fields().get(name)
  return f"algo.{new}" if section == "algo" and new else None


# The fields a run resumed in its workdir may change without
# `train.allow_config_change`: how long it runs, when it evaluates, saves
# and logs, what it displays, whether a non-finite update is skipped, and
# how it computes (attention implementation, remat and mesh change
# rounding at most, and each launch's are recorded in run.json; the
# sampler's steps per check and in-flight slots change no token). Every
# other change (algorithm, data, model, optimizer, sampling, precision,
# seed, ...)
# would make the resumed run a different experiment than its config.json
# says, so `train` refuses it. The one place this is decided.
RESUMABLE = (
    "train.iterations", "train.eval_every", "train.checkpoint_every",
    "train.max_checkpoints", "train.log_every", "train.tensorboard",
    "train.plots", "train.progress", "train.allow_config_change",
    "train.skip_non_finite", "train.packing", "train.row_buckets",
    "model.attention", "model.attention_chunk_size", "model.remat",
    "model.scan_layers", "sampling.steps_per_check",
    "sampling.in_flight_slots", "sampling.refill_rows",
    "mesh.data", "mesh.fsdp", "mesh.tensor",
)


def _flatten(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def config_changes(saved: dict, config: ConfigDict) -> list[str]:
  """`field: old -> new` for each field of `config` that differs from the
  `saved` config (a parsed config.json) and may not change on resume.

  Fields that only one of them has (added to or removed from entropo since
  the run started) are not compared.
  """
  old = _flatten(upgrade(saved))
  new = _flatten(json.loads(config.to_json_best_effort()))
  return [f"{field}: {old[field]!r} -> {new[field]!r}"
          for field in sorted(old.keys() & new.keys())
          if field not in RESUMABLE and _differ(field, old[field],
                                                new[field])]


# Fields that hold a path: a relative and an absolute spelling of one
# folder are the same value.
_PATHS = ("model.init_from", "data.data_dir", "task.path")


def _differ(field: str, old, new) -> bool:
  if field in _PATHS and old and new and isinstance(old, str) and (
      isinstance(new, str)):
    return os.path.realpath(old) != os.path.realpath(new)
  return old != new


def make_task(task_config) -> tasks_lib.Task:
  """The task of the `task` config section (a file-backed one gets `path`)."""
  settings = dict(task_config.settings)
  if tasks_lib.task_class(task_config.name).file_backed:
    settings["path"] = task_config.path
  return tasks_lib.get_task(task_config.name, **settings)
