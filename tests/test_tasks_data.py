"""Task datasets: TFDS array_record round trips without TensorFlow."""

import importlib.util
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from entropo.tasks import base
from entropo.tasks import data
from entropo.tasks import get_task
from entropo.tasks.gsm8k import Gsm8k

SPLITS = {"train": 40, "test": 15}


class Tiny(base.Task):
  """Problems {"x": k}, k uniform in [0, values): a small problem space."""

  name = "tiny"

  def __init__(self, values: int = 10**6):
    self.values = values

  @property
  def config(self):
    return {"values": self.values}

  def prompt(self, problem):
    return f"{problem['x']}?"

  def _verify(self, problem, completion):
    return base.CORRECT

  def generate_problem(self, rng):
    return {"x": int(rng.integers(self.values))}

  def solutions(self, problem):
    return [str(problem["x"])]


def _by_id(records):
  return sorted(records, key=lambda r: r["id"])


def _record(task, seed, index):
  return next(task.records(seed, 1, start=index))


def test_round_trip_without_tensorflow(tmp_path):
  assert importlib.util.find_spec("tensorflow") is None
  builder = data.prepare("countdown", tmp_path, splits=SPLITS, seed=3)
  assert builder.builder_config.name.startswith("seed3-test15-train40-")
  task = get_task("countdown")
  train = data.load("countdown", tmp_path, "train")
  assert len(train) == 40
  assert _by_id(train) == list(task.records(3, 40))
  test = data.load("countdown", tmp_path, "test")
  assert len(test) == 15
  for record in test:
    assert set(record) == {"id", "prompt", "problem", "solution"}
    assert type(record["id"]) is int and type(record["prompt"]) is str
    assert record == _record(task, 3, record["id"])
    assert record["id"] >= data.SPLIT_STARTS["test"]
  assert test[-1] == test[14] and test[1:3] == [test[1], test[2]]
  with pytest.raises(IndexError):
    test[15]  # pylint: disable=pointless-statement
  assert "tensorflow" not in sys.modules


def test_deterministic_across_directories(tmp_path):
  kwargs = {"splits": SPLITS, "task_kwargs": {"num_count": 4}}
  reads = []
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    data.prepare("countdown", tmp_path / name, seed=seed, **kwargs)
    reads.append({split: _by_id(data.load("countdown", tmp_path / name,
                                          split)) for split in SPLITS})
  assert reads[0] == reads[1]
  assert reads[0]["train"] != reads[2]["train"]
  assert len(json.loads(reads[0]["train"][0]["problem"])["numbers"]) == 4


def test_evaluation_problems_are_never_train_problems(tmp_path):
  task = Tiny(values=60)  # 40 train draws repeat some of the 60 problems
  data.prepare(task, tmp_path, splits={"train": 40, "validation": 10,
                                       "test": 20})
  train = data.load("tiny", tmp_path, "train")
  assert _by_id(train) == list(task.records(0, 40))
  train_problems = {r["problem"] for r in train}
  all_ids = {r["id"] for r in train}
  for split, size in (("validation", 10), ("test", 20)):
    records = data.load("tiny", tmp_path, split)
    assert len(records) == size
    assert not train_problems & {r["problem"] for r in records}
    assert not all_ids & {r["id"] for r in records}
    all_ids |= {r["id"] for r in records}
    for record in records:
      assert record == _record(task, 0, record["id"])
    # The split's first indices, except those holding train problems.
    ids = sorted(r["id"] for r in records)
    skipped = set(range(data.SPLIT_STARTS[split], ids[-1] + 1)) - set(ids)
    assert skipped
    assert {_record(task, 0, i)["problem"] for i in skipped} <= train_problems


def test_too_small_problem_space_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="too few distinct problems"):
    data.prepare(Tiny(values=3), tmp_path, splits={"train": 50, "test": 2})


def test_prepare_again_reuses_the_files(tmp_path):
  builder = data.prepare("countdown", tmp_path, splits=SPLITS)
  files = sorted(builder.data_path.iterdir())
  stamps = [os.stat(f).st_mtime_ns for f in files]
  again = data.prepare("countdown", tmp_path, splits=SPLITS)
  assert again.data_path == builder.data_path
  assert sorted(again.data_path.iterdir()) == files
  assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_settings_get_their_own_config(tmp_path):
  names = {data.prepare(Tiny(), tmp_path, splits=splits, seed=seed).
           builder_config.name
           for splits, seed in (({"train": 5}, 0), ({"train": 6}, 0),
                                ({"train": 5}, 1))}
  names.add(data.prepare(Tiny(values=7), tmp_path,
                         splits={"train": 5}).builder_config.name)
  assert len(names) == 4
  assert sorted(data.dataset_dirs("tiny", tmp_path)) == sorted(names)
  with pytest.raises(ValueError, match="several prepared configs"):
    data.load("tiny", tmp_path, "train")
  name = data.prepare(Tiny(), tmp_path, splits={"train": 6}).builder_config.name
  assert len(data.load("tiny", tmp_path, "train", config_name=name)) == 6
  with pytest.raises(FileNotFoundError, match="no prepared config"):
    data.load("tiny", tmp_path, "train", config_name="nope")
  with pytest.raises(FileNotFoundError, match="No prepared dataset"):
    data.load("countdown", tmp_path, "train")


def test_config_name_of_other_settings_is_an_error(tmp_path):
  data.prepare(Tiny(), tmp_path, splits={"train": 5}, config_name="mine")
  with pytest.raises(ValueError, match='"seed": {"asked": 1, "prepared": 0}'):
    data.prepare(Tiny(), tmp_path, splits={"train": 5}, seed=1,
                 config_name="mine")


def test_plain_tfds_reads_it(tmp_path):
  builder = data.prepare(Tiny(), tmp_path, splits={"train": 7, "test": 3})
  name = f"entropo_tiny/{builder.builder_config.name}"
  source = tfds.data_source(name, data_dir=tmp_path, split="test",
                            download=False)
  assert len(source) == 3
  assert isinstance(source[0]["prompt"], bytes)
  assert sorted(data.Records(source), key=lambda r: r["id"]) == _by_id(
      data.load("tiny", tmp_path, "test"))
  assert len(data.load("tiny", tmp_path, "train[:4]")) == 4
  info = tfds.builder_from_directory(builder.data_path).info
  assert info.metadata["seed"] == 0
  assert info.metadata["task_config"] == {"values": 10**6}


@pytest.mark.parametrize("splits, seed, match", [
    (None, 0, "needs splits"),
    ({"train": 5, "dev": 5}, 0, "Unknown split 'dev'"),
    ({"train": 0}, 0, "size must be"),
    ({"train": 5}, -1, "seed must be"),
])
def test_bad_generated_settings(tmp_path, splits, seed, match):
  with pytest.raises(ValueError, match=match):
    data.prepare(Tiny(), tmp_path, splits=splits, seed=seed)


def test_bad_task_arguments(tmp_path):
  with pytest.raises(ValueError, match="task_kwargs only apply"):
    data.prepare(Tiny(), tmp_path, splits=SPLITS, task_kwargs={"a": 1})
  with pytest.raises(ValueError, match="manual_dir does not apply"):
    data.prepare(Tiny(), tmp_path, splits=SPLITS, manual_dir=tmp_path)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))


GSM_TRAIN = [
    {"question": "Ann has 2 apples and buys 3. How many?",
     "answer": "2 + 3 = 5\n#### 5"},
    {"question": "A car costs $1,234. Twice?",
     "answer": "2 * 1234 = 2468\n#### 2,468"},
    {"question": "Half of 7?", "answer": "7 / 2 = 3.50\n#### 3.50"},
]
GSM_TEST = [{"question": "Über 9 + 1?", "answer": "9 + 1 = 10\n#### 10"}]


def test_gsm8k_files_from_the_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_jsonl(manual / "train.jsonl", GSM_TRAIN)
  _write_jsonl(manual / "test.jsonl", GSM_TEST)
  task = Gsm8k()
  builder = data.prepare(task, tmp_path / "data", manual_dir=manual)
  train = _by_id(data.load("gsm8k", tmp_path / "data", "train"))
  assert train == list(task.file_records(manual / "train.jsonl"))
  assert [json.loads(r["problem"])["answer"] for r in train] == [
      "5", "2468", "3.5"]
  assert train[1]["prompt"] == task.prompt(json.loads(train[1]["problem"]))
  assert [r["solution"] for r in train] == [r["answer"] for r in GSM_TRAIN]
  test = list(data.load("gsm8k", tmp_path / "data", "test"))
  assert test == list(task.file_records(manual / "test.jsonl"))
  assert test[0]["prompt"].startswith("Question: Über")
  assert builder.info.metadata["files_sha256"].keys() == {"train", "test"}
  by_name = data.prepare("gsm8k", tmp_path / "data", manual_dir=manual)
  assert by_name.data_path == builder.data_path

  # Other file contents are another config, never the stale data.
  _write_jsonl(manual / "test.jsonl", GSM_TEST * 2)
  again = data.prepare(task, tmp_path / "data", manual_dir=manual)
  assert again.builder_config.name != builder.builder_config.name
  assert len(again.as_data_source("test")) == 2


def test_gsm8k_errors(tmp_path):
  with pytest.raises(ValueError, match="pass manual_dir="):
    data.prepare(Gsm8k(), tmp_path)
  with pytest.raises(FileNotFoundError, match="test.jsonl not found"):
    _write_jsonl(tmp_path / "train.jsonl", GSM_TRAIN)
    data.prepare(Gsm8k(), tmp_path / "data", manual_dir=tmp_path)
  with pytest.raises(ValueError, match="list of names"):
    data.prepare(Gsm8k(), tmp_path, manual_dir=tmp_path, splits={"train": 3})
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "train.jsonl").write_text('{"question": "q"}\n')
  with pytest.raises(ValueError, match="train.jsonl:1: missing"):
    data.prepare(Gsm8k(), tmp_path / "data", manual_dir=tmp_path / "bad",
                 splits=["train"])


def test_the_trainer_writes_its_data_set_quietly(tmp_path, capsys, caplog):
  """No TFDS bar, print or warning between the run's own lines."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import datasets  # pylint: disable=g-import-not-at-top
  from tests.training_setup import tiny_config  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # the launcher's default
  try:
    c = tiny_config()
    task = config_lib.make_task(c.task)
    builder = datasets.write_dataset(c, task, tmp_path)
    datasets.load_split(task, tmp_path, builder, "train")
  finally:
    logging.set_verbosity(verbosity)
  captured = capsys.readouterr()
  assert captured.out.splitlines() == [f"[entropo] data: {builder.data_path}"]
  assert "%|" not in captured.err  # no progress bar
  assert not [r for r in caplog.records if r.levelno < 40], caplog.records
