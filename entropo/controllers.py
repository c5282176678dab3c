"""Entropy controllers: pure `state -> state` updates toward a target entropy.

Each controller is a frozen dataclass of settings with `init() -> state` and
`update(state, entropy, *, target) -> state`. The state is a NamedTuple (a
pytree: jit-able, and saved in checkpoints); its field named by the
controller's `VALUE` holds the controlled value (`zeta`, `clip_high` or
`coef`), read by name with `controller.value(state)`. `entropy` is the measured
mean token entropy of the iteration's batch and `target` the entropy to hold
(by default, the trainer measures it before RL starts). Both may be traced.

All three controllers push the same way: entropy below target raises the
controlled value (more REPO correction, a wider upper clip, a larger bonus),
entropy above target lowers it. Each has two laws:

* a step law: REPO's doubling/halving of zeta with sign flip
  (arXiv:2603.11682; method.md §3), multiplicative steps of ADAPO's
  epsilon_high, and +/- steps of the bonus coefficient (the Skywork-OR1 /
  TRL rule);
* a smooth law that tracks the target without the limit cycle of
  fixed-size steps: a bounded proportional-integral law on the relative
  error for zeta and epsilon_high (`law="pi"`), and projected dual ascent for
  the bonus coefficient (`law="dual"`, the Lagrange multiplier of the
  constraint `H >= target`).

`tolerance` is a deadband of the step laws; the smooth laws have none (they
act on the size of the error). Every law keeps its value within the stated
bounds, whatever the inputs; a
NaN entropy (a diverged batch) leaves the state unchanged.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from entropo import _checks


class ZetaState(NamedTuple):
  zeta: jax.Array  # the REPO coefficient
  integral: jax.Array  # PI law's integral of the error (unused by doubling)


class ClipHighState(NamedTuple):
  clip_high: jax.Array  # ADAPO's epsilon_high
  integral: jax.Array


class EntropyCoefState(NamedTuple):
  coef: jax.Array  # the entropy-bonus coefficient alpha


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _relative_error(entropy, target):
  """`(target - H) / target`: positive when entropy is too low."""
  target = _f32(target)
  scale = jnp.maximum(jnp.abs(target), 1e-3)
  return (target - _f32(entropy)) / scale


def _pi_step(integral, error, kp, ki, low=-1.0):
  """One step of a bounded PI law; returns `(u in [low, 1], new integral)`.

  The integral is clamped so that `ki * integral` stays in [low, 1]
  (anti-windup): after a long excursion the law recovers at once.
  """
  bound = 1.0 / ki if ki > 0 else 0.0
  integral = jnp.clip(integral + error, low * bound, bound)
  u = jnp.clip(kp * error + ki * integral, low, 1.0)
  return u, integral


def _hold_if_nan(old, new):
  """The old state where the update produced NaN (a NaN entropy or target).

  A diverged batch must not poison the controller's state for good (it is
  checkpointed); the step laws already hold on NaN, since every comparison
  with NaN is false.
  """
  bad = jnp.zeros((), bool)
  for x in new:
    bad = bad | jnp.isnan(x)
  return type(new)(*(jnp.where(bad, o, n) for o, n in zip(old, new)))


def _check_pi_gains(kp, ki):
  if kp < 0 or ki < 0 or kp + ki == 0:
    raise ValueError(
        f"PI gains must be >= 0 and not both 0; got kp={kp}, ki={ki}."
    )


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
    _check_pi_gains(self.kp, self.ki)

  def value(self, state) -> jax.Array:
    """The controlled value of `state` (its `VALUE` field)."""
    return getattr(state, self.VALUE)

  def init(self) -> ZetaState:
    integral = (self.init_zeta / self.zeta_max) / self.ki if self.ki else 0.0
    return ZetaState(zeta=_f32(self.init_zeta), integral=_f32(integral))

  def update(self, state: ZetaState, entropy, *, target) -> ZetaState:
    if self.law == "pi":
      # Without sign flip u lives in [0, 1], and so does ki * integral:
      # otherwise the integral winds up below 0 where it has no effect.
      u, integral = _pi_step(state.integral,
                             _relative_error(entropy, target), self.kp,
                             self.ki, low=-1.0 if self.sign_flip else 0.0)
      return _hold_if_nan(
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
    entropy, target = _f32(entropy), _f32(target)
    new = jnp.where(entropy > target + self.tolerance, down, zeta)
    new = jnp.where(entropy < target - self.tolerance, up, new)
    return ZetaState(zeta=new.astype(jnp.float32), integral=state.integral)


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
    _check_pi_gains(self.kp, self.ki)

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
    return ClipHighState(clip_high=_f32(self.init_clip_high),
                         integral=_f32(integral))

  def update(self, state: ClipHighState, entropy, *, target) -> ClipHighState:
    lo, hi = self.clip_high_min, self.clip_high_max
    if self.law == "pi":
      u, integral = _pi_step(state.integral,
                             _relative_error(entropy, target), self.kp,
                             self.ki)
      mid, half = self._log_span()
      value = jnp.clip(jnp.exp(mid + half * u), lo, hi)
      return _hold_if_nan(
          state, ClipHighState(clip_high=value.astype(jnp.float32),
                               integral=integral))
    eps = state.clip_high
    entropy, target = _f32(entropy), _f32(target)
    new = jnp.where(entropy < target - self.tolerance,
                    jnp.minimum(hi, eps * self.factor), eps)
    new = jnp.where(entropy > target + self.tolerance,
                    jnp.maximum(lo, eps / self.factor), new)
    return ClipHighState(clip_high=new.astype(jnp.float32),
                         integral=state.integral)


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
    return EntropyCoefState(coef=_f32(self.init_coef))

  def update(self, state: EntropyCoefState, entropy, *,
             target) -> EntropyCoefState:
    entropy, target = _f32(entropy), _f32(target)
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
