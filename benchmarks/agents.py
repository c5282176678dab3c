"""Multi-turn rollouts against single-turn ones at equal total tokens.

Three ways to put the same `B x (P + K (A + O))` tokens through the model,
side by side in one process (interleaved, median of `--repeats`):

* single: `entropo.models.sample` generates `K (A + O)` tokens per row in
  one call (the single-turn rollout; every token is sampled);
* multi: `entropo.models.multiturn`: `K` turns of `A` sampled tokens (no
  stop id, so every action is `A` long), each followed by an observation
  of `O` tokens prefilled onto the cache (`extend`). Only `K A` tokens are
  sampled; the observations cost one batched prefill each. Decode and
  prefill seconds are timed apart (each call is synchronised);
* recompute: what a driver without a persistent cache does: every turn
  calls `sample` on the whole context so far (the prefix is prefilled
  again each turn).

Reported: seconds per rollout, tokens/s over all tokens that end up in the
sequences, sampled (policy) tokens/s, the observation prefill's share of
the multi-turn time, and how many token-forwards each variant ran.

Usage:

    python benchmarks/agents.py                  # the documented run
    python benchmarks/agents.py --batch 64 --turns 8 --action 16 --obs 16
"""

import argparse
import json
import os
import statistics
import sys
import time

import dataclasses

import jax
import numpy as np
from flax import nnx

from entropo.models import Transformer
from entropo.models import multiturn
from entropo.models import sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler import MODELS  # pylint: disable=g-import-not-at-top,wrong-import-position
from sampler import prompts  # pylint: disable=g-import-not-at-top,wrong-import-position


def _block(x):
  jax.block_until_ready(x)
  return x


def single(model, tokens, mask, args, key):
  t = time.perf_counter()
  _block(sample(model, tokens, mask, key=key,
                max_new_tokens=args.turns * (args.action + args.obs)).tokens)
  return {"seconds": time.perf_counter() - t}


def multi(model, tokens, mask, args, key, obs):
  live = np.ones(args.batch, bool)
  decode = prefill = 0.0
  t = time.perf_counter()
  ctx = multiturn.start(model, tokens, mask,
                        slots=args.prompt_len + args.turns * (
                            args.action + args.obs))
  _block(ctx.hidden)
  prefill += time.perf_counter() - t
  for turn in range(args.turns):
    t = time.perf_counter()
    ctx, _ = multiturn.act(model, ctx, live, key=jax.random.fold_in(key, turn),
                           max_tokens=args.action)
    decode += time.perf_counter() - t
    t = time.perf_counter()
    ctx = multiturn.extend(model, ctx, obs[turn], np.ones_like(obs[turn],
                                                               bool))
    _block(ctx.hidden)
    prefill += time.perf_counter() - t
  return {"seconds": decode + prefill, "decode_seconds": decode,
          "prefill_seconds": prefill, "fed": ctx.fed}


def recompute(model, tokens, mask, args, key, obs):
  t = time.perf_counter()
  context = np.asarray(tokens)
  for turn in range(args.turns):
    out = sample(model, context, np.ones_like(context, bool),
                 key=jax.random.fold_in(key, turn), max_new_tokens=args.action)
    context = np.concatenate([np.asarray(out.tokens), obs[turn]], axis=1)
  return {"seconds": time.perf_counter() - t}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--turns", type=int, default=4)
  parser.add_argument("--action", type=int, default=32)
  parser.add_argument("--obs", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/out/agents.json")
  args = parser.parse_args()
  cfg = MODELS[args.model]
  if args.layers:
    cfg = dataclasses.replace(cfg, num_layers=args.layers)
  model = Transformer(cfg, precision="fp32", rngs=nnx.Rngs(0))
  tokens, mask = prompts(args.batch, args.prompt_len, cfg.vocab_size)
  mask = np.ones_like(mask, bool)  # full prompts: every variant's P slots
  rng = np.random.default_rng(1)
  obs = [rng.integers(3, cfg.vocab_size, (args.batch, args.obs)).astype(
      np.int32) for _ in range(args.turns)]
  key = jax.random.key(0)
  variants = {"single": lambda: single(model, tokens, mask, args, key),
              "multi": lambda: multi(model, tokens, mask, args, key, obs),
              "recompute": lambda: recompute(model, tokens, mask, args, key,
                                             obs)}
  for fn in variants.values():  # compile
    fn()
  runs = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, fn in variants.items():
      runs[name].append(fn())
  total = args.batch * (args.prompt_len + args.turns * (args.action +
                                                        args.obs))
  sampled = {"single": args.turns * (args.action + args.obs),
             "multi": args.turns * args.action,
             "recompute": args.turns * args.action}
  forwards = {"single": total, "multi": total,
              "recompute": args.batch * sum(
                  args.prompt_len + t * (args.action + args.obs) + args.action
                  for t in range(args.turns))}
  rows = []
  for name, results in runs.items():
    seconds = statistics.median(r["seconds"] for r in results)
    row = {"variant": name, "seconds": seconds,
           "tokens_per_s": total / seconds,
           "sampled_tokens_per_s": args.batch * sampled[name] / seconds,
           "token_forwards": forwards[name]}
    if name == "multi":
      row["prefill_share"] = statistics.median(
          r["prefill_seconds"] / r["seconds"] for r in results)
      assert results[0]["fed"] == total
    rows.append(row)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "backend": jax.default_backend(),
               "rows": rows}, f, indent=2)
  print(f"{args.model} layers={cfg.num_layers} B={args.batch} "
        f"P={args.prompt_len} K={args.turns} A={args.action} O={args.obs}: "
        f"{total} tokens per rollout ({jax.default_backend()})")
  print("| variant | s / rollout | tokens/s (all) | sampled tokens/s | "
        "token-forwards | prefill share |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    share = f"{r['prefill_share']:.0%}" if "prefill_share" in r else ""
    print(f"| {r['variant']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} "
          f"| {r['sampled_tokens_per_s']:.0f} | {r['token_forwards']} | "
          f"{share} |")


if __name__ == "__main__":
  main()
