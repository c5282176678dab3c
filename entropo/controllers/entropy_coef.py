"""The entropy-bonus coefficient's controller and `algo.entropy_coef_control`.

The config section `algo.entropy_coef_control` switches it on (`on`, the
`entropy_adaptive` preset does) and holds its law, ceiling and steps; it
starts at `algo.entropy_coef`, at most the ceiling. When it is on the
entropy bonus is on too.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo.controllers import laws
from entropo.controllers import registry


class EntropyCoefState(NamedTuple):
  coef: jax.Array  # the entropy-bonus coefficient alpha



@dataclasses.dataclass(frozen=True, kw_only=True)
class EntropyCoefController:
  """Adaptive coefficient alpha of `entropy_bonus`.

  `law="step"` (Skywork-OR1, TRL): alpha += delta when entropy is below
  target, -= delta above, clamped to `[0, coef_max]`.

  `law="dual"`: alpha is the Lagrange multiplier of the constraint
  `H >= target`, updated by projected gradient ascent on the dual,
  `alpha <- clip(alpha + lr (target - H), 0, coef_max)`: the step is
  proportional to the violation, so alpha settles where the constraint is
  just met instead of oscillating by +/- delta (as SAC's temperature does).
  """

  init_coef: float = 0.0
  coef_max: float = 1.0
  delta: float = 0.005
  lr: float = 0.01
  law: str = "step"
  tolerance: float = 0.0

  LAWS = ("step", "dual")
  VALUE = "coef"  # the state field holding the controlled value

  def __post_init__(self):
    _checks.check_choice("EntropyCoefController law", self.law, self.LAWS)
    if not 0 <= self.init_coef <= self.coef_max:
      raise ValueError(
          f"init_coef={self.init_coef} is outside [0, {self.coef_max}]."
      )
    _checks.check_positive("delta", self.delta)
    _checks.check_positive("lr", self.lr)
    _checks.check_positive("tolerance", self.tolerance, allow_zero=True)

  def value(self, state) -> jax.Array:
    """The controlled value of `state` (its `VALUE` field)."""
    return getattr(state, self.VALUE)

  def init(self) -> EntropyCoefState:
    return EntropyCoefState(coef=laws.f32(self.init_coef))

  def update(self, state: EntropyCoefState, entropy, *,
             target) -> EntropyCoefState:
    entropy, target = laws.f32(entropy), laws.f32(target)
    alpha = state.coef
    if self.law == "dual":
      new = alpha + self.lr * (target - entropy)
      new = jnp.where(jnp.isnan(new), alpha, new)  # NaN entropy: hold
    else:
      new = jnp.where(entropy < target - self.tolerance, alpha + self.delta,
                      alpha)
      new = jnp.where(entropy > target + self.tolerance, alpha - self.delta,
                      new)
    return EntropyCoefState(
        coef=jnp.clip(new, 0.0, self.coef_max).astype(jnp.float32)
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EntropyCoefControlSection(registry.Section):
  """The entropy bonus's coefficient adapted from algo.entropy_coef up to max.

  `algo.entropy_coef` must be at most `max`: the ceiling is not widened.
  """

  on: bool = registry.flag(
      False, "adapt algo.entropy_coef (and so turn the bonus on)")
  law: str = registry.choice(
      "step", "step (+/- delta) or dual (projected ascent at rate lr)",
      EntropyCoefController.LAWS)
  max: float = registry.setting(0.1, "the coefficient's ceiling", low=0)
  delta: float = registry.setting(0.001, "the step law's step", low=0,
                                  low_open=True)
  lr: float = registry.setting(0.01, "the dual law's rate", low=0,
                               low_open=True)


@registry.register(
    "entropy_coef_control", moves="entropy_coef",
    section=EntropyCoefControlSection,
    enabled=lambda section, algo: section.on,
    switch="`algo.entropy_coef_control.on` (the `entropy_adaptive` preset)",
    moved=dict(entropy_control=("on", lambda old: dict(
        on=old != "none", law="step" if old == "none" else old)),
               entropy_coef_max="max", entropy_coef_delta="delta",
               entropy_coef_law_lr="lr"))
def build(s: EntropyCoefControlSection, start: float
          ) -> EntropyCoefController:
  """The EntropyCoefController from `start` (`algo.entropy_coef`)."""
  if not start <= s.max:
    raise registry.SettingError(
        registry.START, f"{start} is above algo.entropy_coef_control.max = "
        f"{s.max}, the controller's ceiling (it is not widened)")
  return EntropyCoefController(init_coef=start, coef_max=s.max,
                               delta=s.delta, lr=s.lr, law=s.law)
