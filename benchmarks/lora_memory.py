"""Full fine-tuning vs LoRA: trainable parameters, optimizer state, and the
compiled memory of one update step.

One update step is the trainer's own `Learner.update` (the GRPO loss
through the fused head, its gradient, global-norm clipping and AdamW) on
one minibatch. Full fine-tuning differentiates and updates every
parameter; LoRA (`entropo.models.add_lora`, every projection targeted)
differentiates the adapters alone, the base weights entering as frozen
arguments. Nothing is run: each variant is lowered on abstract arrays and
compiled, and XLA's `memory_analysis()` gives its temporaries, arguments
and outputs. The optimizer state's bytes are those of `optimizer.init`'s
abstract output.

Compare the totals (arguments + outputs + temporaries), not temporaries
alone: XLA places some scratch buffers of full fine-tuning inside its
large outputs (new parameters and moments), which LoRA does not have, so
LoRA's temporaries can exceed full fine-tuning's while its total is far
smaller (at this width, the transposed tied embedding `[D, V]` float32,
copied for the head's loops, is most of LoRA's temporaries).

    python benchmarks/lora_memory.py
    python benchmarks/lora_memory.py --layers 28 --ranks 8 64 --length 1024

Defaults: the Qwen3-0.6B width (vocab 151936, hidden 1024, 16 heads, 8 kv
heads, head_dim 128, MLP 3072, tied embeddings, qk-norm) with `--layers`
decoder blocks, one group of two 512-token sequences, the `bf16_fp32_head`
preset and blockwise attention.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import add_lora
from entropo.models import lora as lora_lib
from entropo.training import config as config_lib
from entropo.training import sections
from entropo.training import step as step_lib
from entropo.training.algorithm import Algorithm

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_heads=16, num_kv_heads=8, head_dim=128,
                 tie_word_embeddings=True, qk_norm=True, family="qwen3",
                 max_position_embeddings=40960, attention="blockwise")


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def update_step(config, *, precision, rank, alpha, batch, length):
  """`(learner, abstract args of Learner.update, params, frozen)`.

  `rank=0` is full fine-tuning.
  """
  def build():
    model = Transformer(config, precision=precision, rngs=nnx.Rngs(0))
    if rank:
      add_lora(model, rank=rank, alpha=alpha, targets=lora_lib.TARGETS)
    return model

  abstract = nnx.eval_shape(build)
  if rank:
    graphdef, params, frozen = nnx.split(abstract, nnx.LoRAParam, ...)
  else:
    (graphdef, params), frozen = nnx.split(abstract), None
  c = config_lib.default_config("grpo")
  algorithm = Algorithm.from_config(c.algo)
  optimizer = step_lib.make_optimizer(sections.OptimSection())
  learner = step_lib.Learner(graphdef, algorithm, optimizer,
                             max_new_tokens=length // 2, group_size=batch)
  hyper = algorithm.hyperparameters(algorithm.init_controllers(),
                                    algorithm.fixed_hyperparameters())
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
  targets = jax.ShapeDtypeStruct((batch, length - 1), jnp.bool_)
  logps = jax.ShapeDtypeStruct((batch, length - 1), jnp.float32)
  rewards = jax.ShapeDtypeStruct((batch,), jnp.float32)
  pre_update = learner._pre_update  # pylint: disable=protected-access
  batch_shapes, _ = jax.eval_shape(pre_update, params, None, tokens, mask,
                                   targets, logps, rewards, hyper, frozen)
  opt_state = jax.eval_shape(optimizer.init, params)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (params, opt_state, batch_shapes, hyper, key, frozen)
  return learner, args, params, frozen, opt_state


def measure(config, *, precision, rank, alpha, batch, length):
  learner, args, params, frozen, opt_state = update_step(
      config, precision=precision, rank=rank, alpha=alpha, batch=batch,
      length=length)
  start = time.perf_counter()
  compiled = learner.update.lower(*args).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  return {
      "trainable_params": _size(params),
      "frozen_params": _size(frozen) if frozen is not None else 0,
      "optimizer_bytes": _bytes(opt_state),
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "argument_bytes": int(analysis.argument_size_in_bytes),
      "output_bytes": int(analysis.output_size_in_bytes),
      # What the step holds at once, without buffer donation (which
      # `Learner.update` does not use): inputs, new outputs, temporaries.
      "total_bytes": int(analysis.argument_size_in_bytes
                         + analysis.output_size_in_bytes
                         + analysis.temp_size_in_bytes),
      "compile_s": round(seconds, 2),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=28)
  parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64],
                      help="LoRA ranks compared with full fine-tuning")
  parser.add_argument("--alpha", type=float, default=None,
                      help="LoRA alpha (default: the rank)")
  parser.add_argument("--batch", type=int, default=2,
                      help="sequences: one group (>= 2)")
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--precision", default="bf16_fp32_head")
  parser.add_argument("--tiny", action="store_true",
                      help="a tiny width, for tests")
  parser.add_argument("--out", default=None, help="write the rows as JSON")
  args = parser.parse_args(argv)
  shape = QWEN3_06B
  if args.tiny:
    shape = dict(QWEN3_06B, vocab_size=256, hidden_size=32,
                 intermediate_size=64, num_heads=4, num_kv_heads=2,
                 head_dim=8)
  config = ModelConfig(num_layers=args.layers, **shape)
  rows = []
  print("| variant | trainable params | optimizer state MiB | temporaries "
        "MiB | arguments MiB | outputs MiB | total MiB | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  mib = lambda b: f"{b / 2**20:.1f}"
  for rank in [0, *args.ranks]:
    alpha = float(rank) if args.alpha is None else args.alpha
    row = {"variant": "full" if rank == 0 else f"lora_r{rank}",
           "rank": rank, "layers": args.layers, "batch": args.batch,
           "length": args.length, "precision": args.precision}
    row |= measure(config, precision=args.precision, rank=rank,
                   alpha=alpha, batch=args.batch, length=args.length)
    rows.append(row)
    print(f"| {row['variant']} | {row['trainable_params']:,} | "
          f"{mib(row['optimizer_bytes'])} | {mib(row['temp_bytes'])} | "
          f"{mib(row['argument_bytes'])} | {mib(row['output_bytes'])} | "
          f"{mib(row['total_bytes'])} | {row['compile_s']} |", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "jax": jax.__version__,
                 "backend": jax.default_backend(),
                 "command": " ".join(sys.argv)}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
