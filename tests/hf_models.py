"""Tiny random Hugging Face models and their entropo twins, for tests.

`hf_model(family)` builds a small `transformers` Llama / Qwen2 / Qwen3
causal LM with random weights (normal, `std`, large enough that greedy
decoding does not collapse onto one token), and `to_entropo(hf)` copies its
weights into an `entropo.models.Transformer` in memory, without going
through files (checkpoint loading has its own tests).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entropo.models import ModelConfig
from entropo.models import Transformer

FAMILIES = ("llama", "qwen2", "qwen3")
# The peer is the `hf` extra; the Python 3.12 leg of `make test` has no torch.
SKIP_REASON = ("needs torch and transformers (pip install -e '.[hf]'); the "
               "Python 3.12 leg of `make test` installs neither")


def _hf_kwargs(family: str, *, vocab_size=97, hidden_size=32,
               intermediate_size=48, num_layers=2, num_heads=4,
               num_kv_heads=2, max_position_embeddings=64, **overrides):
  """The `transformers` config fields of the tiny model of `family`."""
  if family not in FAMILIES:
    raise ValueError(f"Unknown family {family!r}; expected one of "
                     f"{FAMILIES}.")
  kwargs = dict(
      vocab_size=vocab_size, hidden_size=hidden_size,
      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
      tie_word_embeddings=family == "qwen3",
      rope_theta=10000.0 if family == "llama" else 1e6,
  )
  if family == "qwen3":
    kwargs.update(head_dim=16)
  kwargs.update(overrides)
  return kwargs


def hf_model(family: str, *, std=0.2, seed=0, **sizes):
  """A random `transformers` causal LM of `family`, in eval mode, float32."""
  torch = pytest.importorskip("torch", reason=SKIP_REASON)
  transformers = pytest.importorskip("transformers", reason=SKIP_REASON)
  kwargs = _hf_kwargs(family, **sizes)
  cls_config, cls_model = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
  }[family]
  config = cls_config(**kwargs)
  torch.manual_seed(seed)
  model = cls_model(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      torch.nn.init.normal_(p, std=std)
  return model


def to_entropo(hf, *, precision="fp32") -> Transformer:
  """An entropo `Transformer` holding the weights of the `transformers` `hf`."""
  cfg = ModelConfig.from_hf(hf.config.to_dict())
  model = Transformer(cfg, precision=precision, rngs=nnx.Rngs(0))
  sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
  dt = model.precision.param_dtype
  arr = lambda x: jnp.asarray(np.asarray(x), dt)
  d, h, kv, hd = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                  cfg.head_dim)
  model.embed_tokens[...] = arr(sd["model.embed_tokens.weight"])
  model.norm.scale[...] = arr(sd["model.norm.weight"])
  if not cfg.tie_word_embeddings:
    model.lm_head[...] = arr(sd["lm_head.weight"].T)
  for i, layer in enumerate(model.layers):
    p = f"model.layers.{i}."
    attn, mlp = layer.attn, layer.mlp
    w = lambda name: sd[p + f"self_attn.{name}_proj.weight"].T
    attn.q_proj[...] = arr(w("q").reshape(d, h, hd))
    attn.k_proj[...] = arr(w("k").reshape(d, kv, hd))
    attn.v_proj[...] = arr(w("v").reshape(d, kv, hd))
    attn.o_proj[...] = arr(w("o").reshape(h, hd, d))
    if cfg.qkv_bias:
      attn.q_bias[...] = arr(sd[p + "self_attn.q_proj.bias"].reshape(h, hd))
      attn.k_bias[...] = arr(sd[p + "self_attn.k_proj.bias"].reshape(kv, hd))
      attn.v_bias[...] = arr(sd[p + "self_attn.v_proj.bias"].reshape(kv, hd))
    if cfg.qk_norm:
      attn.q_norm.scale[...] = arr(sd[p + "self_attn.q_norm.weight"])
      attn.k_norm.scale[...] = arr(sd[p + "self_attn.k_norm.weight"])
    layer.input_layernorm.scale[...] = arr(sd[p + "input_layernorm.weight"])
    layer.post_attention_layernorm.scale[...] = arr(
        sd[p + "post_attention_layernorm.weight"])
    mlp.gate_proj[...] = arr(sd[p + "mlp.gate_proj.weight"].T)
    mlp.up_proj[...] = arr(sd[p + "mlp.up_proj.weight"].T)
    mlp.down_proj[...] = arr(sd[p + "mlp.down_proj.weight"].T)
  return model


def entropo_model(family: str, *, std=0.2, seed=0, precision="fp32",
                  **sizes) -> Transformer:
  """The entropo twin of `hf_model(family, std=std, seed=seed)` where torch
  is installed; without it (the Python 3.12 leg) a model of the same
  config whose every weight is drawn from normal(0, std) by NumPy, so the
  tests that need no Hugging Face peer run on both legs."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  else:
    return to_entropo(hf_model(family, std=std, seed=seed, **sizes),
                      precision=precision)
  cfg = ModelConfig.from_hf(dict(model_type=family,
                                 **_hf_kwargs(family, **sizes)))
  model = Transformer(cfg, precision=precision, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    var.set_value(jnp.asarray(rng.normal(0, std, value.shape), value.dtype))
  return model
