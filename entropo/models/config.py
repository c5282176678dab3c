"""Decoder configuration for the Llama, Qwen2 and Qwen3 families."""

import dataclasses
from typing import Any

from entropo.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shapes and options of a decoder-only transformer.

  Attributes:
    vocab_size: V.
    hidden_size: D, the residual width.
    intermediate_size: F, the SwiGLU width.
    num_layers: number of decoder blocks.
    num_heads: query heads H.
    num_kv_heads: key/value heads (grouped-query attention); divides H.
    head_dim: per-head width (default D / H).
    rope_theta: rotary base frequency.
    rms_norm_eps: epsilon of every RMSNorm.
    max_position_embeddings: the context length.
    tie_word_embeddings: the output projection is the embedding transposed.
    qkv_bias: biases on the q, k and v projections (Qwen2).
    qk_norm: RMSNorm over head_dim on queries and keys (Qwen3).
    family: `llama`, `qwen2` or `qwen3` (for export; the options above
      decide the computation).
    attention: the attention implementation, one of
      `entropo.models.attention.IMPLEMENTATIONS`: `auto` (per backend:
      `cudnn` on a GPU with bf16/fp16 compute, else `blockwise`),
      `blockwise` (memory linear in the length, any backend), `cudnn`,
      `reference` (materialised scores, for tests). Not written to
      `config.json`.
    attention_chunk_size: keys per chunk of the `blockwise` attention.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  family: str = "llama"
  attention: str = "auto"
  attention_chunk_size: int = 512

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"Unknown ModelConfig.attention {self.attention!r}; expected one "
          f"of {', '.join(repr(a) for a in ATTENTION_IMPLEMENTATIONS)}."
      )
    if self.family not in FAMILIES:
      raise ValueError(
          f"Unknown model family {self.family!r}; expected one of "
          f"{', '.join(repr(f) for f in FAMILIES)}."
      )
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings", "attention_chunk_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int; got "
                         f"{value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_kv_heads={self.num_kv_heads} must divide "
          f"num_heads={self.num_heads}."
      )
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"hidden_size={self.hidden_size} is not divisible by "
            f"num_heads={self.num_heads}; set head_dim explicitly."
        )
      object.__setattr__(self, "head_dim",
                         self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE; got {self.head_dim}.")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dictionary.

    Raises ValueError for a model type or option entropo does not implement
    (rather than computing something else silently).
    """
    family = hf.get("model_type")
    if family not in FAMILIES:
      raise ValueError(
          f"Unsupported model_type {family!r} in config.json; entropo "
          f"implements {', '.join(repr(f) for f in FAMILIES)}."
      )
    # transformers 5 writes `rope_parameters`; older versions `rope_scaling`.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
      raise ValueError(
          f"rope_scaling of type {kind!r} is not implemented; only plain "
          f"RoPE is."
      )
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not implemented.")
    if family == "llama" and hf.get("attention_bias"):
      raise ValueError("attention_bias=True is not implemented for llama.")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True is not implemented.")
    if family == "qwen3" and hf.get("attention_bias"):
      raise ValueError("attention_bias=True is not implemented for qwen3.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act={act!r} is not implemented (only silu).")
    heads = hf["num_attention_heads"]
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta",
                                                         10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        family=family,
    )
