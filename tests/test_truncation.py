"""Tests for entropo/models/truncation.py: truncate_logits.

The bisection cut must keep exactly the support a sort-based definition
keeps (tests/reference/sampling.py), ties and -inf entries included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropo.models import truncation
from tests.reference import sampling as ref

VOCAB = 5000


def _logits(rng):
  s = (rng.standard_normal((5, VOCAB)) * 3).astype(np.float32)
  s[0, :100] = s[0, 100:200]  # pairs of equal logits
  s[1] = np.round(s[1], 1)  # many ties
  s[2, :3] = s[2].max()  # a three-way tie at the top
  s[3, -10:] = -np.inf  # masked vocabulary entries
  s[4] *= 1e-3  # nearly uniform: top-p keeps most of the vocabulary
  return s


@pytest.mark.parametrize(
    "top_k, top_p",
    [(1, None), (2, None), (50, None), (VOCAB - 1, None), (None, 0.5),
     (None, 0.95), (40, 0.8), (7, 0.3), (None, 1e-6), (None, 1.0),
     (VOCAB, None), (None, None)])
def test_matches_sorting_reference(rng, top_k, top_p):
  s = _logits(rng)
  got = np.asarray(truncation.truncate_logits(jnp.asarray(s), top_k=top_k,
                                              top_p=top_p))
  for b in range(len(s)):
    keep, _ = ref.support(s[b], top_k=top_k, top_p=top_p)
    keep &= np.isfinite(s[b])
    np.testing.assert_array_equal(np.isfinite(got[b]), keep,
                                  err_msg=f"row {b}")
    np.testing.assert_array_equal(got[b][keep], s[b][keep])
    if top_k is not None and top_k < VOCAB and top_p is None:
      # More only through ties; fewer only through -inf entries (row 3).
      assert keep.sum() >= min(top_k, np.isfinite(s[b]).sum())


def test_traced_top_p_under_jit(rng):
  s = jnp.asarray(_logits(rng)[:3])
  fn = jax.jit(lambda s, p: truncation.truncate_logits(s, top_k=40, top_p=p))
  for p in (0.2, 0.9):
    np.testing.assert_array_equal(
        fn(s, jnp.float32(p)), truncation.truncate_logits(s, top_k=40,
                                                          top_p=p))


def test_top_token_always_kept():
  s = jnp.asarray([[0.0, 10.0, -3.0, 10.0 - 1e-6]], jnp.float32)
  got = truncation.truncate_logits(s, top_p=1e-9)
  np.testing.assert_array_equal(np.isfinite(got), [[False, True, False,
                                                     False]])


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(top_k=0), "top_k must be None or an int >= 1; got 0"),
    (dict(top_k=True), "got True"),
    (dict(top_p=0.0), r"top_p must be None or in \(0, 1\]; got 0.0"),
    (dict(top_p=1.2), "got 1.2"),
])
def test_bad_options(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    truncation.truncate_logits(jnp.zeros((1, 4)), **kwargs)
