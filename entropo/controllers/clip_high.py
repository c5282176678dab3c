"""ADAPO's epsilon_high controller (method.md §4) and `algo.clip_high_control`.

The config section `algo.clip_high_control` switches it on (`on`, the
`adapo` preset does) and holds its band, law and gains; it starts at
`algo.clip_high`, which must lie in the band.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo.controllers import laws
from entropo.controllers import registry


class ClipHighState(NamedTuple):
  clip_high: jax.Array  # ADAPO's epsilon_high
  integral: jax.Array



@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipHighController:
  """ADAPO: adapt epsilon_high of the PPO band toward a target entropy.

  The paper's exact law was not available (method.md §4); entropo's choice:

  `law="multiplicative"`: entropy below target -> `clip_high * factor`,
  above -> `clip_high / factor`, clamped to `[clip_high_min,
  clip_high_max]`; no change within `tolerance`.

  Defaults and why:

  * `init_clip_high=0.28`: ADAPO starts as DAPO's clip-higher.
  * `clip_high_min=0.2`: equal to DAPO's epsilon_low; at the floor the band
    is symmetric PPO/GRPO clipping, whose entropy decline is the documented
    behaviour, so the controller can always pull entropy down, and it never
    makes the band tighter on the raising side than on the lowering side.
  * `clip_high_max=0.4`: wide enough to let rare positive tokens grow
    (entropy up) but bounded, since DAPO's unbounded growth (+298 % on
    AppWorld) is what ADAPO exists to prevent.
  * `factor=1.1`: no step moves the band edge by more than 10 %, and the
    whole range is crossed in about 7 iterations, faster than entropy
    typically responds (tens of iterations), so the controller is not the
    bottleneck; doubling (REPO's law) would jump across the range in one
    step.

  `law="pi"`: `log clip_high` follows a bounded PI law on the relative
  error across `[log min, log max]`, a smooth alternative that settles
  instead of cycling between two multiplicative steps.
  """

  init_clip_high: float = 0.28
  clip_high_min: float = 0.2
  clip_high_max: float = 0.4
  factor: float = 1.1
  law: str = "multiplicative"
  tolerance: float = 0.0
  kp: float = 2.0
  ki: float = 0.2

  LAWS = ("multiplicative", "pi")
  VALUE = "clip_high"  # the state field holding the controlled value

  def __post_init__(self):
    _checks.check_choice("ClipHighController law", self.law, self.LAWS)
    if not 0 < self.clip_high_min < self.clip_high_max:
      raise ValueError(
          f"Need 0 < clip_high_min < clip_high_max; got "
          f"{self.clip_high_min}, {self.clip_high_max}."
      )
    if not self.clip_high_min <= self.init_clip_high <= self.clip_high_max:
      raise ValueError(
          f"init_clip_high={self.init_clip_high} is outside "
          f"[{self.clip_high_min}, {self.clip_high_max}]."
      )
    if not self.factor > 1:
      raise ValueError(f"factor must be > 1; got {self.factor}.")
    _checks.check_positive("tolerance", self.tolerance, allow_zero=True)
    laws.check_pi_gains(self.kp, self.ki)

  def _log_span(self):
    lo, hi = math.log(self.clip_high_min), math.log(self.clip_high_max)
    return (lo + hi) / 2, (hi - lo) / 2

  def value(self, state) -> jax.Array:
    """The controlled value of `state` (its `VALUE` field)."""
    return getattr(state, self.VALUE)

  def init(self) -> ClipHighState:
    mid, half = self._log_span()
    u0 = (math.log(self.init_clip_high) - mid) / half
    integral = u0 / self.ki if self.ki else 0.0
    return ClipHighState(clip_high=laws.f32(self.init_clip_high),
                         integral=laws.f32(integral))

  def update(self, state: ClipHighState, entropy, *, target) -> ClipHighState:
    lo, hi = self.clip_high_min, self.clip_high_max
    if self.law == "pi":
      u, integral = laws.pi_step(state.integral,
                             laws.relative_error(entropy, target), self.kp,
                             self.ki)
      mid, half = self._log_span()
      value = jnp.clip(jnp.exp(mid + half * u), lo, hi)
      return laws.hold_if_nan(
          state, ClipHighState(clip_high=value.astype(jnp.float32),
                               integral=integral))
    eps = state.clip_high
    entropy, target = laws.f32(entropy), laws.f32(target)
    new = jnp.where(entropy < target - self.tolerance,
                    jnp.minimum(hi, eps * self.factor), eps)
    new = jnp.where(entropy > target + self.tolerance,
                    jnp.maximum(lo, eps / self.factor), new)
    return ClipHighState(clip_high=new.astype(jnp.float32),
                         integral=state.integral)




@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipHighControlSection(registry.Section):
  """ADAPO: epsilon_high adapted from algo.clip_high within [min, max].

  `algo.clip_high` must lie in the band: the bounds are not widened.
  """

  on: bool = registry.flag(False, "adapt algo.clip_high (ADAPO)")
  min: float = registry.setting(
      0.2, "the lowest epsilon_high (DAPO's epsilon_low)", low=0,
      low_open=True)
  max: float = registry.setting(
      0.4, "the highest epsilon_high, above min", low=0, low_open=True)
  factor: float = registry.setting(
      1.1, "the multiplicative law's step (x or / factor)", low=1,
      low_open=True)
  law: str = registry.choice(
      "multiplicative", "multiplicative (by factor) or pi (a bounded PI "
      "law on log epsilon_high)", ClipHighController.LAWS)
  kp: float = registry.setting(2.0, "the pi law's proportional gain", low=0)
  ki: float = registry.setting(
      0.2, "the pi law's integral gain (kp and ki not both 0)", low=0)


@registry.register(
    "clip_high_control", moves="clip_high", section=ClipHighControlSection,
    enabled=lambda section, algo: section.on,
    switch="`algo.clip_high_control.on` (the `adapo` preset)",
    moved=dict(adapo="on", clip_high_min="min", clip_high_max="max",
               clip_high_factor="factor", clip_high_law="law",
               clip_high_kp="kp", clip_high_ki="ki"))
def build(s: ClipHighControlSection, start: float) -> ClipHighController:
  """The ClipHighController from `start` (`algo.clip_high`), each relation
  checked by name."""
  if not s.min < s.max:
    raise registry.SettingError(
        "max", f"must be > algo.clip_high_control.min = {s.min}; got {s.max}")
  if not s.min <= start <= s.max:
    raise registry.SettingError(
        registry.START, f"{start} is outside ADAPO's band "
        f"[algo.clip_high_control.min, algo.clip_high_control.max] = "
        f"[{s.min}, {s.max}], where its controller starts; move the start "
        f"or the bounds (they are not widened)")
  if s.kp + s.ki == 0:
    raise registry.SettingError(
        "ki", "the PI gains algo.clip_high_control.kp and "
        "algo.clip_high_control.ki must not both be 0")
  return ClipHighController(init_clip_high=start, clip_high_min=s.min,
                            clip_high_max=s.max, factor=s.factor, law=s.law,
                            kp=s.kp, ki=s.ki)
