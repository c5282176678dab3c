"""Fused chunked head vs materialised logits: memory and time, side by side.

For each (tokens N, width D, vocab V) the benchmark builds the same loss,
`sum(g_lp * log pi(target)) + sum(g_h * H)`, two ways:

* materialised: `logits = hidden @ lm_head` (`[N, V]`), then
  `token_logprobs` and `token_entropy`, differentiated by autodiff;
* fused: `fused_logprobs_entropy` (vocabulary chunks, custom VJP).

It reports, for the forward pass and for forward+backward (gradients for
hidden and lm_head):

* XLA's compiled memory analysis (temporary bytes, from
  `jit(...).lower(...).compile().memory_analysis()`): needs no execution;
* process peak RSS of one execution, in a fresh subprocess per variant:
  the executable is compiled ahead of time, the kernel's peak counter is
  reset, and the execution's peak is reported over the RSS held before it
  (inputs, runtime, compiler);
* wall time: median over repeats, the two variants interleaved in one
  process so that machine noise hits both alike.

Usage:

    python benchmarks/fused_head.py                      # the issue's sizes
    python benchmarks/fused_head.py --configs 1024x256x8192 --repeats 3

Writes a JSON summary to `--out` (default benchmarks/out/fused_head.json)
and prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import entropo

DEFAULT_CONFIGS = ("4096x1024x32768", "8192x1024x151936")


def parse_config(text):
  n, d, v = (int(x) for x in text.split("x"))
  return n, d, v


def make_inputs(n, d, v, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (n, d), jnp.float32)
  lm_head = jax.random.normal(k[1], (d, v), jnp.float32) / np.sqrt(d)
  targets = jax.random.randint(k[2], (n,), 0, v)
  g_lp = jax.random.normal(k[3], (n,), jnp.float32)
  g_h = jax.random.normal(k[4], (n,), jnp.float32)
  return hidden, lm_head, targets, g_lp, g_h


def loss_fn(variant, chunk_size):
  def materialised(hidden, lm_head, targets, g_lp, g_h):
    logits = hidden @ lm_head  # [N, V]
    logps = entropo.token_logprobs(logits, targets)
    ent = entropo.token_entropy(logits)
    return jnp.sum(g_lp * logps) + jnp.sum(g_h * ent)

  def fused(hidden, lm_head, targets, g_lp, g_h):
    logps, ent = entropo.fused_logprobs_entropy(
        hidden, lm_head, targets, chunk_size=chunk_size
    )
    return jnp.sum(g_lp * logps) + jnp.sum(g_h * ent)

  return {"materialised": materialised, "fused": fused}[variant]


def compiled(variant, mode, chunk_size):
  f = loss_fn(variant, chunk_size)
  if mode == "fwd_bwd":
    f = jax.value_and_grad(f, argnums=(0, 1))
  return jax.jit(f)


def memory_analysis(fn, args):
  stats = fn.lower(*args).compile().memory_analysis()
  return {
      "temp_bytes": int(stats.temp_size_in_bytes),
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
  }


def _status_bytes(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def child(args):
  """Runs one variant in this (fresh) process; prints its RSS as JSON.

  The executable is compiled ahead of time, then the kernel's peak-RSS
  counter is reset (`/proc/self/clear_refs`), so the peak of the one
  execution that follows is measured over the RSS the inputs, the runtime
  and the compiler already hold, with no compilation inside the window.
  """
  n, d, v = parse_config(args.child)
  inputs = make_inputs(n, d, v)
  executable = compiled(args.variant, args.mode, args.chunk_size).lower(
      *inputs).compile()
  jax.block_until_ready(inputs)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  base = _status_bytes("VmRSS")
  jax.block_until_ready(executable(*inputs))
  print(json.dumps({"rss_peak_over_inputs": _status_bytes("VmHWM") - base}))


def rss_in_subprocess(config, variant, mode, chunk_size):
  cmd = [
      sys.executable, __file__, "--child", config, "--variant", variant,
      "--mode", mode, "--chunk_size", str(chunk_size),
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])[
      "rss_peak_over_inputs"
  ]


def time_interleaved(fns, args, repeats):
  """Median seconds per variant, variants alternating within each repeat."""
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for r in range(repeats):
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for name in order:
      start = time.perf_counter()
      jax.block_until_ready(fns[name](*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def run_config(config, args):
  n, d, v = parse_config(config)
  inputs = make_inputs(n, d, v)
  row = {"config": config, "chunk_size": args.chunk_size}
  for mode in ("fwd", "fwd_bwd"):
    fns = {
        variant: compiled(variant, mode, args.chunk_size)
        for variant in ("materialised", "fused")
    }
    mem = {name: memory_analysis(fn, inputs) for name, fn in fns.items()}
    row[f"{mode}/memory"] = mem
    fits = mem["materialised"]["temp_bytes"] < args.max_bytes
    if fits and not args.skip_rss:
      row[f"{mode}/rss"] = {
          name: rss_in_subprocess(config, name, mode, args.chunk_size)
          for name in fns
      }
    if fits and args.repeats > 0:
      row[f"{mode}/seconds"] = time_interleaved(fns, inputs, args.repeats)
    else:
      row[f"{mode}/skipped_run"] = (
          "materialised temporaries exceed --max_bytes"
          if not fits else "--repeats 0"
      )
    print(json.dumps(row), flush=True)
  return row


def gib(x):
  return "n/a" if x is None else f"{x / 2**30:.2f}"


def markdown(rows):
  lines = [
      "| N x D x V | pass | temp GiB mat. | temp GiB fused | temp ratio "
      "| RSS GiB mat. | RSS GiB fused | s mat. | s fused | time ratio |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    for mode in ("fwd", "fwd_bwd"):
      mem = row[f"{mode}/memory"]
      tm, tf = mem["materialised"]["temp_bytes"], mem["fused"]["temp_bytes"]
      rss = row.get(f"{mode}/rss", {})
      sec = row.get(f"{mode}/seconds")
      time_cols = (
          f"{sec['materialised']:.2f} | {sec['fused']:.2f} | "
          f"{sec['fused'] / sec['materialised']:.2f}"
          if sec else "not run | not run | n/a"
      )
      lines.append(
          f"| {row['config']} | {mode} | {gib(tm)} | {gib(tf)} | "
          f"{tf / tm:.3f} | {gib(rss.get('materialised'))} | "
          f"{gib(rss.get('fused'))} | {time_cols} |"
      )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  parser.add_argument("--chunk_size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_bytes", type=float, default=14 * 2**30,
                      help="run (time, RSS) only if materialised temporaries "
                      "are below this")
  parser.add_argument("--skip_rss", action="store_true")
  parser.add_argument("--out", default="benchmarks/out/fused_head.json")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cpus", flush=True)
  rows = [run_config(c, args) for c in args.configs]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f,
              indent=1)
  print(markdown(rows))


if __name__ == "__main__":
  main()
