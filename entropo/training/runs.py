"""Starting and reading runs: `train` (run or resume the experiment of a
config in a workdir) and `load_policy` (the latest policy of a run)."""

import json
import pathlib

from entropo.models import Transformer
from entropo.training import config as config_lib
from entropo.training import guards
from entropo.training import logger as logger_lib
from entropo.training.loop import Trainer


def load_policy(config, workdir=None) -> tuple[Transformer, object]:
  """The policy of the latest checkpoint in a run's workdir, and its
  tokenizer: `load_policy(workdir)` (the run's own `config.json`) or
  `load_policy(config, workdir)`.

  A given `config` must be the run's (the fields outside `RESUMABLE`); a
  mismatch (a LoRA rank or alpha, `init_from`, ...) raises ValueError
  naming each field as `field: run's -> given`, before anything is built,
  as does a workdir without `config.json` or a checkpoint. Nothing is
  trained: with the run's config the warm start is the run's own.
  """
  if workdir is None:
    config, workdir = None, config
  workdir = pathlib.Path(workdir)
  saved_path = workdir / "config.json"
  if not saved_path.is_file():
    raise ValueError(f"{workdir} holds no run: no config.json (load_policy "
                     f"reads the workdir a run trained in)")
  saved = json.loads(saved_path.read_text())
  if not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
    raise ValueError(f"{workdir} holds no checkpoint to load (the run saves "
                     f"one every train.checkpoint_every iterations and at "
                     f"the end)")
  if config is None:
    # (a run saved before the controllers' sections: the same values)
    config = config_lib.ConfigDict(config_lib.upgrade(saved))
  else:
    changes = config_lib.config_changes(saved, config)
    if changes:
      raise ValueError(
          f"the config given to load_policy differs from the run's in "
          f"{saved_path} (run's -> given):\n  " + "\n  ".join(changes)
          + f"\nCall load_policy({str(workdir)!r}) to use the run's own.")
  trainer = Trainer(config, workdir)
  trainer.checkpointer.close()
  return trainer.policy(), trainer.tokenizer


def train(config, workdir) -> dict[str, float]:
  """Runs (or resumes) the experiment of `config` in `workdir`.

  A resume with a changed config is refused (`guards.check_resume`).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  guards.check_resume(config, workdir)
  logger_lib.write_run_metadata(workdir, config)
  trainer = Trainer(config, workdir)
  logger_lib.write_run_metadata(workdir, config, logger_lib.launch_record(
      iteration=trainer.meta.iteration, precision=trainer.precision,
      sampler_precision=trainer.sampler_precision, model=trainer.model,
      model_section=trainer.config.model, lora=trainer.lora,
      sampling_section=trainer.config.sampling,
      packing=trainer.config.train.packing,
      minibatch_tokens=trainer.config.train.minibatch_tokens,
      agent_section=trainer.config.agent if trainer.agent else None))
  return trainer.run()
