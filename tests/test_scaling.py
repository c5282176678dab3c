"""The memory estimator against entropo's own model, JAX and hand counts."""

import contextlib
import functools
import io
import math
import pathlib
import re

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entropo import planning
from entropo import precision as precision_lib
from entropo import sharding
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import add_lora
from entropo.models import transformer as transformer_lib
from entropo.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True,
                   family="qwen3")
TINY_CONFIGS = {
    "qwen3_tied": TINY.replace(tie_word_embeddings=True),
    "qwen3_untied": TINY,
    "qwen2_bias": TINY.replace(qk_norm=False, qkv_bias=True, family="qwen2",
                               head_dim=16),
    "llama": TINY.replace(qk_norm=False, family="llama", num_kv_heads=4),
}


@functools.lru_cache(maxsize=None)
def _abstract_model(cfg, precision="fp32", remat="none"):
  """The Transformer's parameters as shapes only: nothing is allocated."""
  return nnx.eval_shape(
      lambda: Transformer(cfg, precision=precision, rngs=nnx.Rngs(0),
                          remat=remat))


def _model_params(model):
  """`[(shape, logical_axes)]` of every parameter of an abstract model."""
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(tuple(v.shape), tuple(v.get_metadata()["logical_axes"]))
          for v in leaves]


def _estimator_params(cfg):
  return [(p.shape, p.axes) for p in planning.param_shapes(cfg)
          for _ in range(p.count)]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_param_shapes_equal_the_transformers(name):
  cfg = TINY_CONFIGS[name]
  params = _model_params(_abstract_model(cfg))
  assert sorted(_estimator_params(cfg)) == sorted(params)
  assert planning.param_count(cfg) == sum(math.prod(s) for s, _ in params)


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B"])
def test_qwen3_param_count_equals_the_abstract_transformer(name):
  cfg = planning.qwen3_config(name)
  params = _model_params(_abstract_model(cfg))
  assert sorted(_estimator_params(cfg)) == sorted(params)
  assert planning.param_count(cfg) == sum(math.prod(s) for s, _ in params)


@pytest.mark.parametrize("name, total, body", [
    # Totals as the model cards round them, in billions.
    ("Qwen3-0.6B", 0.6, 0.44),
    ("Qwen3-1.7B", 1.7, 1.4),
    ("Qwen3-4B", 4.0, 3.6),
    ("Qwen3-8B", 8.19, 6.95),
    ("Qwen3-14B", 14.8, 13.2),
    ("Qwen3-32B", 32.8, 31.2),
])
def test_qwen3_param_counts_match_the_published_totals(name, total, body):
  cfg = planning.qwen3_config(name)
  digits = len(str(total).split(".")[1])
  assert round(planning.param_count(cfg) / 1e9, digits) == total
  assert round(planning.param_count(cfg, embeddings=False) / 1e9,
               len(str(body).split(".")[1])) == body


def test_qwen3_exact_counts_and_config():
  counts = {name: planning.param_count(planning.qwen3_config(name))
            for name in ("Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B")}
  assert counts == {"Qwen3-0.6B": 596_049_920, "Qwen3-8B": 8_190_735_360,
                    "Qwen3-32B": 32_762_123_264}
  cfg = planning.qwen3_config("Qwen3-0.6B")
  assert (cfg.tie_word_embeddings, cfg.qk_norm, cfg.head_dim,
          cfg.vocab_size) == (True, True, 128, 151936)
  with pytest.raises(ValueError, match="Unknown Qwen3 model 'Qwen3-7B'"):
    planning.qwen3_config("Qwen3-7B")


def local_elements(shape, spec, mesh):
  n = 1
  for size, axis in zip(shape, tuple(spec) + (None,) * len(shape)):
    n *= size // (mesh.shape[axis] if axis else 1)
  return n


@pytest.mark.parametrize("name, layout", [
    ("qwen3_untied", (2, 2, 2)), ("qwen3_untied", (1, 1, 8)),
    ("qwen3_tied", (1, 8, 1)), ("qwen2_bias", (1, 2, 4)),
    ("Qwen3-8B", (1, 4, 2)), ("Qwen3-0.6B", (2, 1, 4)),
])
@pytest.mark.multidevice
def test_params_per_device_follow_entropos_sharding_rules(name, layout):
  cfg = TINY_CONFIGS.get(name) or planning.qwen3_config(name)
  data, fsdp, tensor = layout
  mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
  model = _abstract_model(cfg)
  specs = sharding.param_specs(model, mesh)
  state = nnx.state(model, nnx.Param)
  is_var = lambda x: isinstance(x, nnx.Variable)
  expected = sum(
      local_elements(v.shape, s.get_value(), mesh) for v, s in zip(
          jax.tree.leaves(state, is_leaf=is_var),
          jax.tree.leaves(specs, is_leaf=is_var)))
  shape = planning.MeshShape(data=data, fsdp=fsdp, tensor=tensor)
  assert planning.params_per_device(cfg, shape) == expected


_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")
_ITEMSIZE = {"bool": 1, "bf16": 2, "f16": 2, "f32": 4, "i32": 4, "u32": 4}


def _residual_bytes(fn, *args):
  """Bytes of what autodiff saves for `fn`'s backward, arguments excluded."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(fn, *args)
  total = 0
  for line in out.getvalue().splitlines():
    match = _RESIDUAL.match(line.strip())
    if match and "from the argument" not in match[3]:
      shape = [int(x) for x in match[2].split(",") if x]
      total += math.prod(shape) * _ITEMSIZE[match[1]]
  return total


def _block_residuals(cfg, precision, batch, length):
  precision = precision_lib.get_precision(precision)
  block = nnx.eval_shape(
      lambda: transformer_lib.Block(cfg, precision, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(block)

  def loss(params, x):
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cos, sin = transformer_lib.rope_tables(positions, cfg.head_dim,
                                           cfg.rope_theta)
    out, _ = nnx.merge(graphdef, params)(
        x, cos, sin, jnp.ones((batch, length), bool), jnp.arange(length))
    return jnp.sum(out.astype(jnp.float32))

  x = jax.ShapeDtypeStruct((batch, length, cfg.hidden_size),
                           precision.compute_dtype)
  return _residual_bytes(loss, params, x)


@pytest.mark.parametrize("attention", ["reference", "blockwise"])
@pytest.mark.parametrize("name", ["qwen3_untied", "qwen2_bias"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_fp32_head"])
def test_block_activations_equal_jaxs_saved_residuals(name, precision,
                                                      attention):
  # One more sequence in the batch adds exactly the per-sequence residuals
  # (weights cast to the compute dtype do not grow with the batch).
  cfg, length = TINY_CONFIGS[name].replace(attention=attention), 24
  per_sequence = (_block_residuals(cfg, precision, 2, length)
                  - _block_residuals(cfg, precision, 1, length))
  c = jnp.dtype(precision_lib.get_precision(
      precision).compute_dtype).itemsize
  saved, _, _ = planning.block_token_bytes(cfg, planning.MeshShape(), c,
                                           length, attention)
  # In float32 the first RMSNorm keeps the block's input itself, which is
  # an argument here (in the model, the previous block's output).
  argument = cfg.hidden_size * c if c == 4 else 0
  assert per_sequence == length * (saved - argument)


@pytest.mark.parametrize("remat", ["none", "block", "block_save_dots"])
@pytest.mark.parametrize("attention", ["reference", "blockwise"])
@pytest.mark.parametrize("precision", ["fp32", "bf16_fp32_head"])
def test_model_activations_close_to_jaxs_saved_residuals(precision,
                                                         attention, remat):
  cfg = TINY_CONFIGS["qwen3_untied"].replace(attention=attention)
  length = 24
  graphdef, params = nnx.split(_abstract_model(cfg, precision, remat))

  def loss(params, tokens):
    logps, entropy = step_lib.sequence_logps(
        nnx.merge(graphdef, params), tokens, jnp.ones(tokens.shape, bool))
    return jnp.sum(logps) + jnp.sum(entropy)

  tokens = lambda b: jax.ShapeDtypeStruct((b, length), jnp.int32)
  per_sequence = (_residual_bytes(loss, params, tokens(2))
                  - _residual_bytes(loss, params, tokens(1)))
  est = lambda b: planning.memory_estimate(
      cfg, precision, planning.MeshShape(), batch=b, seq_len=length,
      attention=attention, remat=remat)
  assert per_sequence == pytest.approx(
      est(2).activations - est(1).activations, rel=0.01)


def test_hand_computed_case_float64():
  cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
  est = planning.memory_estimate(cfg, "fp32", planning.MeshShape(), batch=2,
                                seq_len=4, attention="reference")
  f8 = np.float64
  v, d, f, h, kv, hd, c = map(f8, (16, 8, 16, 2, 1, 4, 4))
  params = (v * d + d + d * v  # embedding, final norm, lm_head
            + 2 * d + d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
  assert planning.param_count(cfg) == params == 856
  assert est.params == 4 * params and est.optimizer == 8 * params
  assert est.gradients == 4 * params and est.update_outputs == 12 * params
  rows, slots = f8(2), f8(4)
  assert est.kv_cache == 2 * 1 * rows * slots * kv * hd * c + rows * slots
  # Per token of the block: two RMSNorms, v / rotated q, k / output, the
  # rope tables, the SwiGLU arrays and the float32 scores over 4 keys.
  norms = 2 * ((8 + 2 * c) * d + 8)
  attention = c * (kv * hd + h * hd + kv * hd + h * hd) + 16 * hd
  mlp = 6 * c * f
  scores = h * slots * (1 + 4 + 4 + c) + 8 * h
  extra = 4 + (8 + 2 * c) * d + 8 + 16  # ids, final norm, head statistics
  tokens = rows * slots
  assert est.activations == tokens * (norms + attention + mlp + scores
                                      + extra) == 8736


def _estimate(mesh=planning.MeshShape(), precision="fp32", **options):
  options = dict(dict(batch=16, seq_len=64), **options)
  return planning.memory_estimate(TINY_CONFIGS["llama"], precision, mesh,
                                 **options)


def test_fsdp_shards_the_state_and_data_splits_the_batch():
  one = _estimate()
  # Every llama parameter has an `embed` axis that fsdp=2 divides.
  fsdp = _estimate(planning.MeshShape(fsdp=2))
  for field in ("params", "optimizer", "gradients", "update_outputs"):
    assert getattr(fsdp, field) == getattr(one, field) / 2
  data = _estimate(planning.MeshShape(data=2))
  assert data.params == one.params
  for field in ("activations", "kv_cache"):
    assert getattr(data, field) == getattr(one, field) / 2
    assert getattr(fsdp, field) == getattr(data, field)
  tensor = _estimate(planning.MeshShape(tensor=2))
  assert tensor.params < one.params and tensor.activations < one.activations
  valid = 16 * 64  # the cache's bool slot mask, not split over tensor
  assert tensor.kv_cache - valid == (one.kv_cache - valid) / 2


def test_precision_sets_the_dtype_dependent_terms():
  fp32, bf16 = _estimate(), _estimate(precision="bf16_fp32_head")
  assert bf16.params == fp32.params and bf16.optimizer == fp32.optimizer
  assert bf16.kv_cache < fp32.kv_cache
  kv_bytes = lambda e: e.kv_cache - 16 * 64  # the bool `valid` slots
  assert kv_bytes(bf16) == kv_bytes(fp32) / 2
  assert fp32.weight_casts == 0 and fp32.sample_weights == 0
  layers = sum(math.prod(p.shape) * p.count
               for p in planning.param_shapes(TINY_CONFIGS["llama"])
               if p.name.startswith("layers/"))
  assert bf16.weight_casts == 2 * layers  # a bf16 copy of each block weight
  assert bf16.activations < fp32.activations


def test_options_change_what_they_name():
  base = _estimate()
  cfg = TINY_CONFIGS["llama"]
  d, tokens = cfg.hidden_size, 16 * 64
  remat = _estimate(remat="block")
  assert remat.activations == tokens * (2 * d * 4 + 4 + 16 * d + 8
                                        + 8 * cfg.head_dim + 16)
  assert remat.update_working > base.update_working
  dots = _estimate(remat="block_save_dots")
  assert remat.activations < dots.activations < base.activations
  with pytest.raises(ValueError, match="remat must be one of"):
    _estimate(remat=True)
  unfused = _estimate(fused_head=False)
  assert unfused.activations - base.activations == tokens * (
      cfg.vocab_size * 8 - 16)
  reference = _estimate(attention="reference")
  assert base.activations < reference.activations
  long = dict(seq_len=4096)
  assert (_estimate(**long).update_working
          < _estimate(attention="reference", **long).update_working)
  # Blockwise working memory is one key chunk: it stops growing with length
  # past the chunk, while the reference attention's keeps growing.
  per_token = lambda **o: _estimate(**o).update_working / (16 * o["seq_len"])
  assert per_token(seq_len=1024, attention_chunk_size=256) == pytest.approx(
      per_token(seq_len=4096, attention_chunk_size=256), rel=1e-12)
  assert (per_token(seq_len=4096, attention="reference")
          > 3 * per_token(seq_len=1024, attention="reference"))
  # The TPU kernel: linear in the length too, per token constant past its
  # 128-key blocks.
  assert per_token(seq_len=1024, attention="pallas") == pytest.approx(
      per_token(seq_len=4096, attention="pallas"), rel=1e-12)
  assert (_estimate(attention="pallas", **long).update_working
          < _estimate(attention="reference", **long).update_working)
  # cuDNN as jax calls it: a [B, 1, T, T] mask bias in the compute dtype
  # saved per layer, beside the blockwise-like statistics; per token it
  # grows with the length, one score row per query (not one per head).
  cudnn = lambda n: _estimate(attention="cudnn", seq_len=n).activations
  blockwise = lambda n: _estimate(seq_len=n).activations
  layers = cfg.num_layers
  for n in (1024, 4096):
    extra = (cudnn(n) - blockwise(n)) / (16 * n * layers)
    assert extra == pytest.approx(4 * n - 4 * cfg.num_heads - 1, rel=1e-12)
  with pytest.raises(ValueError, match="attention must be one of"):
    _estimate(attention="flash")
  assert _estimate(donate=True).update_outputs == 0
  assert _estimate(reference=True).reference == base.params
  half = _estimate(minibatches=2)
  assert half.kv_cache == base.kv_cache
  assert half.activations == base.activations / 2
  with pytest.raises(ValueError, match="does not split into minibatches=3"):
    _estimate(minibatches=3)
  with pytest.raises(ValueError, match="MeshShape.tensor must be a positive"):
    planning.MeshShape(tensor=0)


def test_lora_estimate_trains_the_adapters_only():
  cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
  full = planning.memory_estimate(cfg, "fp32", planning.MeshShape(), batch=2,
                                 seq_len=4, reference=True)
  lora = planning.memory_estimate(cfg, "fp32", planning.MeshShape(), batch=2,
                                 seq_len=4, reference=True, lora_rank=3)
  # Adapters, by hand: A [in, r] and B [r, out] of each projection.
  d, f, h, kv, hd, r, layers = 8, 16, 2, 1, 4, 3, 2
  shapes = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, f),
            (d, f), (f, d)]
  adapters = layers * sum(r * (i + o) for i, o in shapes)
  assert adapters == 2 * 3 * (16 + 12 + 12 + 16 + 24 + 24 + 24) == 768
  assert sum(math.prod(p.shape) * p.count
             for p in planning.lora_shapes(cfg, r)) == adapters
  assert lora.params == full.params + 4 * adapters
  assert lora.optimizer == 8 * adapters and lora.gradients == 4 * adapters
  assert lora.update_outputs == 12 * adapters
  assert lora.reference == 0 and full.reference == full.params
  tokens = 2 * 4
  assert lora.activations - full.activations == tokens * layers * r * 4 * 7
  fewer = planning.memory_estimate(cfg, "fp32", planning.MeshShape(),
                                  batch=2, seq_len=4, lora_rank=3,
                                  lora_targets=("q_proj", "down_proj"))
  assert fewer.optimizer == 8 * layers * r * (d + h * hd + f + d)
  # The base's projections in bf16 (lora_base_dtype="compute"): 2 bytes
  # fewer per projection weight under bf16, nothing under fp32.
  projections = layers * sum(i * o for i, o in shapes)
  for preset, saved in (("bf16", 2 * projections), ("fp32", 0)):
    kw = dict(batch=2, seq_len=4, lora_rank=3)
    param, compute = (planning.memory_estimate(
        cfg, preset, planning.MeshShape(), lora_base_dtype=b, **kw)
                      for b in ("param", "compute"))
    assert param.params - compute.params == saved
    assert param.optimizer == compute.optimizer
  for bad in (dict(lora_rank=-1), dict(lora_rank=2, lora_targets=("qkv",)),
              dict(lora_base_dtype="compute"),
              dict(lora_rank=2, lora_base_dtype="bf16")):
    with pytest.raises(ValueError, match="lora"):
      planning.memory_estimate(cfg, "fp32", planning.MeshShape(), batch=2,
                               seq_len=4, **bad)


def test_lora_adapter_shapes_equal_add_lora():
  cfg = TINY_CONFIGS["llama"]
  model = nnx.eval_shape(lambda: add_lora(
      Transformer(cfg, rngs=nnx.Rngs(0)), rank=5, alpha=5,
      targets=planning.memory.LORA_TARGETS))
  ours = sorted(tuple(v.get_value().shape) for _, v in nnx.to_flat_state(
      nnx.state(model, nnx.LoRAParam)))
  planned = sorted(p.shape for p in planning.lora_shapes(cfg, 5)
                   for _ in range(p.count))
  assert ours == planned


@pytest.mark.parametrize("phase", ["update", "rollout"])
def test_max_sequences_is_the_largest_batch_that_fits(phase):
  cfg, mesh = planning.qwen3_config("Qwen3-0.6B"), planning.MeshShape(fsdp=4)
  budget = planning.HARDWARE["v5p"].budget
  n = planning.max_sequences(cfg, "fp32", mesh, budget=budget, seq_len=1024,
                            phase=phase)
  assert n > 0
  peaks = lambda rows: planning.memory_estimate(
      cfg, "fp32", mesh, batch=rows * 4, seq_len=1024).phase_peaks(phase)
  assert max(peaks(n)) <= budget < max(peaks(n + 1))
  assert planning.max_sequences(cfg, "fp32", mesh, budget=1e9, seq_len=1024,
                               phase=phase) == 0


def test_recommend_mesh_uses_every_chip_and_prefers_less_communication():
  cfg = planning.qwen3_config("Qwen3-8B")
  hw = planning.HARDWARE["h100"]
  mesh, capacity = planning.recommend_mesh(cfg, "bf16_fp32_head", hw, 16,
                                          seq_len=1024, remat="block")
  assert mesh.size == 16 and capacity > 0
  assert cfg.num_kv_heads % mesh.tensor == 0
  small, _ = planning.recommend_mesh(planning.qwen3_config("Qwen3-0.6B"),
                                    "fp32", planning.HARDWARE["v5p"], 4,
                                    seq_len=256, remat="block")
  assert small == planning.MeshShape(data=4)  # the state fits every chip
  none, zero = planning.recommend_mesh(
      planning.qwen3_config("Qwen3-32B"), "fp32", planning.HARDWARE["v5e"], 8,
      seq_len=1024)
  assert (none, zero) == (None, 0)


def test_docs_tables_are_current():
  docs = (ROOT / "docs" / "scaling.md").read_text()
  assert planning.markdown_tables() in docs, (
      "docs/scaling.md is out of date; regenerate it with "
      "`python -m entropo.planning`")
