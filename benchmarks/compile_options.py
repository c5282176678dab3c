"""XLA compile time of one training step under compiler options.

Lowers one optax step of a small decoder (the fused head's log-probs and
entropy, their gradient, AdamW) once, then compiles it under each option
set in turn, `--repeats` rounds with the sets interleaved (a shared machine
drifts), and prints the CPU seconds of each compile (all threads of the
process). Options are XLA `DebugOptions` fields passed per compile
(`Lowered.compile(compiler_options=...)`), so fields that jaxlib does not
accept as `XLA_FLAGS` can be tried too; an unknown one is reported, not
fatal. The process's own `XLA_FLAGS` apply to every set.

    XLA_FLAGS="--xla_backend_optimization_level=0" python benchmarks/compile_options.py \\
        '{}' '{"xla_cpu_opt_preset": 1}' '{"xla_cpu_max_isa": "SSE4_2"}'

(docs/benchmarks.md, "The test suite": the search on jaxlib 0.11.)
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.training.step import sequence_logps


def lowered_step(layers: int, batch: int, length: int, variant: int):
  """One AdamW step on the summed log-probs and entropy, lowered; each
  `variant` adds its own constant to the loss, so it is a new program to
  the compilation caches, with the same work."""
  config = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                       num_layers=layers, num_heads=4, num_kv_heads=2,
                       head_dim=16, qk_norm=True, family="qwen3")
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  tokens = jnp.ones((batch, length), jnp.int32)
  tx = optax.adamw(1e-3)

  def loss(p):
    logps, entropy = sequence_logps(nnx.merge(graphdef, p), tokens,
                                    jnp.ones_like(tokens))
    return logps.sum() + entropy.sum() + variant

  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  return jax.jit(step).lower(params, tx.init(params))


def _compile_rounds(sets, args):
  """CPU seconds of each option set's compiles, and the sets refused."""
  seconds = {i: [] for i in range(len(sets))}
  errors = {}
  for r in range(args.repeats):
    for i, options in enumerate(sets):
      if i in errors:
        continue
      lowered = lowered_step(args.layers, args.batch, args.length,
                             r * len(sets) + i)
      start = time.process_time()
      try:
        lowered.compile(compiler_options=options or None)
      except Exception as e:  # pylint: disable=broad-except
        errors[i] = str(e).splitlines()[0][:160]
        continue
      seconds[i].append(time.process_time() - start)
  return seconds, errors


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("options", nargs="+",
                      help="JSON objects of compiler options; '{}' is none")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=24)
  args = parser.parse_args(argv)
  for name in ("repeats", "layers", "batch", "length"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  sets = []
  for text in args.options:
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      parser.error(f"options {text!r} are not JSON: {e}")
    if not isinstance(value, dict):
      parser.error(f"options {text!r} must be a JSON object")
    sets.append(value)
  # Every compile below is of a program no cache has seen (the persistent
  # cache off, each program its own variant).
  cache_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    seconds, errors = _compile_rounds(sets, args)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_on)
  print("| options | compile CPU s (each round) | median |")
  print("|---|---|---|")
  for i, options in enumerate(sets):
    label = json.dumps(options)
    if i in errors:
      print(f"| {label} | refused: {errors[i]} | |")
    else:
      each = ", ".join(f"{s:.2f}" for s in seconds[i])
      print(f"| {label} | {each} | {statistics.median(seconds[i]):.2f} |")


if __name__ == "__main__":
  main()
