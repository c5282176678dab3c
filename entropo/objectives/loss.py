"""`policy_loss`: one objective's per-token terms, weighted and aggregated.

The objectives live one family per module (`ppo`, `gspo`, `covariance`,
`reinforce`, ..., over the shared `ratio`) and register there (`registry`:
name, terms function, typed settings); `policy_loss` checks the inputs,
cleans the padding, looks the objective up in `OBJECTIVE_TERMS`, applies
the optional importance weights and reduces the terms with `aggregate`, so
the loss is the same however the batch is sharded (`axis_name`).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo import masking
from entropo import precision as precision_lib
from entropo.objectives import ratio as ratio_lib
from entropo.objectives import registry

registry.load_all()
# name -> `registry.Objective` (terms function, settings class, ...); to add
# an objective, write its module in entropo/objectives/ (see registry.py).
OBJECTIVE_TERMS = registry.OBJECTIVE_TERMS
OBJECTIVES = tuple(OBJECTIVE_TERMS)


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    objective: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    band: str = "additive",
    agg: str = "token_mean",
    norm: float | None = None,
    axis_name=None,
    key: jax.Array | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_ratio: float = 2e-4,
    kl_cov_coef: float = 1.0,
    importance_weights: jax.Array | None = None,
    entropy: jax.Array | None = None,
    precision=None,
    settings: registry.Settings | Mapping | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The policy-gradient loss of `objective` and its metrics.

  Args:
    logps: `[B, T]` float, log pi_theta of the taken tokens (differentiated).
    old_logps: `[B, T]` float, log pi_old of the same tokens (stop-gradient).
    advantages: `[B]` or `[B, T]` float (stop-gradient).
    mask: `[B, T]` bool, valid completion tokens.
    objective: one of `OBJECTIVES` (`reinforce`, `ppo`, `gspo`, `gspo_token`,
      `clip_cov`, `kl_cov`, and any other registered objective; the
      formulas are in their modules, `registry.table()` lists them).
    clip_low, clip_high, band: the ratio band (`clip_band`); `clip_high` may
      be traced (ADAPO's controller state). Both are >= 0: a negative
      concrete value raises ValueError.
    dual_clip: optional c > 1 capping negative-advantage losses at `-A c`.
    agg, norm: the aggregation mode and constant (see `aggregate`).
    axis_name: optional mesh axis the batch is split over.
    key: PRNG key, required by `clip_cov` (token choice).
    clip_cov_ratio, clip_cov_bounds: fraction of valid tokens Clip-Cov
      detaches and the covariance window of candidates.
    kl_cov_ratio, kl_cov_coef: fraction of valid tokens KL-Cov penalises and
      its coefficient on `|log pi - log pi_old|`. These four keywords fill
      Clip-Cov's and KL-Cov's settings when `settings` is None.
    importance_weights: optional `[B, T]` per-token weights (stop-gradient).
    entropy: optional `[B, T]` token entropy, only for metrics.
    precision: a `Precision` or preset name (log-ratio dtype and clamp).
    settings: the objective's settings: an instance of its registered
      `Settings` class or a mapping of its fields (missing ones take their
      defaults); None builds them from the keywords above and defaults.
      A bad value raises `registry.SettingError` (a ValueError) naming it.

  Returns:
    `(loss, metrics)`: a float32 scalar and a flat dict of float32 scalars
    (`pg/loss`, `pg/clipfrac_low`, `pg/clipfrac_high`, `adv/mean`, ...).
  """
  _check_inputs(logps, old_logps, advantages, mask, importance_weights,
                objective=objective, agg=agg, dual_clip=dual_clip, key=key,
                clips=(clip_low, clip_high))
  x = _token_inputs(logps, old_logps, advantages, mask,
                    band=ratio_lib.clip_band(clip_low, clip_high, band),
                    dual_clip=dual_clip, axis_name=axis_name,
                    precision=precision_lib.get_precision(precision))
  entry = OBJECTIVE_TERMS[objective]
  if settings is None:
    settings = registry.settings_of(objective, dict(
        clip_cov_ratio=clip_cov_ratio, clip_cov_bounds=clip_cov_bounds,
        kl_cov_ratio=kl_cov_ratio, kl_cov_coef=kl_cov_coef))
  settings = _objective_settings(entry, settings)
  if entry.needs_key:
    out = entry.terms(x, settings, key=key)
  else:
    out = entry.terms(x, settings)
  terms = out.terms
  if importance_weights is not None:
    terms = terms * jax.lax.stop_gradient(
        jnp.where(mask, importance_weights.astype(jnp.float32), 0.0))
  loss = masking.aggregate(terms, mask, mode=agg, axis_name=axis_name,
                           norm=norm)
  return loss, _metrics(x, out, loss, entropy)


def _check_inputs(logps, old_logps, advantages, mask, importance_weights, *,
                  objective, agg, dual_clip, key, clips):
  _checks.check_choice("objective", objective, OBJECTIVES)
  _check_clips(clip_low=clips[0], clip_high=clips[1])
  _checks.check_choice("agg", agg, masking.AGGREGATION_MODES)
  _checks.check_float("logps", logps)
  _checks.check_float("old_logps", old_logps)
  _checks.check_float("advantages", advantages)
  _checks.check_rank("logps", logps, 2)
  _checks.check_nonempty("logps", logps)
  _checks.check_same_shape(logps=logps, old_logps=old_logps)
  _checks.check_mask(mask, logps.shape)
  _checks.check_rank("advantages", advantages, (1, 2))
  if advantages.shape not in (logps.shape, logps.shape[:1]):
    raise ValueError(
        f"advantages must be [B] or [B, T] = {logps.shape}; got "
        f"{advantages.shape}."
    )
  if importance_weights is not None:
    _checks.check_same_shape(logps=logps,
                             importance_weights=importance_weights)
  if dual_clip is not None and isinstance(dual_clip, (int, float)):
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be > 1; got {dual_clip}.")
  if OBJECTIVE_TERMS[objective].needs_key and key is None:
    raise ValueError(f"objective={objective!r} needs key= (a PRNG key).")


def _objective_settings(entry: registry.Objective, settings
                        ) -> registry.Settings:
  """`settings` as an instance of `entry.settings` (a mapping is built)."""
  if isinstance(settings, entry.settings):
    return settings
  if isinstance(settings, Mapping):
    own = {f for f in entry.settings.__dataclass_fields__}
    unknown = sorted(set(settings) - own)
    if unknown:
      raise ValueError(f"objective {entry.name!r} has no setting "
                       f"{unknown[0]!r}; its settings are {sorted(own)}.")
    return entry.settings(**settings)
  raise TypeError(f"settings of objective {entry.name!r} must be a "
                  f"{entry.settings.__name__} or a mapping; got "
                  f"{type(settings).__name__}.")


def _check_clips(**clips) -> None:
  """Concrete clip widths are >= 0 (a traced one, e.g. ADAPO's, is not
  checked)."""
  for name, value in clips.items():
    if isinstance(value, (int, float)) and not value >= 0:
      raise ValueError(f"{name} must be >= 0; got {value}.")


def _token_inputs(logps, old_logps, advantages, mask, *, band, dual_clip,
                  axis_name, precision) -> ratio_lib.TokenInputs:
  """float32 inputs, advantages broadcast to `[B, T]`, padding zeroed."""
  logps = logps.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_logps.astype(jnp.float32))
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  adv = jnp.broadcast_to(adv if adv.ndim == 2 else adv[:, None], logps.shape)
  # Padding may hold anything (-inf - -inf is nan): zero it before any
  # arithmetic, or a non-finite padded value turns the zero cotangent of a
  # masked token into nan in the backward pass.
  logps = jnp.where(mask, logps, 0.0)
  old = jnp.where(mask, old, 0.0)
  adv = jnp.where(mask, adv, 0.0)
  lo, hi = band
  return ratio_lib.TokenInputs(logps, old, adv, mask, lo, hi, dual_clip,
                               precision, axis_name)


def _metrics(x: ratio_lib.TokenInputs, out: ratio_lib.PolicyTerms, loss,
             entropy) -> dict:
  """The objective's, the ratio's and the advantages' metrics, and the loss."""
  metrics = {**out.metrics, **ratio_lib.ratio_metrics(x, out.ratio,
                                                      out.log_ratio),
             **advantage_metrics(x.advantages, x.mask,
                                 axis_name=x.axis_name)}
  if entropy is not None:
    metrics["entropy/mean"] = masking.masked_mean(entropy, x.mask,
                                                  axis_name=x.axis_name)
  metrics["pg/loss"] = loss
  return masking.scalar_metrics(metrics)


def advantage_metrics(advantages, mask, *, axis_name=None) -> dict:
  """Mean, std, max, min and sign fractions of the valid advantages."""
  mean = lambda x: masking.masked_mean(x, mask, axis_name=axis_name)
  return {
      "adv/mean": mean(advantages),
      "adv/std": masking.masked_std(advantages, mask, axis_name=axis_name),
      "adv/max": masking.masked_max(advantages, mask, axis_name=axis_name),
      "adv/min": masking.masked_min(advantages, mask, axis_name=axis_name),
      "adv/pos_frac": mean(advantages > 0),
      "adv/zero_frac": mean(advantages == 0),
  }
