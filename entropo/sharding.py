"""Placing models and batches on a device mesh with data, fsdp and tensor axes.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv`,
`head_dim`, `mlp`; see `entropo.models.transformer`). A rule table maps each
logical name to a mesh axis, in one place:

| logical  | mesh axis | why |
|----------|-----------|-----|
| vocab    | tensor    | the embedding and head are the largest matrices |
| embed    | fsdp      | every weight has a model-width dimension to shard |
| heads    | tensor    | Megatron-style attention split |
| kv       | tensor    | (replicated when it does not divide, e.g. few KV heads) |
| mlp      | tensor    | Megatron-style MLP split |
| head_dim | -         | kept whole for the attention einsums |

A dimension whose size the mesh axis does not divide is replicated instead
(tiny test models, GQA with fewer KV heads than tensor shards), and a mesh
axis is used at most once per array. The batch is split over
`("data", "fsdp")`. XLA's SPMD partitioner inserts the collectives (fsdp
all-gathers, tensor reduce-scatters) under `jax.jit`.

Several processes (`jax.distributed`): a mesh spans the devices of all of
them and arrays on it are global, each process holding its devices' shards.
`process_rows` says which rows of a batch this process's devices hold (a
contiguous block when processes own consecutive devices, as in
`jax.devices()` order), `from_process_rows` assembles a global batch from
every process's block, `local_rows` reads this process's block back, and
`to_host` copies a whole global array to every process. With one process
they are plain copies.
"""

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
)


def make_mesh(*, data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh with automatic (compiler-chosen) sharding.

  `data * fsdp * tensor` must equal the number of devices used (all of
  `jax.devices()` by default). Axes of size 1 are fine.
  """
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"Mesh axis {name} must be a positive int; got "
                       f"{size!r}.")
  devices = list(jax.devices() if devices is None else devices)
  if data * fsdp * tensor != len(devices):
    raise ValueError(
        f"Mesh data={data} x fsdp={fsdp} x tensor={tensor} = "
        f"{data * fsdp * tensor} does not match the {len(devices)} devices."
    )
  grid = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical_axes, shape, mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  """The `PartitionSpec` of an array with these logical axes and shape."""
  rules = dict(rules)
  if len(logical_axes) != len(shape):
    raise ValueError(
        f"logical axes {tuple(logical_axes)} do not match the array rank "
        f"{len(shape)} (shape {tuple(shape)})."
    )
  used, spec = set(), []
  for name, size in zip(logical_axes, shape):
    if name is not None and name not in rules:
      raise ValueError(
          f"No sharding rule for logical axis {name!r}; rules cover "
          f"{', '.join(repr(r) for r in rules)}."
      )
    axis = rules.get(name)
    if (axis is None or axis in used or axis not in mesh.shape
        or size % mesh.shape[axis]):
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def param_specs(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES):
  """An `nnx.State` of `PartitionSpec`s matching `nnx.state(model, Param)`.

  Every parameter must carry `logical_axes` metadata; one without raises
  ValueError naming it, so nothing is replicated by accident.
  """
  state = nnx.state(model, nnx.Param)

  def spec(path, var):
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(f"Parameter {name} has no logical_axes metadata.")
    return var.replace(logical_to_spec(axes, var.shape, mesh, rules))

  return jax.tree.map_with_path(
      spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES):
  """Like `param_specs`, with `NamedSharding`s on `mesh`."""
  return jax.tree.map(
      lambda s: NamedSharding(mesh, s), param_specs(model, mesh, rules),
      is_leaf=lambda x: isinstance(x, P))


def shard_model(model: nnx.Module, mesh: Mesh,
                rules=DEFAULT_RULES) -> nnx.Module:
  """Moves the model's parameters onto `mesh` by the rules, in place."""
  state = nnx.state(model, nnx.Param)
  placed = jax.device_put(state, param_shardings(model, mesh, rules))
  nnx.update(model, placed)
  return model


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Sharding of a `[B, ...]` batch array: B over `("data", "fsdp")`."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def process_rows(mesh: Mesh, num_rows: int) -> slice:
  """The rows of a `[num_rows, ...]` batch that this process's devices hold.

  Raises ValueError if they are not one contiguous block (a mesh whose
  batch axes interleave the processes' devices).
  """
  spans = {index[0].indices(num_rows)[:2] for index in batch_sharding(
      mesh, rank=1).addressable_devices_indices_map((num_rows,)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f"Process {jax.process_index()} holds rows "
                     f"{sorted(spans)} of a batch of {num_rows}: not one "
                     f"contiguous block. Order the mesh's devices by process "
                     f"(as jax.devices() does).")
  return slice(start, stop)


def from_process_rows(mesh: Mesh, local, num_rows: int) -> jax.Array:
  """A global `[num_rows, ...]` batch from each process's `process_rows`.

  `local` holds this process's rows (NumPy); the result is sharded by
  `batch_sharding(mesh)`.
  """
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh, local.ndim), local,
      (num_rows, *local.shape[1:]))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, as NumPy.

  The whole array when this process holds all of it (one process).
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  n = x.shape[0]
  parts = {}
  for shard in x.addressable_shards:
    rows, *rest = shard.index
    if any(r.indices(d)[:2] != (0, d) for r, d in zip(rest, x.shape[1:])):
      raise ValueError(f"local_rows reads arrays sharded over rows only; "
                       f"got {x.sharding}.")
    parts.setdefault(rows.indices(n)[:2], shard)
  spans = sorted(parts)
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"This process holds rows {spans} of {n}: not one "
                     f"contiguous block.")
  return np.concatenate([np.asarray(parts[s].data) for s in spans])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (global) array as NumPy, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
