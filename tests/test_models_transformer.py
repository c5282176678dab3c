"""Invariants of the decoder that the parity tests against transformers do
not cover: jit, the KV cache, padding, logical axes, the fused head, the
precision presets and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import entropo
from entropo.models import ModelConfig
from entropo.models import sample
from entropo.models import Transformer
from entropo.models.transformer import default_positions
from entropo.training.step import sequence_logps

_BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=48,
             num_layers=2, num_heads=4, num_kv_heads=2)
CONFIGS = {
    "llama": ModelConfig(**_BASE, family="llama"),
    "qwen2_tied": ModelConfig(**_BASE, qkv_bias=True,
                              tie_word_embeddings=True, family="qwen2"),
    "qwen3": ModelConfig(**_BASE, head_dim=16, qk_norm=True,
                         rope_theta=1e6, family="qwen3"),
}
AXES = {"vocab", "embed", "heads", "kv", "head_dim", "mlp"}
EXPECTED_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv", "head_dim"),
    "v_proj": ("embed", "kv", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv", "head_dim"),
    "v_bias": ("kv", "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "input_layernorm": ("embed",),
    "post_attention_layernorm": ("embed",),
    "norm": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def _model(name="qwen3", *, precision="fp32", seed=0) -> Transformer:
  """A model whose every parameter is random (norm scales around 1, biases
  non-zero), so that no invariant holds by accident of the initialiser."""
  model = Transformer(CONFIGS[name], precision=precision, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  leaves = []
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    new = rng.normal(0.0, 0.3, value.shape) + (path[-1] == "scale")
    leaves.append((path, var.replace(jnp.asarray(new, value.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


@nnx.jit
def _hidden(model, tokens, mask):
  return model(tokens, attention_mask=mask)


@nnx.jit
def _step(model, tokens, mask, positions, cache, index):
  return model(tokens, attention_mask=mask, positions=positions, cache=cache,
               cache_index=index)


def _tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 101, shape))


def _close(got, want, *, rel=1e-5):
  """max |got - want| <= rel * max |want| (float32 rounding, not model
  error: rel 1e-5 is ~80 float32 ulps at the scale of the values)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"max abs error {err} > {rel} * {scale}"


@pytest.mark.parametrize("name", CONFIGS)
def test_jit_matches_eager(name):
  model = _model(name)
  tokens = _tokens((3, 12))
  mask = jnp.ones((3, 12), bool).at[1, 8:].set(False).at[2, :3].set(False)
  eager = model.logits(tokens, attention_mask=mask)
  jitted = nnx.jit(lambda m, t, a: m.logits(t, attention_mask=a))(
      model, tokens, mask)
  assert eager.shape == (3, 12, 101) and eager.dtype == jnp.float32
  _close(jitted, eager)


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_prefill_then_decode_equals_full_forward(name):
  model = _model(name)
  b, t, prompt = 2, 11, 5
  tokens = _tokens((b, t))
  # Row 1 is left-padded by 2: its prompt is 3 tokens.
  mask = jnp.ones((b, t), bool).at[1, :2].set(False)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  full = _hidden(model, tokens, mask)

  cache = model.init_cache(b, t)
  pieces = []
  # The prompt, a 2-token chunk, then one token at a time, `cache_index`
  # traced (as in the sampler's decode loop).
  for start, stop in [(0, prompt), (prompt, prompt + 2)] + [
      (i, i + 1) for i in range(prompt + 2, t)]:
    hidden, cache = _step(model, tokens[:, start:stop], mask[:, start:stop],
                          positions[:, start:stop], cache, jnp.int32(start))
    pieces.append(hidden)
  cached = jnp.concatenate(pieces, axis=1)
  assert cached.shape == full.shape
  np.testing.assert_array_equal(np.asarray(cache["valid"]), np.asarray(mask))
  valid = np.asarray(mask)
  _close(np.asarray(cached)[valid], np.asarray(full)[valid])


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_does_not_change_valid_tokens(name):
  model = _model(name)
  n, pad = 7, 3
  row = _tokens((1, n))
  alone = _hidden(model, row, jnp.ones(row.shape, bool))[0]  # [n, D]
  junk = _tokens((1, pad), seed=1)  # pad ids are arbitrary tokens
  rows = jnp.concatenate([
      jnp.concatenate([junk, row], axis=1),  # left-padded
      jnp.concatenate([row, junk], axis=1),  # right-padded
      jnp.concatenate([junk[:, :1], row, junk[:, 1:]], axis=1),  # both
  ])
  mask = jnp.zeros(rows.shape, bool)
  mask = mask.at[0, pad:].set(True).at[1, :n].set(True).at[2, 1:n + 1].set(
      True)
  hidden = np.asarray(_hidden(model, rows, mask))
  for i in range(3):
    got = hidden[i][np.asarray(mask[i])]
    assert np.isfinite(hidden[i]).all()
    _close(got, alone)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_param_has_logical_axes(name):
  model = _model(name)
  cfg = model.config
  sizes = {"vocab": cfg.vocab_size, "embed": cfg.hidden_size,
           "heads": cfg.num_heads, "kv": cfg.num_kv_heads,
           "head_dim": cfg.head_dim, "mlp": cfg.intermediate_size}
  assert set(sizes) == AXES
  flat = list(nnx.to_flat_state(nnx.state(model)))
  assert flat
  for path, var in flat:
    assert isinstance(var, nnx.Param), path
    axes = var.get_metadata().get("logical_axes")
    assert isinstance(axes, tuple), (path, axes)
    assert set(axes) <= AXES, (path, axes)
    # Rank-matching, and each axis has the size its name says.
    assert var.get_value().shape == tuple(sizes[a] for a in axes), (path,
                                                                   axes)
  # The full table: the sharding rules rely on each name's meaning.
  named = {path: var.get_metadata()["logical_axes"] for path, var in flat}
  for path, axes in named.items():
    key = path[-2] if path[-1] == "scale" else path[-1]
    assert axes == EXPECTED_AXES[key], (path, axes)
  assert (("lm_head",) in named) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("name", ["llama", "qwen2_tied"])
def test_fused_head_equals_log_softmax_of_logits(name):
  model = _model(name)
  tokens = _tokens((2, 9))
  targets = _tokens((2, 9), seed=2)
  head = model.lm_head_matrix()
  assert head.shape == (32, 101)
  if model.config.tie_word_embeddings:
    np.testing.assert_array_equal(head, model.embed_tokens[...].T)
  # 101 is not a multiple of 32: the last chunk is partial.
  logps, entropy = entropo.fused_logprobs_entropy(
      model(tokens), head, targets, chunk_size=32)
  logp_all = jax.nn.log_softmax(model.logits(tokens), axis=-1)
  want_logps = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
  want_entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  _close(logps, want_logps)
  _close(entropy, want_entropy)


def test_bf16_preset_is_close_to_fp32():
  fp32, bf16 = _model("qwen3"), _model("qwen3", precision="bf16")
  # Same float32 master weights; only the computation differs.
  np.testing.assert_array_equal(bf16.embed_tokens[...], fp32.embed_tokens[...])
  assert bf16.embed_tokens[...].dtype == jnp.float32
  tokens = _tokens((3, 12))
  assert bf16(tokens).dtype == jnp.bfloat16
  want, got = fp32.logits(tokens), bf16.logits(tokens)
  assert got.dtype == jnp.float32
  # The logits are bfloat16 values (held in float32) ...
  np.testing.assert_array_equal(got, got.astype(jnp.bfloat16).astype(
      jnp.float32))
  # ... within the error of ~8 significant bits over two blocks (measured:
  # max 2.2% of the logit range, KL 1e-3), and not bit-equal to float32.
  err = np.abs(np.asarray(got - want))
  assert 0 < err.max() <= 0.05 * np.abs(np.asarray(want)).max()
  logp, logp_bf16 = (jax.nn.log_softmax(x, axis=-1) for x in (want, got))
  kl = jnp.sum(jnp.exp(logp) * (logp - logp_bf16), axis=-1)
  assert float(kl.max()) < 1e-2
  # The paper's fix keeps the head's product in float32.
  mixed = _model("qwen3", precision="bf16_fp32_head").logits(tokens)
  assert not np.array_equal(mixed, mixed.astype(jnp.bfloat16).astype(
      jnp.float32))


def test_with_precision_is_the_same_weights_under_another_policy():
  fp32 = _model("qwen3")
  bf16 = entropo.models.with_precision(fp32, "bf16")
  assert entropo.models.with_precision(fp32, "fp32") is fp32
  assert fp32.precision.name == "fp32"  # the original is unchanged
  assert {m.precision.name for _, m in nnx.iter_modules(bf16)
          if hasattr(m, "precision")} == {"bf16"}
  assert bf16.embed_tokens[...] is fp32.embed_tokens[...]  # no copy
  tokens = _tokens((3, 12))
  built = _model("qwen3", precision="bf16")  # same weights, built as bf16
  np.testing.assert_array_equal(bf16.logits(tokens), built.logits(tokens))


def test_default_positions_count_valid_tokens():
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0],
                      [0, 0, 1, 1, 1, 1],
                      [0, 1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(
      default_positions(mask),
      [[0, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 3], [0, 0, 1, 2, 2, 2]])


def test_head_dim_defaults_to_width_over_heads():
  assert CONFIGS["llama"].head_dim == 8
  assert CONFIGS["qwen3"].head_dim == 16
  assert CONFIGS["llama"].replace(num_heads=2, num_kv_heads=1).head_dim == 8


@pytest.mark.parametrize("changes,message", [
    (dict(family="mistral"), "Unknown model family 'mistral'"),
    (dict(vocab_size=0), "ModelConfig.vocab_size must be a positive int"),
    (dict(num_layers=2.0), "ModelConfig.num_layers must be a positive int"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
    (dict(hidden_size=30), "hidden_size=30 is not divisible by num_heads=4"),
    (dict(head_dim=7), "head_dim must be even"),
])
def test_config_validation(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**_BASE, **changes})


def test_bad_calls():
  model = _model("llama")
  with pytest.raises(ValueError, match=r"tokens must be a \[B, T\] int"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"tokens must be a \[B, T\] int"):
    model(jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="cache_index is required"):
    model(_tokens((1, 2)), cache=model.init_cache(1, 4))


@pytest.mark.parametrize("precision", sorted(entropo.PRESETS))
@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3"])
def test_every_preset_samples_and_differentiates_under_jit(name, precision):
  # What the trainer compiles under each preset, tied head or not: XLA:CPU
  # has rejected low-precision dots of some layouts only at run time.
  model = _model(name, precision=precision)
  tokens, mask = _tokens((3, 9)), jnp.ones((3, 9), bool)
  out = sample(model, tokens, mask, key=jax.random.key(0), max_new_tokens=3)
  assert np.all(np.isfinite(np.asarray(out.logps)))
  graphdef, state = nnx.split(model)

  def loss(state):
    logps, entropy = sequence_logps(nnx.merge(graphdef, state), tokens, mask)
    return jnp.sum(logps) + jnp.sum(entropy)

  grads = jax.jit(jax.grad(loss))(state)
  norms = [float(jnp.linalg.norm(g.astype(jnp.float32)))
           for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0
