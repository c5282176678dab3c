"""The laws' shared pieces: float32 values, the relative error, a bounded
PI step, holding the state on NaN, the PI gains' check."""

import jax.numpy as jnp


def f32(x):
  return jnp.asarray(x, jnp.float32)


def relative_error(entropy, target):
  """`(target - H) / target`: positive when entropy is too low."""
  target = f32(target)
  scale = jnp.maximum(jnp.abs(target), 1e-3)
  return (target - f32(entropy)) / scale


def pi_step(integral, error, kp, ki, low=-1.0):
  """One step of a bounded PI law; returns `(u in [low, 1], new integral)`.

  The integral is clamped so that `ki * integral` stays in [low, 1]
  (anti-windup): after a long excursion the law recovers at once.
  """
  bound = 1.0 / ki if ki > 0 else 0.0
  integral = jnp.clip(integral + error, low * bound, bound)
  u = jnp.clip(kp * error + ki * integral, low, 1.0)
  return u, integral


def hold_if_nan(old, new):
  """The old state where the update produced NaN (a NaN entropy or target).

  A diverged batch must not poison the controller's state for good (it is
  checkpointed); the step laws already hold on NaN, since every comparison
  with NaN is false.
  """
  bad = jnp.zeros((), bool)
  for x in new:
    bad = bad | jnp.isnan(x)
  return type(new)(*(jnp.where(bad, o, n) for o, n in zip(old, new)))


def check_pi_gains(kp, ki):
  if kp < 0 or ki < 0 or kp + ki == 0:
    raise ValueError(
        f"PI gains must be >= 0 and not both 0; got kp={kp}, ki={ki}."
    )
