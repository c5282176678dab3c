"""Launches an entropo experiment.

    python -m experiments.main --config=experiments/configs/countdown.py \\
        --workdir=/tmp/entropo/demo

The config file's `get_config(arg)` takes what follows a colon, here the
algorithm: `--config=experiments/configs/countdown.py:dapo+repo_r`. Any
field can be overridden: `--config.algo.zeta.max=0.05`,
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

import ast
import difflib
import importlib.util
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = "experiments/configs/countdown.py"
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


def _die(message: str, code: int = 2):
  """Ends the launcher with `message` on one line of stderr: no usage text,
  no traceback."""
  sys.stderr.write(f"{message.rstrip()}\n")
  sys.exit(code)


def _config_arg(argv) -> str:
  value = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _file_config(argv):
  """The config of the `--config` file (None when it does not load: the
  flag parser's own message then says what is wrong)."""
  path, _, arg = _config_arg(argv).partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_entropo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


_SETTING_FLAG = "--config.task.settings."


def _take_task_settings(argv: list[str]) -> dict[str, str]:
  """Removes from `argv` each `--config.task.settings.<name>=<value>` whose
  name the config file's `task.settings` lacks, and returns them.

  A task's settings are its dataclass fields, and a config file sets only
  some of them; ml_collections refuses a key its config lacks, so these are
  added to `task.settings` after parsing (`_typed_setting`) and checked,
  misspelt names included, by `validate` like any other setting.
  """
  if not any(a.startswith(_SETTING_FLAG) for a in argv):
    return {}  # (the config file is loaded here only when needed)
  config = _file_config(argv)
  if config is None or "task" not in config or (
      "settings" not in config.task):
    return {}
  present = set(config.task.settings.keys())
  taken = {}
  for a in list(argv):
    if a.startswith(_SETTING_FLAG) and "=" in a:
      name, value = a[len(_SETTING_FLAG):].split("=", 1)
      if "." not in name and name not in present:
        taken[name] = value
        argv.remove(a)
  return taken


def _typed_setting(task_name: str, name: str, text: str):
  """A setting flag's value, read as its field's annotation wants: the
  text for a string field, else a Python literal (`3`, `2.5`, `True`,
  `('a+b',)`) or, when it is none, the text (which `validate` refuses
  naming the setting)."""
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.tasks import settings  # pylint: disable=g-import-not-at-top
  try:
    fields = settings.fields(tasks.task_class(task_name)) or {}
  except ValueError:
    fields = {}
  if fields.get(name) is str:
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _unknown_override(argv) -> str | None:
  """The message for the first `--config.<path>` whose path is not a field
  of the config file's config (with a "did you mean"), or None."""
  config = _file_config(argv)
  if config is None:
    return None  # the flag parser's own message says what is wrong
  for a in argv:
    if not a.startswith("--config."):
      continue
    names = a[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for depth, name in enumerate(names):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if name not in keys:
        field = ".".join(names[:depth + 1])
        new = _moved(field)
        if new:
          return f"Invalid config: {field}: moved to {new}"
        close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
        hint = (f" (did you mean {'.'.join(names[:depth] + close)!r}?)"
                if close else "")
        where = ".".join(names[:depth]) or "the config"
        return (f"Invalid config: {field}: no such field{hint}; the fields "
                f"of {where} are {sorted(keys)}")
      node = node[name]
  return None


def _moved(field: str) -> str | None:
  """Where an old flat controller field is now (`algo.zeta_max` ->
  `algo.zeta.max`), or None."""
  if not field.startswith("algo."):
    return None
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.moved(field)


# Task settings that the config file does not set (its dataclass has them).
_TASK_SETTINGS = _take_task_settings(sys.argv)

try:
  # ml_collections reads the --config.<field> overrides from sys.argv here,
  # when the flag is defined, so a misspelt field fails at this point.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Path of a config file, optionally followed by :<algorithm>.",
      lock_config=True)
except Exception as error:  # pylint: disable=broad-except
  _die(_unknown_override(sys.argv) or str(error).splitlines()[0])


def _parse_flags(argv):
  """absl's flag parsing, with each error as one line (no usage text)."""
  for a in argv:
    if a.startswith("--config.algo.name"):
      _die("Invalid config: algo.name: is the label of the algorithm the "
           "config was built for, and setting it changes no other field; "
           "choose the algorithm after the config file's colon instead: "
           "--config=experiments/configs/countdown.py:dapo")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # A misspelt --config.<field> surfaces as an AttributeError or KeyError
    # from ml_collections; say which field, and the closest one.
    message = _unknown_override(argv)
    if message is None:  # absl's own message, its first line
      raw = str(e).strip()
      message = raw.strip("'\"").replace("\\n", " ")
      message = message.splitlines()[0]
      # `flag --config.<field>=<value>: why`: name the field like validate.
      bad = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$",
                     raw.replace("\\n", " ").splitlines()[0])
      if bad:
        message = (f"Invalid config: {bad[1]}: cannot read {bad[2]!r} as "
                   f"its type ({bad[3]})")
    _die(message)


def main(argv):
  if len(argv) > 1:
    _die(f"Unexpected arguments: {argv[1:]} (flags are --name=value)")
  if not flags.FLAGS["verbosity"].present:
    # absl's INFO lines (Orbax, TFDS, XLA: dozens per checkpoint) bury the
    # run's own log; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  from entropo.training import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize_from_env()
  except ValueError as e:
    _die(str(e))
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import check_resume  # pylint: disable=g-import-not-at-top
  from entropo.training import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  with config.unlocked():
    if _INIT_FROM.value:
      config.model.init_from = _INIT_FROM.value
    if _ALLOW_CONFIG_CHANGE.value:
      config.train.allow_config_change = True
    for name, text in _TASK_SETTINGS.items():
      config.task.settings[name] = _typed_setting(config.task.name, name,
                                                  text)
  try:
    config_lib.validate(config)
    check_resume(config, _WORKDIR.value)
  except ValueError as e:
    _die(str(e))
  try:
    metrics = train(config, _WORKDIR.value)
  except KeyboardInterrupt:
    # The loop has said what it saved (or discarded) and closed its
    # checkpointer and logs; no traceback. Exit at once: an interrupt that
    # lands while a library starts a worker thread (grain's prefetch pool)
    # can leave a non-daemon thread that the interpreter's shutdown would
    # wait on for ever (seen in 1 of 3 runs of the Ctrl-C launcher test on
    # a loaded machine: the line printed, then a hang in threading._shutdown).
    sys.stderr.write("[entropo] interrupted; rerun the same command to "
                     "resume from the latest checkpoint\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)  # pylint: disable=protected-access
  summary = {k: v for k, v in metrics.items()
             if k.startswith(("eval/", "reward/mean", "entropy/change_pct"))}
  print("final:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(summary.items())
                            if v is not None))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
