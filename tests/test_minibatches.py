"""The trainer's minibatches (entropo/training/minibatches.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from entropo import sharding
from entropo.training.minibatches import Minibatches
from entropo.training.placement import BatchPlacement


def _batch(lengths, width=8):
  mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(
      np.int32)
  return {"tokens": jax.numpy.asarray(mask * 7),
          "attention_mask": jax.numpy.asarray(mask),
          "mask": jax.numpy.asarray(mask)}


def _minibatches(data=1, **settings):
  placement = BatchPlacement(sharding.make_mesh(
      data=data, devices=jax.devices()[:data]))
  return Minibatches(placement, **{
      "minibatches": 1, "minibatch_tokens": 0, "packing": False,
      "row_buckets": 8, **settings})


def test_rows_split_a_permutation_into_equal_minibatches():
  batch = _batch([3, 8, 1, 5, 2, 6])
  one = _minibatches().rows(batch, jax.random.key(0), iteration=0)
  np.testing.assert_array_equal(np.concatenate(one), np.arange(6))
  rows = _minibatches(minibatches=3).rows(batch, jax.random.key(0),
                                          iteration=0)
  assert [len(r) for r in rows] == [2, 2, 2]
  np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(6))


def test_rows_by_tokens_respect_the_budget_and_cover_the_batch():
  lengths = np.array([3, 8, 1, 5, 2, 6])
  rows = _minibatches(minibatch_tokens=9).rows(
      _batch(lengths), jax.random.key(1), iteration=0)
  assert all(lengths[r].sum() <= 9 for r in rows)
  np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(6))


def test_a_budget_below_a_sequence_names_the_field_and_iteration():
  with pytest.raises(ValueError, match=r"train.minibatch_tokens=4 is less "
                     r"than a sequence of 8 tokens .* in iteration 7"):
    _minibatches(minibatch_tokens=4).rows(
        _batch([3, 8, 1]), jax.random.key(0), iteration=7)


@pytest.mark.multidevice
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_minibatches_by_tokens_pad_to_a_multiple_of_the_data_shards(packing):
  """On 4 data shards a minibatch by tokens of 3 rows is gathered with one
  empty row (no token, no loss) and packed into a multiple of 4 rows, both
  split evenly over the devices."""
  batch = _batch([3, 8, 1, 5, 2, 6, 4, 7])
  batch["mask"] = batch["attention_mask"][:, 1:]  # the targets'
  batch = jax.device_put(batch, BatchPlacement(sharding.make_mesh(
      data=4, devices=jax.devices()[:4])).sharding)
  mbs = _minibatches(data=4, minibatch_tokens=9, packing=packing)
  mb = mbs.packed(mbs.gather(batch, np.array([0, 2, 4])))
  assert mb["tokens"].shape[0] == 4
  np.testing.assert_array_equal(np.asarray(mb["attention_mask"]).sum(axis=1),
                                [3, 1, 2, 0])
  assert not np.asarray(mb["mask"])[3].any()
  for key in ("tokens", "pack_source") if packing else ("tokens",):
    assert mb[key].shape[0] % 4 == 0
    assert {s.data.shape[0] for s in mb[key].addressable_shards} == {
        mb[key].shape[0] // 4}


@pytest.mark.parametrize("row_buckets, rows", [(8, 3), (4, 4), (1, 8)])
def test_row_buckets_set_the_padded_row_counts(row_buckets, rows):
  """`train.row_buckets`: a minibatch by tokens of 3 of 8 rows is padded
  to 3 rows with 8 buckets (sizes 1..8), 4 with 4 (2, 4, 6, 8) and the
  whole batch's 8 with one; packing rounds its rows the same way (its 6
  tokens fit one 8-token row: 1 row of up to 3 or 4, 8 of 8)."""
  batch = _batch([3, 8, 1, 5, 2, 6, 4, 7])
  batch["mask"] = batch["attention_mask"][:, 1:]
  mbs = _minibatches(minibatch_tokens=9, row_buckets=row_buckets)
  mb = mbs.gather(batch, np.array([0, 2, 4]))
  assert mb["tokens"].shape[0] == rows
  np.testing.assert_array_equal(
      np.asarray(mb["attention_mask"]).sum(axis=1)[:3], [3, 1, 2])
  assert not np.asarray(mb["attention_mask"])[3:].any()
  packed = dataclasses.replace(mbs, packing=True).packed(mb)
  assert packed["pack_source"].shape[0] == {8: 1, 4: 1, 1: 8}[row_buckets]
