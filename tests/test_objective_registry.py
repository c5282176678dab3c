"""entropo/objectives/registry.py: where objectives declare themselves."""

import dataclasses
import subprocess
import sys

import pytest

from entropo import objectives
from entropo.objectives import registry
from entropo.training import config as config_lib


@pytest.fixture
def scratch():
  """Registers into the real registry, then removes what a test added."""
  before = dict(registry.OBJECTIVE_TERMS)
  yield
  registry.OBJECTIVE_TERMS.clear()
  registry.OBJECTIVE_TERMS.update(before)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Settings(registry.Settings):
  scratch_width: float = registry.setting(0.5, "a width", low=0, high=1,
                                          high_open=True)


def test_the_historical_objectives_come_first_in_order():
  assert objectives.OBJECTIVES[:6] == (
      "reinforce", "ppo", "gspo", "gspo_token", "clip_cov", "kl_cov")
  assert set(objectives.OBJECTIVES) == set(registry.OBJECTIVE_TERMS)


def test_every_setting_is_an_algo_field_with_its_default():
  algo = config_lib.default_config().algo
  for name, objective in registry.setting_fields().items():
    field = objective.settings.__dataclass_fields__[name]
    assert algo[name] == (list(field.default) if isinstance(
        algo[name], list) else field.default), name
    assert field.metadata["doc"], name


def test_settings_check_their_declared_bounds():
  assert _Settings().scratch_width == 0.5
  assert _Settings(scratch_width=0.0).scratch_width == 0.0
  for bad in (1.0, -0.1, float("nan"), "wide", True):
    with pytest.raises(registry.SettingError) as info:
      _Settings(scratch_width=bad)
    assert info.value.field == "scratch_width"
    assert str(info.value).startswith("scratch_width ")


def test_register_refuses_a_taken_name_or_setting(scratch):
  del scratch
  terms = lambda x, s: None  # noqa: E731
  registry.register("scratch", settings=_Settings)(terms)
  assert objectives.OBJECTIVE_TERMS["scratch"].settings is _Settings
  with pytest.raises(ValueError, match="registered twice"):
    registry.register("scratch")(terms)

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Clash(registry.Settings):
    kl_cov_coef: float = registry.setting(1.0, "taken")

  with pytest.raises(ValueError, match="'kl_cov_coef' is already "
                     "objective 'kl_cov'"):
    registry.register("clash", settings=Clash)(terms)

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Undocumented(registry.Settings):
    bare_field: float = 1.0

  with pytest.raises(ValueError, match="registry.setting"):
    registry.register("bare", settings=Undocumented)(terms)
  with pytest.raises(TypeError, match="subclass registry.Settings"):
    registry.register("plain", settings=dict)(terms)


def test_settings_of_takes_its_own_fields_only():
  values = {"kl_cov_ratio": 0.1, "clip_cov_ratio": 0.5, "unrelated": 1}
  settings = registry.settings_of("kl_cov", values)
  assert settings.kl_cov_ratio == 0.1 and settings.kl_cov_coef == 1.0


def test_policy_loss_refuses_a_foreign_setting():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="has no setting 'clip_cov_ratio'"):
    objectives.policy_loss(x, x, x, mask, objective="kl_cov",
                           settings={"clip_cov_ratio": 0.1})
  with pytest.raises(TypeError, match="KLCovSettings or a mapping"):
    objectives.policy_loss(x, x, x, mask, objective="kl_cov", settings=3)


def test_the_table_is_printed_from_the_registry():
  out = subprocess.run([sys.executable, "-m", "entropo.objectives"],
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == registry.table()
  for name in objectives.OBJECTIVES:
    assert f"| `{name}` |" in out
  assert "`kl_cov_ratio`=0.002 (0, 1]" in out
  # A pipe inside a formula would break the markdown row.
  assert all(row.count(" | ") == 2 for row in out.splitlines()[2:])
