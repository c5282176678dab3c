"""Random test inputs shared by the test modules."""

import numpy as np


def random_mask(rng, shape, p_valid=0.7, *, first_valid=True):
  """A random `[B, T]` bool mask; by default every row has a valid token."""
  mask = rng.random(shape) < p_valid
  if first_valid:
    mask[:, 0] = True
  return mask
