"""Placing the decoder on a (data, fsdp, tensor) mesh of 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import entropo
from entropo import sharding
from entropo.models import ModelConfig
from entropo.models import Transformer

# Meshes of the 8 virtual CPU devices (tests/conftest.py).
pytestmark = pytest.mark.multidevice

CONFIG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2,
                     qk_norm=True, family="qwen3")


def _model(config=CONFIG):
  return Transformer(config, rngs=nnx.Rngs(0))


def _inputs(batch=8, length=10):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CONFIG.vocab_size, (batch, length))
  mask = np.ones((batch, length), bool)
  mask[1, 6:] = False
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_make_mesh_shapes_and_errors():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="does not match the 8 devices"):
    sharding.make_mesh(data=3)
  with pytest.raises(ValueError, match="tensor must be a positive int"):
    sharding.make_mesh(tensor=0)


def test_logical_to_spec_rules_divisibility_and_reuse():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P(
      "fsdp", "tensor")
  # 3 does not divide by the tensor axis (2): replicated, not an error.
  assert sharding.logical_to_spec(("embed", "kv", "head_dim"), (32, 3, 8),
                                  mesh) == P("fsdp", None, None)
  # A mesh axis is used at most once per array.
  assert sharding.logical_to_spec(("heads", "mlp"), (4, 64), mesh) == P(
      "tensor", None)
  with pytest.raises(ValueError, match="No sharding rule for logical axis "
                     "'experts'"):
    sharding.logical_to_spec(("experts",), (4,), mesh)
  with pytest.raises(ValueError, match="do not match the array rank"):
    sharding.logical_to_spec(("embed",), (4, 4), mesh)


def test_every_parameter_is_placed_by_its_logical_axes():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = sharding.shard_model(_model(), mesh)
  specs = nnx.to_flat_state(sharding.param_specs(model, mesh))
  placed = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for (path, spec), (_, var) in zip(specs, placed):
    assert var.get_value().sharding.spec == spec.get_value(), path
  by_name = {"/".join(map(str, p)): s.get_value() for p, s in specs}
  assert by_name["embed_tokens"] == P("tensor", "fsdp")
  assert by_name["layers/0/mlp/down_proj"] == P("tensor", "fsdp")
  assert by_name["layers/0/attn/q_proj"] == P("fsdp", "tensor", None)


def test_sharded_forward_and_fused_head_equal_single_device():
  tokens, mask = _inputs()
  model = _model()
  want_hidden = model(tokens, attention_mask=mask)
  want_logps, want_ent = entropo.fused_logprobs_entropy(
      want_hidden[:, :-1], model.lm_head_matrix(), tokens[:, 1:],
      chunk_size=32)

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = sharding.shard_model(_model(), mesh)
  batch = sharding.batch_sharding(mesh)

  @nnx.jit
  def forward(m, tokens, mask):
    hidden = m(tokens, attention_mask=mask)
    logps, ent = entropo.fused_logprobs_entropy(
        hidden[:, :-1], m.lm_head_matrix(), tokens[:, 1:], chunk_size=32)
    return hidden, logps, ent

  hidden, logps, ent = forward(sharded, jax.device_put(tokens, batch),
                               jax.device_put(mask, batch))
  np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logps, want_logps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)


def test_parameter_without_logical_axes_is_an_error():
  model = _model()
  model.extra = nnx.Param(jnp.zeros((3,)))
  mesh = sharding.make_mesh(data=8)
  with pytest.raises(ValueError, match="extra has no logical_axes"):
    sharding.param_specs(model, mesh)
