"""The sampler's decode step: time per step and loops of unknown length.

Runs `entropo.models.sample` in several variants on the same model shape,
prompts and key, compiled ahead of time and executed interleaved (these
machines are shared and noisy), and reports per variant: compile time,
milliseconds per generated token (one whole `sample` call, prefill
included, divided by `--new_tokens`; rows may stop early at `--eos_id`,
and each JSON row holds their lengths),
tokens/s, and how many `while` loops of the compiled program have no
known trip count (on a GPU, XLA copies such a loop's condition to the host
and waits for the device at every trip).

A variant is `PRECISION:STEPS_PER_CHECK[:LOOP]`:

* PRECISION: an entropo precision preset (`fp32`, `bf16`, ...);
* STEPS_PER_CHECK: `sample(..., steps_per_check=)`, decode steps between
  two checks of whether every row has stopped (1: a check per step);
* LOOP (optional): how a decode step's blockwise attention walks a cache
  longer than one chunk: `filled` (a loop over the filled chunks only, of
  data-dependent length: the CPU and TPU default), `every` (every chunk,
  a loop of known length: the GPU default) or `auto` (this backend's
  default; the default).

Variants of one precision must sample the same tokens; the script exits
non-zero if they do not.

    python benchmarks/decode_step.py                           # GPU shape
    python benchmarks/decode_step.py --layers 2 --batch 8 \\
        --new_tokens 128 --variants fp32:1 fp32:16             # CPU
"""

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from entropo.models import attention as attention_lib
from entropo.models import sampler
from entropo.models import Transformer

# benchmarks/sampler.py, beside this script (on sys.path when run by path).
from sampler import MODELS, prompts  # pylint: disable=g-bad-import-order

LOOPS = {"filled": False, "every": True}


def parse_variant(text):
  parts = text.split(":")
  if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
    raise ValueError(f"A variant is PRECISION:STEPS_PER_CHECK[:LOOP]; got "
                     f"{text!r}.")
  loop = parts[2] if len(parts) == 3 else "auto"
  if loop not in (*LOOPS, "auto"):
    raise ValueError(f"Unknown LOOP {loop!r} in {text!r}; expected filled, "
                     f"every or auto.")
  return dict(name=text, precision=parts[0], steps_per_check=int(parts[1]),
              loop=loop)


def unknown_length_loops(hlo_text):
  """The `while` loops of compiled HLO without a known trip count."""
  return sum(1 for line in hlo_text.splitlines()
             if " while(" in line and "known_trip_count" not in line)


def compile_variant(model, tokens, mask, variant, new_tokens, eos_id):
  """`(executable, dynamic inputs, compile seconds, unknown loops)`."""
  fn, args, kwargs = sampler._prepare(  # pylint: disable=protected-access
      model, tokens, mask, key=jax.random.key(0),
      max_new_tokens=new_tokens, temperature=1.0, top_k=None, top_p=None,
      eos_id=eos_id, use_cache=True,
      steps_per_check=variant["steps_per_check"])
  default = attention_lib._loop_checks_on_host  # pylint: disable=protected-access
  if variant["loop"] != "auto":
    every = LOOPS[variant["loop"]]
    attention_lib._loop_checks_on_host = lambda backend=None: every  # pylint: disable=protected-access
  jax.clear_caches()  # trace anew: variants may differ in traced code only
  try:
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - start
  finally:
    attention_lib._loop_checks_on_host = default  # pylint: disable=protected-access
  return compiled, args[1:], seconds, unknown_length_loops(compiled.as_text())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="qwen3-0.6b", choices=list(MODELS))
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--chunk_size", type=int, default=None,
                      help="attention_chunk_size (default: the config's)")
  parser.add_argument("--variants", nargs="+",
                      default=["fp32:1", "fp32:16", "bf16:1", "bf16:16"])
  parser.add_argument(
      "--eos_id", type=int, default=0,
      help="stop rows at this id; -1: no EOS id. The default, 0, is an id "
      "a random model almost never samples: rows run to the end, but the "
      "loop must check for stopped rows, as in RL rollouts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="write the rows as JSON")
  args = parser.parse_args(argv)
  variants = [parse_variant(v) for v in args.variants]
  eos_id = None if args.eos_id < 0 else args.eos_id
  config = MODELS[args.model]
  config = config.replace(
      num_layers=args.layers or config.num_layers,
      attention_chunk_size=args.chunk_size or config.attention_chunk_size)
  tokens, mask = prompts(args.batch, args.prompt_len, config.vocab_size)
  models, compiled = {}, {}
  for v in variants:
    if v["precision"] not in models:
      models[v["precision"]] = Transformer(config, precision=v["precision"],
                                           rngs=nnx.Rngs(0))
    compiled[v["name"]] = compile_variant(models[v["precision"]], tokens,
                                          mask, v, args.new_tokens,
                                          eos_id)
    print(f"# {v['name']}: compiled in {compiled[v['name']][2]:.1f}s",
          flush=True)
  times = {name: [] for name in compiled}
  outputs = {}
  for repeat in range(args.repeats + 1):  # round 0 warms up
    for name, (fn, dynamic, _, _) in compiled.items():
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*dynamic))
      if repeat:
        times[name].append(time.perf_counter() - start)
      outputs[name] = out
  rows = []
  for v in variants:
    name = v["name"]
    median = statistics.median(times[name])
    first = next(u["name"] for u in variants
                 if u["precision"] == v["precision"])
    rows.append(dict(
        v, compile_s=compiled[name][2], seconds=times[name],
        ms_per_step=1e3 * median / args.new_tokens,
        tokens_per_s=args.batch * args.new_tokens / median,
        unknown_length_loops=compiled[name][3],
        completion_lengths=np.asarray(outputs[name].lengths).tolist(),
        same_tokens=bool(np.array_equal(outputs[name].tokens,
                                        outputs[first].tokens))))
  print(f"| variant | ms/step | tok/s | loops of unknown length | compile s "
        f"| same tokens |  {args.model}@{config.num_layers}, B={args.batch}, "
        f"{args.prompt_len}+{args.new_tokens} slots\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['ms_per_step']:.3f} | {r['tokens_per_s']:.0f} "
          f"| {r['unknown_length_loops']} | {r['compile_s']:.1f} | "
          f"{r['same_tokens']} |")
  result = dict(rows=rows, model=args.model, layers=config.num_layers,
                batch=args.batch, prompt_len=args.prompt_len,
                new_tokens=args.new_tokens, eos_id=eos_id,
                chunk_size=config.attention_chunk_size,
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                command=" ".join(sys.argv))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  if not all(r["same_tokens"] for r in rows):
    raise SystemExit("variants of one precision sampled different tokens")
  return result


if __name__ == "__main__":
  main()
