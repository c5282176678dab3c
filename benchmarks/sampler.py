"""KV-cache sampler vs recomputing the whole prefix: generated tokens/s.

Both variants are `entropo.models.sample` with the same prompts, key and
settings (temperature 1, no truncation, no EOS, so every row generates all
`N` tokens), compiled ahead of time:

* cached: one prefill of the prompts, then one single-token forward pass per
  new token against the KV cache (`use_cache=True`, the default);
* recompute: no cache; every step reruns the model over the whole
  fixed-width `[B, P + N]` token buffer (causal attention, future slots
  masked) and reads the hidden state at the last filled slot
  (`use_cache=False`). Same head, same sampling code.

The recompute baseline does `O(N (P + N))` token-forwards where a
growing-prefix recompute would do `O(N (P + N / 2))`; static shapes under
jit make the fixed width the natural JAX baseline, and the docs say so.

Reported per run: compile time (lower + compile, separately for each
variant); wall time of one execution of the compiled sampler (median of
`--repeats`, after `--warmup` untimed executions of the cached variant and
`--recompute_warmup` (default 0) of the slow baseline, whose first
execution then counts; the two variants interleaved); generated tokens/s
`= B * N / time`; and the ratio cached / recompute from the same process.

Usage:

    python benchmarks/sampler.py                    # the documented runs
    python benchmarks/sampler.py --runs tiny:256 qwen3-0.6b@2:256

A run is `MODEL[@LAYERS]:NEW_TOKENS[:VARIANTS]` with MODEL `tiny` or
`qwen3-0.6b` (Qwen3-0.6B's shape: vocab 151936, hidden 1024, 28 layers, 16
heads, 8 kv heads, head_dim 128, intermediate 3072, tied embeddings; random
weights), `@LAYERS` overriding the depth and VARIANTS `cached`,
`recompute` or `both` (default). Writes JSON to `--out` and prints a
Markdown table.
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

from entropo.models import ModelConfig
from entropo.models import Transformer
from entropo.models import sampler

MODELS = {
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=384,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        tie_word_embeddings=True, qk_norm=True, family="qwen3",
        max_position_embeddings=4096, rope_theta=1e6),
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        tie_word_embeddings=True, qk_norm=True, family="qwen3",
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6),
}

# The documented runs: the full ratio at 256 tokens where recomputing is
# affordable on a 2-core CPU, full-depth 0.6B cached throughput at 256
# tokens, and the full-depth ratio at 32 tokens.
DEFAULT_RUNS = ("tiny:256", "qwen3-0.6b@2:256", "qwen3-0.6b:256:cached",
                "qwen3-0.6b:32")


def parse_run(text):
  parts = text.split(":")
  name, _, layers = parts[0].partition("@")
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of "
                     f"{', '.join(MODELS)}.")
  variants = parts[2] if len(parts) > 2 else "both"
  if variants not in ("cached", "recompute", "both"):
    raise ValueError(f"Unknown variants {variants!r}.")
  return dict(
      name=name,
      layers=int(layers) if layers else MODELS[name].num_layers,
      new_tokens=int(parts[1]),
      variants=("cached", "recompute") if variants == "both" else (variants,),
  )


def prompts(batch, width, vocab, seed=0):
  """`[B, P]` random prompts of lengths in `[P - 8, P]`, left-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, width))
  lengths = rng.integers(width - 8, width + 1, (batch,))
  mask = np.arange(width)[None, :] >= (width - lengths)[:, None]
  return tokens, mask


def compile_variant(model, tokens, mask, new_tokens, use_cache):
  fn, args, kwargs = sampler._prepare(  # pylint: disable=protected-access
      model, tokens, mask, key=jax.random.key(0),
      max_new_tokens=new_tokens, temperature=1.0, top_k=None, top_p=None,
      eos_id=None, use_cache=use_cache)
  start = time.perf_counter()
  compiled = fn.lower(*args, **kwargs).compile()
  seconds = time.perf_counter() - start
  dynamic = args[1:]  # the graphdef is static
  return compiled, dynamic, seconds


def timed(compiled, dynamic):
  start = time.perf_counter()
  result = compiled(*dynamic)
  jax.block_until_ready(result)
  return time.perf_counter() - start, result


def run(spec, models, args):
  key = (spec["name"], spec["layers"])
  if key not in models:
    cfg = MODELS[spec["name"]].replace(num_layers=spec["layers"],
                                       attention=args.attention)
    start = time.perf_counter()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    print(f"# built {spec['name']}@{spec['layers']} in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    models.clear()  # one model at a time in memory
    models[key] = model
  model = models[key]
  cfg = model.config
  n, batch = spec["new_tokens"], args.batch
  tokens, mask = prompts(batch, args.prompt_len, cfg.vocab_size)
  row = dict(model=spec["name"], layers=cfg.num_layers,
             vocab=cfg.vocab_size, hidden=cfg.hidden_size, batch=batch,
             prompt_width=args.prompt_len,
             prompt_lengths=mask.sum(1).tolist(), new_tokens=n,
             attention=cfg.attention)
  compiled = {}
  for variant in spec["variants"]:
    compiled[variant] = compile_variant(model, tokens, mask, n,
                                        variant == "cached")
    row[f"{variant}/compile_s"] = compiled[variant][2]
    print(f"# {spec['name']}@{cfg.num_layers} N={n} {variant}: compiled in "
          f"{compiled[variant][2]:.1f}s", flush=True)
  warmup = {"cached": args.warmup, "recompute": args.recompute_warmup}
  times = {v: [] for v in compiled}
  outputs = {}
  for i in range(max(warmup[v] for v in compiled) + args.repeats):
    for variant, (fn, dynamic, _) in compiled.items():
      if i >= warmup[variant] + args.repeats:
        continue
      seconds, outputs[variant] = timed(fn, dynamic)
      print(f"# {variant} execution {i}: {seconds:.2f}s"
            + (" (warm-up)" if i < warmup[variant] else ""), flush=True)
      if i >= warmup[variant]:
        times[variant].append(seconds)
  for variant, values in times.items():
    median = statistics.median(values)
    row[f"{variant}/seconds"] = values
    row[f"{variant}/median_s"] = median
    row[f"{variant}/tokens_per_s"] = batch * n / median
  if len(outputs) == 2:
    same = np.array_equal(outputs["cached"].tokens,
                          outputs["recompute"].tokens)
    row["same_tokens"] = bool(same)
    row["ratio"] = (row["cached/tokens_per_s"]
                    / row["recompute/tokens_per_s"])
  print(json.dumps(row), flush=True)
  return row


def markdown(rows):
  lines = [
      "| model | layers | N | cached tok/s | recompute tok/s | ratio | "
      "compile s (cached / recompute) | same tokens |",
      "|---|---|---|---|---|---|---|---|",
  ]
  fmt = lambda r, k, f: (f.format(r[k]) if k in r else "not run")
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['layers']} | {r['new_tokens']} | "
        f"{fmt(r, 'cached/tokens_per_s', '{:.1f}')} | "
        f"{fmt(r, 'recompute/tokens_per_s', '{:.2f}')} | "
        f"{fmt(r, 'ratio', '{:.1f}x')} | "
        f"{fmt(r, 'cached/compile_s', '{:.1f}')} / "
        f"{fmt(r, 'recompute/compile_s', '{:.1f}')} | "
        f"{r.get('same_tokens', 'n/a')} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed executions of the cached sampler")
  parser.add_argument(
      "--recompute_warmup", type=int, default=0,
      help="untimed executions of the recompute baseline (default 0: it is "
      "slow; timing its first execution can flatter the cached sampler by "
      "the first-execution overhead, seconds against minutes)")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--attention", default="auto",
                      help="ModelConfig.attention")
  parser.add_argument("--out", default="benchmarks/out/sampler.json")
  args = parser.parse_args()
  specs = [parse_run(r) for r in args.runs]
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs", flush=True)
  models, rows = {}, []
  start = time.perf_counter()
  for spec in specs:
    rows.append(run(spec, models, args))
  print(f"# total {time.perf_counter() - start:.0f}s", flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "args": vars(args),
               "rows": rows}, f, indent=1)
  print(markdown(rows))


if __name__ == "__main__":
  main()
