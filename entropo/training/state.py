"""The typed state of a training run: `TrainState` (arrays) and `RunMeta`
(JSON values), each field documented in one place; and `LaunchCounts`,
what one launch counts for its own warnings (never saved).

Both are frozen dataclasses: a change is `state.replace(field=...)`, a
misspelt field is an AttributeError (or a TypeError in `replace`), and the
`Trainer` (loop.py) can snapshot them by reference before an iteration.
`TrainState` is a pytree (`flax.struct.dataclass`), so `jax.tree.map` and
the placement's `replicate` see its arrays.

A checkpoint (checkpoint.py) holds them as before this module existed: the
`state` item is the dict `TrainState.to_tree()` (an Orbax pytree with the
keys of the fields), the `meta` item the JSON dict `RunMeta.to_json()`.
So checkpoints written before the typed state restore unchanged; a meta
without `skipped_minibatches` (older still) restores with 0.
"""

import dataclasses
import json
from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
  """The arrays that decide the rest of a run, checkpointed by Orbax."""

  # The trained variables, an `nnx.State` (with LoRA: the adapters only;
  # the frozen base is `Trainer.frozen`, never saved).
  params: Any
  # The optax state of `params` (`step.make_optimizer`).
  opt_state: Any
  # The algorithm's controller states (`Algorithm.init_controllers`).
  controllers: Any
  # The run's PRNG key as raw key data (`jax.random.key_data`), split once
  # per iteration into the sampling and update keys.
  key: jax.Array

  FIELDS = ("params", "opt_state", "controllers", "key")

  def to_tree(self) -> dict[str, Any]:
    """The checkpoint's `state` item: a dict with a key per field."""
    return {name: getattr(self, name) for name in self.FIELDS}

  @classmethod
  def from_tree(cls, tree: dict[str, Any]) -> "TrainState":
    """The inverse of `to_tree` (a restored `state` item)."""
    return cls(**{name: tree[name] for name in cls.FIELDS})


@dataclasses.dataclass(frozen=True)
class RunMeta:
  """The plain values that decide the rest of a run, checkpointed as JSON."""

  # The next iteration to run (= iterations done); the checkpoint's step.
  iteration: int = 0
  # The prompt iterator's position (`get_state()` of the grain iterator),
  # set when a checkpoint is written; None before the first.
  data_state: dict | None = None
  # The pre-RL evaluation's entropy (nats/token); None until `baseline`.
  initial_entropy: float | None = None
  # The controllers' entropy target: `algo.target_entropy`, or
  # `initial_entropy * algo.target_scale`; None until `baseline`.
  target_entropy: float | None = None
  # The sum of each iteration's `entropy/mean` (`entropy/cumulative`).
  cumulative_entropy: float = 0.0
  # Minibatch updates skipped as non-finite (`train.skip_non_finite`).
  skipped_minibatches: int = 0
  # The pre-RL evaluation's metrics (`baseline.json`), for the plots.
  baseline: dict | None = None

  def replace(self, **changes) -> "RunMeta":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict[str, Any]:
    """The checkpoint's `meta` item (a JSON round trip, so no array or
    NumPy scalar reaches Orbax's JsonSave)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, meta: dict[str, Any]) -> "RunMeta":
    """A restored `meta` item; ValueError for a key no field holds."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(meta) - names)
    if unknown:
      raise ValueError(
          f"the checkpoint's meta has keys this version of entropo does not "
          f"know: {', '.join(unknown)} (written by a newer version?); its "
          f"fields are {', '.join(sorted(names))}")
    return cls(**meta)


@dataclasses.dataclass
class LaunchCounts:
  """Counters of this launch alone (not checkpointed): what the end-of-run
  warnings read (`Trainer._warn_if_never_clipped`)."""

  # Iterations run by this launch.
  iterations: int = 0
  # Whether any of them clipped a token (`pg/clipfrac_high` or `_low` > 0).
  clipped: bool = False
