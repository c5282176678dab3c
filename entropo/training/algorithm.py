"""`Algorithm`: an RL algorithm's whole wiring, built once from the config.

An `Algorithm` owns the advantage estimator, the REPO variant, the
objective and its arguments, the regularisers and its controllers. The
`Learner` (step.py) and the loop only call it:

* `advantages(rewards, logps, entropy, mask, hyper, group_size=)`: the
  estimator, then the REPO variant (jit-able);
* `loss(logps, entropy, batch, hyper, key, norm=, precision=)`: the
  objective plus the regularisers that are on (jit-able);
* `init_controllers()`, `step_controllers(states, entropy, target=)` and
  `hyperparameters(states, fixed)`: `{name: controller}` over the hyperparameters
  they move. A hyperparameter no controller moves keeps its configured
  value; all of them (`zeta`, `clip_high`, `entropy_coef`) are traced
  inputs of the compiled steps, so moving one never recompiles.

To add an objective, write its module in `entropo/objectives/`: it
registers its name and its settings, which become fields of the `algo`
config section, checked here and handed to `policy_loss`. To add a
controller, write its module in `entropo/controllers/`: it registers its
config section `algo.<name>` (typed, documented, bounded fields), the
hyperparameter it moves, how it is switched on and its build (which checks
the relations between its fields); `from_config` reads them from there.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from entropo import _checks
from entropo import advantages as advantages_lib
from entropo import controllers as controllers_lib
from entropo import corrections as corrections_lib
from entropo import masking
from entropo import objectives
from entropo import regularizers
from entropo import repo as repo_lib
from entropo.training import validation

ADVANTAGES = ("rloo", "grpo", "dr_grpo")
REPO_VARIANTS = ("none", "repo", "repo_r", "repo_d")
OLD_LOGPS = ("trainer", "sampler")
# The sampler/trainer mismatch correction's fields (entropo.corrections).
CORRECTION_FIELDS = ("correction", "correction_level", "correction_low",
                     "correction_high", "correction_veto",
                     "correction_max_kl")
# The hyperparameters controllers may move, each with the config field that
# holds its value when no controller does (entropo/controllers/registry.py).
HYPERPARAMETERS = controllers_lib.HYPERPARAMETERS


def _fail(field: str, message: str):
  validation.fail(f"algo.{field}", message)


def _check_choice(field, value, options):
  _checks.check_choice(f"algo.{field}", value, options, fail=validation.fail)


def _check_number(field, value, **options):
  validation.check_number(f"algo.{field}", value, **options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
  """The advantage, objective, regularisers and controllers of a run.

  Build it with `Algorithm.from_config(config.algo)`; the fields are those
  of the `algo` config section (documented in config.py), with "off"
  spelled one way: `repo=None`, `dual_clip=None`, `tis_cap=None`,
  `correction_veto=None`, `correction_max_kl=None`, and a controller is on
  when the hyperparameter it moves is in `controllers` (the controllers'
  sections `algo.<name>` are read from entropo/controllers/registry.py).
  `tis_cap = c` is the correction `truncate` at the token level with
  `correction_high = c` (one code path).
  """

  name: str
  advantage: str
  grpo_scale: str
  repo: str | None
  repo_positive_only: bool
  repo_sign_clamp: bool
  objective: str
  clip_low: float
  band: str
  dual_clip: float | None
  agg: str
  norm: float | None
  # The objective's registered settings (entropo/objectives/registry.py),
  # from the `algo` fields of the same names.
  settings: objectives.Settings
  kl_coef: float
  kl_estimator: str
  entropy_bonus: bool
  old_logps: str
  tis_cap: float | None
  # The sampler/trainer mismatch correction (entropo.mismatch_correction):
  # mode, level, band and the two sequence rejections.
  correction: str = "none"
  correction_level: str = "token"
  correction_low: float = 0.0
  correction_high: float = 2.0
  correction_veto: float | None = None
  correction_max_kl: float | None = None
  # {hyperparameter: controller}, only the enabled ones.
  controllers: Mapping[str, Any]
  # Every hyperparameter of HYPERPARAMETERS at its configured value.
  initial: Mapping[str, float]
  target_entropy: float
  target_scale: float
  epochs: int
  minibatches: int
  dynamic_sampling: bool
  max_resample: int

  def __post_init__(self):
    _check_choice("advantage", self.advantage, ADVANTAGES)
    _check_choice("grpo_scale", self.grpo_scale, advantages_lib.GRPO_SCALES)
    _check_choice("objective", self.objective, objectives.OBJECTIVES)
    _check_choice("band", self.band, objectives.BANDS)
    _check_choice("agg", self.agg, masking.AGGREGATION_MODES)
    _check_choice("kl_estimator", self.kl_estimator,
                  regularizers.KL_ESTIMATORS)
    _check_choice("repo", self.repo or "none", REPO_VARIANTS)
    _check_choice("old_logps", self.old_logps, OLD_LOGPS)
    _check_number("clip_low", self.clip_low, allow_zero=True)
    if self.band == "additive" and not self.clip_low < 1:
      _fail("clip_low", f"must be in [0, 1) with band='additive' (the "
            f"band's lower edge is 1 - clip_low); got {self.clip_low}")
    _check_number("clip_high", self.initial["clip_high"], allow_zero=True)
    for field in ("kl_coef", "target_entropy"):
      _check_number(field, getattr(self, field), allow_zero=True)
    _check_number("entropy_coef", self.initial["entropy_coef"],
                  allow_zero=True)
    if self.dual_clip is not None and not self.dual_clip > 1:
      _fail("dual_clip", f"must be > 1 (or 0: off); got {self.dual_clip}")
    if self.tis_cap is not None and not self.tis_cap >= 1:
      _fail("tis_cap", f"must be >= 1 (or 0: off); got {self.tis_cap}")
    self._check_correction()
    for field in ("epochs", "minibatches"):
      _check_number(field, getattr(self, field), integer=True)
    _check_number("max_resample", self.max_resample, allow_zero=True,
                  integer=True)

  def _check_correction(self):
    _check_choice("correction", self.correction, corrections_lib.MODES)
    _check_choice("correction_level", self.correction_level,
                  corrections_lib.LEVELS)
    if self.tis_cap is not None and self.correction != "none":
      _fail("tis_cap", f"is the correction 'truncate' at the token level; "
            f"set it or algo.correction, not both (correction="
            f"{self.correction!r})")
    corrected = self.corrected
    if corrected and self.old_logps == "sampler":
      _fail("old_logps", "is 'sampler', so the PPO ratio already divides by "
            "the sampler's probabilities; a mismatch correction would count "
            "the mismatch twice: use old_logps='trainer'")
    try:
      corrections_lib.check_settings(**self.correction_settings())
    except ValueError as e:
      _fail("correction", str(e))

  @property
  def corrected(self) -> bool:
    """Whether a sampler/trainer mismatch correction is on (TIS too)."""
    return (self.tis_cap is not None or self.correction != "none"
            or self.correction_veto is not None
            or self.correction_max_kl is not None)

  def correction_settings(self) -> dict:
    """The keyword arguments of `entropo.mismatch_correction`."""
    if self.tis_cap is not None:
      return dict(level="token", mode="truncate", low=0.0,
                  high=self.tis_cap, veto=None, max_kl=None)
    return dict(level=self.correction_level, mode=self.correction,
                low=self.correction_low, high=self.correction_high,
                veto=self.correction_veto, max_kl=self.correction_max_kl)

  @classmethod
  def from_config(cls, algo) -> "Algorithm":
    """The algorithm of an `algo` config section; raises naming a field."""
    for field in ("dual_clip", "tis_cap", "norm", "correction_low",
                  "correction_high", "correction_veto", "correction_max_kl"):
      _check_number(field, algo[field], allow_zero=True)
    _check_ranges(algo)
    sections = _controller_sections(algo)
    algorithm = cls(
        name=algo.name, advantage=algo.advantage, grpo_scale=algo.grpo_scale,
        repo=None if algo.repo == "none" else algo.repo,
        repo_positive_only=algo.repo_positive_only,
        repo_sign_clamp=algo.repo_sign_clamp,
        objective=algo.objective, clip_low=algo.clip_low, band=algo.band,
        dual_clip=algo.dual_clip or None, agg=algo.agg,
        norm=algo.norm or None,
        settings=_objective_settings(algo),
        kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator,
        entropy_bonus=algo.entropy_coef > 0,
        old_logps=algo.old_logps, tis_cap=algo.tis_cap or None,
        correction=algo.correction, correction_level=algo.correction_level,
        correction_low=algo.correction_low,
        correction_high=algo.correction_high,
        correction_veto=algo.correction_veto or None,
        correction_max_kl=algo.correction_max_kl or None,
        controllers={},
        initial={k: _lookup(algo, v) for k, v in HYPERPARAMETERS.items()},
        target_entropy=algo.target_entropy, target_scale=algo.target_scale,
        epochs=algo.epochs, minibatches=algo.minibatches,
        dynamic_sampling=algo.dynamic_sampling,
        max_resample=algo.max_resample)
    # The controllers last, so that a bad plain field is named first; one
    # that moves entropy_coef turns the entropy bonus on.
    controllers = _controllers(algo, sections, algorithm.initial)
    return dataclasses.replace(
        algorithm, controllers=controllers,
        entropy_bonus=algorithm.entropy_bonus or "entropy_coef" in controllers)

  # -- controllers

  def init_controllers(self) -> dict[str, Any]:
    """`{name: state}` of the enabled controllers."""
    return {name: c.init() for name, c in self.controllers.items()}

  def step_controllers(self, states: dict, entropy, *, target) -> dict:
    """Each enabled controller's state after one measured `entropy`."""
    return {name: self.controllers[name].update(states[name], entropy,
                                                target=target)
            for name in states}

  def fixed_hyperparameters(self) -> dict[str, np.ndarray]:
    """float32 values of the hyperparameters no controller moves."""
    return {name: np.float32(value) for name, value in self.initial.items()
            if name not in self.controllers}

  def hyperparameters(self, states: dict, fixed: dict) -> dict[str, Any]:
    """Every hyperparameter: `fixed` ones, then each controller's value
    (read by name: `controller.value(state)`)."""
    return {**fixed, **{name: self.controllers[name].value(state)
                        for name, state in states.items()}}

  # -- the maths of one iteration (jit-able)

  def advantages(self, rewards, logps, entropy, mask, hyper, *,
                 group_size: int) -> jax.Array:
    """`[B, T]` advantages of `rewards: [B]`, then the REPO variant.

    `logps`, `entropy` and `mask` are `[B, T]`; REPO uses `hyper["zeta"]`.
    """
    if self.advantage == "rloo":
      adv = advantages_lib.rloo_advantages(rewards, group_size=group_size)
    else:
      scale = "none" if self.advantage == "dr_grpo" else self.grpo_scale
      adv = advantages_lib.grpo_advantages(rewards, group_size=group_size,
                                           scale=scale)
    adv = jnp.broadcast_to(adv[:, None], mask.shape)
    zeta = hyper["zeta"]
    if self.repo == "repo_r":
      adv = repo_lib.repo_r_advantages(adv, logps, zeta=zeta,
                                       positive_only=self.repo_positive_only,
                                       sign_clamp=self.repo_sign_clamp)
    elif self.repo == "repo":
      adv = repo_lib.repo_advantages(adv, logps, entropy, beta=zeta)
    elif self.repo == "repo_d":
      adv = repo_lib.repo_d_advantages(adv, logps, entropy, mask, zeta=zeta)
    return adv

  def importance_weights(self, logps, sampler_logps, mask
                         ) -> tuple[jax.Array, dict]:
    """The mismatch correction's `[B, T]` weights and its metrics.

    `logps` are the trainer's log-probs at the iteration's parameters
    (pi_old), so the weights correct the behaviour-to-old ratio
    `pi_old / pi_sampler`; the loss multiplies the objective's per-token
    term (and so its clipped ratio `pi_theta / pi_old`) by them. Ones and
    no metrics when no correction is on.
    """
    if not self.corrected:
      return jnp.ones_like(logps), {}
    return corrections_lib.mismatch_correction(
        logps, sampler_logps, mask, **self.correction_settings())

  def loss(self, logps, entropy, batch: dict, hyper: dict, key, *,
           norm: float, precision) -> tuple[jax.Array, dict]:
    """The objective plus the regularisers that are on, and their metrics.

    `logps` and `entropy` are the `[B, T]` float32 of the model being
    differentiated; `batch` holds the other per-token arrays (`mask`,
    `old_logps`, `advantages`, `ref_logps`, `importance_weights`).
    """
    mask = batch["mask"]
    loss, metrics = objectives.policy_loss(
        logps, batch["old_logps"], batch["advantages"], mask,
        objective=self.objective, clip_low=self.clip_low,
        clip_high=hyper["clip_high"], dual_clip=self.dual_clip,
        band=self.band, agg=self.agg, norm=norm, key=key,
        settings=self.settings,
        importance_weights=batch["importance_weights"], entropy=entropy,
        precision=precision)
    if self.entropy_bonus:
      bonus, bonus_metrics = regularizers.entropy_bonus(
          entropy, mask, coef=hyper["entropy_coef"], mode=self.agg,
          norm=norm)
      loss = loss + bonus
      metrics.update(bonus_metrics)
    if self.kl_coef > 0:
      kl, kl_metrics = regularizers.kl_penalty(
          logps, batch["ref_logps"], mask, coef=self.kl_coef,
          estimator=self.kl_estimator, mode=self.agg, norm=norm)
      loss = loss + kl
      metrics.update(kl_metrics)
    return loss, metrics


# Fields of `algo` checked by `_check_ranges` alone: (low, high, open at
# low); None is unbounded.
_RANGES = {"target_scale": (0, None, True)}
_BOOLS = ("dynamic_sampling", "repo_positive_only", "repo_sign_clamp")


def _check_ranges(algo) -> None:
  """The booleans and the numeric fields of `_RANGES`, naming the field."""
  for field in _BOOLS:
    validation.check_bool(f"algo.{field}", algo[field])
  for field, (low, high, low_open) in _RANGES.items():
    validation.check_range(f"algo.{field}", algo[field], low, high,
                           low_open=low_open)


def _objective_settings(algo) -> objectives.Settings:
  """The selected objective's settings; every registered objective's
  settings are checked (a bad value is refused even when its objective is
  not the one selected), naming `algo.<field>`."""
  values = {name: algo[name]
            for name in objectives.registry.setting_fields()}
  chosen = None
  for name in objectives.OBJECTIVE_TERMS:
    try:
      settings = objectives.registry.settings_of(name, values)
    except objectives.SettingError as e:
      _fail(e.field, e.message)
    if name == algo.objective:
      chosen = settings
  return chosen


def _lookup(algo, path: str):
  """The value of `algo` at a dotted `path` (`zeta.init`)."""
  for name in path.split("."):
    algo = algo[name]
  return algo


def _controller_sections(algo) -> dict[str, Any]:
  """`{name: section}` of every registered controller, switched on or not:
  each field's declared values checked, naming `algo.<name>.<field>`."""
  out = {}
  for name, controller in controllers_lib.CONTROLLERS.items():
    values = algo[name] if name in algo else {}
    if not hasattr(values, "keys"):
      _fail(name, f"is the section of the {name} controller, not a value; "
            f"set its fields: algo.{name}.<field> (got {values!r})")
    values = dict(values)
    known = [f.name for f in dataclasses.fields(controller.section)]
    unknown = sorted(set(values) - set(known))
    if unknown:
      _fail(f"{name}.{unknown[0]}", f"no such field"
            f"{validation.did_you_mean(unknown[0], known)}; the fields are "
            f"{known}")
    try:
      out[name] = controller.section(**values)
    except controllers_lib.registry.SettingError as e:
      _fail(f"{name}.{e.field}", e.message)
  return out


def _controllers(algo, sections: dict, initial: Mapping[str, float]
                 ) -> dict[str, Any]:
  """`{hyperparameter: controller}` of the controllers `algo` switches on.

  Each controller's build checks the relations between its fields, naming
  the field that breaks one; a starting value outside its controller's
  bounds is refused (the bounds are never widened to include it). Two
  controllers may not move one hyperparameter.
  """
  out, by = {}, {}
  for name, controller in controllers_lib.CONTROLLERS.items():
    section = sections[name]
    if not controller.enabled(section, algo):
      continue
    hyper = controller.moves
    if hyper in out:
      _fail(name, f"moves {hyper}, which algo.{by[hyper]} moves already; "
            f"switch one of them off")
    start_field = HYPERPARAMETERS[hyper]
    try:
      out[hyper] = controller.build(section, initial[hyper])
    except controllers_lib.registry.SettingError as e:
      field = (start_field if e.field == controllers_lib.registry.START
               else f"{name}.{e.field}")
      _fail(field, e.message)
    except ValueError as e:  # the controller's own check
      _fail(start_field, str(e))
    by[hyper] = name
  return out


# Objectives whose ratio band (`clip_low` / `clip_high`) shapes the update.
CLIPPED_OBJECTIVES = tuple(name for name, objective
                           in objectives.OBJECTIVE_TERMS.items()
                           if objective.uses_band)


def on_policy_single_step(algorithm: Algorithm) -> bool:
  """One optax step per batch (epochs = minibatches = 1) with the old
  log-probs recomputed by the trainer: pi_old is the policy being updated,
  so every importance ratio is exactly 1 and no band ever clips."""
  return (algorithm.epochs * algorithm.minibatches == 1
          and algorithm.old_logps == "trainer")


def inert_band(algorithm: Algorithm) -> str | None:
  """Why `algorithm`'s distinguishing band never binds, or None.

  Only for bands that make a preset what it is (an asymmetric clip-higher
  such as DAPO's, ADAPO's adapted epsilon_high, GSPO's narrow band, a dual
  clip): under `on_policy_single_step` they change nothing, and presets
  that differ only there train the same run. GRPO's symmetric clip, inert
  in the same way, is the usual one-step GRPO and is not reported.
  """
  if (algorithm.objective not in CLIPPED_OBJECTIVES
      or not on_policy_single_step(algorithm)):
    return None
  if "clip_high" in algorithm.controllers:
    what = "ADAPO's adapted epsilon_high"
  elif algorithm.objective != "ppo":
    what = f"{algorithm.objective}'s band"
  elif algorithm.initial["clip_high"] != algorithm.clip_low:
    what = "the asymmetric band (clip_high != clip_low)"
  elif algorithm.dual_clip is not None:
    what = "the dual clip"
  else:
    return None
  return (f"algo {algorithm.name!r}: with algo.epochs = algo.minibatches = 1 "
          f"and old log-probs from the trainer every importance ratio is 1, "
          f"so {what} never clips and changes nothing (countdown.py:adapo "
          f"and :dapo train the same run); for a band that binds take "
          f"several optax steps per batch, e.g. --config.algo.minibatches=4")
