"""Task datasets as TFDS array_record files, read without TensorFlow.

`prepare` writes a task's records (see `entropo.tasks.base`) into a TFDS
dataset under `data_dir`; `load` reads a split back as a random-access
sequence of records with str fields, ready for `grain` (see
`entropo.tasks.pipeline`):

    prepare("countdown", "~/data", splits={"train": 10_000, "test": 500})
    test = load("countdown", "~/data", "test")
    test[0]  # {"id": 2000000017, "prompt": "3 7 25>46:", ...}

Two kinds of task:

* Generated tasks (`Task.generate_problem`): the record of index i is the
  one `task.records(seed, 1, start=i)` yields, so a dataset depends only on
  the task's settings, the seed and the split sizes. Each split draws its
  indices from its own range (`SPLIT_STARTS`: train from 0, validation from
  10**9, test from 2 * 10**9), so record ids are unique across splits. An
  evaluation split skips every index whose problem also occurs in the train
  split of the same dataset (small problem spaces repeat problems), so
  evaluation problems are never trained on (this generates the train split
  twice).
* File-backed tasks (`task.file_backed`, with a `file_records(path)`
  method, e.g. GSM8K): the records of `<split>.jsonl` in TFDS's manual
  directory (`manual_dir=`).
  Record ids are the files' line indices (unique within a split only).

The dataset is `entropo_<task name>`; its config name encodes the settings
(seed, split sizes and a hash of `task.config` and of the input files), so
different settings never share a directory, and preparing again with the
same settings reuses the files. Datasets live in
`<data_dir>/entropo_<task>/<config>/<version>/` and can also be read with
plain TFDS: `tfds.data_source("entropo_countdown/<config>",
data_dir=data_dir, split="test")`. TFDS stores a split in an order hashed
from the ids, not in id order. On several hosts, prepare from one process
and let the others `load` once it is done.
"""

import collections.abc
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from entropo.tasks import base
from entropo.tasks import registry

VERSION = "1.0.0"
_RELEASE_NOTES = {VERSION: "Records: id, prompt, problem, solution."}
# The first record index of each split of a generated task.
SPLIT_STARTS = {"train": 0, "validation": 10**9, "test": 2 * 10**9}
FILE_SPLITS = ("train", "test")  # default splits of file-backed tasks
_PREFIX = "entropo_"


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": np.int64,
      "prompt": tfds.features.Text(),
      "problem": tfds.features.Text(),
      "solution": tfds.features.Text(),
  })


def _json(value) -> str:
  return json.dumps(value, sort_keys=True)


@dataclasses.dataclass(eq=False, kw_only=True)
class TaskConfig(tfds.core.BuilderConfig):
  """The settings of a task dataset.

  Attributes:
    task: the task whose records the dataset holds.
    splits: generated tasks: `{split: number of records}`; file-backed
      tasks: the split names, each read from `<split>.jsonl`.
    seed: the generation seed (generated tasks; None for file-backed ones).
    files_sha256: file-backed tasks: `{split: SHA-256 of its file}`.
  """

  task: base.Task
  splits: Mapping[str, int] | Sequence[str]
  seed: int | None = None
  files_sha256: Mapping[str, str] | None = None

  @property
  def settings(self) -> dict[str, Any]:
    """What determines the records (stored as the dataset's metadata)."""
    splits = self.splits
    splits = dict(splits) if isinstance(splits, Mapping) else list(splits)
    return {"task": self.task.name, "task_config": self.task.config,
            "seed": self.seed, "splits": splits,
            "files_sha256": self.files_sha256}


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by the builders of both kinds of task."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = _RELEASE_NOTES

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"Records of the entropo task {config.task.name!r}. "
                     f"Settings: {_json(config.settings)}"),
        features=_features(),
        metadata=tfds.core.MetadataDict(config.settings),
    )

  def _generate_examples(self, records):
    for record in records:
      yield record["id"], record


class GeneratedTaskBuilder(_TaskBuilder, skip_registration=True):
  """Records of a generated task (see the module docstring)."""

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(self._records(split, size))
            for split, size in self.builder_config.splits.items()}

  @functools.cached_property
  def _train_problems(self) -> frozenset[str]:
    config = self.builder_config
    return frozenset(r["problem"] for r in config.task.records(
        config.seed, config.splits["train"], start=SPLIT_STARTS["train"]))

  def _records(self, split, size):
    config = self.builder_config
    start = SPLIT_STARTS[split]
    if split == "train" or "train" not in config.splits:
      yield from config.task.records(config.seed, size, start=start)
      return
    exclude, kept, skipped = self._train_problems, 0, 0
    for record in config.task.records(config.seed, 10**9, start=start):
      if record["problem"] not in exclude:
        yield record
        kept += 1
        if kept == size:
          return
        continue
      skipped += 1
      if skipped > max(1000, 10 * size):
        raise ValueError(
            f"Split {split!r} of task {config.task.name!r}: {skipped} of "
            f"{skipped + kept} candidate problems are train problems; the "
            f"task has too few distinct problems for these split sizes "
            f"({dict(config.splits)}). Widen the task or lower the sizes.")


class FileTaskBuilder(_TaskBuilder, skip_registration=True):
  """Records of a file-backed task, from `<split>.jsonl` in `manual_dir`."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the task's files, one per split (train.jsonl, test.jsonl), in a "
      "directory and pass it as manual_dir.")

  def _split_generators(self, dl_manager):
    task = self.builder_config.task
    return {split: self._generate_examples(task.file_records(
        os.fspath(dl_manager.manual_dir / f"{split}.jsonl")))
            for split in self.builder_config.splits}


@functools.cache
def builder_class(task_name: str, file_backed: bool) -> type:
  """The TFDS builder class of dataset `entropo_<task_name>`."""
  parent = FileTaskBuilder if file_backed else GeneratedTaskBuilder
  cls_name = "".join(p.title() for p in (_PREFIX + task_name).split("_"))
  return type(cls_name, (parent,), {"name": _PREFIX + task_name,
                                    "__module__": __name__},
              skip_registration=True)


def _get_task(task: str | base.Task, task_kwargs) -> base.Task:
  if isinstance(task, base.Task):
    if task_kwargs:
      raise ValueError("task_kwargs only apply to a task given by name; got "
                       "a Task instance.")
    return task
  return registry.get_task(task, **(task_kwargs or {}))


def _is_file_backed(task: base.Task) -> bool:
  return task.file_backed


def _digest(*parts: bytes) -> str:
  sha = hashlib.sha256()
  for part in parts:
    sha.update(hashlib.sha256(part).digest())
  return sha.hexdigest()


def _generated_config(task, splits, seed) -> TaskConfig:
  if not isinstance(splits, Mapping) or not splits:
    raise ValueError(f"Generated task {task.name!r} needs splits={{name: "
                     f"size}}, e.g. {{'train': 10000, 'test': 1000}}; got "
                     f"{splits!r}.")
  for split, size in splits.items():
    if split not in SPLIT_STARTS:
      raise ValueError(f"Unknown split {split!r}; use names of "
                       f"{sorted(SPLIT_STARTS)}.")
    if not isinstance(size, (int, np.integer)) or not 0 < size < 10**9:
      raise ValueError(f"Split {split!r} size must be an int in [1, 1e9); "
                       f"got {size!r}.")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0; got {seed!r}.")
  splits = {split: int(size) for split, size in splits.items()}
  sizes = "-".join(f"{split}{splits[split]}" for split in sorted(splits))
  digest = _digest(_json(task.config).encode())[:10]
  return TaskConfig(name=f"seed{seed}-{sizes}-{digest}", task=task,
                    splits=splits, seed=int(seed))


def _file_config(task, splits, manual_dir) -> TaskConfig:
  if isinstance(splits, (str, Mapping)) or not splits:
    raise ValueError(f"File-backed task {task.name!r} takes splits as a "
                     f"list of names (one <name>.jsonl each); got {splits!r}.")
  if manual_dir is None:
    names = ", ".join(f"{split}.jsonl" for split in splits)
    raise ValueError(f"Task {task.name!r} reads files: pass manual_dir=, a "
                     f"directory holding {names}.")
  files = {}
  for split in splits:
    path = os.path.join(os.path.expanduser(manual_dir), f"{split}.jsonl")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: task {task.name!r} reads "
                              f"split {split!r} from <manual_dir>/{split}"
                              f".jsonl.")
    with open(path, "rb") as f:
      files[split] = hashlib.sha256(f.read()).hexdigest()
  digest = _digest(_json(task.config).encode(), _json(files).encode())[:10]
  return TaskConfig(name=f"{'-'.join(sorted(splits))}-{digest}", task=task,
                    splits=list(splits), files_sha256=files)


def prepare(task: str | base.Task, data_dir, *,
            splits: Mapping[str, int] | Sequence[str] | None = None,
            seed: int = 0, task_kwargs: Mapping[str, Any] | None = None,
            manual_dir=None, config_name: str | None = None
            ) -> tfds.core.DatasetBuilder:
  """Writes a task's dataset into `data_dir` (reused if already there).

  Shows TFDS's progress bars. Preparing again with the same settings reads
  nothing and writes nothing.

  Args:
    task: a task name (`entropo.tasks.get_task`) or a `Task`.
    data_dir: the TFDS data directory.
    splits: generated tasks: `{split: size}` with splits among
      `SPLIT_STARTS` (required); file-backed tasks: split names (default
      `FILE_SPLITS`), each read from `<manual_dir>/<split>.jsonl`.
    seed: the generation seed (generated tasks).
    task_kwargs: settings for `get_task` when `task` is a name.
    manual_dir: the directory of a file-backed task's JSONL files.
    config_name: a name for these settings instead of the derived one.

  Returns:
    The prepared builder (`builder.as_data_source(split)`, wrapped in
    `Records`, reads it).

  Raises:
    ValueError: bad settings, or `config_name` names a dataset prepared
      with other settings.
    FileNotFoundError: a file-backed task's split file is missing.
  """
  task = _get_task(task, task_kwargs)
  file_backed = _is_file_backed(task)
  if file_backed:
    if seed != 0:
      raise ValueError(f"seed does not apply to file-backed task "
                       f"{task.name!r}.")
    config = _file_config(task, FILE_SPLITS if splits is None else splits,
                          manual_dir)
  else:
    if manual_dir is not None:
      raise ValueError(f"manual_dir does not apply to generated task "
                       f"{task.name!r}.")
    config = _generated_config(task, splits, seed)
  if config_name is not None:
    config = dataclasses.replace(config, name=config_name)
  cls = builder_class(task.name, file_backed)
  builder = cls(config=config, data_dir=os.path.expanduser(data_dir),
                file_format="array_record")
  if builder.is_prepared():
    stored = json.loads(_json(dict(builder.info.metadata)))
    wanted = json.loads(_json(config.settings))
    diff = {key: {"prepared": stored.get(key), "asked": wanted[key]}
            for key in wanted if stored.get(key) != wanted[key]}
    if diff:
      raise ValueError(f"{builder.data_path} was prepared with other "
                       f"settings: {_json(diff)}. Use another config_name "
                       f"or data_dir.")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual_dir is None
          else os.path.expanduser(manual_dir)))
  return builder


class Records(collections.abc.Sequence):
  """A TFDS data source whose records have str fields and an int id.

  TFDS returns text as bytes and ints as numpy scalars; this decodes each
  record into `{"id": int, "prompt": str, "problem": str, "solution": str}`.
  Random access (`len`, `records[i]`), so `grain.MapDataset.source` takes it.
  """

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    size = len(self)
    if not -size <= index < size:
      raise IndexError(f"record {index} out of range [0, {size}).")
    return _decode(self.source[index % size])

  def __repr__(self) -> str:
    return f"Records({self.source!r})"


def _decode(example: Mapping[str, Any]) -> dict[str, Any]:
  return {key: value.decode("utf-8") if isinstance(value, bytes)
          else int(value) for key, value in example.items()}


def dataset_dirs(task: str | base.Task, data_dir) -> dict[str, str]:
  """`{config name: directory}` of the prepared datasets of a task."""
  name = task if isinstance(task, str) else task.name
  root = os.path.join(os.path.expanduser(data_dir), _PREFIX + name)
  if not os.path.isdir(root):
    return {}
  return {config: os.path.join(root, config, VERSION)
          for config in sorted(os.listdir(root))
          if os.path.isfile(os.path.join(root, config, VERSION,
                                         "dataset_info.json"))}


def load(task: str | base.Task, data_dir, split: str, *,
         config_name: str | None = None) -> Records:
  """The records of a prepared split (no TensorFlow involved).

  Args:
    task: the task name (or a `Task`, for its name).
    data_dir: the TFDS data directory given to `prepare`.
    split: e.g. "train", or a TFDS slice such as "train[:100]".
    config_name: which prepared settings (`builder.builder_config.name` of
      `prepare`'s builder); may be left out when the task has one.

  Raises:
    FileNotFoundError: nothing prepared, or no such config.
    ValueError: several configs are prepared and none was named.
  """
  dirs = dataset_dirs(task, data_dir)
  name = task if isinstance(task, str) else task.name
  if not dirs:
    raise FileNotFoundError(f"No prepared dataset of task {name!r} in "
                            f"{data_dir}; run entropo.tasks.data.prepare.")
  if config_name is None:
    if len(dirs) > 1:
      raise ValueError(f"Task {name!r} has several prepared configs in "
                       f"{data_dir}; pass config_name= one of {list(dirs)}.")
    config_name = next(iter(dirs))
  if config_name not in dirs:
    raise FileNotFoundError(f"Task {name!r} has no prepared config "
                            f"{config_name!r} in {data_dir}; prepared: "
                            f"{list(dirs)}.")
  builder = tfds.builder_from_directory(dirs[config_name])
  return Records(builder.as_data_source(split))
