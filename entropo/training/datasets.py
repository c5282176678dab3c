"""The run's data sets: written once per data directory, then read."""

from entropo.tasks import data as data_lib


def write_dataset(config, task, data_dir):
  """Writes the task's train and test splits (reused if already there).

  A generated task's splits depend on `data.seed` and the sizes; a
  file-backed one reads `task.path`'s JSONL files. Returns the builder.
  """
  if task.file_backed:
    return data_lib.prepare(task, data_dir, manual_dir=config.task.path)
  return data_lib.prepare(
      task, data_dir, seed=config.data.seed,
      splits={"train": config.data.train_size, "test": config.data.eval_size})


def load_split(task, data_dir, builder, split: str):
  """A written split as a random-access source of records."""
  return data_lib.load(task, data_dir, split,
                       config_name=builder.builder_config.name)


def held_out_records(config, task, data_dir, builder) -> list:
  """The first `data.eval_size` records of the test split."""
  source = load_split(task, data_dir, builder, "test")
  return [source[i] for i in range(min(len(source), config.data.eval_size))]
