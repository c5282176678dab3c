"""Orbax checkpoints of the whole training state.

A checkpoint holds two items: `state`, the array pytree (parameters,
optimizer state, controller states, PRNG key data) saved with
`StandardSave`, and `meta`, a JSON dict (next iteration, data-iterator
state, entropy target, running sums) saved with `JsonSave`. Orbax writes a
step into a temporary directory and renames it when complete, so a crash
while saving leaves the previous step as the latest readable checkpoint;
`latest_step` never returns a half-written one.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state, meta)` under `directory`."""

  def __init__(self, directory, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """The checkpoint of `step`, with the structure and shardings of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
