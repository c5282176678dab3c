"""docs/models.md's example runs end to end on a tiny local model directory
(tokenizer.json, config.json and safetensors written here): load, sample,
decode, and recompute the log-probs the way the trainer does."""

import pathlib
import re

import numpy as np
from flax import nnx

import entropo
from entropo import models
from test_tokenizer import _build

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_models_doc_example_runs(tmp_path, capsys):
  tokenizer = _build()
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
      '{"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}')
  config = models.ModelConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=16, qk_norm=True, tie_word_embeddings=True, family="qwen3",
      max_position_embeddings=128)
  models.save_pretrained(models.Transformer(config, rngs=nnx.Rngs(0)),
                         tmp_path)

  code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
  code = code.replace("/path/to/Qwen3-0.6B", str(tmp_path))
  namespace = {}
  exec(compile(code, str(DOC), "exec"), namespace)  # pylint: disable=exec-used

  out = namespace["out"]
  assert int(out.lengths[0]) > 0
  assert capsys.readouterr().out.strip()  # the decoded completion
  mask = np.asarray(out.completion_mask)[:, 1:]
  logps = np.asarray(namespace["logps"])
  assert logps.shape == mask.shape
  assert np.all(np.isfinite(logps)) and np.all(logps[mask] <= 0)
  assert np.all(np.isfinite(np.asarray(namespace["entropy"])))
  # Under bf16_fp32_head the body runs in bf16 on both paths (KV cache vs
  # full forward), so the sampler/trainer gap is measured, not assumed 0.
  gap = entropo.precision_mismatch(namespace["logps"],
                                   out.logps[:, 1:], out.completion_mask[:, 1:])
  assert np.isfinite(float(gap["mismatch/max_abs_diff"]))
  assert float(gap["mismatch/max_abs_diff"]) < 0.5


def test_lora_doc_example_runs(tmp_path):
  config = models.ModelConfig(
      vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
      tie_word_embeddings=True, family="qwen3", max_position_embeddings=64)
  models.save_pretrained(models.Transformer(config, rngs=nnx.Rngs(0)),
                         tmp_path / "base")
  section = DOC.read_text().split("## LoRA", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  code = (code.replace("/path/to/Qwen3-0.6B", str(tmp_path / "base"))
          .replace("/tmp/adapter", str(tmp_path / "adapter"))
          .replace("/tmp/merged", str(tmp_path / "merged")))
  namespace = {}
  exec(compile(code, str(DOC), "exec"), namespace)  # pylint: disable=exec-used
  assert len(nnx.to_flat_state(namespace["trainable"])) == 2 * 4 * 2
  assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
  assert namespace["again"].lora_config.rank == 16
  # Fresh adapters: the base model and the merged export are the same.
  merged = models.from_pretrained(tmp_path / "merged",
                                  precision="bf16_fp32_head")
  np.testing.assert_array_equal(
      np.asarray(merged.logits(namespace["tokens"])),
      np.asarray(namespace["base_logits"]))
