"""A tiny training configuration and a shared warm start for the tests."""

import pathlib

from entropo.training import config as config_lib
from experiments.configs import tiny


def tiny_config(algo: str = "grpo", **sections):
  """Seconds-scale settings: a 1-layer 32-wide model, 2 prompts x 4."""
  c = tiny.shrink(config_lib.default_config(algo))
  c.train.update(iterations=3, eval_every=2, eval_samples=4, pass_k=(1, 4),
                 checkpoint_every=2, progress=False, tensorboard=True,
                 plots=False)
  for name, values in sections.items():
    c[name].update(values)
  return c


def warm_started(directory) -> str:
  """Runs the tiny warm start once into `directory`; returns the model dir."""
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  path = pathlib.Path(directory) / "warm_start"
  warm_start.warm_start(c, config_lib.make_task(c.task),
                        tasks.char_tokenizer(), path)
  return str(path)
