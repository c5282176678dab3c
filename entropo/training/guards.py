"""What stops a run before it does damage: non-finite numbers, changed
configs on resume.

* `non_finite` checks an update's or rollout's metrics, and
  `non_finite_update` the parameters and optimizer state an update would
  leave (the loss and gradient can be finite when they are not): with
  `train.skip_non_finite` a bad minibatch is skipped (and counted by the
  loop), otherwise `NonFiniteError` names the iteration and the first
  non-finite metric, and says whether a checkpoint exists to resume from
  (`checkpoint_note`).
* `check_finite_state` refuses to checkpoint NaN/inf parameters, optimizer
  moments or controller states.
* `check_resume` refuses to continue a run with another config, listing
  each changed field (docs/training.md, "When things go wrong").
* `held_interrupts` holds a Ctrl-C during a checkpoint save, so the save
  completes before the run stops; `DeferredInterrupts` turns a Ctrl-C
  during training into a KeyboardInterrupt at the loop's next safe point.
"""

import contextlib
import json
import os
import pathlib
import signal
import threading

import numpy as np

from entropo.training import config as config_lib
from entropo.training import logger as logger_lib
from entropo.training import step as step_lib


class NonFiniteError(FloatingPointError):
  """A loss, gradient, update, entropy or parameter became NaN/inf; nothing
  non-finite is ever saved, so the latest checkpoint (if any) is good."""


def checkpoint_note(directory, latest: int | None, every: int) -> str:
  """What a rerun resumes from: the latest checkpoint, or none yet."""
  if latest is None:
    return (f"No checkpoint was written yet (the first is at iteration "
            f"{every}, train.checkpoint_every), so a rerun starts over.")
  return (f"The latest checkpoint, iteration {latest} in {directory}, is "
          f"good (nothing non-finite is saved); a rerun resumes from it.")


def _note(checkpoints) -> str:
  """`checkpoints`, a note or a function that returns it (called only when
  a message needs it)."""
  return checkpoints() if callable(checkpoints) else str(checkpoints)


def non_finite(metrics: dict, names, *, iteration: int, where: str,
               skip: bool, checkpoints) -> bool:
  """Whether one of `names` in `metrics` is NaN/inf and is to be skipped.

  Returns False when all are finite, True when one is not and `skip` (and
  a `where`, the minibatch) allows skipping; raises NonFiniteError naming
  the iteration, the first non-finite metric and the others otherwise,
  ending with `checkpoints` (`checkpoint_note`).
  """
  bad = [k for k in names if not np.isfinite(metrics[k])]
  if not bad:
    return False
  others = sorted(k for k, v in metrics.items()
                  if k not in bad and not np.isfinite(v))
  more = f" and {len(others) - 5} more" if len(others) > 5 else ""
  detail = (f"; also non-finite: {', '.join(others[:5])}{more}"
            if others else "")
  if skip and where:
    logger_lib.warn(f"skipping the update of iteration {iteration} "
                    f"({where}): non-finite {bad[0]}={metrics[bad[0]]}"
                    f"{detail}")
    return True
  raise NonFiniteError(
      f"Non-finite {bad[0]}={metrics[bad[0]]} at iteration {iteration}"
      f"{f' ({where})' if where else ''}{detail}; stopping. "
      f"{_note(checkpoints)}")


def non_finite_update(*, iteration: int, where: str, skip: bool,
                      checkpoints) -> bool:
  """An update whose loss and gradient norm were finite but whose new
  parameters or optimizer state are not: True (skip it) with `skip`,
  else raises NonFiniteError. Either way it is not applied."""
  what = (f"the parameters or optimizer state after the update of iteration "
          f"{iteration} ({where}) are non-finite, with a finite loss and "
          f"gradient norm (the optimizer's step itself overflowed or divided "
          f"by zero: check the optim section)")
  if skip:
    logger_lib.warn(f"skipping the update: {what}")
    return True
  raise NonFiniteError(f"Non-finite update: {what}; it was not applied; "
                       f"stopping. {_note(checkpoints)}")


def check_finite_state(state, iteration: int, checkpoints) -> None:
  """Raises NonFiniteError if a floating leaf of `state` is NaN/inf."""
  finite = step_lib.finite_leaves(state)
  bad = [path for path, ok in finite.items() if not bool(ok)]
  if bad:
    raise NonFiniteError(
        f"Non-finite state{bad[0]} after iteration {iteration} ({len(bad)} "
        f"arrays in all); not saving it. {_note(checkpoints)}")


def check_resume(config, workdir) -> None:
  """Refuses to resume the run in `workdir` with a changed config.

  A workdir holds a run when it has a `config.json` and a checkpoint. The
  fields of `config` outside `config.RESUMABLE` must equal the saved
  config's, unless `config.train.allow_config_change`; the ValueError lists
  each changed field as `field: old -> new`. Cheap: nothing is loaded.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  checkpoints = workdir / "checkpoints"
  if not path.is_file() or not checkpoints.is_dir() or not any(
      p.name.isdigit() for p in checkpoints.iterdir()):
    return
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    logger_lib.warn(f"cannot read {path} ({e}); the config of the run being "
                    f"resumed is unknown, so it is not compared")
    return
  changes = config_lib.config_changes(saved, config)
  if not changes:
    return
  if config.train.allow_config_change:
    logger_lib.log(f"resuming {workdir} with a changed config "
                   f"(train.allow_config_change): " + "; ".join(changes))
    return
  raise ValueError(
      f"{workdir} holds a run started with another config; resuming it "
      f"would silently change:\n  " + "\n  ".join(changes) + "\nUse "
      f"another --workdir, or resume with the new values with "
      f"--allow_config_change (--config.train.allow_config_change=True). "
      f"These may change on resume: {', '.join(config_lib.RESUMABLE)}.")


@contextlib.contextmanager
def held_interrupts():
  """Holds a Ctrl-C (SIGINT) that arrives inside the block: yields a list
  that gets an entry per interrupt held, so the caller can finish what it
  is doing (a checkpoint save) and then stop, saying so. Outside the main
  thread (where signals cannot be handled) it holds nothing."""
  held: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield held
    return
  previous = signal.signal(signal.SIGINT, lambda *_: held.append(1))
  try:
    yield held
  finally:
    signal.signal(signal.SIGINT, previous)


class DeferredInterrupts:
  """Notes a Ctrl-C (SIGINT) inside the block and raises KeyboardInterrupt
  at the next `check()`, a point of the training loop's choosing.

  A KeyboardInterrupt raised wherever the main thread happens to be can land
  inside a library (a lock of Orbax's saver, grain's prefetch, JAX's
  dispatch) and leave it half-done, so the save that follows hangs; this
  was seen in about 1 of 10 Ctrl-Cs of the launcher on a loaded machine. A
  second Ctrl-C before the next check raises at once. `check()` outside the
  block, or outside the main thread, only raises for a noted interrupt.
  """

  MESSAGE = (b"[entropo] Ctrl-C: stopping at the next safe point (Ctrl-C "
             b"again stops at once)\n")

  def __init__(self):
    self.pending = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    if self.pending:
      raise KeyboardInterrupt
    self.pending = True
    os.write(2, self.MESSAGE)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
    self.pending = False

  def check(self) -> None:
    """Raises KeyboardInterrupt when a Ctrl-C was noted since the last."""
    if self.pending:
      self.pending = False
      raise KeyboardInterrupt
