"""Mesh search: how many sequences fit, and the mesh that fits the most."""

import math

from entropo.planning.catalog import Hardware
from entropo.planning.memory import memory_estimate
from entropo.planning.params import MeshShape


def affine_peaks(cfg, precision, mesh, *, seq_len, phase, **options):
  """`[(fixed, per_sequence)]` bytes per device of each peak of `phase`.

  Every term is affine in the sequences per device, so two estimates (0
  and 1 sequence per device) give each peak exactly.
  """
  options = dict(options, minibatches=1)
  zero, one = (memory_estimate(cfg, precision, mesh, seq_len=seq_len,
                               batch=rows * mesh.batch_shards,
                               **options).phase_peaks(phase)
               for rows in (0, 1))
  return [(a, b - a) for a, b in zip(zero, one)]


def max_sequences(cfg, precision, mesh, *, budget: float, seq_len: int,
                  phase: str, **options) -> int:
  """Most sequences per device that fit `budget` bytes in `phase`.

  `phase="update"` counts the sequences of one minibatch; `"rollout"`
  counts rollout sequences (sampling, then the trainer's forward over
  them). Returns 0 when not even one fits. `options` go to
  `memory_estimate`.
  """
  fits = []
  for fixed, per_row in affine_peaks(cfg, precision, mesh, seq_len=seq_len,
                                      phase=phase, **options):
    if fixed + per_row > budget:
      return 0
    fits.append(math.inf if per_row <= 0 else (budget - fixed) // per_row)
  return int(min(fits))


def _candidate_meshes(cfg, chips, hardware):
  for tensor in (1, 2, 4, 8):
    if (tensor > hardware.max_tensor or chips % tensor
        or cfg.num_kv_heads % tensor):
      continue
    fsdp = 1
    while fsdp <= chips // tensor:
      if (chips // tensor) % fsdp == 0:
        yield MeshShape(data=chips // tensor // fsdp, fsdp=fsdp,
                        tensor=tensor)
      fsdp *= 2


def recommend_mesh(cfg, precision, hardware: Hardware, chips: int, *,
                   seq_len: int, **options) -> tuple[MeshShape | None, int]:
  """The mesh with the largest update capacity, and that capacity.

  Capacity is the number of `seq_len`-token sequences one update step
  holds across all devices (`max_sequences` times `data x fsdp`). Meshes
  within 10 % of the best are ranked by communication: smaller `tensor`
  first (collectives on activations in every layer), then smaller `fsdp`
  (weight all-gathers), so `data` takes what is left. Tensor sizes
  divide the KV heads and stay within `hardware.max_tensor`. Returns
  `(None, 0)` when no mesh fits one sequence per device.
  """
  scored = []
  for mesh in _candidate_meshes(cfg, chips, hardware):
    per_device = max_sequences(cfg, precision, mesh, budget=hardware.budget,
                               seq_len=seq_len, phase="update", **options)
    scored.append((mesh.tensor, mesh.fsdp, per_device * mesh.batch_shards,
                   mesh))
  best = max(capacity for _, _, capacity, _ in scored)
  if best == 0:
    return None, 0
  *_, capacity, mesh = min(x for x in scored if x[2] >= 0.9 * best)
  return mesh, capacity
