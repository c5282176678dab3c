"""The decode step against a long KV cache: every key chunk vs the filled ones.

With one query per step (decoding), `entropo.models.attention`'s blockwise
path loops only over the key chunks up to the query's slot, sliced from the
cache in place. Before, it scored every chunk of the cache (masking the
unfilled ones) from a padded, transposed copy of the whole cache, in every
layer and step. This benchmark runs `entropo.models.sample` both ways in
one process, interleaved, with the same model, prompts and key, checks that
the tokens are identical, and reports generated tokens/s and the ratio.

    python benchmarks/decode_cache.py
    python benchmarks/decode_cache.py --chunk_size 64 --new_tokens 480

The "all chunks" variant is the previous code path, rebuilt here from the
module's own pieces (`_chunks`, `_scan`).
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

from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import attention as attention_lib
from entropo.models import sample

FILLED = attention_lib._decode_loop  # pylint: disable=protected-access


def _all_chunks(body, init, k, v, key_valid, query_slots, chunk):
  del query_slots  # every chunk is scored; the mask drops the unfilled
  xs = attention_lib._chunks(k, v, key_valid, chunk)  # pylint: disable=protected-access
  carry, _ = attention_lib._scan(body, init, xs)  # pylint: disable=protected-access
  return carry


def _run(model, tokens, mask, new_tokens, loop):
  attention_lib._decode_loop = loop  # pylint: disable=protected-access
  try:
    start = time.perf_counter()
    out = sample(model, tokens, mask, key=jax.random.key(0),
                 max_new_tokens=new_tokens)
    out.tokens.block_until_ready()
    return time.perf_counter() - start, np.asarray(out.tokens)
  finally:
    attention_lib._decode_loop = FILLED  # pylint: disable=protected-access


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=480)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--layers", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="write the result as JSON")
  args = parser.parse_args(argv)
  length = args.prompt_len + args.new_tokens
  config = ModelConfig(
      vocab_size=64, hidden_size=128, intermediate_size=384,
      num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=32,
      max_position_embeddings=length, attention="blockwise",
      attention_chunk_size=args.chunk_size)
  model = Transformer(config, precision="fp32", rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (args.batch, args.prompt_len)),
                       jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  variants = {"all chunks": _all_chunks, "filled chunks": FILLED}
  # Each variant traces its own program: jit caches by function identity
  # of the traced code, so clear between variants and warm each up once.
  times = {name: [] for name in variants}
  outputs = {}
  for repeat in range(args.repeats + 1):
    for name, loop in variants.items():
      jax.clear_caches()
      _run(model, tokens, mask, args.new_tokens, loop)  # compile
      seconds, out = _run(model, tokens, mask, args.new_tokens, loop)
      if repeat:  # the first round only warms up
        times[name].append(seconds)
      outputs[name] = out
  same = np.array_equal(outputs["all chunks"], outputs["filled chunks"])
  rate = {name: args.batch * args.new_tokens / statistics.median(t)
          for name, t in times.items()}
  result = {
      "cache_slots": length, "chunk_size": args.chunk_size,
      "chunks": -(-length // args.chunk_size), "batch": args.batch,
      "layers": args.layers, "tokens_per_s": rate,
      "ratio": rate["filled chunks"] / rate["all chunks"],
      "same_tokens": bool(same), "jax": jax.__version__,
      "command": " ".join(sys.argv),
  }
  print(f"| variant | tok/s | cache {length} slots, chunks of "
        f"{args.chunk_size} |\n|---|---|---|")
  for name, r in rate.items():
    print(f"| {name} | {r:.0f} | |")
  print(f"filled / all = {result['ratio']:.2f}; same tokens: {same}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  if not same:
    raise SystemExit("the two variants sampled different tokens")
  return result


if __name__ == "__main__":
  main()
