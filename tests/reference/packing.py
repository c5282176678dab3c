"""Loop-style reference for sequence packing. Never imports entropo.

Packs sequences, in the bins it is given, one token at a time: each
sequence's valid tokens in order, segments numbered from 1 in the order of
the sequence indices within a bin; a per-target value `x[b, j]` (the
log-prob of token j + 1 given tokens up to j) goes to the packed target
position of token j when token j + 1 is the next packed token of the same
sequence.
"""

import numpy as np


def pack(attention_mask, tokens, targets, bins, row_tokens, rows):
  """Returns packed tokens `[R, W]`, segment ids `[R, W]` and float64
  per-target values `[R, W - 1]` (nan where no target is packed)."""
  valid = np.asarray(attention_mask, bool)
  out_tokens = np.zeros((rows, row_tokens), np.int64)
  out_segments = np.zeros((rows, row_tokens), np.int64)
  out_targets = np.full((rows, row_tokens - 1), np.nan)
  for r, members in enumerate(bins):
    p = 0
    for segment, b in enumerate(sorted(members), start=1):
      cols = [l for l in range(valid.shape[1]) if valid[b, l]]
      for k, l in enumerate(cols):
        out_tokens[r, p] = tokens[b, l]
        out_segments[r, p] = segment
        if k + 1 < len(cols) and cols[k + 1] == l + 1:
          out_targets[r, p] = float(targets[b, l])
        p += 1
  return out_tokens, out_segments, out_targets


def unpack(packed_targets, attention_mask, bins, row_tokens):
  """Per-target `[R, W - 1]` back to `[B, L - 1]` float64 (nan where the
  packed rows hold no value)."""
  valid = np.asarray(attention_mask, bool)
  b_size, l_size = valid.shape
  out = np.full((b_size, l_size - 1), np.nan)
  for r, members in enumerate(bins):
    p = 0
    for b in sorted(members):
      cols = [l for l in range(l_size) if valid[b, l]]
      for k, l in enumerate(cols):
        if k + 1 < len(cols) and cols[k + 1] == l + 1:
          out[b, l] = packed_targets[r, p]
        p += 1
  del row_tokens
  return out
