"""The trainer's minibatches (entropo/training/minibatches.py)."""

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


def _minibatches(**settings):
  placement = BatchPlacement(sharding.make_mesh(
      data=1, devices=jax.devices()[:1]))
  return Minibatches(placement, **{
      "minibatches": 1, "minibatch_tokens": 0, "packing": False,
      **settings})


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
