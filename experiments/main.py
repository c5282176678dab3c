"""Launches an entropo experiment.

    python -m experiments.main --config=experiments/configs/countdown.py \\
        --workdir=/tmp/entropo/demo

The config file's `get_config(arg)` takes what follows a colon, here the
algorithm: `--config=experiments/configs/countdown.py:dapo+repo_r`. Any
field can be overridden: `--config.algo.zeta_max=0.05`,
`--config.train.iterations=200`, `--config.precision=bf16`. A rerun with the
same `--workdir` resumes from its latest checkpoint; a rerun whose config
differs from the run's in a field that may not change on resume
(`entropo.training.config.RESUMABLE` lists those that may) is refused,
listing the changes, unless `--allow_config_change`. Invalid configurations
fail before any compute, naming the field.

The run's log is entropo's lines (`[entropo] ...`), warnings and the
progress bar; `--verbosity=0` adds the INFO lines of absl (Orbax, TFDS).

Multi-process runs (several hosts, or several local processes) start every
process with the same flags and the environment variables of
`entropo.training.distributed` (`ENTROPO_COORDINATOR_ADDRESS`,
`ENTROPO_NUM_PROCESSES`, `ENTROPO_PROCESS_ID`, or `ENTROPO_DISTRIBUTED=auto`);
the workdir must be on a filesystem all processes share.
"""

from absl import app
from absl import flags
from absl import logging
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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume the run in --workdir even though "
    "the config differs from the one it was started with (sets "
    "config.train.allow_config_change).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # absl's INFO lines (Orbax, TFDS, XLA: dozens per checkpoint) bury the
    # run's own log; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  from entropo.training import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize_from_env()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import check_resume  # pylint: disable=g-import-not-at-top
  from entropo.training import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  with config.unlocked():
    if _INIT_FROM.value:
      config.model.init_from = _INIT_FROM.value
    if _ALLOW_CONFIG_CHANGE.value:
      config.train.allow_config_change = True
  try:
    config_lib.validate(config)
    check_resume(config, _WORKDIR.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  metrics = train(config, _WORKDIR.value)
  summary = {k: v for k, v in metrics.items()
             if k.startswith(("eval/", "reward/mean", "entropy/change_pct"))}
  print("final:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())
                            if v is not None))


if __name__ == "__main__":
  app.run(main)
