"""Hugging Face checkpoints: load and export, against `transformers`.

Every model here is a random tiny `transformers` model saved to `tmp_path`;
nothing is downloaded.
"""

import json
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from entropo.models import ModelConfig
from entropo.models import from_pretrained
from entropo.models import save_pretrained
from tests import hf_models

torch = pytest.importorskip("torch", reason=hf_models.SKIP_REASON)
transformers = pytest.importorskip("transformers",
                                   reason=hf_models.SKIP_REASON)

VOCAB = 97


def _inputs():
  """Tokens `[3, 9]` and a mask: full, right-padded and left-padded rows."""
  tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 9))
  mask = np.ones((3, 9), bool)
  mask[1, 6:] = False  # right padding
  mask[2, :4] = False  # left padding
  return tokens, mask


def _hf_logits(hf, tokens, mask):
  """float32 logits `[B, T, V]` of `transformers`, positions counting valid
  tokens (what entropo does by default, and `generate` with left padding)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(
        np.int64)), position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def _logits(model, tokens, mask):
  return np.asarray(model.logits(jnp.asarray(tokens),
                                 attention_mask=jnp.asarray(mask)))


def _assert_parity(model, hf, atol=1e-4):
  tokens, mask = _inputs()
  got, want = _logits(model, tokens, mask), _hf_logits(hf, tokens, mask)
  assert got.dtype == np.float32
  err = np.abs(got - want)[mask].max()
  assert err <= atol, f"max abs logit error {err} > {atol}"


def _load_hf(path, **kwargs):
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      path, output_loading_info=True, **kwargs)
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys",
              "error_msgs"):
    assert not info[key], (key, info[key])
  return hf.eval()


def _read_weights(path) -> dict:
  """All tensors of a saved directory (single file or shards)."""
  index = path / "model.safetensors.index.json"
  files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
           if index.exists() else ["model.safetensors"])
  tensors = {}
  for file in files:
    tensors.update(safetensors.numpy.load_file(path / file))
  return tensors


CASES = [
    # family, overrides of hf_models.hf_model
    ("llama", dict(tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True, num_kv_heads=4)),  # no GQA
    ("qwen2", dict(tie_word_embeddings=False)),  # q/k/v biases
    ("qwen2", dict(tie_word_embeddings=True, num_kv_heads=1)),
    ("qwen3", dict(tie_word_embeddings=True)),  # qk-norm, head_dim 16 != D/H
    ("qwen3", dict(tie_word_embeddings=False)),
]


@pytest.mark.parametrize("family,overrides", CASES,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_load_matches_transformers_and_export_round_trips(tmp_path, family,
                                                          overrides):
  hf = hf_models.hf_model(family, vocab_size=VOCAB, **overrides)
  hf.save_pretrained(tmp_path / "hf")
  model = from_pretrained(tmp_path / "hf")
  assert model.config == ModelConfig.from_hf(hf.config.to_dict())
  assert model.config.tie_word_embeddings == overrides["tie_word_embeddings"]
  _assert_parity(model, hf)

  save_pretrained(model, tmp_path / "out")
  # Same tensor names, layouts and values as transformers' own export.
  ours, theirs = _read_weights(tmp_path / "out"), _read_weights(
      tmp_path / "hf")
  assert ours.keys() == theirs.keys()
  for name in theirs:
    assert ours[name].dtype == theirs[name].dtype, name
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  reloaded = _load_hf(tmp_path / "out")
  assert type(reloaded) is type(hf)
  tokens, mask = _inputs()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens, mask),
                                _hf_logits(hf, tokens, mask))
  # And entropo reads its own export back to the same config and model.
  again = from_pretrained(tmp_path / "out")
  assert again.config == model.config
  np.testing.assert_array_equal(_logits(again, tokens, mask),
                                _logits(model, tokens, mask))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_bf16_checkpoint(tmp_path, family):
  hf = hf_models.hf_model(family, vocab_size=VOCAB)
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
  bf16 = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
  assert bf16["model.norm.weight"].dtype == ml_dtypes.bfloat16

  model = from_pretrained(tmp_path / "hf")
  assert model.embed_tokens[...].dtype == jnp.float32
  np.testing.assert_array_equal(
      np.asarray(model.embed_tokens[...]),
      bf16["model.embed_tokens.weight"].astype(np.float32))
  # The reference: transformers holding the same bf16 values in float32.
  _assert_parity(model, _load_hf(tmp_path / "hf", dtype=torch.float32))

  save_pretrained(model, tmp_path / "out", dtype="bfloat16")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["dtype"] == config["torch_dtype"] == "bfloat16"
  out = _read_weights(tmp_path / "out")
  assert out.keys() == bf16.keys()
  for name in bf16:  # bf16 -> f32 -> bf16 is exact
    assert out[name].dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(out[name], bf16[name], err_msg=name)
  reloaded = _load_hf(tmp_path / "out")
  assert reloaded.dtype == torch.bfloat16


def test_sharded_checkpoints(tmp_path):
  hf = hf_models.hf_model("qwen2", vocab_size=VOCAB)
  hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  index = json.loads(
      (tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "hf" / "model.safetensors").exists()
  model = from_pretrained(tmp_path / "hf")
  _assert_parity(model, hf)

  out = tmp_path / "out"
  save_pretrained(model, out)  # a single file first ...
  max_bytes = 8000
  save_pretrained(model, out, max_shard_bytes=max_bytes)  # ... replaced
  assert not (out / "model.safetensors").exists()
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2
  assert files == sorted(p.name for p in out.glob("model-*.safetensors"))
  assert files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
  tensors = _read_weights(out)
  assert index["metadata"]["total_size"] == sum(
      t.nbytes for t in tensors.values())
  for file in files:
    shard = safetensors.numpy.load_file(out / file)
    size = sum(t.nbytes for t in shard.values())
    assert size <= max_bytes or len(shard) == 1, (file, size)
  tokens, mask = _inputs()
  np.testing.assert_array_equal(_hf_logits(_load_hf(out), tokens, mask),
                                _hf_logits(hf, tokens, mask))
  np.testing.assert_array_equal(_logits(from_pretrained(out), tokens, mask),
                                _logits(model, tokens, mask))
  # Back to one file: the stale shards and index go.
  save_pretrained(model, out)
  assert not list(out.glob("model-*.safetensors"))
  assert not (out / "model.safetensors.index.json").exists()
  assert from_pretrained(out).config == model.config


def test_export_keeps_extra_config_and_rejects_bad_options(tmp_path):
  hf = hf_models.hf_model("llama", vocab_size=VOCAB)
  hf.save_pretrained(tmp_path / "hf")
  model = from_pretrained(tmp_path / "hf")
  save_pretrained(model, tmp_path / "out",
                  extra_config={"eos_token_id": 3, "bos_token_id": 1})
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (config["eos_token_id"], config["bos_token_id"]) == (3, 1)
  assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
  with pytest.raises(ValueError, match="Cannot export dtype.*int8"):
    save_pretrained(model, tmp_path / "bad", dtype="int8")
  with pytest.raises(ValueError, match="max_shard_bytes must be a positive"):
    save_pretrained(model, tmp_path / "bad", max_shard_bytes=0)


# Bad checkpoints: every problem raises an error that names it.


@pytest.fixture(name="checkpoint")
def _checkpoint(tmp_path):
  """An untied llama checkpoint; returns (dir, tensors, config dict)."""
  hf = hf_models.hf_model("llama", vocab_size=VOCAB)
  hf.save_pretrained(tmp_path / "ckpt")
  directory = tmp_path / "ckpt"
  tensors = safetensors.numpy.load_file(directory / "model.safetensors")
  config = json.loads((directory / "config.json").read_text())
  return directory, tensors, config


def _write(directory, tensors=None, config=None):
  if tensors is not None:
    safetensors.numpy.save_file(tensors, directory / "model.safetensors",
                                metadata={"format": "pt"})
  if config is not None:
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_tensor(checkpoint):
  directory, tensors, _ = checkpoint
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _write(directory, tensors)
  with pytest.raises(ValueError, match=re.escape(
      "missing tensors ['model.layers.1.mlp.up_proj.weight']")):
    from_pretrained(directory)


def test_unexpected_tensor(checkpoint):
  directory, tensors, _ = checkpoint
  tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  _write(directory, tensors)
  with pytest.raises(ValueError, match=re.escape(
      "unexpected tensors ['model.layers.0.self_attn.extra.weight']")):
    from_pretrained(directory)


def test_missing_head_of_untied_model(checkpoint):
  directory, tensors, _ = checkpoint
  del tensors["lm_head.weight"]
  _write(directory, tensors)
  with pytest.raises(ValueError, match=re.escape("['lm_head.weight']")):
    from_pretrained(directory)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.0.self_attn.q_proj.weight", (32, 33)),
    ("model.layers.1.self_attn.o_proj.weight", (32, 16)),
    ("model.norm.weight", (1, 32)),
    ("model.embed_tokens.weight", (32, 97)),  # transposed
])
def test_misshaped_tensor(checkpoint, name, shape):
  directory, tensors, _ = checkpoint
  want = list(tensors[name].shape)
  tensors[name] = np.zeros(shape, np.float32)
  _write(directory, tensors)
  with pytest.raises(ValueError, match=re.escape(
      f"Tensor {name!r} has shape {list(shape)}; the config implies {want}")):
    from_pretrained(directory)


def test_non_float_tensor(checkpoint):
  directory, tensors, _ = checkpoint
  tensors["model.norm.weight"] = np.ones(32, np.int32)
  _write(directory, tensors)
  with pytest.raises(ValueError, match="'model.norm.weight' has dtype int32"):
    from_pretrained(directory)


def test_rotary_buffers_are_ignored(checkpoint):
  directory, tensors, _ = checkpoint
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(
      4, np.float32)
  _write(directory, tensors)
  from_pretrained(directory)


def test_tied_checkpoint_with_head(checkpoint):
  directory, tensors, config = checkpoint
  config["tie_word_embeddings"] = True
  # Some exports store the tied head: accepted when it is the embedding ...
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  _write(directory, tensors, config)
  model = from_pretrained(directory)
  assert not hasattr(model, "lm_head")
  # ... an error when it is not (the model would silently differ).
  tensors["lm_head.weight"][0, 0] += 1.0
  _write(directory, tensors)
  with pytest.raises(ValueError, match=r"unexpected tensors \['lm_head."
                     r"weight'\].*differs from the embedding"):
    from_pretrained(directory)


@pytest.mark.parametrize("change,message", [
    (dict(model_type="mistral"), "Unsupported model_type 'mistral'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                           "rope_theta": 1e4}), "rope_scaling of type "
     "'linear'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling of type 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_config(checkpoint, change, message):
  directory, _, config = checkpoint
  config.update(change)
  _write(directory, config=config)
  with pytest.raises(ValueError, match=re.escape(message)):
    from_pretrained(directory)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_sliding_window_is_rejected(model_type):
  config = hf_models.hf_model(model_type, num_layers=1).config.to_dict()
  config.update(use_sliding_window=True, sliding_window=4)
  with pytest.raises(ValueError, match="use_sliding_window"):
    ModelConfig.from_hf(config)


def test_missing_files(checkpoint, tmp_path):
  directory, _, _ = checkpoint
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(tmp_path / "nowhere")
  (directory / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="expected model.safetensors or "
                     "model.safetensors.index.json"):
    from_pretrained(directory)


def test_bad_index(checkpoint):
  directory, tensors, _ = checkpoint
  (directory / "model.safetensors").unlink()
  names = sorted(tensors)
  half = len(names) // 2
  for i, part in enumerate((names[:half], names[half:])):
    safetensors.numpy.save_file({n: tensors[n] for n in part},
                                directory / f"part{i}.safetensors")
  weight_map = {n: f"part{int(k >= half)}.safetensors"
                for k, n in enumerate(names)}
  index = directory / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": weight_map}))
  from_pretrained(directory)  # the valid index loads

  wrong = dict(weight_map, **{names[0]: "part1.safetensors"})
  index.write_text(json.dumps({"weight_map": wrong}))
  with pytest.raises(ValueError, match=re.escape(
      f"Tensor {names[0]!r} is listed in the index but missing")):
    from_pretrained(directory)

  (directory / "part1.safetensors").unlink()
  index.write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"part1.safetensors (holding {names[half]!r}")):
    from_pretrained(directory)
