"""Sequence packing: several variable-length sequences per row of tokens.

A padded batch spends the model's compute on padding: `[B, L]` tokens where
most sequences are much shorter than `L`. Packing places the valid tokens
of several sequences one after another in rows of a fixed token budget `W`
with segment ids (`1, 2, ...` per sequence of a row, `0` for padding);
attention stays within a segment and positions restart per segment
(`entropo.models.Transformer(..., segment_ids=)`), so every sequence gets
exactly the hidden states it gets in a row of its own.

The plan is computed on the host, in NumPy, from the attention mask (the
lengths are data: a jit-compiled program needs the row count fixed, so
`rows=` pads the plan to a fixed number of rows). It is three index
arrays, and the packing itself is a gather inside the compiled step:

* `source: [R, W]` int32, for each packed token the flat index
  `b * L + l` of the padded token it holds, `-1` for padding;
* `segment_ids: [R, W]` int32;
* `unpack_index: [B, L - 1]` int32, for each padded target position
  `(b, j)` (the log-prob of `tokens[b, j + 1]`, as `sequence_logps` and
  every per-token array of a training batch are laid out) the flat index
  `r * (W - 1) + p` of the packed target position that computes it, `-1`
  where the packed rows do not (padding, or a target across a hole of the
  mask: such positions must carry no loss).

The loss then runs on the padded layout: per-token log-probs and entropy
computed on packed rows are gathered back (`unpack`) to `[B, L - 1]`, and
every objective, aggregation mode (`seq_mean_*` reduce per sequence, so per
segment), advantage and metric is the padded computation itself, on
values equal to float32 rounding; the gather's transpose carries the
gradient back to the packed rows. (Only `O(B L)` elementwise work is left
padded; attention, MLP and the vocabulary head, which cost
`O(L D^2 + L^2 D + L D V)` per row, run on the packed rows.)

`token_budget_batches` forms minibatches by tokens instead of rows (the
trainer's `train.minibatch_tokens`).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """Index arrays that pack a padded `[B, L]` batch into `[R, W]` rows.

  Attributes:
    source: `[R, W]` int32, flat padded index `b * L + l` of each packed
      token, -1 for padding.
    segment_ids: `[R, W]` int32, 1, 2, ... per sequence of a row; 0 padding.
    unpack_index: `[B, L - 1]` int32, flat packed target index
      `r * (W - 1) + p` of each padded target position, -1 where none.
    row_of: `[B]` int32, the packed row of each sequence (-1: empty).
  """

  source: np.ndarray
  segment_ids: np.ndarray
  unpack_index: np.ndarray
  row_of: np.ndarray

  @property
  def rows(self) -> int:
    return self.source.shape[0]

  def arrays(self) -> dict[str, np.ndarray]:
    """The arrays a compiled step needs (`pack_tokens`, `unpack`)."""
    return {"pack_source": self.source, "segment_ids": self.segment_ids,
            "unpack_index": self.unpack_index}


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
  """Bins of sequence indices whose lengths sum to at most `capacity`.

  First-fit decreasing: longest first (ties by index), each into the first
  bin with room. Deterministic; sequences of length 0 go nowhere. At most
  `11/9 OPT + 1` bins.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 1:
    raise ValueError(f"lengths must be [N]; got shape {lengths.shape}.")
  if lengths.size and lengths.max() > capacity:
    raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit "
                     f"a row of {capacity}.")
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  bins, room = [], []
  for i in order:
    if lengths[i] == 0:
      continue
    for j, free in enumerate(room):
      if lengths[i] <= free:
        bins[j].append(i)
        room[j] -= lengths[i]
        break
    else:
      bins.append([i])
      room.append(capacity - lengths[i])
  return bins


def plan(attention_mask, *, row_tokens: int, rows: int | None = None,
         loss_mask=None) -> PackPlan:
  """The packing plan of a padded batch (see the module docstring).

  Each sequence's valid tokens (`attention_mask`, in order, holes
  dropped: the positions they get are `default_positions`', so the
  computation is the padded one) go to one row, by `first_fit_decreasing`.

  Args:
    attention_mask: `[B, L]` bool, the valid tokens of each sequence.
    row_tokens: W, tokens per packed row (at least the longest sequence).
    rows: the number of rows R to pad the plan to (a compiled step's fixed
      shape); default the rows needed. Raises if more are needed.
    loss_mask: optional `[B, L - 1]` bool, checked to lie where the packed
      rows compute the target (both tokens valid and adjacent).

  Returns:
    A `PackPlan`.
  """
  valid = np.asarray(attention_mask, bool)
  if valid.ndim != 2:
    raise ValueError(f"attention_mask must be [B, L]; got {valid.shape}.")
  b, l = valid.shape
  bins = first_fit_decreasing(valid.sum(axis=1), row_tokens)
  r = len(bins) if rows is None else rows
  if len(bins) > r:
    raise ValueError(f"packing needs {len(bins)} rows of {row_tokens} "
                     f"tokens; rows={rows}.")
  source = np.full((r, row_tokens), -1, np.int32)
  segments = np.zeros((r, row_tokens), np.int32)
  unpack = np.full((b, l - 1), -1, np.int32)
  row_of = np.full((b,), -1, np.int32)
  for row, members in enumerate(bins):
    offset = 0
    for segment, i in enumerate(sorted(members), start=1):
      cols = np.flatnonzero(valid[i])  # [n] padded columns, in order
      n = len(cols)
      source[row, offset:offset + n] = i * l + cols
      segments[row, offset:offset + n] = segment
      # Target j = cols[k] pairs token cols[k] with cols[k] + 1: computed
      # at packed position offset + k when the next token is adjacent.
      adjacent = cols[1:] == cols[:-1] + 1  # [n - 1]
      k = np.flatnonzero(adjacent)
      unpack[i, cols[k]] = row * (row_tokens - 1) + offset + k
      row_of[i] = row
      offset += n
  if loss_mask is not None:
    lost = np.asarray(loss_mask, bool) & (unpack < 0)
    if lost.any():
      b_bad, j_bad = np.argwhere(lost)[0]
      raise ValueError(
          f"loss_mask[{b_bad}, {j_bad}] is set where the target's tokens are "
          f"not both valid and adjacent; packing cannot compute it.")
  return PackPlan(source, segments, unpack, row_of)


def with_rows(plan_: PackPlan, rows: int) -> PackPlan:
  """`plan_` padded with empty rows to `rows` (a compiled step's shape)."""
  extra = rows - plan_.rows
  if extra < 0:
    raise ValueError(f"the plan needs {plan_.rows} rows; rows={rows}.")
  def pad(x, fill):
    return np.pad(x, ((0, extra), (0, 0)), constant_values=fill)

  return dataclasses.replace(plan_, source=pad(plan_.source, -1),
                             segment_ids=pad(plan_.segment_ids, 0))


def rows_bucket(needed: int, *, max_rows: int, multiple: int = 1,
                buckets: int = 8) -> int:
  """A row count >= `needed` from at most `buckets` sizes up to `max_rows`.

  Compiled steps take one shape per row count: rounding up to a multiple
  of `ceil(max_rows / buckets)` (itself a multiple of `multiple`, e.g. the
  number of data shards) bounds the number of compilations.
  """
  step = -(-max_rows // buckets)
  step = -(-step // multiple) * multiple
  return max(step, -(-needed // step) * step)


def pack_tokens(tokens, pack_source, *, fill=0):
  """Per-token `[B, L]` arrays (tokens, the attention mask) -> `[R, W]`
  packed, `fill` on padding (jit-able gather)."""
  flat = tokens.reshape(-1)
  return jnp.where(pack_source >= 0,
                   flat[jnp.maximum(pack_source, 0)], fill).astype(
                       tokens.dtype)


def pack_targets(values, unpack_index, rows: int, row_tokens: int, *,
                 fill=0):
  """Per-target `[B, L - 1]` values (masks, old log-probs, advantages) ->
  `[R, W - 1]` packed: each at the packed target position computing it,
  `fill` elsewhere (segment boundaries, padding)."""
  out = jnp.full((rows * (row_tokens - 1),), fill, values.dtype)
  idx = jnp.where(unpack_index >= 0, unpack_index, out.shape[0])
  out = out.at[idx.reshape(-1)].set(values.reshape(-1), mode="drop")
  return out.reshape(rows, row_tokens - 1)


def pack_sequence_values(values, pack_source, length: int, *, fill=0):
  """Per-sequence `[B]` values (rewards, sequence advantages) -> `[R, W]`,
  each on every token of its segment (`length` = L of the padded batch)."""
  seq = jnp.where(pack_source >= 0, pack_source // length, 0)
  return jnp.where(pack_source >= 0, values[seq], fill)


def unpack(packed, unpack_index, *, fill=0.0):
  """Packed per-target values `[R, W - 1]` -> `[B, L - 1]` (jit-able).

  Differentiable: the gradient of each padded position goes back to the
  packed position it came from; positions with no packed source get
  `fill` and no gradient.
  """
  flat = packed.reshape(-1)
  got = flat[jnp.maximum(unpack_index, 0)]
  return jnp.where(unpack_index >= 0, got, jnp.asarray(fill, packed.dtype))


def token_budget_batches(lengths, *, tokens_per_batch: int,
                         order=None) -> list[np.ndarray]:
  """Minibatches of sequence indices by tokens, not rows.

  Walks the sequences in `order` (default their index order; pass a
  permutation to shuffle) and closes a minibatch when the next sequence
  would take it past `tokens_per_batch` tokens: every minibatch but the
  last holds about the same number of tokens, whatever the lengths.

  Args:
    lengths: `[N]` int, tokens per sequence.
    tokens_per_batch: the budget, at least the longest sequence.
    order: optional `[N]` permutation.

  Returns:
    A list of int arrays of sequence indices.
  """
  lengths = np.asarray(lengths, np.int64)
  order = np.arange(len(lengths)) if order is None else np.asarray(order)
  if lengths.size and lengths.max() > tokens_per_batch:
    raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds "
                     f"tokens_per_batch={tokens_per_batch}.")
  batches, current, used = [], [], 0
  for i in order:
    if current and used + lengths[i] > tokens_per_batch:
      batches.append(np.asarray(current))
      current, used = [], 0
    current.append(int(i))
    used += int(lengths[i])
  if current:
    batches.append(np.asarray(current))
  return batches


def padding_fraction(attention_mask, plan_: PackPlan) -> tuple[float, float]:
  """`(padded, packed)` fractions of token slots that hold padding."""
  valid = np.asarray(attention_mask, bool)
  return 1.0 - valid.mean(), 1.0 - (plan_.segment_ids > 0).mean()

