"""Controllers register where they are defined (entropo/controllers/).

A controller declared in this file only, for an existing hyperparameter,
becomes a section of the `algo` config, is validated by name, is built by
`Algorithm.from_config` and moves its hyperparameter: adding a controller
touches its module and its test.
"""

import dataclasses
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo import controllers
from entropo.controllers import registry
from entropo.training import Algorithm
from entropo.training import validate
from entropo.training import config as config_lib
from tests.training_setup import tiny_config


class RampState(NamedTuple):
  clip_high: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RampController:
  """Raises clip_high by `step` per iteration up to `cap`, whatever the
  entropy (the protocol: `init`, `update`, `value`)."""

  start: float
  step: float
  cap: float
  VALUE = "clip_high"

  def init(self) -> RampState:
    return RampState(clip_high=jnp.float32(self.start))

  def value(self, state):
    return getattr(state, self.VALUE)

  def update(self, state, entropy, *, target):
    del entropy, target
    return RampState(jnp.minimum(state.clip_high + self.step, self.cap))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RampSection(registry.Section):
  """A ramp of clip_high (a test's controller)."""

  on: bool = registry.flag(False, "ramp algo.clip_high up")
  step: float = registry.setting(0.01, "added per iteration", low=0,
                                 low_open=True)
  cap: float = registry.setting(0.3, "the ramp's ceiling", low=0)


@pytest.fixture(name="ramp")
def _ramp():
  @registry.register("clip_high_ramp", moves="clip_high", section=RampSection,
                     enabled=lambda section, algo: section.on,
                     switch="`algo.clip_high_ramp.on`")
  def build(s: RampSection, start: float):
    if start > s.cap:
      raise registry.SettingError(registry.START, f"{start} is above "
                                  f"algo.clip_high_ramp.cap = {s.cap}")
    return RampController(start=start, step=s.step, cap=s.cap)

  yield build
  registry.unregister("clip_high_ramp")


def test_the_builtin_controllers_are_registered():
  assert list(controllers.CONTROLLERS) == ["zeta", "clip_high_control",
                                           "entropy_coef_control"]
  assert {c.moves for c in controllers.CONTROLLERS.values()} == {
      "zeta", "clip_high", "entropy_coef"}
  table = registry.table()
  for name in controllers.CONTROLLERS:
    assert f"`algo.{name}`" in table
  assert "`max`=0.05 (0, inf)" in table  # zeta's, with its bounds


def test_a_controller_registered_here_runs_through_the_algorithm(ramp):
  del ramp
  c = tiny_config("grpo")
  assert dict(c.algo.clip_high_ramp) == dict(on=False, step=0.01, cap=0.3)
  c.algo.clip_high_ramp.on = True
  algorithm = validate(c).algorithm
  assert set(algorithm.controllers) == {"clip_high"}
  states = algorithm.init_controllers()
  fixed = algorithm.fixed_hyperparameters()
  values = []
  for _ in range(3):
    values.append(float(algorithm.hyperparameters(states, fixed)[
        "clip_high"]))
    states = algorithm.step_controllers(states, 1.0, target=1.0)
  np.testing.assert_allclose(values, [0.2, 0.21, 0.22], rtol=1e-6)
  assert algorithm.hyperparameters(states, fixed)["zeta"] == np.float32(
      1e-3)  # a hyperparameter no controller moves keeps its value


def test_its_fields_and_relations_are_checked_by_name(ramp):
  del ramp
  c = tiny_config("grpo")
  c.algo.clip_high_ramp.step = 0.0
  with pytest.raises(ValueError, match="Invalid config: "
                     "algo.clip_high_ramp.step: must be"):
    validate(c)
  c = tiny_config("grpo")
  c.algo.clip_high_ramp.update(on=True, cap=0.1)
  with pytest.raises(ValueError, match="Invalid config: algo.clip_high: "
                     "0.2 is above algo.clip_high_ramp.cap"):
    validate(c)
  c = tiny_config("grpo")
  c.algo.clip_high_ramp.stpe = 0.1
  with pytest.raises(ValueError, match="algo.clip_high_ramp.stpe: no such "
                     "field \\(did you mean 'step'\\?\\)"):
    validate(c)


def test_one_hyperparameter_has_one_controller(ramp):
  del ramp
  c = tiny_config("adapo")
  c.algo.clip_high = 0.28
  c.algo.clip_high_ramp.on = True
  with pytest.raises(ValueError, match="Invalid config: algo.clip_high_ramp: "
                     "moves clip_high, which algo.clip_high_control moves"):
    validate(c)


def test_a_controller_must_move_a_known_hyperparameter():
  with pytest.raises(ValueError, match="moves 'temperature'"):
    registry.register("t", moves="temperature", section=RampSection,
                      enabled=lambda s, a: False)
  assert "t" not in registry.CONTROLLERS


def test_from_config_takes_the_section_values():
  c = config_lib.default_config("grpo+repo_r")
  c.algo.zeta.update(max=0.5, law="pi")
  zeta = Algorithm.from_config(c.algo).controllers["zeta"]
  assert (zeta.zeta_max, zeta.law, zeta.init_zeta) == (0.5, "pi", 1e-3)


def test_the_docs_table_rows_are_the_registry_s():
  """Each controller row of docs/training.md's table is current (a new
  controller needs no docs edit: `python -m entropo.controllers` lists it)."""
  docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" /
          "training.md").read_text()
  rows = [line for line in docs.splitlines()
          if any(line.startswith(f"| `algo.{name}` |")
                 for name in registry.CONTROLLERS)]
  assert len(rows) >= 3  # the built-in controllers'
  table = registry.table().splitlines()
  for row in rows:
    assert row in table, f"paste `python -m entropo.controllers`: {row}"
