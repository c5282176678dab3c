"""The catalog of the memory planner: published models and accelerators.

`qwen3_config(name)` gives the `ModelConfig` of a published Qwen3 dense
model; `HARDWARE` the accelerator kinds the tables of docs/scaling.md plan
for, with the share of memory an estimate may fill.
"""

import dataclasses

from entropo.models.config import ModelConfig

GIB = 2**30

# Published Hugging Face config.json values (Qwen/Qwen3-*): hidden size,
# intermediate size, layers, attention heads, KV heads, tied embeddings.
# All have head_dim 128, vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6,
# 40960 positions and q/k RMSNorm.
QWEN3 = {
    "Qwen3-0.6B": (1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": (2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": (2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": (4096, 12288, 36, 32, 8, False),
    "Qwen3-14B": (5120, 17408, 40, 40, 8, False),
    "Qwen3-32B": (5120, 25600, 64, 64, 8, False),
}


def qwen3_config(name: str) -> ModelConfig:
  """The `ModelConfig` of a published Qwen3 dense model, e.g. `Qwen3-8B`."""
  if name not in QWEN3:
    raise ValueError(f"Unknown Qwen3 model {name!r}; choose one of "
                     f"{list(QWEN3)}.")
  d, f, layers, heads, kv, tied = QWEN3[name]
  return ModelConfig(
      vocab_size=151936, hidden_size=d, intermediate_size=f,
      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
      rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
      tie_word_embeddings=tied, qk_norm=True, family="qwen3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
  """An accelerator kind: memory per chip and what the estimate may use.

  Attributes:
    name: for tables.
    hbm_gib: memory per chip.
    memory_fraction: what the runtime gives XLA (launch/run_host.sh sets
      `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9` on GPUs; TPUs give XLA all of it).
    margin: share of that kept free for what the estimate ignores.
    max_tensor: largest tensor axis (within one NVLink domain on GPUs).
  """

  name: str
  hbm_gib: float
  memory_fraction: float = 1.0
  margin: float = 0.15
  max_tensor: int = 8

  @property
  def budget(self) -> float:
    """Bytes per chip an estimate may fill."""
    return self.hbm_gib * GIB * self.memory_fraction * (1 - self.margin)


HARDWARE = {
    "v5e": Hardware(name="TPU v5e", hbm_gib=16),
    "v5p": Hardware(name="TPU v5p", hbm_gib=95),
    "h100": Hardware(name="H100 80GB", hbm_gib=80, memory_fraction=0.9),
}
