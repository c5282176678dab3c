"""Launches an entropo experiment.

    python -m experiments.main --config=experiments/configs/countdown.py \\
        --workdir=/tmp/entropo/demo

The config file's `get_config(arg)` takes what follows a colon, here the
algorithm: `--config=experiments/configs/countdown.py:dapo+repo_r`. Any
field can be overridden: `--config.algo.zeta_max=0.05`,
`--config.train.iterations=200`, `--config.precision=bf16`. A rerun with the
same `--workdir` resumes from its latest checkpoint. Invalid configurations
fail before any compute, naming the field.

Multi-process runs (several hosts, or several local processes) start every
process with the same flags and the environment variables of
`entropo.training.distributed` (`ENTROPO_COORDINATOR_ADDRESS`,
`ENTROPO_NUM_PROCESSES`, `ENTROPO_PROCESS_ID`, or `ENTROPO_DISTRIBUTED=auto`);
the workdir must be on a filesystem all processes share.
"""

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
  from entropo.training import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize_from_env()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
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
