"""Orbax checkpoints of the whole training state.

A checkpoint holds two items: `state`, the array pytree (parameters,
optimizer state, controller states, PRNG key data) saved with
`StandardSave`, and `meta`, a JSON dict (next iteration, data-iterator
state, entropy target, running sums) saved with `JsonSave`: the dict forms
of the loop's typed `TrainState` and `RunMeta` (state.py). Orbax writes a
step into a temporary directory and renames it when complete, so a crash
while saving leaves the previous step as the latest readable checkpoint;
`latest_step` never returns a half-written one. A complete step that no
longer restores (a truncated data file, a damaged manifest or metadata) is
skipped by `restore_latest`, which warns, moves it to
`<directory>_corrupt/<step>` and falls back to the newest step that
restores.
"""

import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from entropo.training import logger as logger_lib


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

  def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
    """`(step, state, meta)` of the newest checkpoint that restores.

    None when there is no checkpoint. A newer step that fails to restore is
    named in a warning and, once an older one has restored, moved to
    `<directory>_corrupt/<step>` (kept for inspection, out of Orbax's way:
    the run saves that step again). When none restores, raises
    RuntimeError listing each step's error and moves nothing.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state, meta = self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax, TensorStore and JSON raise many types for damaged files.
        failed.append((step, f"{type(e).__name__}: {e}"))
        logger_lib.warn(f"checkpoint {self.directory / str(step)} does not "
                        f"restore ({type(e).__name__}: {str(e)[:300]}); "
                        f"trying the one before it")
        continue
      if failed:
        self._set_aside([s for s, _ in failed])
      return step, state, meta
    if failed:
      raise RuntimeError(
          f"No checkpoint in {self.directory} restores:\n  " + "\n  ".join(
              f"step {s}: {e[:500]}" for s, e in failed) + "\nMove the "
          f"damaged steps away (or start again in another workdir).")
    return None

  def _set_aside(self, steps) -> None:
    """Moves damaged `steps` to `<directory>_corrupt/` (process 0)."""
    aside = self.directory.with_name(self.directory.name + "_corrupt")
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / str(step)
        if target.exists():
          target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(self.directory / str(step), target)
        logger_lib.warn(f"moved the damaged checkpoint of step {step} to "
                        f"{target}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("entropo: corrupt checkpoints")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
