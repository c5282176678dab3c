"""The run's data sets: written once per data directory, then read.

TFDS's own progress bars and its absl warnings ("Using custom data
configuration ...") are off while the trainer writes and reads (they would
interleave with the run's progress bar); entropo logs one line when it
writes a data set. `--verbosity=0` (absl INFO) brings TFDS's lines back.
"""

import contextlib
import io

from absl import logging

from entropo.tasks import data as data_lib
from entropo.training import logger as logger_lib


@contextlib.contextmanager
def quiet_tfds():
  """TFDS without its progress bars and (unless absl logs INFO) warnings."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  active = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  quiet = verbosity < logging.INFO
  if quiet:
    logging.set_verbosity(logging.ERROR)
  try:
    # TFDS prints "Downloading and preparing ..." and "... prepared to"
    # lines itself; entropo's own line says where the data set is.
    with contextlib.redirect_stdout(io.StringIO()) if quiet else (
        contextlib.nullcontext()):
      yield
  finally:
    tqdm_utils.display_progress_bar(active)
    logging.set_verbosity(verbosity)


def write_dataset(config, task, data_dir):
  """Writes the task's train and test splits (reused if already there).

  A generated task's splits depend on `data.seed` and the sizes; a
  file-backed one reads `task.path`'s JSONL files. Returns the builder.
  """
  with quiet_tfds():
    if task.file_backed:
      builder = data_lib.prepare(task, data_dir, manual_dir=config.task.path)
    else:
      builder = data_lib.prepare(
          task, data_dir, seed=config.data.seed,
          splits={"train": config.data.train_size,
                  "test": config.data.eval_size})
  logger_lib.log(f"data: {builder.data_path}")
  return builder


def load_split(task, data_dir, builder, split: str):
  """A written split as a random-access source of records."""
  with quiet_tfds():
    return data_lib.load(task, data_dir, split,
                         config_name=builder.builder_config.name)


def held_out_records(config, task, data_dir, builder) -> list:
  """The first `data.eval_size` records of the test split."""
  source = load_split(task, data_dir, builder, "test")
  return [source[i] for i in range(min(len(source), config.data.eval_size))]
