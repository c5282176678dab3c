"""LoRA adapters: the math, switching off, merging, and PEFT hand-off.

The PEFT tests build tiny random `transformers` models (tests/hf_models.py),
write entropo's adapters with `save_lora` and load them with
`peft.PeftModel.from_pretrained`; nothing is downloaded. They skip without
torch, transformers and peft (the Python 3.12 leg of `make test`).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import entropo
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import add_lora
from entropo.models import from_pretrained
from entropo.models import load_lora
from entropo.models import lora_disabled
from entropo.models import merge_lora
from entropo.models import save_lora
from entropo.models import save_pretrained
from entropo.models import lora as lora_lib
from tests import hf_models

PEFT_SKIP_REASON = ("needs torch, transformers and peft (pip install -e "
                    "'.[hf]'); the Python 3.12 leg of `make test` installs "
                    "none of them")
ALL = lora_lib.TARGETS
CONFIG = ModelConfig(vocab_size=41, hidden_size=16, intermediate_size=24,
                     num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=32, attention="reference")


def _model(config=CONFIG, precision="fp32", seed=0):
  return Transformer(config, precision=precision, rngs=nnx.Rngs(seed))


def _randomize_adapters(model, seed=0, scale=0.3):
  """Random non-zero A and B (a fresh adapter's B is zero)."""
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var[...] = jnp.asarray(rng.normal(size=var.get_value().shape) * scale,
                           jnp.float32)


def _tokens(vocab=41, batch=2, length=7, seed=1):
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, length))
  mask = np.ones((batch, length), bool)
  mask[1, :2] = False  # left padding
  return jnp.asarray(tokens), jnp.asarray(mask)


def _logits(model, tokens, mask):
  return np.asarray(model.logits(tokens, attention_mask=mask))


# ----------------------------------------------------------- structure


def test_adapters_are_the_lora_params_and_start_as_a_no_op():
  model = _model()
  tokens, mask = _tokens()
  before = _logits(model, tokens, mask)
  params_before = nnx.state(model, nnx.Param)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert add_lora(model, rank=4, alpha=8, targets=ALL) is model
  lora = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  # Two matrices per target per layer, nothing else.
  assert len(lora) == 2 * len(ALL) * CONFIG.num_layers
  d, h, kv, hd, f = (CONFIG.hidden_size, CONFIG.num_heads,
                     CONFIG.num_kv_heads, CONFIG.head_dim,
                     CONFIG.intermediate_size)
  shapes = {path[2:]: v.get_value().shape for path, v in lora
            if path[1] == 0}
  assert shapes == {
      ("attn", "lora", "q_proj", "a"): (d, 4),
      ("attn", "lora", "q_proj", "b"): (4, h, hd),
      ("attn", "lora", "k_proj", "a"): (d, 4),
      ("attn", "lora", "k_proj", "b"): (4, kv, hd),
      ("attn", "lora", "v_proj", "a"): (d, 4),
      ("attn", "lora", "v_proj", "b"): (4, kv, hd),
      ("attn", "lora", "o_proj", "a"): (h, hd, 4),
      ("attn", "lora", "o_proj", "b"): (4, d),
      ("mlp", "lora", "gate_proj", "a"): (d, 4),
      ("mlp", "lora", "gate_proj", "b"): (4, f),
      ("mlp", "lora", "up_proj", "a"): (d, 4),
      ("mlp", "lora", "up_proj", "b"): (4, f),
      ("mlp", "lora", "down_proj", "a"): (f, 4),
      ("mlp", "lora", "down_proj", "b"): (4, d),
  }
  for path, var in lora:
    value = np.asarray(var.get_value())
    assert value.dtype == np.float32
    if path[-1] == "b":
      assert not value.any()
    else:  # uniform in +-1/sqrt(fan_in), PEFT's Kaiming bound
      bound = 1 / math.sqrt(math.prod(value.shape[:-1]))
      assert np.abs(value).max() <= bound
      assert np.abs(value).max() > 0.5 * bound and value.std() > 0
    assert len(var.get_metadata()["logical_axes"]) == value.ndim
  # The base parameters are untouched and the fresh model computes the same.
  for path, var in nnx.to_flat_state(params_before):
    assert not isinstance(var, nnx.LoRAParam)
  np.testing.assert_array_equal(_logits(model, tokens, mask), before)
  assert model.lora_config == lora_lib.LoRAConfig(rank=4, alpha=8.0,
                                                  targets=ALL)


def test_targets_pick_projections_and_bad_arguments_raise():
  model = add_lora(_model(), rank=2, alpha=2, targets="v_proj, q_proj")
  names = {path[4] for path, _ in nnx.to_flat_state(
      nnx.state(model, nnx.LoRAParam))}
  assert names == {"q_proj", "v_proj"}
  assert model.lora_config.targets == ("q_proj", "v_proj")
  with pytest.raises(ValueError, match="already has LoRA"):
    add_lora(model, rank=2, alpha=2, targets="q_proj")
  for kwargs, match in [
      (dict(rank=0, alpha=1, targets="q_proj"), "rank"),
      (dict(rank=2.0, alpha=1, targets="q_proj"), "rank"),
      (dict(rank=2, alpha=0, targets="q_proj"), "alpha"),
      (dict(rank=2, alpha=1, targets="qkv"), "Unknown LoRA target 'qkv'"),
      (dict(rank=2, alpha=1, targets=""), "empty"),
      (dict(rank=2, alpha=1, targets=["q_proj", "q_proj"]), "repeat"),
  ]:
    with pytest.raises(ValueError, match=match):
      add_lora(_model(), **kwargs)


# ------------------------------------------------ the math, in float64


@pytest.mark.parametrize("target", ["q_proj", "o_proj", "down_proj"])
def test_adapter_output_matches_float64_reference(target):
  model = add_lora(_model(), rank=3, alpha=5, targets=[target])
  _randomize_adapters(model)
  attr = lora_lib._WHERE[target][0]  # pylint: disable=protected-access
  adapter = getattr(model.layers[0], attr).lora[target]
  a = np.asarray(adapter.a[...], np.float64)
  b = np.asarray(adapter.b[...], np.float64)
  x = np.random.default_rng(2).normal(size=(2, 5, *a.shape[:-1]))
  got = np.asarray(adapter(jnp.asarray(x, jnp.float32)))
  flat_x = x.reshape(2, 5, -1)
  want = (5 / 3) * (flat_x @ a.reshape(-1, 3)) @ b.reshape(3, -1)
  assert got.shape == (2, 5, *b.shape[1:])
  np.testing.assert_allclose(got.reshape(2, 5, -1), want, rtol=1e-5,
                             atol=1e-6)


def _folded_float64(model):
  """A copy of the base model with `W + (alpha/r) A B` computed in float64."""
  base = _model()
  nnx.update(base, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  scaling = model.lora_config.scaling
  for block, base_block in zip(model.layers, base.layers):
    for name in model.lora_config.targets:
      attr = lora_lib._WHERE[name][0]  # pylint: disable=protected-access
      adapter = getattr(block, attr).lora[name]
      a = np.asarray(adapter.a[...], np.float64)
      b = np.asarray(adapter.b[...], np.float64)
      w = getattr(getattr(base_block, attr), name)
      w64 = np.asarray(w[...], np.float64)
      delta = np.tensordot(a, b, axes=1)
      w[...] = jnp.asarray(w64 + scaling * delta, jnp.float32)
  return base


def test_adapted_model_equals_base_with_folded_float64_weights():
  model = add_lora(_model(), rank=4, alpha=16, targets=ALL)
  _randomize_adapters(model, scale=0.2)
  tokens, mask = _tokens()
  got = _logits(model, tokens, mask)
  want = _logits(_folded_float64(model), tokens, mask)
  base = _logits(_model(), tokens, mask)
  assert np.abs(got - base).max() > 0.1  # the adapters do something
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_lora_disabled_is_the_base_model_and_restores():
  model = add_lora(_model(), rank=4, alpha=8, targets=ALL)
  _randomize_adapters(model)
  tokens, mask = _tokens()
  adapted = _logits(model, tokens, mask)
  base = _logits(_model(), tokens, mask)
  with lora_disabled(model) as same:
    assert same is model
    np.testing.assert_array_equal(_logits(model, tokens, mask), base)

    # A jitted forward traced inside the context is the base model too.
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state):
      return nnx.merge(graphdef, state).logits(tokens, attention_mask=mask)

    base_graphdef, base_state = nnx.split(_model())

    @jax.jit
    def base_logits(state):
      return nnx.merge(base_graphdef, state).logits(tokens,
                                                    attention_mask=mask)

    np.testing.assert_array_equal(np.asarray(logits(state)),
                                  np.asarray(base_logits(base_state)))
  np.testing.assert_array_equal(_logits(model, tokens, mask), adapted)


def test_merge_lora_folds_adapters_into_base_weights():
  model = add_lora(_model(), rank=4, alpha=8, targets=ALL)
  _randomize_adapters(model)
  tokens, mask = _tokens()
  adapted = _logits(model, tokens, mask)
  folded = _logits(_folded_float64(model), tokens, mask)
  assert merge_lora(model) is model
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert lora_lib.lora_config(model) is None
  merged = _logits(model, tokens, mask)
  np.testing.assert_allclose(merged, folded, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    merge_lora(model)


@pytest.mark.parametrize("preset", sorted(entropo.PRESETS))
def test_adapters_under_every_precision_preset(preset):
  """float32 adapters on the preset's weights; the compute dtype flows
  through, and the adapted model follows the float64 reference as closely
  as the preset computes."""
  model = add_lora(_model(precision=preset), rank=4, alpha=8, targets=ALL)
  _randomize_adapters(model, scale=0.2)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    assert var.get_value().dtype == jnp.float32
  tokens, mask = _tokens()
  hidden = model(tokens, attention_mask=mask)
  assert hidden.dtype == model.precision.compute_dtype
  got = _logits(model, tokens, mask)
  fp32 = add_lora(_model(), rank=4, alpha=8, targets=ALL)
  nnx.update(fp32, nnx.state(model))
  want = _logits(_folded_float64(fp32), tokens, mask)
  tol = {"fp32": 1e-4, "tf32": 0.05}.get(preset, 0.5)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)
  # The base weights may be stored in the compute dtype, adapters float32.
  low = add_lora(_model(precision=preset), rank=4, alpha=8, targets=ALL)
  nnx.update(low, nnx.state(model))
  compute = model.precision.compute_dtype
  entropo.models.cast_base(low, compute)
  for block in low.layers:
    for name in ALL:
      module = getattr(block, lora_lib._WHERE[name][0])  # pylint: disable=protected-access
      assert getattr(module, name).get_value().dtype == compute
  # Embeddings and norms keep param_dtype (the head may compute in f32).
  assert low.embed_tokens.get_value().dtype == model.precision.param_dtype
  np.testing.assert_array_equal(_logits(low, tokens, mask), got)


# ------------------------------------------------------ PEFT hand-off


def _peft():
  return pytest.importorskip("peft", reason=PEFT_SKIP_REASON)


def _torch():
  return pytest.importorskip("torch", reason=PEFT_SKIP_REASON)


def _hf_logits(hf, tokens, mask):
  torch = _torch()
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = hf(torch.tensor(tokens), attention_mask=torch.tensor(
        mask.astype(np.int64)), position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def _assert_close_on_valid(got, want, mask, atol=1e-4):
  err = np.abs(got - want)[np.asarray(mask)].max()
  assert err <= atol, f"max abs logit error {err} > {atol}"


HF_CASES = [
    ("llama", False, ALL),
    ("llama", True, ("q_proj", "v_proj")),
    ("qwen2", False, ALL),
    ("qwen2", True, ("k_proj", "o_proj", "down_proj")),
    ("qwen3", True, ALL),
    ("qwen3", False, ("q_proj", "o_proj", "gate_proj", "up_proj")),
]


@pytest.mark.parametrize("family,tied,targets", HF_CASES, ids=[
    f"{f}-{'tied' if t else 'untied'}-{len(g)}" for f, t, g in HF_CASES])
def test_save_lora_loads_in_peft_with_the_same_logits(tmp_path, family,
                                                      tied, targets):
  peft = _peft()
  hf = hf_models.hf_model(family, vocab_size=97, tie_word_embeddings=tied)
  hf.save_pretrained(tmp_path / "hf")
  model = from_pretrained(tmp_path / "hf")
  add_lora(model, rank=4, alpha=12, targets=targets)
  _randomize_adapters(model, scale=0.3)
  save_lora(model, tmp_path / "lora", base_model_name_or_path=str(
      tmp_path / "hf"))
  config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == (
      "CAUSAL_LM")
  assert config["r"] == 4 and config["lora_alpha"] == 12
  assert config["target_modules"] == list(targets)
  assert config["base_model_name_or_path"] == str(tmp_path / "hf")
  tensors = safetensors.numpy.load_file(tmp_path / "lora" /
                                        "adapter_model.safetensors")
  q = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
  assert (q in tensors) == ("q_proj" in targets)
  assert len(tensors) == 2 * len(targets) * hf.config.num_hidden_layers

  tokens, mask = _tokens(vocab=97, batch=3, length=9)
  base = _hf_logits(hf, tokens, mask)
  peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "lora").eval()
  want = _hf_logits(peft_model, tokens, mask)
  assert np.abs(want - base)[np.asarray(mask)].max() > 0.05  # adapted
  got = _logits(model, tokens, mask)
  _assert_close_on_valid(got, want, mask)

  # load_lora reads the folder back exactly, into a fresh model.
  again = load_lora(from_pretrained(tmp_path / "hf"), tmp_path / "lora")
  assert again.lora_config == model.lora_config
  for (pa, x), (pb, y) in zip(
      nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)),
      nnx.to_flat_state(nnx.state(again, nnx.LoRAParam))):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(x.get_value()),
                                  np.asarray(y.get_value()))
  np.testing.assert_array_equal(_logits(again, tokens, mask), got)

  # PEFT's own save of the adapters reads into entropo with its logits.
  peft_model.save_pretrained(tmp_path / "peft_saved")
  theirs = load_lora(from_pretrained(tmp_path / "hf"),
                     tmp_path / "peft_saved")
  assert theirs.lora_config == model.lora_config
  np.testing.assert_array_equal(_logits(theirs, tokens, mask), got)

  # Merged, the export is a plain checkpoint transformers reads.
  with pytest.raises(ValueError, match="merge_lora"):
    save_pretrained(model, tmp_path / "refused")
  save_pretrained(merge_lora(model), tmp_path / "merged")
  transformers = pytest.importorskip("transformers", reason=PEFT_SKIP_REASON)
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged").eval()
  _assert_close_on_valid(_hf_logits(merged, tokens, mask), want, mask)
  _assert_close_on_valid(_logits(model, tokens, mask), want, mask)


def test_load_lora_rejects_mismatches(tmp_path):
  model = add_lora(_model(), rank=2, alpha=4, targets="q_proj,v_proj")
  save_lora(model, tmp_path / "a")
  with pytest.raises(ValueError, match="holds adapters"):
    load_lora(add_lora(_model(), rank=3, alpha=4, targets="q_proj,v_proj"),
              tmp_path / "a")
  # A model of another depth: the file lacks the third layer's tensors.
  deeper = _model(CONFIG.replace(num_layers=3))
  with pytest.raises(ValueError, match="missing tensors.*layers.2"):
    load_lora(deeper, tmp_path / "a")
  # Shapes are checked against the model.
  wider = _model(CONFIG.replace(hidden_size=32, head_dim=4))
  with pytest.raises(ValueError, match="has shape"):
    load_lora(wider, tmp_path / "a")
  config_file = tmp_path / "a" / "adapter_config.json"
  config = json.loads(config_file.read_text())
  for key, value, match in [("use_dora", True, "use_dora"),
                            ("use_rslora", True, "use_rslora"),
                            ("target_modules", ".*proj", "pattern"),
                            ("peft_type", "IA3", "peft_type")]:
    config_file.write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=match):
      load_lora(_model(), tmp_path / "a")
  with pytest.raises(FileNotFoundError):
    load_lora(_model(), tmp_path / "nowhere")
