"""Tests for entropo.controllers (method.md §3-4)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import controllers as ctl
from tests.reference import controllers as ref

N_STEPS = 400


def _reference(c):
  """(initial state, step function) of the plain-Python reference for `c`."""
  if isinstance(c, ctl.ZetaController):
    if c.law == "doubling":
      return (c.init_zeta, 0.0), functools.partial(
          ref.zeta_doubling_step, zeta_min=c.zeta_min, zeta_max=c.zeta_max,
          sign_flip=c.sign_flip, tolerance=c.tolerance)
    return ref.zeta_init(c.init_zeta, c.zeta_max, c.ki), functools.partial(
        ref.zeta_pi_step, zeta_max=c.zeta_max, kp=c.kp, ki=c.ki,
        sign_flip=c.sign_flip)
  if isinstance(c, ctl.ClipHighController):
    lo, hi = c.clip_high_min, c.clip_high_max
    if c.law == "multiplicative":
      return (c.init_clip_high, 0.0), functools.partial(
          ref.clip_high_multiplicative_step, lo=lo, hi=hi, factor=c.factor,
          tolerance=c.tolerance)
    return ref.clip_high_init(c.init_clip_high, lo, hi, c.ki), (
        functools.partial(ref.clip_high_pi_step, lo=lo, hi=hi, kp=c.kp,
                          ki=c.ki))
  if c.law == "step":
    return (c.init_coef,), functools.partial(
        ref.coef_step_step, coef_max=c.coef_max, delta=c.delta,
        tolerance=c.tolerance)
  return (c.init_coef,), functools.partial(ref.coef_dual_step,
                                           coef_max=c.coef_max, lr=c.lr)


def _bounds(c):
  """(lowest, highest) value the controller may ever hold."""
  if isinstance(c, ctl.ZetaController):
    low = -c.zeta_max if c.sign_flip else (
        0.0 if c.law == "pi" else c.zeta_min)
    return low, c.zeta_max
  if isinstance(c, ctl.ClipHighController):
    return c.clip_high_min, c.clip_high_max
  return 0.0, c.coef_max


CONTROLLERS = {
    "zeta_doubling": ctl.ZetaController(),
    "zeta_doubling_noflip": ctl.ZetaController(sign_flip=False),
    "zeta_doubling_repo_d_tol": ctl.ZetaController(
        init_zeta=1e-2, zeta_min=1e-3, zeta_max=10.0, tolerance=0.05),
    "zeta_doubling_from_0": ctl.ZetaController(init_zeta=0.0),
    "zeta_pi": ctl.ZetaController(law="pi"),
    "zeta_pi_noflip": ctl.ZetaController(law="pi", sign_flip=False, kp=1.0,
                                         ki=0.05),
    "clip_multiplicative": ctl.ClipHighController(),
    "clip_multiplicative_tol": ctl.ClipHighController(factor=1.25,
                                                      tolerance=0.1),
    "clip_pi": ctl.ClipHighController(law="pi", kp=0.5, ki=0.5),
    "coef_step": ctl.EntropyCoefController(coef_max=0.05),
    "coef_step_tol": ctl.EntropyCoefController(init_coef=0.1, coef_max=0.3,
                                               delta=0.05, tolerance=0.05),
    "coef_dual": ctl.EntropyCoefController(law="dual", lr=0.05,
                                           coef_max=0.5),
}
STEP_LAWS = ("doubling", "multiplicative", "step")


def _value(state):
  return state[0]


def _sequence(rng, n=N_STEPS, *, tolerance=0.0):
  """float32 (entropies, targets) visiting both sides for long stretches.

  Targets are piecewise constant (a new random target every 50 steps); the
  sign of `entropy - target` persists for a few steps so that the laws reach
  their bounds. About 5% of steps sit exactly on the target. No step lies
  within 1e-3 of a tolerance edge, where float32 and float64 could disagree.
  """
  targets = np.repeat(rng.uniform(0.2, 3.0, size=-(-n // 50)), 50)[:n]
  signs = np.empty(n)
  s = 1.0
  for i in range(n):
    if rng.random() < 0.15:
      s = -s
    signs[i] = s
  gap = rng.exponential(0.2, size=n) * targets
  edge = np.abs(gap - tolerance) < 1e-3
  gap[edge] += 2e-3
  entropies = targets + signs * gap
  on_target = rng.random(n) < 0.05
  entropies[on_target] = targets[on_target]
  return entropies.astype(np.float32), targets.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _scan(c, state, entropies, targets):
  def body(state, xs):
    state = c.update(state, xs[0], target=xs[1])
    return state, _value(state)
  return jax.lax.scan(body, state, (entropies, targets))


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_matches_reference_over_long_sequences(rng, name):
  c = CONTROLLERS[name]
  entropies, targets = _sequence(rng, tolerance=c.tolerance)
  final, values = _scan(c, c.init(), entropies, targets)
  init, step = _reference(c)
  expected, ref_final = ref.run(step, init, entropies.astype(np.float64),
                                targets.astype(np.float64))
  lo, hi = _bounds(c)
  np.testing.assert_allclose(values, expected, rtol=1e-5,
                             atol=1e-6 * max(abs(lo), hi))
  # The whole final state (the step laws carry the integral unused).
  used = 1 if c.law in STEP_LAWS else len(final)
  np.testing.assert_allclose(final[:used], ref_final[:used], rtol=1e-5,
                             atol=1e-5)
  assert values.dtype == jnp.float32
  # The sequence exercises the whole range: both bounds are reached.
  assert np.isclose(np.max(expected), hi, rtol=1e-3)
  if name != "zeta_pi_noflip":
    assert np.isclose(np.min(expected), lo, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_python_loop_of_jitted_update_matches_scan(rng, name):
  c = CONTROLLERS[name]
  entropies, targets = _sequence(rng, 60, tolerance=c.tolerance)
  update = jax.jit(c.update)
  state, values = c.init(), []
  for h, t in zip(entropies, targets):
    state = update(state, h, target=t)
    values.append(float(_value(state)))
  eager = c.init()
  for h, t in zip(entropies[:10], targets[:10]):
    eager = c.update(eager, float(h), target=float(t))
  # Same float32 maths; XLA may fuse the scan's body differently (last-bit
  # differences, e.g. 3e-9 on a dual coefficient of 1e-3 built from 0.07).
  scale = max(abs(b) for b in _bounds(c))
  np.testing.assert_allclose(values, _scan(c, c.init(), entropies,
                                           targets)[1], rtol=1e-6,
                             atol=1e-7 * scale)
  np.testing.assert_allclose(_value(eager), values[9], rtol=1e-6,
                             atol=1e-7 * scale)


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_values_always_within_bounds(rng, name):
  c = CONTROLLERS[name]
  entropies, targets = _sequence(rng, 300, tolerance=c.tolerance)
  extreme = rng.random(300) < 0.2
  entropies[extreme] = rng.choice(
      np.array([0.0, -5.0, 1e6, np.inf, -np.inf, 1e-30, np.nan],
               np.float32), size=extreme.sum())
  targets[rng.random(300) < 0.05] = 0.0
  _, values = _scan(c, c.init(), entropies, targets)
  values = np.asarray(values)
  lo, hi = _bounds(c)
  assert np.all(np.isfinite(values))
  assert np.all(values >= np.float32(lo)) and np.all(values <= np.float32(hi))
  if isinstance(c, ctl.ZetaController) and c.law == "doubling":
    nonzero = values[np.flatnonzero(values)[0]:]  # once nonzero ...
    assert np.all(np.abs(nonzero) >= np.float32(c.zeta_min))  # ... stays so


def test_no_sign_flip_keeps_zeta_in_min_max(rng):
  for law in ("doubling", "pi"):
    c = ctl.ZetaController(law=law, sign_flip=False)
    entropies, targets = _sequence(rng, 300)
    _, values = _scan(c, c.init(), entropies, targets)
    low = c.zeta_min if law == "doubling" else 0.0
    assert np.all(np.asarray(values) >= np.float32(low)), law
    assert np.all(np.asarray(values) <= np.float32(c.zeta_max)), law
    assert np.any(np.asarray(values) == np.float32(low)), law


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_nan_entropy_holds_the_state(rng, name):
  c = CONTROLLERS[name]
  entropies, targets = _sequence(rng, 20)
  state, _ = _scan(c, c.init(), entropies, targets)
  for bad in (dict(entropy=np.nan, target=1.0),
              dict(entropy=1.0, target=np.nan)):
    new = c.update(state, jnp.float32(bad["entropy"]),
                   target=jnp.float32(bad["target"]))
    for x, y in zip(new, state):
      np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------- direction


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_moves_in_documented_direction(rng, name):
  """Below target: the value rises (or holds at its max); above: falls."""
  c = CONTROLLERS[name]
  entropies, targets = _sequence(rng, 200, tolerance=c.tolerance)
  update = jax.jit(lambda s, h, t: c.update(s, h, target=t))
  lo, hi = _bounds(c)
  state = c.init()
  for h, t in zip(entropies, targets):
    at = update(state, t, t)
    gap = np.float32(c.tolerance + 0.3 * t)
    up = update(state, t - gap, t)
    down = update(state, t + gap, t)
    v, v_at, v_up, v_down = map(float, (_value(state), _value(at),
                                        _value(up), _value(down)))
    if c.law in STEP_LAWS:
      assert v_at == v  # on target: no change
      assert v_up > v or v == np.float32(hi)
      assert v_down < v or v == np.float32(lo)
    else:  # PI / dual: monotone in the error from the same state
      # (clip_high reaches its bounds through exp(log bound): to rounding)
      assert v_up > v_at or np.isclose(v_at, hi, rtol=1e-6, atol=0)
      assert v_down < v_at or np.isclose(v_at, lo, rtol=1e-6, atol=0)
    state = update(state, h, t)


@pytest.mark.parametrize("name", [n for n in CONTROLLERS
                                  if CONTROLLERS[n].law not in STEP_LAWS])
def test_smooth_laws_sustained_error_is_monotone(name):
  """A steady error drives a smooth law monotonically to the bound."""
  c = CONTROLLERS[name]
  lo, hi = _bounds(c)
  for sign, bound in ((-1.0, hi), (1.0, lo)):  # entropy below / above target
    entropies = np.full(300, 1.0 + 0.1 * sign, np.float32)
    _, values = _scan(c, c.init(), entropies, np.ones(300, np.float32))
    values = np.asarray(values)
    step = np.diff(values) * -sign
    assert np.all(step >= 0)
    # At the bound (to rounding: clip_high goes through exp(log bound)).
    np.testing.assert_allclose(values[-1], bound, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in CONTROLLERS
                                  if CONTROLLERS[n].law not in STEP_LAWS])
def test_smooth_laws_recover_at_once(name):
  """Anti-windup: after a long excursion one opposite step leaves the bound."""
  c = CONTROLLERS[name]
  lo, hi = _bounds(c)
  init, step = _reference(c)
  for h, back, bound in ((3.0, 0.8, lo), (0.1, 1.2, hi)):
    state, values = _scan(c, c.init(), np.full(300, h, np.float32),
                          np.ones(300, np.float32))
    np.testing.assert_allclose(values[-1], bound, rtol=1e-6)
    value = float(_value(c.update(state, back, target=1.0)))
    assert lo < value < hi and not np.isclose(value, bound), (h, value)
    # By the reference's amount: the integral did not wind up past the
    # point where it saturates the value.
    expected, _ = ref.run(step, init, [h] * 300 + [back], [1.0] * 301)
    np.testing.assert_allclose(value, expected[-1], rtol=1e-5)


# ------------------------------------------------ sign flip and deadband


def test_zeta_doubling_sign_flip_hand_sequence():
  c = ctl.ZetaController(init_zeta=1e-3, zeta_min=1e-4, zeta_max=0.05)
  high, low = 2.0, 0.5  # entropy above / below the target 1.0
  entropies = [high] * 4 + [high] * 11 + [low] * 10 + [low] * 2
  expected = (
      [5e-4, 2.5e-4, 1.25e-4, -1e-4]  # halves, then flips to -zeta_min
      + [-2e-4, -4e-4, -8e-4, -1.6e-3, -3.2e-3, -6.4e-3, -1.28e-2, -2.56e-2,
         -0.05, -0.05, -0.05]  # doubles negative, clamped at -zeta_max
      + [-0.025, -0.0125, -6.25e-3, -3.125e-3, -1.5625e-3, -7.8125e-4,
         -3.90625e-4, -1.953125e-4, 1e-4, 2e-4]  # halves, flips to +zeta_min
      + [4e-4, 8e-4])
  _, values = _scan(c, c.init(), np.array(entropies, np.float32),
                    np.ones(len(entropies), np.float32))
  np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_zeta_doubling_from_zero():
  c = ctl.ZetaController(init_zeta=0.0)
  assert float(c.update(c.init(), 0.5, target=1.0).zeta) == np.float32(1e-4)
  assert float(c.update(c.init(), 2.0, target=1.0).zeta) == np.float32(-1e-4)
  assert float(c.update(c.init(), 1.0, target=1.0).zeta) == 0.0


def test_zeta_doubling_without_sign_flip_hand_sequence():
  c = ctl.ZetaController(init_zeta=1e-3, zeta_min=1e-4, zeta_max=0.05,
                         sign_flip=False)
  entropies = [2.0] * 5 + [0.5] * 11
  expected = ([5e-4, 2.5e-4, 1.25e-4, 1e-4, 1e-4]
              + [2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3, 1.28e-2, 2.56e-2,
                 0.05, 0.05, 0.05])
  _, values = _scan(c, c.init(), np.array(entropies, np.float32),
                    np.ones(len(entropies), np.float32))
  np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_clip_high_and_coef_hand_sequences():
  c = ctl.ClipHighController(init_clip_high=0.28, factor=1.1)
  _, values = _scan(c, c.init(), np.array([0.5, 0.5, 0.5, 2.0, 2.0, 2.0,
                                           2.0], np.float32),
                    np.ones(7, np.float32))
  np.testing.assert_allclose(
      values, [0.308, 0.3388, 0.37268, 0.3388, 0.308, 0.28, 0.28 / 1.1],
      rtol=1e-6)
  c = ctl.EntropyCoefController(init_coef=0.0, coef_max=0.012, delta=0.005)
  _, values = _scan(c, c.init(), np.array([0.5, 0.5, 0.5, 2.0, 2.0, 2.0,
                                           2.0], np.float32),
                    np.ones(7, np.float32))
  np.testing.assert_allclose(values, [0.005, 0.01, 0.012, 0.007, 0.002, 0.0,
                                      0.0], rtol=1e-6, atol=1e-9)
  c = ctl.EntropyCoefController(law="dual", lr=0.1, init_coef=0.05)
  _, values = _scan(c, c.init(), np.array([0.5, 1.2, 3.0], np.float32),
                    np.ones(3, np.float32))
  np.testing.assert_allclose(values, [0.1, 0.08, 0.0], rtol=1e-6)


@pytest.mark.parametrize("c", [
    ctl.ZetaController(tolerance=0.25),
    ctl.ZetaController(tolerance=0.25, sign_flip=False),
    ctl.ClipHighController(tolerance=0.25),
    ctl.EntropyCoefController(tolerance=0.25, init_coef=0.5),
], ids=["zeta", "zeta_noflip", "clip_high", "coef"])
def test_tolerance_deadband(c):
  state = c.init()
  for h in (0.75, 0.9, 1.0, 1.1, 1.25):  # edges included: no change
    new = c.update(state, jnp.float32(h), target=jnp.float32(1.0))
    assert float(_value(new)) == float(_value(state)), h
  below = c.update(state, jnp.float32(0.74), target=1.0)
  above = c.update(state, jnp.float32(1.26), target=1.0)
  assert float(_value(below)) > float(_value(state))
  assert float(_value(above)) < float(_value(state))


# --------------------------------------------------------------- settling


def _plant(c, v_eq, gain, *, target=1.0, n=600, noise=1e-3, seed=0):
  """Closed loop with a first-order entropy plant.

  Entropy relaxes (rate 0.3 per iteration) toward the level that the current
  value sustains, `target + gain * (value - v_eq)`, plus Gaussian noise; the
  value `v_eq` holds the target. Returns (values, entropies) as NumPy.
  """
  eps = np.random.default_rng(seed).normal(size=n).astype(np.float32) * noise

  @jax.jit
  def loop(state):
    def body(carry, e):
      state, h = carry
      state = c.update(state, h, target=target)
      v = _value(state)
      h = h + 0.3 * (target + gain * (v - v_eq) - h) + e
      return (state, h), (v, h)
    return jax.lax.scan(body, (state, jnp.float32(target + 0.3)), eps)[1]

  values, entropies = loop(c.init())
  return np.asarray(values, np.float64), np.asarray(entropies, np.float64)


@pytest.mark.parametrize("step, smooth, v_eq, gain", [
    (ctl.ZetaController(), ctl.ZetaController(law="pi"), 0.01, 20.0),
    (ctl.ClipHighController(), ctl.ClipHighController(law="pi"), 0.3, 5.0),
    (ctl.EntropyCoefController(),
     ctl.EntropyCoefController(law="dual"), 0.02, 10.0),
], ids=["zeta", "clip_high", "coef"])
def test_smooth_law_settles_where_step_law_cycles(step, smooth, v_eq, gain):
  last = slice(-100, None)
  v_step, h_step = _plant(step, v_eq, gain)
  v_smooth, h_smooth = _plant(smooth, v_eq, gain)
  amp_step, amp_smooth = np.ptp(v_step[last]), np.ptp(v_smooth[last])
  # The step law keeps cycling by whole steps; the smooth law settles to
  # an oscillation driven only by the noise, far smaller.
  assert amp_smooth < 0.2 * amp_step, (amp_smooth, amp_step)
  # ... at the value that holds the target ...
  assert abs(np.mean(v_smooth[last]) - v_eq) < 0.05 * v_eq
  # ... and entropy tracks the target to within a few noise levels.
  err_smooth = np.mean(np.abs(h_smooth[last] - 1.0))
  assert err_smooth < 3e-3, err_smooth
  assert err_smooth < np.mean(np.abs(h_step[last] - 1.0))


# ------------------------------------------------------------------ pytree


@pytest.mark.parametrize("c, fields", [
    (ctl.ZetaController(), ("zeta", "integral")),
    (ctl.ZetaController(law="pi"), ("zeta", "integral")),
    (ctl.ClipHighController(), ("clip_high", "integral")),
    (ctl.ClipHighController(law="pi"), ("clip_high", "integral")),
    (ctl.EntropyCoefController(), ("coef",)),
    (ctl.EntropyCoefController(law="dual"), ("coef",)),
])
def test_state_is_a_pytree(c, fields):
  state = c.init()
  assert state._fields == fields
  leaves = jax.tree.leaves(state)
  assert len(leaves) == len(fields)
  assert all(x.dtype == jnp.float32 and x.shape == () for x in leaves)
  rebuilt = jax.tree.unflatten(jax.tree.structure(state), leaves)
  assert type(rebuilt) is type(state)
  new = jax.jit(c.update)(state, jnp.float32(0.5), target=jnp.float32(1.0))
  assert type(new) is type(state)
  assert all(x.dtype == jnp.float32 and x.shape == ()
             for x in jax.tree.leaves(new))
  assert float(_value(new)) > float(_value(state))
  # The first field is the controlled value, starting at the initial one.
  init_value = {"zeta": c.init_zeta if fields[0] == "zeta" else None,
                "clip_high": getattr(c, "init_clip_high", None),
                "coef": getattr(c, "init_coef", None)}[fields[0]]
  assert float(_value(state)) == np.float32(init_value)


@pytest.mark.parametrize("c", [
    ctl.ZetaController(law="pi", init_zeta=0.02),
    ctl.ZetaController(law="pi", init_zeta=-0.03),
    ctl.ZetaController(law="pi", init_zeta=0.0, sign_flip=False),
    ctl.ClipHighController(law="pi", init_clip_high=0.25),
    ctl.ClipHighController(law="pi"),
])
def test_pi_starts_from_its_initial_value(c):
  """On target the first PI update keeps the initial value (no jump)."""
  new = c.update(c.init(), 1.5, target=1.5)
  np.testing.assert_allclose(_value(new), _value(c.init()), rtol=1e-6,
                             atol=1e-9)


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls, law, accepted", [
    (ctl.ZetaController, "bang", "'doubling', 'pi'"),
    (ctl.ClipHighController, "doubling", "'multiplicative', 'pi'"),
    (ctl.EntropyCoefController, "pi", "'step', 'dual'"),
])
def test_unknown_law(cls, law, accepted):
  with pytest.raises(ValueError, match=f"Unknown {cls.__name__} law "
                     f"'{law}'; expected one of {accepted}"):
    cls(law=law)


def test_zeta_bad_settings():
  with pytest.raises(ValueError, match=r"Need 0 < zeta_min <= zeta_max; got "
                     r"zeta_min=0.1, zeta_max=0.01"):
    ctl.ZetaController(zeta_min=0.1, zeta_max=0.01)
  with pytest.raises(ValueError, match=r"got zeta_min=0.0, zeta_max"):
    ctl.ZetaController(zeta_min=0.0)
  with pytest.raises(ValueError, match=r"init_zeta=0.1 is outside"):
    ctl.ZetaController(init_zeta=0.1)
  with pytest.raises(ValueError, match=r"init_zeta=-0.1 is outside "
                     r"\[-0.05, 0.05\]"):
    ctl.ZetaController(init_zeta=-0.1, law="pi")
  with pytest.raises(ValueError, match=r"init_zeta=-0.001 is outside "
                     r"\[0.0, 0.05\]"):
    ctl.ZetaController(init_zeta=-1e-3, law="pi", sign_flip=False)
  # The doubling law only ever holds 0 or |zeta| in [zeta_min, zeta_max].
  with pytest.raises(ValueError, match=r"init_zeta=5e-05 is outside 0 or "
                     r"\+-\[0.0001, 0.05\]"):
    ctl.ZetaController(init_zeta=5e-5)
  with pytest.raises(ValueError, match=r"init_zeta=0.0 is outside "
                     r"\[0.0001, 0.05\] \(the doubling law without sign "
                     r"flip\)"):
    ctl.ZetaController(init_zeta=0.0, sign_flip=False)
  with pytest.raises(ValueError, match=r"PI gains must be >= 0 and not both "
                     r"0; got kp=-1.0, ki=0.2"):
    ctl.ZetaController(kp=-1.0)
  with pytest.raises(ValueError, match=r"got kp=0.0, ki=0.0"):
    ctl.ZetaController(law="pi", kp=0.0, ki=0.0)
  with pytest.raises(ValueError, match=r"tolerance must be >= 0; got -0.1"):
    ctl.ZetaController(tolerance=-0.1)
  # Legal edge values construct.
  ctl.ZetaController(init_zeta=-0.05)
  ctl.ZetaController(init_zeta=0.0)
  ctl.ZetaController(init_zeta=5e-5, law="pi")


def test_clip_high_bad_settings():
  with pytest.raises(ValueError, match=r"Need 0 < clip_high_min < "
                     r"clip_high_max; got 0.4, 0.2"):
    ctl.ClipHighController(clip_high_min=0.4, clip_high_max=0.2)
  with pytest.raises(ValueError, match=r"got 0.0, 0.4"):
    ctl.ClipHighController(clip_high_min=0.0)
  with pytest.raises(ValueError, match=r"init_clip_high=0.5 is outside "
                     r"\[0.2, 0.4\]"):
    ctl.ClipHighController(init_clip_high=0.5)
  with pytest.raises(ValueError, match=r"factor must be > 1; got 1.0"):
    ctl.ClipHighController(factor=1.0)
  with pytest.raises(ValueError, match=r"got kp=0.0, ki=-0.5"):
    ctl.ClipHighController(kp=0.0, ki=-0.5)
  with pytest.raises(ValueError, match=r"tolerance must be >= 0; got -1"):
    ctl.ClipHighController(tolerance=-1)


def test_coef_bad_settings():
  with pytest.raises(ValueError, match=r"init_coef=-0.1 is outside \[0, 1.0\]"):
    ctl.EntropyCoefController(init_coef=-0.1)
  with pytest.raises(ValueError, match=r"init_coef=2.0 is outside \[0, 1.0\]"):
    ctl.EntropyCoefController(init_coef=2.0)
  with pytest.raises(ValueError, match=r"init_coef=0.0 is outside \[0, -1.0\]"):
    ctl.EntropyCoefController(coef_max=-1.0)
  with pytest.raises(ValueError, match=r"delta must be > 0; got 0"):
    ctl.EntropyCoefController(delta=0)
  with pytest.raises(ValueError, match=r"lr must be > 0; got -0.01"):
    ctl.EntropyCoefController(law="dual", lr=-0.01)
  with pytest.raises(ValueError, match=r"tolerance must be >= 0; got -0.5"):
    ctl.EntropyCoefController(tolerance=-0.5)


def test_settings_are_frozen_and_keyword_only():
  c = ctl.ZetaController()
  with pytest.raises(Exception, match="cannot assign"):
    c.zeta_max = 1.0  # type: ignore[misc]
  with pytest.raises(TypeError):
    ctl.ZetaController(1e-3)  # type: ignore[misc]
  assert math.isclose(c.zeta_max, 0.05)


@pytest.mark.parametrize("controller,field", [
    (ctl.ZetaController(init_zeta=0.01, law="pi"), "zeta"),
    (ctl.ClipHighController(law="pi"), "clip_high"),
    (ctl.EntropyCoefController(init_coef=0.3), "coef")])
def test_the_value_is_read_by_name(controller, field):
  """`controller.value(state)` is the state's field named `VALUE` (the
  contract's `zeta`, `clip_high`, `coef`), whatever the field order."""
  assert controller.VALUE == field
  state = controller.update(controller.init(), 0.5, target=1.0)
  assert controller.value(state) is getattr(state, field)
  swapped = state._replace(**{field: jnp.float32(7.0)})
  assert float(controller.value(swapped)) == 7.0
