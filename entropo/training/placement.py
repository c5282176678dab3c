"""Where the rows of a global batch live: the multi-process interface.

Several processes (`entropo.training.distributed`) run the same loop on one
mesh over all their devices. Every array the steps see is a global
`jax.Array`: each process loads and tokenizes only its rows of each global
batch, and scores the rows its devices hold. Whatever decides control flow
(rewards, verdicts, evaluation counts) is gathered to every process, so all
of them take the same decisions and meet in the same collectives. With one
process every method is the obvious single-host operation.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from entropo import sharding
from entropo import tasks as tasks_lib


class BatchPlacement:
  """The batch sharding of a mesh and the moves between hosts and devices.

  Dimension 0 of a batch is split over `(data, fsdp)`; the rest is
  replicated, whatever the rank.
  """

  def __init__(self, mesh):
    self.mesh = mesh
    self.sharding = sharding.batch_sharding(mesh, rank=1)
    self.shards = mesh.shape["data"] * mesh.shape["fsdp"]

  def local_slice(self, num_rows: int) -> slice:
    """This process's rows of a global batch of `num_rows`."""
    return sharding.process_rows(self.mesh, num_rows)

  def to_global(self, local, num_rows: int) -> jax.Array:
    """The global batch of which `local` holds this process's rows."""
    return sharding.from_process_rows(self.mesh, local, num_rows)

  def local_rows(self, x: jax.Array) -> np.ndarray:
    """This process's rows of the global `x`, on the host."""
    return sharding.local_rows(x)

  def to_host(self, x: jax.Array) -> np.ndarray:
    """All rows of the global `x`, on every process's host."""
    return sharding.to_host(x)

  def put(self, x) -> jax.Array:
    """`x` (a global array or pytree of them) on the batch sharding."""
    return jax.device_put(x, self.sharding)

  def from_host(self, x: np.ndarray) -> jax.Array:
    """A host array that every process holds whole, on the batch sharding."""
    return jax.make_array_from_callback(x.shape, self.sharding,
                                        lambda index: x[index])

  def replicate(self, tree):
    """`tree` with every array not yet on the mesh replicated over it.

    Scalars (optimizer count, controller states, PRNG keys) become global
    arrays too, which multi-process steps and Orbax checkpoints need.
    """
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(getattr(x, "sharding", None),
                                  NamedSharding)
        else jax.device_put(x, replicated), tree)

  def gather_scores(self, rewards: np.ndarray, reasons: list[str],
                    num_rows: int) -> tuple[np.ndarray, list[str]]:
    """The whole batch's rewards and verdicts from each process's rows."""
    if jax.process_count() == 1:
      return rewards, reasons
    codes = np.asarray([tasks_lib.REASONS.index(r) for r in reasons],
                       np.int32)
    rewards, codes = (self.to_host(self.to_global(x, num_rows))
                      for x in (rewards, codes))
    return rewards, [tasks_lib.REASONS[i] for i in codes]
