"""REPO's zeta controller (arXiv:2603.11682; method.md §3) and `algo.zeta`.

The config section `algo.zeta` holds zeta's starting value and the
controller's bounds, law and gains; the controller is on whenever a REPO
variant is (`algo.repo` is not "none").
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from entropo import _checks
from entropo.controllers import laws
from entropo.controllers import registry


class ZetaState(NamedTuple):
  zeta: jax.Array  # the REPO coefficient
  integral: jax.Array  # PI law's integral of the error (unused by doubling)



@dataclasses.dataclass(frozen=True, kw_only=True)
class ZetaController:
  """REPO's zeta controller.

  `law="doubling"` (method.md §3), with `H*` the target:

      H > H*:  zeta >= 0 -> zeta / 2, flipped to -zeta_min when it falls
               below zeta_min;  zeta < 0 -> max(-zeta_max, 2 zeta)
      H < H*:  zeta >= 0 -> min(zeta_max, 2 zeta) (0 -> zeta_min);
               zeta < 0 -> zeta / 2, flipped to +zeta_min above -zeta_min

  With `sign_flip=False` zeta stays in `[zeta_min, zeta_max]` instead (the
  flip comes from a public re-implementation; the paper may not have it).
  No change when `|H - H*| <= tolerance`.

  `law="pi"`: `zeta = zeta_max * clip(kp e + ki sum(e), -1, 1)` with the
  relative error `e = (H* - H) / H*`; zeta moves continuously in
  `[-zeta_max, zeta_max]` (`[0, zeta_max]` without sign flip) and settles
  where the integral balances, instead of cycling by factors of 2.

  Defaults are the REPO-R bounds reported for the paper, |zeta| in
  [1e-4, 0.05], initial 1e-3; REPO-D uses [1e-3, 10].
  """

  init_zeta: float = 1e-3
  zeta_min: float = 1e-4
  zeta_max: float = 0.05
  law: str = "doubling"
  sign_flip: bool = True
  tolerance: float = 0.0
  kp: float = 2.0
  ki: float = 0.2

  LAWS = ("doubling", "pi")
  VALUE = "zeta"  # the state field holding the controlled value

  def __post_init__(self):
    _checks.check_choice("ZetaController law", self.law, self.LAWS)
    if not 0 < self.zeta_min <= self.zeta_max:
      raise ValueError(
          f"Need 0 < zeta_min <= zeta_max; got zeta_min={self.zeta_min}, "
          f"zeta_max={self.zeta_max}."
      )
    if self.law == "pi":
      low = -self.zeta_max if self.sign_flip else 0.0
      ok = low <= self.init_zeta <= self.zeta_max
      accepted = f"[{low}, {self.zeta_max}]"
    elif self.sign_flip:  # the doubling law's values: 0 or |zeta| in bounds
      ok = (self.init_zeta == 0
            or self.zeta_min <= abs(self.init_zeta) <= self.zeta_max)
      accepted = (f"0 or +-[{self.zeta_min}, {self.zeta_max}] (the doubling "
                  f"law)")
    else:
      ok = self.zeta_min <= self.init_zeta <= self.zeta_max
      accepted = (f"[{self.zeta_min}, {self.zeta_max}] (the doubling law "
                  f"without sign flip)")
    if not ok:
      raise ValueError(
          f"init_zeta={self.init_zeta} is outside {accepted}."
      )
    _checks.check_positive("tolerance", self.tolerance, allow_zero=True)
    laws.check_pi_gains(self.kp, self.ki)

  def value(self, state) -> jax.Array:
    """The controlled value of `state` (its `VALUE` field)."""
    return getattr(state, self.VALUE)

  def init(self) -> ZetaState:
    integral = (self.init_zeta / self.zeta_max) / self.ki if self.ki else 0.0
    return ZetaState(zeta=laws.f32(self.init_zeta), integral=laws.f32(integral))

  def update(self, state: ZetaState, entropy, *, target) -> ZetaState:
    if self.law == "pi":
      # Without sign flip u lives in [0, 1], and so does ki * integral:
      # otherwise the integral winds up below 0 where it has no effect.
      u, integral = laws.pi_step(state.integral,
                             laws.relative_error(entropy, target), self.kp,
                             self.ki, low=-1.0 if self.sign_flip else 0.0)
      return laws.hold_if_nan(
          state, ZetaState(zeta=self.zeta_max * u, integral=integral))
    zeta = state.zeta
    lo, hi = self.zeta_min, self.zeta_max
    if self.sign_flip:
      down = jnp.where(
          zeta >= 0,
          jnp.where(zeta / 2 < lo, -lo, zeta / 2),
          jnp.maximum(-hi, 2 * zeta),
      )
      up = jnp.where(
          zeta >= 0,
          jnp.where(zeta == 0, lo, jnp.minimum(hi, 2 * zeta)),
          jnp.where(zeta / 2 > -lo, lo, zeta / 2),
      )
    else:
      down = jnp.maximum(lo, zeta / 2)
      up = jnp.clip(2 * zeta, lo, hi)
    entropy, target = laws.f32(entropy), laws.f32(target)
    new = jnp.where(entropy > target + self.tolerance, down, zeta)
    new = jnp.where(entropy < target - self.tolerance, up, new)
    return ZetaState(zeta=new.astype(jnp.float32), integral=state.integral)




@dataclasses.dataclass(frozen=True, kw_only=True)
class ZetaSection(registry.Section):
  """REPO's zeta: its start and its controller's bounds, law and gains.

  The defaults are REPO-R's bounds (|zeta| in [1e-4, 0.05], from 1e-3);
  the repo_d modifier sets REPO-D's ([1e-3, 10], from 0.1).
  """

  init: float = registry.setting(
      1e-3, "zeta's starting value (0 or |zeta| in [min, max] under the "
      "doubling law)")
  min: float = registry.setting(
      1e-4, "the doubling law's smallest |zeta| (where the sign flips)",
      low=0, low_open=True)
  max: float = registry.setting(
      0.05, "the largest |zeta|, at least min (REPO-D uses 10)", low=0,
      low_open=True)
  law: str = registry.choice(
      "doubling", "doubling (x2 / /2 steps) or pi (a bounded PI law)",
      ZetaController.LAWS)
  sign_flip: bool = registry.flag(
      True, "zeta may turn negative (else it stays in [min, max])")
  kp: float = registry.setting(2.0, "the pi law's proportional gain", low=0)
  ki: float = registry.setting(
      0.2, "the pi law's integral gain (kp and ki not both 0)", low=0)


@registry.register(
    "zeta", moves="zeta", section=ZetaSection,
    enabled=lambda section, algo: algo.repo != "none",
    switch="`algo.repo` is not `none`",
    moved=dict(zeta_init="init", zeta_min="min", zeta_max="max",
               zeta_law="law", zeta_sign_flip="sign_flip", zeta_kp="kp",
               zeta_ki="ki"))
def build(s: ZetaSection, start: float) -> ZetaController:
  """The ZetaController from `start` (= `s.init`), each relation checked
  by name; a start outside the bounds is refused (they are not widened)."""
  if not s.min <= s.max:
    raise registry.SettingError(
        "max", f"must be >= algo.zeta.min = {s.min}; got {s.max}")
  if s.kp + s.ki == 0:
    raise registry.SettingError(
        "ki", "the PI gains algo.zeta.kp and algo.zeta.ki must not both be 0")
  zeta, lo, hi = start, s.min, s.max
  if s.law == "pi":
    low = -hi if s.sign_flip else 0.0
    ok, accepted = low <= zeta <= hi, f"[{low}, {hi}] (the pi law)"
  elif s.sign_flip:
    ok = zeta == 0 or lo <= abs(zeta) <= hi
    accepted = f"0 or +-[{lo}, {hi}] (the doubling law)"
  else:
    ok = lo <= zeta <= hi
    accepted = f"[{lo}, {hi}] (the doubling law without sign flip)"
  if not ok:
    raise registry.SettingError(
        "init", f"{zeta} is outside {accepted}, from algo.zeta.min and "
        f"algo.zeta.max")
  return ZetaController(init_zeta=zeta, zeta_min=lo, zeta_max=hi, law=s.law,
                        sign_flip=s.sign_flip, kp=s.kp, ki=s.ki)
