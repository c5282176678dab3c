"""The typed loop state (entropo/training/state.py) and its checkpoint form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo.training.state import RunMeta
from entropo.training.state import TrainState


def _state():
  return TrainState(params={"w": jnp.ones(3)}, opt_state=(jnp.zeros(3),),
                    controllers={"zeta": jnp.float32(0.5)},
                    key=jax.random.key_data(jax.random.key(0)))


def test_a_misspelt_field_is_an_error():
  state, meta = _state(), RunMeta()
  with pytest.raises(AttributeError):
    state.parms  # pylint: disable=pointless-statement
  with pytest.raises(AttributeError):
    meta.iteraton  # pylint: disable=pointless-statement
  with pytest.raises(TypeError):
    meta.replace(iteraton=1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    meta.iteration = 1


def test_the_state_is_a_pytree_and_round_trips_as_the_old_dict():
  state = _state()
  tree = state.to_tree()
  assert list(tree) == ["params", "opt_state", "controllers", "key"]
  doubled = jax.tree.map(lambda x: x * 2, state)
  assert isinstance(doubled, TrainState)
  np.testing.assert_array_equal(doubled.params["w"], 2 * np.ones(3))
  back = TrainState.from_tree(tree)
  assert jax.tree.structure(back) == jax.tree.structure(state)


def test_meta_json_round_trip_and_old_checkpoints():
  meta = RunMeta(iteration=2, data_state={"next_index": 4},
                 initial_entropy=2.0, target_entropy=2.0,
                 cumulative_entropy=3.5, baseline={"eval/x": 1})
  assert RunMeta.from_json(meta.to_json()) == meta
  # A meta of the untyped loop before `skipped_minibatches` and a baseline.
  old = {"iteration": 2, "data_state": None, "initial_entropy": 1.0,
         "target_entropy": 1.0, "cumulative_entropy": 0.5}
  assert RunMeta.from_json(old) == RunMeta(
      iteration=2, initial_entropy=1.0, target_entropy=1.0,
      cumulative_entropy=0.5)
  with pytest.raises(ValueError, match="does not know: surprise"):
    RunMeta.from_json({**old, "surprise": 1})
