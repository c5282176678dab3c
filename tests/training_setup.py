"""A tiny training configuration and a shared warm start for the tests."""

import pathlib

from entropo.training import config as config_lib


def tiny_config(algo: str = "grpo", **sections):
  """Seconds-scale settings: a 1-layer 32-wide model, 2 prompts x 4."""
  c = config_lib.default_config(algo)
  c.model.update(hidden_size=32, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=1)
  c.warm_start.update(steps=40, num_problems=200, batch_size=16,
                      learning_rate=1e-2)
  c.data.update(train_size=64, eval_size=4)
  c.sampling.update(prompts_per_batch=2, group_size=4, max_new_tokens=8)
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
