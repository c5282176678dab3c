"""The supervised warm start of the tiny model on correct solutions."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import tqdm
from flax import nnx

from entropo import tasks as tasks_lib
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import add_lora
from entropo.models import cast_base
from entropo.models import from_pretrained
from entropo.models import load_tokenizer
from entropo.models import save_pretrained
from entropo.models import hf as hf_lib
from entropo.models import tokenizer as tokenizer_lib
from entropo.tasks import pipeline
from entropo.training import distributed
from entropo.training import guards
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
  tokenizer.json, plus `warm_start.json`: the settings that made it, and
  `warm_start_loss.json`: its loss per step) at `directory`, which is
  reused if it already exists:
  every run of a study can start from the same warm-started policy. The
  warm start always trains in float32; the RL run loads it under its own
  precision preset.

  The directory is written as `<directory>.tmp-<pid>` and renamed when
  complete, so a kill while saving never leaves a half-written model at
  `directory`. One that is incomplete all the same (written by an older
  version, or damaged: `incomplete_reason`) is rebuilt with a warning.

  A Ctrl-C lets the step in progress finish, saves the progress to
  `<directory>.partial.npz` and raises KeyboardInterrupt; the next call
  with the same settings continues from there, exactly.
  """
  directory = pathlib.Path(directory)
  _remove_stale_temporaries(directory)
  if directory.exists():
    why = incomplete_reason(directory)
    if why is None:
      logger_lib.log(f"warm start: reusing {directory}")
      return directory
    logger_lib.warn(f"warm start {directory} is incomplete ({why}); "
                    f"rebuilding it")
    shutil.rmtree(directory)
  ws = config.warm_start
  model_config = tiny_model_config(config.model, tokenizer.vocab_size)
  model = Transformer(model_config, precision="fp32",
                      rngs=nnx.Rngs(config.seed))
  pairs = tasks_lib.warm_start_examples(
      task, seed=ws.seed, num_problems=ws.num_problems,
      samples_per_problem=ws.samples_per_problem, spread=ws.spread)
  if isinstance(task, tasks_lib.AgentTask):
    # As wide as the longest transcript (within the episode context): most
    # are far shorter than the context an episode may use.
    longest = _longest(pairs, tokenizer)
    if longest > config.agent.max_context:
      raise ValueError(
          f"agent.max_context={config.agent.max_context} is shorter than "
          f"the longest scripted transcript of the warm start ({longest} "
          f"tokens): the policy could not play that episode; raise it.")
    max_len = min(config.agent.max_context, -(-longest // 8) * 8)
  else:
    max_len = config.data.max_prompt_len + config.sampling.max_new_tokens
  batches = iter(pipeline.sft_batches(
      pairs, tokenizer, batch_size=ws.batch_size, seed=ws.seed,
      max_len=max_len))
  optimizer = step_lib.warm_start_optimizer(ws.learning_rate, ws.steps)
  graphdef, params = nnx.split(model)
  state = (params, optimizer.init(params))
  partial = directory.with_name(f"{directory.name}.partial.npz")
  fingerprint = json.dumps(
      {"warm_start": _settings(ws), "model": dataclasses.asdict(model_config),
       "seed": config.seed, "max_len": max_len}, sort_keys=True, default=str)
  losses = []
  found = _load_partial(partial, fingerprint, state)
  if found is not None:
    state, losses, data_state = found
    batches.set_state(data_state)
    logger_lib.log(f"warm start: continuing from step {len(losses)} "
                   f"({partial})")
  state, stopped, position = _train(graphdef, optimizer, state, batches,
                                    losses, ws.steps)
  if stopped:
    _save_partial(partial, fingerprint, state, losses, position)
    logger_lib.log(f"interrupted in the warm start at step {len(losses)} of "
                   f"{ws.steps}; saved its progress to {partial}, so a "
                   f"rerun continues from there")
    raise KeyboardInterrupt
  params = state[0]
  nnx.update(model, params)
  tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  save_pretrained(model, tmp)
  tasks_lib.save_tokenizer(tokenizer, tmp)
  (tmp / "warm_start_loss.json").write_text(json.dumps(losses))
  # What made this policy (the spread sets its starting entropy).
  (tmp / "warm_start.json").write_text(json.dumps(
      {**_settings(ws), "model_seed": config.seed}, indent=2))
  os.replace(tmp, directory)
  partial.unlink(missing_ok=True)
  final = f", final loss {losses[-1]:.4f}" if losses else ""
  logger_lib.log(f"warm start: {ws.steps} steps{final} -> {directory}")
  return directory


def _longest(pairs, tokenizer) -> int:
  """Tokens of the longest (prompt, transcript) pair."""
  return max(len(tokenizer.encode(p)) + sum(
      len(tokenizer.encode(s.text, add_special_tokens=False)) for s in t)
             for p, t in pairs)


def _settings(ws) -> dict:
  """The warm_start section's fields (a typed section or a ConfigDict)."""
  return dataclasses.asdict(ws) if dataclasses.is_dataclass(ws) else (
      ws.to_dict())


def _train(graphdef, optimizer, state, batches, losses: list, steps: int):
  """SFT steps from `len(losses)` to `steps`; `(state, interrupted, the
  data position after the last step done)`.

  A Ctrl-C is held until the step in progress is complete, so the state,
  the losses and the data iterator always agree.
  """
  bar = tqdm.tqdm(range(len(losses), steps), desc="warm start", unit="step",
                  initial=len(losses), total=steps, dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  position = batches.get_state()  # of the next batch to train on
  with guards.held_interrupts() as held:
    try:
      for i in bar:
        if held:
          break
        position = batches.get_state()
        b = next(batches)
        *state, loss = step_lib.sft_step(
            graphdef, optimizer, *state, jnp.asarray(b["tokens"]),
            jnp.asarray(b["mask"]), jnp.asarray(b["loss_mask"]))
        losses.append(float(loss))
        position = batches.get_state()
        if i % 20 == 0:
          bar.set_postfix(loss=f"{losses[-1]:.3f}")
    except KeyboardInterrupt:  # raised by the step itself, not applied
      held.append(1)
    finally:
      bar.close()
  return tuple(state), bool(held), position


def _save_partial(path, fingerprint: str, state, losses, data_state) -> None:
  """The warm start's progress (arrays, losses, data position), atomically."""
  meta = json.dumps({"fingerprint": fingerprint, "losses": losses,
                     "data_state": data_state}, default=str)
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")
  np.savez(tmp, np.asarray(meta), *[np.asarray(x)
                                    for x in jax.tree.leaves(state)])
  os.replace(tmp, path)


def _load_partial(path, fingerprint: str, like):
  """`(state, losses, data_state)` saved by `_save_partial` for these
  settings, or None (a file for other settings is removed, with a note)."""
  if not path.is_file():
    return None
  treedef = jax.tree.structure(like)
  try:
    with np.load(path) as f:
      meta = json.loads(str(f["arr_0"]))
      leaves = [f[f"arr_{i + 1}"] for i in range(treedef.num_leaves)]
  except Exception as e:  # pylint: disable=broad-except
    logger_lib.warn(f"cannot read {path} ({e}); the warm start starts over")
    path.unlink()
    return None
  if meta["fingerprint"] != fingerprint:
    logger_lib.log(f"{path} is another warm start's progress; starting over")
    path.unlink()
    return None
  state = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
  return state, meta["losses"], meta["data_state"]


def _remove_stale_temporaries(directory: pathlib.Path) -> None:
  """Removes `<directory>.tmp-<pid>` folders of processes that are gone (a
  kill between writing the warm start and renaming it leaves one)."""
  for tmp in directory.parent.glob(f"{directory.name}.tmp-*"):
    pid = tmp.name.rsplit("-", 1)[1]
    if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
      logger_lib.log(f"removing {tmp}, left by an interrupted warm start")
      shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return True


def incomplete_reason(directory) -> str | None:
  """Why the model directory `directory` is unusable, or None if it is whole.

  Cheap checks (no weights are loaded): `config.json` parses as an object,
  `tokenizer.json` exists, and the safetensors header of `model.safetensors`
  reads and its tensors fit in the file.
  """
  directory = pathlib.Path(directory)
  try:
    config = json.loads((directory / hf_lib.CONFIG_NAME).read_text())
  except (OSError, ValueError) as e:
    return f"cannot read {hf_lib.CONFIG_NAME}: {e}"
  if not isinstance(config, dict):
    return f"{hf_lib.CONFIG_NAME} is not a JSON object"
  if not (directory / tokenizer_lib.TOKENIZER_NAME).is_file():
    return f"no {tokenizer_lib.TOKENIZER_NAME}"
  weights = directory / hf_lib.WEIGHTS_NAME
  try:
    with safetensors.safe_open(weights, framework="np") as f:
      for name in f.keys():
        f.get_slice(name)
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot read {hf_lib.WEIGHTS_NAME}: {e}"
  return None


def initial_policy(config, task, workdir, precision):
  """`(model, tokenizer, path)`: the policy RL starts from.

  `model.init_from`'s Hugging Face checkpoint, or the tiny model warm
  started into `<workdir>/warm_start` (by process 0; the others wait);
  loaded under `precision` with the model section's attention, remat and
  layer scan, and LoRA adapters added when `model.lora_rank > 0` (the
  base's projections cast to the compute dtype with
  `model.lora_base_dtype="compute"`).
  """
  m = config.model
  if m.init_from:
    path = pathlib.Path(m.init_from)
    tokenizer = load_tokenizer(path)
  else:
    tokenizer = tasks_lib.char_tokenizer()
    path = distributed.on_primary_first(
        "warm start", warm_start, config, task, tokenizer,
        pathlib.Path(workdir) / "warm_start")
  model = from_pretrained(
      path, precision=precision, attention=m.attention,
      attention_chunk_size=m.attention_chunk_size, remat=m.remat,
      scan_layers=m.scan_layers)
  if m.lora_rank:
    add_lora(model, rank=m.lora_rank, alpha=m.lora_alpha,
             targets=m.lora_targets, rngs=nnx.Rngs(config.seed))
    if m.lora_base_dtype == "compute":
      cast_base(model, model.precision.compute_dtype)
  return model, tokenizer, path
