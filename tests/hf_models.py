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


def hf_model(family: str, *, vocab_size=97, hidden_size=32,
             intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=64, std=0.2, seed=0, **overrides):
  """A random `transformers` causal LM of `family`, in eval mode, float32."""
  torch = pytest.importorskip("torch", reason=SKIP_REASON)
  transformers = pytest.importorskip("transformers", reason=SKIP_REASON)

  kwargs = dict(
      vocab_size=vocab_size, hidden_size=hidden_size,
      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
      tie_word_embeddings=family == "qwen3",
  )
  if family == "llama":
    kwargs.update(rope_theta=10000.0)
    cls_config, cls_model = (transformers.LlamaConfig,
                             transformers.LlamaForCausalLM)
  elif family == "qwen2":
    kwargs.update(rope_theta=1e6)
    cls_config, cls_model = (transformers.Qwen2Config,
                             transformers.Qwen2ForCausalLM)
  elif family == "qwen3":
    kwargs.update(rope_theta=1e6, head_dim=16)
    cls_config, cls_model = (transformers.Qwen3Config,
                             transformers.Qwen3ForCausalLM)
  else:
    raise ValueError(f"Unknown family {family!r}; expected one of "
                     f"{FAMILIES}.")
  kwargs.update(overrides)
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
  dt = model.policy.param_dtype
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
