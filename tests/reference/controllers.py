"""Plain-Python references for the entropy controllers (method.md §3-4).

One `if`/`else` per case of the written laws, float64, never imports
entropo. Each `*_step` maps (state, entropy, target) to the next state; the
state is a tuple of Python floats. `run` folds a step over a sequence of
(entropy, target) pairs and returns the trajectory of the controlled value.

A NaN entropy (or target) is no measurement: every law leaves its state
unchanged.
"""

import math


def _clamp(x, lo, hi):
  return min(hi, max(lo, x))


def _relative_error(entropy, target):
  return (target - entropy) / max(abs(target), 1e-3)


def _pi(integral, error, kp, ki, u_min=-1.0):
  """Bounded PI law; the integral stays where `ki * integral` is in range."""
  if ki > 0:
    integral = _clamp(integral + error, u_min / ki, 1.0 / ki)
  else:
    integral = 0.0
  u = _clamp(kp * error + ki * integral, u_min, 1.0)
  return u, integral


# ------------------------------------------------------------------- zeta


def zeta_init(init_zeta, zeta_max, ki):
  return (init_zeta, (init_zeta / zeta_max) / ki if ki else 0.0)


def zeta_doubling_step(state, entropy, target, *, zeta_min, zeta_max,
                       sign_flip=True, tolerance=0.0):
  """method.md §3, case by case."""
  zeta, integral = state
  if entropy > target + tolerance:  # entropy too high: lower zeta
    if not sign_flip:
      new = max(zeta_min, zeta / 2)
    elif zeta >= 0:
      new = zeta / 2
      if new < zeta_min:
        new = -zeta_min
    else:
      new = max(-zeta_max, 2 * zeta)
  elif entropy < target - tolerance:  # entropy too low: raise zeta
    if not sign_flip:
      new = min(zeta_max, 2 * zeta)
    elif zeta >= 0:
      if zeta == 0:
        new = zeta_min
      else:
        new = min(zeta_max, 2 * zeta)
    else:
      new = zeta / 2
      if new > -zeta_min:
        new = zeta_min
  else:  # within tolerance, or NaN
    new = zeta
  return (new, integral)


def zeta_pi_step(state, entropy, target, *, zeta_max, kp, ki,
                 sign_flip=True):
  """`zeta = zeta_max * clip(kp e + ki sum e, lo, 1)`, lo = -1 or 0."""
  zeta, integral = state
  error = _relative_error(entropy, target)
  if math.isnan(error):
    return state
  u, integral = _pi(integral, error, kp, ki, -1.0 if sign_flip else 0.0)
  return (zeta_max * u, integral)


# -------------------------------------------------------------- clip_high


def clip_high_init(init, lo, hi, ki):
  mid = (math.log(lo) + math.log(hi)) / 2
  half = (math.log(hi) - math.log(lo)) / 2
  u0 = (math.log(init) - mid) / half
  return (init, u0 / ki if ki else 0.0)


def clip_high_multiplicative_step(state, entropy, target, *, lo, hi, factor,
                                  tolerance=0.0):
  eps, integral = state
  if entropy < target - tolerance:
    new = min(hi, eps * factor)
  elif entropy > target + tolerance:
    new = max(lo, eps / factor)
  else:
    new = eps
  return (new, integral)


def clip_high_pi_step(state, entropy, target, *, lo, hi, kp, ki):
  """`log clip_high = mid + half * u`, u from the bounded PI law."""
  eps, integral = state
  error = _relative_error(entropy, target)
  if math.isnan(error):
    return state
  u, integral = _pi(integral, error, kp, ki)
  mid = (math.log(lo) + math.log(hi)) / 2
  half = (math.log(hi) - math.log(lo)) / 2
  return (_clamp(math.exp(mid + half * u), lo, hi), integral)


# ------------------------------------------------------------------- coef


def coef_step_step(state, entropy, target, *, coef_max, delta,
                   tolerance=0.0):
  (alpha,) = state
  if entropy < target - tolerance:
    alpha = alpha + delta
  elif entropy > target + tolerance:
    alpha = alpha - delta
  return (_clamp(alpha, 0.0, coef_max),)


def coef_dual_step(state, entropy, target, *, coef_max, lr):
  (alpha,) = state
  if math.isnan(entropy) or math.isnan(target):
    return state
  return (_clamp(alpha + lr * (target - entropy), 0.0, coef_max),)


def run(step, state, entropies, targets, **settings):
  """Trajectory `[N]` of the controlled value (first state field)."""
  values = []
  for entropy, target in zip(entropies, targets):
    state = step(state, float(entropy), float(target), **settings)
    values.append(state[0])
  return values, state
