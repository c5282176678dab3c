"""Launches an entropo experiment.

    python -m experiments.main --config=experiments/configs/countdown.py \\
        --workdir=/tmp/entropo/demo

The config file's `get_config(arg)` takes what follows a colon, here the
algorithm: `--config=experiments/configs/countdown.py:dapo+repo_r`. Any
field can be overridden: `--config.algo.zeta_max=0.05`,
`--config.train.iterations=200`, `--config.precision=bf16`. A rerun with the
same `--workdir` resumes from its latest checkpoint. Invalid configurations
fail before any compute, naming the field.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/countdown.py",
    "Path of a config file, optionally followed by :<algorithm>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, metrics and plots.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "A Hugging Face checkpoint directory to start RL from "
    "instead of the supervised warm start (sets config.model.init_from).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if int(os.environ.get("ENTROPO_NUM_PROCESSES", "1")) > 1 or (
      "JAX_COORDINATOR_ADDRESS" in os.environ):
    jax.distributed.initialize()
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _INIT_FROM.value:
    with config.unlocked():
      config.model.init_from = _INIT_FROM.value
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  metrics = train(config, _WORKDIR.value)
  summary = {k: v for k, v in metrics.items()
             if k.startswith(("eval/", "reward/mean", "entropy/change_pct"))}
  print("final:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())
                            if v is not None))


if __name__ == "__main__":
  app.run(main)
