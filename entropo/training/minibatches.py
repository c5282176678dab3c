"""How the trainer cuts a batch of rollouts into minibatches, and packs them.

`Minibatches` holds the four settings that decide it: `algo.minibatches`
(equal slices of a random permutation), `train.minibatch_tokens` (the same
permutation cut by a token budget, docs/training.md "Minibatches by
tokens"), `train.packing` (each minibatch's sequences packed into rows
with segment ids, entropo/packing.py) and `train.row_buckets` (the row
counts those are padded to). The trainer's `update` asks it for
each epoch's rows, gathers them and packs them; the pre-update pass packs
the whole batch the same way.
"""

import dataclasses

import jax
import numpy as np

from entropo import packing as packing_lib
from entropo.training import rollouts as rollouts_lib
from entropo.training.placement import BatchPlacement


@dataclasses.dataclass(frozen=True)
class Minibatches:
  """The minibatch settings of one run and where its batches live."""

  placement: BatchPlacement
  minibatches: int  # algo.minibatches
  minibatch_tokens: int  # train.minibatch_tokens (0: by rows)
  packing: bool  # train.packing
  row_buckets: int  # train.row_buckets

  def rows(self, batch: dict, key, *, iteration: int) -> list[np.ndarray]:
    """The rows of each minibatch of one epoch, in index order.

    `minibatches` equal slices of a random permutation (the whole batch,
    unpermuted, for one); with `minibatch_tokens`, the same permutation cut
    by `entropo.packing.token_budget_batches` into minibatches of at most
    that many real tokens (a budget that holds the batch gives the batch
    itself: the row split's one minibatch).
    """
    n = batch["tokens"].shape[0]
    budget = self.minibatch_tokens
    if not budget and self.minibatches == 1:
      return [np.arange(n)]
    order = np.asarray(jax.random.permutation(key, n))
    if not budget:
      size = n // self.minibatches
      return [order[m * size:(m + 1) * size]
              for m in range(self.minibatches)]
    lengths = self.placement.to_host(batch["attention_mask"]).sum(axis=1)
    if lengths.max() > budget:
      raise ValueError(
          f"train.minibatch_tokens={budget} is less than a sequence of "
          f"{int(lengths.max())} tokens (prompt and completion) in "
          f"iteration {iteration}; set it to at least the rollouts' row "
          f"length, {batch['tokens'].shape[1]}")
    return [np.sort(rows) for rows in packing_lib.token_budget_batches(
        lengths, tokens_per_batch=budget, order=order)]

  def gather(self, batch: dict, rows: np.ndarray) -> dict:
    """The minibatch of `rows`; by tokens (any row count) padded with
    empty rows (no token, no loss) to one of `row_buckets` row counts
    (`rows_bucket`), each a multiple of the data shards (data x fsdp), so
    the minibatch splits over the devices and the update compiles a
    bounded number of times: empty rows change no loss or metric
    (`Learner(batch_rows=)` keeps seq_mean_token_sum_norm's constant, the
    other modes count tokens or sequences with tokens)."""
    n = batch["tokens"].shape[0]
    if len(rows) == n:
      return batch
    if not self.minibatch_tokens:
      return rollouts_lib.gather_rows(self.placement.sharding, [batch], rows)
    size = packing_lib.rows_bucket(len(rows), max_rows=n,
                                   multiple=self.placement.shards,
                                   buckets=self.row_buckets)
    rows = np.concatenate([rows, np.full(size - len(rows), n)])  # n: empty
    return rollouts_lib.gather_rows(self.placement.sharding, [batch], rows,
                                    fill=True)

  def packed(self, mb: dict) -> dict:
    """`mb` with the index arrays of its packing plan when `packing` is on
    (the Learner then runs the forward on packed rows: the pre-update pass
    over the whole batch and each minibatch's update); `mb` itself when
    off.

    Rows of the batch's length L, so every sequence fits one; the row count
    is rounded up to one of `row_buckets` sizes (`rows_bucket`, a multiple
    of the data shards), so the update compiles at most that many times.
    """
    if not self.packing:
      return mb
    mask = self.placement.to_host(mb["attention_mask"])
    b, length = mask.shape
    plan = packing_lib.plan(mask, row_tokens=length,
                            loss_mask=self.placement.to_host(mb["mask"]))
    plan = packing_lib.with_rows(plan, packing_lib.rows_bucket(
        plan.rows, max_rows=b, multiple=self.placement.shards,
        buckets=self.row_buckets))
    return {**mb, **{k: self.placement.from_host(v)
                     for k, v in plan.arrays().items()}}
