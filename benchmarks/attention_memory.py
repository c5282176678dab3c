"""Compiled temporaries of one update step, by attention path and remat.

One update step here is the forward pass of the decoder, the fused head
(`fused_logprobs_entropy`) and the backward pass of a simple loss,
`sum(log pi(target)) + sum(H)`, over every parameter: what the trainer's
update differentiates, less the objective and the optimizer. Nothing is
run: each variant is lowered on abstract parameters and compiled, and XLA's
`memory_analysis()` gives its temporary buffers (arguments and outputs not
included). Compile time is reported too.

With `--time N` every variant also runs, on random weights and tokens:
all are compiled first, then executed in N + 1 interleaved rounds (the
first warms up), and the median seconds per step and tokens/s are
reported beside the memory (on an accelerator; this is how to compare the
attention paths, remat and the layer scan by speed).

    python benchmarks/attention_memory.py
    python benchmarks/attention_memory.py --lengths 1024 4096 \\
        --attention reference blockwise --remat none block
    python benchmarks/attention_memory.py --layers 28 --batch 16 \\
        --lengths 1024 --attention auto blockwise --remat none block \\
        --loops unrolled scan --precision bf16_fp32_logits --time 3  # GPU

Defaults: the Qwen3-0.6B width (vocab 151936, hidden 1024, 16 heads, 8 kv
heads, head_dim 128, MLP 3072, tied embeddings, qk-norm) with 2 layers,
batch 1, float32 (`--precision`).
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
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
        precision=model.precision)
    return jnp.sum(logps) + jnp.sum(entropy)

  step = jax.jit(jax.grad(loss_fn))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return step, (state, tokens)


def measure(config, *, precision, remat, batch, length, scan_layers=False):
  """`({temp_bytes, compile_s}, compiled step)`."""
  step, args = update_step(config, precision=precision, remat=remat,
                           batch=batch, length=length,
                           scan_layers=scan_layers)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  return {"temp_bytes": int(analysis.temp_size_in_bytes),
          "compile_s": round(seconds, 2)}, compiled


def time_steps(rows, steps, config, *, precision, batch, rounds):
  """Runs the compiled steps interleaved; adds `step_s`, `tokens_per_s`.

  Every variant has the same parameter tree (attention, remat and the
  layer scan change how, not what, is computed), so one random model
  serves them all.
  """
  state = nnx.split(Transformer(config, precision=precision,
                                rngs=nnx.Rngs(0)))[1]
  rng = np.random.default_rng(0)
  inputs = {length: jnp.asarray(rng.integers(0, config.vocab_size,
                                             (batch, length)), jnp.int32)
            for length in {row["length"] for row in rows}}
  times = [[] for _ in rows]
  for r in range(rounds + 1):  # round 0 warms up
    for row, step, spent in zip(rows, steps, times):
      start = time.perf_counter()
      jax.block_until_ready(step(state, inputs[row["length"]]))
      if r:
        spent.append(time.perf_counter() - start)
  for row, spent in zip(rows, times):
    row["step_s"] = statistics.median(spent)
    row["tokens_per_s"] = batch * row["length"] / row["step_s"]


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
  parser.add_argument("--time", type=int, default=0, metavar="N",
                      help="also run every variant N times (interleaved)")
  parser.add_argument("--out", default=None, help="write the rows as JSON")
  args = parser.parse_args(argv)
  shape = QWEN3_06B
  if args.tiny:
    shape = dict(QWEN3_06B, vocab_size=256, hidden_size=32,
                 intermediate_size=64, num_heads=4, num_kv_heads=2,
                 head_dim=8)
  rows, steps = [], []
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
          measured, step = measure(config, precision=args.precision,
                                   remat=remat, batch=args.batch,
                                   length=length, scan_layers=loop == "scan")
          rows.append(row | measured)
          row = rows[-1]
          if args.time:
            steps.append(step)
          print(f"| {attention} | {remat} | {args.layers} {loop} | {length}"
                f" | {row['temp_bytes'] / 2**30:.2f} | {row['compile_s']} |",
                flush=True)
  if args.time:
    time_steps(rows, steps, config, precision=args.precision,
               batch=args.batch, rounds=args.time)
    print("\n| attention | remat | loop | L | step s | tokens/s |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
      print(f"| {row['attention']} | {row['remat']} | {row['loop']} | "
            f"{row['length']} | {row['step_s']:.4f} | "
            f"{row['tokens_per_s']:.0f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "jax": jax.__version__,
                 "backend": jax.default_backend(),
                 "command": " ".join(sys.argv)}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
