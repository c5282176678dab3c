"""Compiled temporaries of one update step, by attention path and remat.

One update step here is the forward pass of the decoder, the fused head
(`fused_logprobs_entropy`) and the backward pass of a simple loss,
`sum(log pi(target)) + sum(H)`, over every parameter: what the trainer's
update differentiates, less the objective and the optimizer. Nothing is
run: each variant is lowered on abstract parameters and compiled, and XLA's
`memory_analysis()` gives its temporary buffers (arguments and outputs not
included). Compile time is reported too.

    python benchmarks/attention_memory.py
    python benchmarks/attention_memory.py --lengths 1024 4096 \\
        --attention reference blockwise --remat none block

Defaults: the Qwen3-0.6B width (vocab 151936, hidden 1024, 16 heads, 8 kv
heads, head_dim 128, MLP 3072, tied embeddings, qk-norm) with 2 layers,
batch 1, float32 (`--precision`).
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import entropo
from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import transformer as transformer_lib

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_heads=16, num_kv_heads=8, head_dim=128,
                 tie_word_embeddings=True, qk_norm=True, family="qwen3",
                 max_position_embeddings=40960)


def update_step(config, *, precision, remat, batch, length,
                scan_layers=False):
  """`(jitted step, abstract args)` for one forward+backward."""
  abstract = nnx.eval_shape(lambda: Transformer(
      config, precision=precision, rngs=nnx.Rngs(0), remat=remat,
      scan_layers=scan_layers))
  graphdef, state = nnx.split(abstract)

  def loss_fn(state, tokens):
    model = nnx.merge(graphdef, state)
    hidden = model(tokens)
    logps, entropy = entropo.fused_logprobs_entropy(
        hidden[:, :-1], model.lm_head_matrix(), tokens[:, 1:],
        precision=model.policy)
    return jnp.sum(logps) + jnp.sum(entropy)

  step = jax.jit(jax.grad(loss_fn))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return step, (state, tokens)


def measure(config, *, precision, remat, batch, length, scan_layers=False):
  step, args = update_step(config, precision=precision, remat=remat,
                           batch=batch, length=length,
                           scan_layers=scan_layers)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  return {"temp_bytes": int(analysis.temp_size_in_bytes),
          "compile_s": round(seconds, 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+",
                      default=[1024, 4096, 16384])
  parser.add_argument("--attention", nargs="+",
                      default=["reference", "blockwise"])
  parser.add_argument("--remat", nargs="+",
                      default=list(transformer_lib.REMAT_OPTIONS))
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--loops", nargs="+", default=["unrolled"],
                      choices=["unrolled", "scan"],
                      help="the blocks as a Python loop or one scan "
                      "(Transformer(scan_layers=...))")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--precision", default="fp32")
  parser.add_argument("--chunk_size", type=int, default=512,
                      help="ModelConfig.attention_chunk_size")
  parser.add_argument("--tiny", action="store_true",
                      help="a tiny width, for tests")
  parser.add_argument("--out", default=None, help="write the rows as JSON")
  args = parser.parse_args(argv)
  shape = QWEN3_06B
  if args.tiny:
    shape = dict(QWEN3_06B, vocab_size=256, hidden_size=32,
                 intermediate_size=64, num_heads=4, num_kv_heads=2,
                 head_dim=8)
  rows = []
  print("| attention | remat | layers | L | temp GiB | compile s |")
  print("|---|---|---|---|---|---|")
  for attention in args.attention:
    for remat in args.remat:
      for loop in args.loops:
        for length in args.lengths:
          config = ModelConfig(num_layers=args.layers, attention=attention,
                               attention_chunk_size=args.chunk_size, **shape)
          row = {"attention": attention, "remat": remat, "loop": loop,
                 "length": length, "layers": args.layers,
                 "batch": args.batch, "precision": args.precision,
                 "chunk_size": args.chunk_size}
          row |= measure(config, precision=args.precision, remat=remat,
                         batch=args.batch, length=length,
                         scan_layers=loop == "scan")
          rows.append(row)
          print(f"| {attention} | {remat} | {args.layers} {loop} | {length}"
                f" | {row['temp_bytes'] / 2**30:.2f} | {row['compile_s']} |",
                flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "jax": jax.__version__,
                 "backend": jax.default_backend(),
                 "command": " ".join(sys.argv)}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
