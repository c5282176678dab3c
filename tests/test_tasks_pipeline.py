"""grain pipelines: group layout, process slices, seeds, resume, SFT masks."""

import itertools
import json

import numpy as np
import pytest

from entropo.tasks import char_tokenizer
from entropo.tasks import data
from entropo.tasks import get_task
from entropo.tasks import pipeline
from entropo.tasks import warm_start_examples

TOK = char_tokenizer()
N = 12  # records
MAX_LEN = 8


def _records(n=N):
  return [{"id": 100 + i, "prompt": "ab"[i % 2] * (1 + i % 7),
           "problem": json.dumps({"i": i}), "solution": str(i)}
          for i in range(n)]


def _prompts(source=None, **kwargs):
  kwargs = {"prompts_per_batch": 3, "group_size": 2, "seed": 0,
            "max_prompt_len": MAX_LEN, **kwargs}
  return pipeline.prompt_batches(_records() if source is None else source,
                                 TOK, **kwargs)


def _take(dataset_or_iterator, n):
  return list(itertools.islice(dataset_or_iterator, n))


def _ids(batches, group_size=2):
  return [int(i) for b in batches for i in b["id"][::group_size]]


def _equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_shapes_dtypes_and_group_layout():
  batches = _take(_prompts(group_size=4), 4)
  by_id = {r["id"]: r for r in _records()}
  for batch in batches:
    assert batch["prompt_tokens"].shape == (12, MAX_LEN)
    assert batch["prompt_tokens"].dtype == np.int32
    assert batch["prompt_mask"].shape == (12, MAX_LEN)
    assert batch["prompt_mask"].dtype == bool
    assert batch["id"].shape == (12,) and batch["id"].dtype == np.int64
    assert batch["problem"].shape == (12,)
    for key, value in batch.items():
      groups = value.reshape(3, 4, *value.shape[1:])
      for g in range(3):  # rows [4g, 4g + 4) are one prompt
        for row in groups[g]:
          np.testing.assert_array_equal(row, groups[g][0], err_msg=key)
    assert len(set(batch["id"].tolist())) == 3
    for tokens, mask, i, problem in zip(
        batch["prompt_tokens"], batch["prompt_mask"], batch["id"],
        batch["problem"]):
      prompt = by_id[int(i)]["prompt"]
      assert problem == by_id[int(i)]["problem"]
      n = len(prompt)  # one token per character
      assert mask.tolist() == [True] * n + [False] * (MAX_LEN - n)
      assert TOK.decode(tokens[:n]) == prompt
      assert (tokens[n:] == TOK.pad_id).all()


def test_epochs_are_reshuffled_permutations():
  batches = list(_prompts(num_epochs=3))  # 12 prompts: 4 batches an epoch
  assert len(batches) == 12
  ids = _ids(batches)
  epochs = [ids[i * N:(i + 1) * N] for i in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == [r["id"] for r in _records()]
  assert epochs[0] != epochs[1] != epochs[2]
  # A last partial batch is dropped: 12 * 3 prompts in batches of 5.
  assert len(list(_prompts(prompts_per_batch=5, num_epochs=3))) == 7


def test_seeds():
  first = _ids(_take(_prompts(seed=5), 8))
  assert first == _ids(_take(_prompts(seed=5), 8))
  assert first != _ids(_take(_prompts(seed=6), 8))


@pytest.mark.parametrize("shard_count", [1, 2, 3])
def test_shards_are_slices_of_the_global_batches(shard_count):
  # 6 prompts a batch over 12 records: batches cross epoch boundaries.
  whole = _take(_prompts(prompts_per_batch=6), 5)
  shards = [iter(_prompts(prompts_per_batch=6, shard_index=i,
                          shard_count=shard_count))
            for i in range(shard_count)]
  for batch in whole:
    parts = [next(shard) for shard in shards]
    for part in parts:  # whole groups: 6 / shard_count prompts x 2
      assert len(part["id"]) == 12 // shard_count
    _equal([{k: np.concatenate([p[k] for p in parts]) for k in batch}],
           [batch])
  # Every process is at the same position, which restores on any of them.
  states = [pipeline.iterator_state(shard) for shard in shards]
  assert all(state == states[0] for state in states)
  resumed = pipeline.restore(iter(_prompts(prompts_per_batch=6)), states[-1])
  _equal(_take(resumed, 2), _take(_prompts(prompts_per_batch=6), 7)[5:])


def test_sft_shards_are_slices_of_the_global_batches():
  whole = _take(_sft(_records(), batch_size=6), 3)
  parts = [_take(_sft(_records(), batch_size=6, shard_index=i,
                      shard_count=2), 3) for i in range(2)]
  for batch, first, second in zip(whole, *parts):
    _equal([{k: np.concatenate([first[k], second[k]]) for k in batch}],
           [batch])


@pytest.mark.parametrize("taken", [1, 3, 4, 9])  # 4 batches an epoch
def test_resume_from_saved_state(taken):
  iterator = iter(_prompts())
  _take(iterator, taken)
  state = pipeline.iterator_state(iterator)
  json.dumps(state)
  expected = _take(iterator, 6)
  resumed = pipeline.restore(iter(_prompts()), json.loads(json.dumps(state)))
  _equal(_take(resumed, 6), expected)
  _equal(_take(iter(_prompts()), taken + 6)[taken:], expected)


def test_resume_across_an_epoch_boundary_inside_a_batch():
  # 12 prompts in batches of 5: batch 2 holds the end of epoch 0 and the
  # start of epoch 1.
  iterator = iter(_prompts(prompts_per_batch=5))
  _take(iterator, 2)
  state = pipeline.iterator_state(iterator)
  expected = _take(iterator, 4)
  resumed = pipeline.restore(iter(_prompts(prompts_per_batch=5)), state)
  _equal(_take(resumed, 4), expected)


def test_too_long_or_empty_prompt_is_an_error():
  records = _records()
  records[4]["prompt"] = "x" * (MAX_LEN + 3)
  with pytest.raises(ValueError, match=r"Record id 104: its prompt has 11 "
                     r"tokens; max_prompt_len=8"):
    list(_prompts(records, num_epochs=1))
  records[4]["prompt"] = ""
  with pytest.raises(ValueError, match="Record id 104: its prompt has 0"):
    list(_prompts(records, num_epochs=1))


def test_prompt_batch_matches_the_shuffled_pipeline_layout():
  records = _records()
  batch = pipeline.prompt_batch(records[3:6], TOK, max_prompt_len=MAX_LEN,
                                group_size=2)
  assert batch["id"].tolist() == [103, 103, 104, 104, 105, 105]
  for shuffled in _take(_prompts(num_epochs=1), 4):
    for row, i in enumerate(shuffled["id"]):
      alone = pipeline.prompt_batch([records[int(i) - 100]], TOK,
                                    max_prompt_len=MAX_LEN)
      for key in ("prompt_tokens", "prompt_mask", "problem"):
        np.testing.assert_array_equal(alone[key][0], shuffled[key][row])
  records[4]["prompt"] = "x" * (MAX_LEN + 3)
  with pytest.raises(ValueError, match="Record id 104: its prompt has 11"):
    pipeline.prompt_batch(records, TOK, max_prompt_len=MAX_LEN)
  with pytest.raises(ValueError, match="group_size"):
    pipeline.prompt_batch(records[:1], TOK, max_prompt_len=MAX_LEN,
                          group_size=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"group_size": 0}, "group_size"),
    ({"prompts_per_batch": 2.0}, "prompts_per_batch"),
    ({"shard_index": 3, "shard_count": 3}, "shard_index"),
    ({"prompts_per_batch": 4, "shard_count": 3},
     "prompts_per_batch=4 does not split over shard_count=3"),
    ({"seed": -1}, "seed"),
    ({"num_epochs": 0}, "num_epochs"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _prompts(**kwargs)


def test_prepared_records_feed_the_pipeline(tmp_path):
  data.prepare("countdown", tmp_path, splits={"train": 20})
  source = data.load("countdown", tmp_path, "train")
  batches = list(pipeline.prompt_batches(
      source, TOK, prompts_per_batch=4, group_size=3, seed=1,
      max_prompt_len=32, num_epochs=1))
  assert len(batches) == 5
  assert sorted(_ids(batches, 3)) == list(range(20))
  by_id = {r["id"]: r for r in source}
  row = batches[0]
  n = int(row["prompt_mask"][0].sum())
  assert TOK.decode(row["prompt_tokens"][0, :n]) == by_id[
      int(row["id"][0])]["prompt"]


PAIRS = [("3 7>10:", "3+7"), ("1 2>3:", "1+2"), ("ab", ""), ("x", "yz")]


def _sft(examples=PAIRS, **kwargs):
  kwargs = {"batch_size": 2, "max_len": 12, "seed": 0, **kwargs}
  return pipeline.sft_batches(examples, TOK, **kwargs)


def test_sft_tokens_and_loss_mask():
  batches = list(_sft(num_epochs=1))
  assert len(batches) == 2
  seen = set()
  for batch in batches:
    assert batch["tokens"].shape == (2, 12)
    assert batch["tokens"].dtype == np.int32
    assert batch["mask"].dtype == bool and batch["loss_mask"].dtype == bool
    for tokens, mask, loss_mask in zip(batch["tokens"], batch["mask"],
                                       batch["loss_mask"]):
      n = int(mask.sum())
      assert mask.tolist() == [True] * n + [False] * (12 - n)
      assert tokens[n - 1] == TOK.eos_id
      assert (tokens[n:] == TOK.pad_id).all()
      prompt = next(p for p, c in PAIRS
                    if TOK.decode(tokens[:n]) == p + c)
      completion = dict(PAIRS)[prompt]
      start = len(prompt)
      assert loss_mask.tolist() == (
          [False] * start + [True] * (len(completion) + 1)
          + [False] * (12 - n))
      seen.add(prompt)
  assert seen == {p for p, _ in PAIRS}


def test_sft_records_resume_and_errors():
  records = _records()
  batch = _take(_sft(records, batch_size=12), 1)[0]
  texts = {TOK.decode(t[:m.sum() - 1]) for t, m in zip(batch["tokens"],
                                                       batch["mask"])}
  assert texts == {r["prompt"] + r["solution"] for r in records}

  iterator = iter(_sft(records, batch_size=5))
  _take(iterator, 3)
  state = pipeline.iterator_state(iterator)
  expected = _take(iterator, 3)
  _equal(_take(pipeline.restore(iter(_sft(records, batch_size=5)), state),
               3), expected)

  with pytest.raises(ValueError, match=r"Example 1: prompt, completion and "
                     r"EOS have 3 \+ 9 \+ 1 = 13 tokens; max_len=12"):
    list(_sft([("a", "b"), ("abc", "x" * 9)], num_epochs=1))
  records[2]["solution"] = "x" * 20
  with pytest.raises(ValueError, match="Record id 102: prompt, completion"):
    list(_sft(records, num_epochs=1))


def test_sft_of_warm_start_examples():
  pairs = warm_start_examples(get_task("countdown"), seed=0, num_problems=6,
                              samples_per_problem=2)
  batch = _take(_sft(pairs, batch_size=12, max_len=32), 1)[0]
  rows = {(TOK.decode(tokens[mask & ~loss_mask]), TOK.decode(tokens[loss_mask]))
          for tokens, mask, loss_mask in zip(
              batch["tokens"], batch["mask"], batch["loss_mask"])}
  assert rows == set(pairs)
