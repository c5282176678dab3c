"""The supervised warm start of the tiny model on correct solutions."""

import json
import pathlib

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

from entropo import tasks as tasks_lib
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import save_pretrained
from entropo.tasks import pipeline
from entropo.training import logger as logger_lib
from entropo.training import step as step_lib


def tiny_model_config(model, vocab_size: int) -> ModelConfig:
  """The from-scratch model of the `model` config section (Qwen3-style)."""
  return ModelConfig(
      vocab_size=vocab_size, hidden_size=model.hidden_size,
      intermediate_size=model.intermediate_size, num_layers=model.num_layers,
      num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
      max_position_embeddings=model.max_position_embeddings,
      rope_theta=model.rope_theta, tie_word_embeddings=True, family="qwen3",
      qk_norm=True, attention=model.attention,
      attention_chunk_size=model.attention_chunk_size)


def warm_start(config, task, tokenizer, directory) -> pathlib.Path:
  """Trains the tiny model from scratch on correct solutions (SFT).

  Saves it as a Hugging Face directory (safetensors, config.json,
  tokenizer.json) at `directory`, which is reused if it already exists:
  every run of a study can start from the same warm-started policy. The
  warm start always trains in float32; the RL run loads it under its own
  precision preset.
  """
  directory = pathlib.Path(directory)
  if (directory / "config.json").is_file():
    logger_lib.log(f"warm start: reusing {directory}")
    return directory
  ws = config.warm_start
  model = Transformer(tiny_model_config(config.model, tokenizer.vocab_size),
                      precision="fp32", rngs=nnx.Rngs(config.seed))
  pairs = tasks_lib.warm_start_examples(
      task, seed=ws.seed, num_problems=ws.num_problems,
      samples_per_problem=ws.samples_per_problem, spread=ws.spread)
  max_len = config.data.max_prompt_len + config.sampling.max_new_tokens
  batches = iter(pipeline.sft_batches(
      pairs, tokenizer, batch_size=ws.batch_size, seed=ws.seed,
      max_len=max_len))
  optimizer = step_lib.warm_start_optimizer(ws.learning_rate, ws.steps)
  graphdef, params = nnx.split(model)
  opt_state = optimizer.init(params)
  losses = []
  bar = tqdm.tqdm(range(ws.steps), desc="warm start", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  for i in bar:
    b = next(batches)
    params, opt_state, loss = step_lib.sft_step(
        graphdef, optimizer, params, opt_state, jnp.asarray(b["tokens"]),
        jnp.asarray(b["mask"]), jnp.asarray(b["loss_mask"]))
    losses.append(float(loss))
    if i % 20 == 0:
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  nnx.update(model, params)
  save_pretrained(model, directory)
  tasks_lib.save_tokenizer(tokenizer, directory)
  (directory / "warm_start_loss.json").write_text(json.dumps(losses))
  final = f", final loss {losses[-1]:.4f}" if losses else ""
  logger_lib.log(f"warm start: {ws.steps} steps{final} -> {directory}")
  return directory
