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
* the peak memory of one execution, in a fresh subprocess per variant,
  over what was held just before it (inputs, runtime, compiler): on CPU the
  process's peak RSS (the kernel's peak counter is reset after the
  ahead-of-time compilation); on GPU/TPU the device allocator's
  `peak_bytes_in_use` over its `bytes_in_use`;
* wall time: median over repeats, the two variants interleaved in one
  process so that machine noise hits both alike.

Usage:

    python benchmarks/fused_head.py                      # the issue's sizes
    python benchmarks/fused_head.py --configs 1024x256x8192 --repeats 3
    python benchmarks/fused_head.py --precision bf16_fp32_logits

`--precision` picks the policy both variants run under (a preset of
`entropo.precision`): hidden states come in its compute dtype, as the
model hands them over, and `lm_head` stays float32 (master weights), so
`bf16_fp32_logits` is bf16 operands with a float32 product.

Writes a JSON summary to `--out` (default benchmarks/out/fused_head.json)
and prints a Markdown table.
"""

import argparse
import functools
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


def _config_arg(text):
  try:
    ok = min(parse_config(text)) > 0
  except ValueError:
    ok = False
  if not ok:
    raise argparse.ArgumentTypeError(
        f"expected NxDxV with three positive ints, e.g. 4096x1024x32768; "
        f"got {text!r}")
  return text


def make_inputs(n, d, v, precision="fp32", seed=0):
  precision = entropo.get_precision(precision)
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (n, d), precision.compute_dtype)
  lm_head = jax.random.normal(k[1], (d, v), jnp.float32) / np.sqrt(d)
  targets = jax.random.randint(k[2], (n,), 0, v)
  g_lp = jax.random.normal(k[3], (n,), jnp.float32)
  g_h = jax.random.normal(k[4], (n,), jnp.float32)
  return hidden, lm_head, targets, g_lp, g_h


def loss_fn(variant, chunk_size, precision="fp32"):
  precision = entropo.get_precision(precision)

  def materialised(hidden, lm_head, targets, g_lp, g_h):
    logits = precision.head_product(hidden, lm_head)  # [N, V]
    logps = entropo.token_logprobs(logits, targets, precision=precision)
    ent = entropo.token_entropy(logits, precision=precision)
    return jnp.sum(g_lp * logps) + jnp.sum(g_h * ent)

  def fused(hidden, lm_head, targets, g_lp, g_h):
    logps, ent = entropo.fused_logprobs_entropy(
        hidden, lm_head, targets, chunk_size=chunk_size, precision=precision
    )
    return jnp.sum(g_lp * logps) + jnp.sum(g_h * ent)

  return {"materialised": materialised, "fused": fused}[variant]


def products(mode, chunk_size, precision="fp32"):
  """The head products the fused path cannot avoid, and nothing else.

  `fwd`: one pass of `hidden @ lm_head[:, chunk]` over the vocabulary;
  `fwd_bwd`: that pass, then a second loop that recomputes each chunk's
  product and takes both gradient products from it (`dz @ W_c^T`,
  `hidden^T @ dz`): 4 products of N·D·V against the materialised path's 3.
  No softmax, no masking: its time is the floor of the fused path's on
  this device (the `--floor` column). Operand dtypes and layouts follow
  `fused.py` (`hidden^T` made once; a transposed `[V, D]` copy of a
  low-precision head, each float32 chunk transposed in the loop). Assumes
  `chunk_size` divides V.
  """
  precision = entropo.get_precision(precision)
  dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

  def forward(h_op, w, n_chunks):
    def step(acc, c):
      w_c = jax.lax.dynamic_slice_in_dim(w, c * chunk_size, chunk_size, 1)
      # A max, as the fused forward takes: a sum of the product could be
      # rewritten by XLA as a matrix-vector product.
      z = precision.head_product(h_op, w_c)
      return jnp.maximum(acc, jnp.max(z, axis=1).astype(jnp.float32)), None
    acc = jnp.full(h_op.shape[0], -jnp.inf, jnp.float32)
    return jax.lax.scan(step, acc, jnp.arange(n_chunks))[0]

  def fwd(hidden, lm_head, *_):
    h_op = hidden.astype(precision.head_dtype)
    return jnp.sum(forward(h_op, lm_head, lm_head.shape[1] // chunk_size))

  def fwd_bwd(hidden, lm_head, *_):
    n_chunks = lm_head.shape[1] // chunk_size
    h_op = hidden.astype(precision.head_dtype)
    row = forward(h_op, lm_head, n_chunks)  # [N], feeds the second loop
    low_precision = jnp.dtype(precision.head_dtype).itemsize < 4
    w_t = lm_head.astype(precision.head_dtype).T if low_precision else None
    h_t, w_t = jax.lax.optimization_barrier((h_op.T, w_t))

    def step(carry, c):
      dh, dw = carry
      start = c * chunk_size
      w_c = jax.lax.dynamic_slice_in_dim(lm_head, start, chunk_size, 1)
      z = precision.head_product(h_op, w_c).astype(jnp.float32)
      dz = (z * row[:, None]).astype(precision.head_dtype)
      w_c_t = (jax.lax.dynamic_slice_in_dim(w_t, start, chunk_size, 0)
               if low_precision else w_c.astype(precision.head_dtype).T)
      dh = dh + dot(dz, w_c_t)
      dw = jax.lax.dynamic_update_slice_in_dim(dw, dot(h_t, dz), start, 1)
      return (dh, dw), None

    init = (jnp.zeros(hidden.shape, jnp.float32),
            jnp.zeros(lm_head.shape, jnp.float32))
    dh, dw = jax.lax.scan(step, init, jnp.arange(n_chunks))[0]
    return jax.lax.optimization_barrier((dh, dw))

  return jax.jit(fwd if mode == "fwd" else fwd_bwd)


def compiled(variant, mode, chunk_size, precision="fp32"):
  if variant == "floor":
    return products(mode, chunk_size, precision)
  f = loss_fn(variant, chunk_size, precision)
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


def _on_cpu():
  return jax.devices()[0].platform == "cpu"


def child(args):
  """Runs one variant in this (fresh) process; prints its peak as JSON.

  The executable is compiled ahead of time, so no compilation falls inside
  the measured window. On CPU the kernel's peak-RSS counter is then reset
  (`/proc/self/clear_refs`) and the peak of the one execution is measured
  over the RSS already held; on an accelerator, over the allocator's
  `bytes_in_use` (its `peak_bytes_in_use` covers only this execution and
  the inputs, which are in use before it).
  """
  n, d, v = parse_config(args.child)
  inputs = make_inputs(n, d, v, args.precision)
  executable = compiled(args.variant, args.mode, args.chunk_size,
                        args.precision).lower(*inputs).compile()
  jax.block_until_ready(inputs)
  if _on_cpu():
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    base = _status_bytes("VmRSS")
    jax.block_until_ready(executable(*inputs))
    peak = _status_bytes("VmHWM") - base
  else:
    device = jax.devices()[0]
    base = device.memory_stats()["bytes_in_use"]
    jax.block_until_ready(executable(*inputs))
    peak = device.memory_stats()["peak_bytes_in_use"] - base
  print(json.dumps({"peak_over_inputs": peak}))


def peak_in_subprocess(config, variant, mode, args):
  cmd = [
      sys.executable, __file__, "--child", config, "--variant", variant,
      "--mode", mode, "--chunk_size", str(args.chunk_size),
      "--precision", args.precision,
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    print(f"peak measurement of {variant} {mode} failed:\n{out.stderr}",
          file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])["peak_over_inputs"]


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


CPU_MAX_BYTES = 14 * 2**30  # leaves room on a 24 GiB machine


def default_max_bytes():
  """What a variant's temporaries may take for it to be run."""
  limit = None if _on_cpu() else jax.devices()[0].memory_stats().get(
      "bytes_limit")
  return 0.8 * limit if limit else CPU_MAX_BYTES


def run_config(config, args):
  n, d, v = parse_config(config)
  inputs = make_inputs(n, d, v, args.precision)
  row = {"config": config, "chunk_size": args.chunk_size,
         "precision": args.precision}
  for mode in ("fwd", "fwd_bwd"):
    fns = {
        variant: compiled(variant, mode, args.chunk_size, args.precision)
        for variant in ("materialised", "fused")
    }
    mem = {name: memory_analysis(fn, inputs) for name, fn in fns.items()}
    row[f"{mode}/memory"] = mem
    # The materialised variant runs only where its temporaries fit; the
    # fused one always does (that it runs where the other cannot is the
    # point), alone then, with no ratio.
    run = {name: fn for name, fn in fns.items()
           if mem[name]["temp_bytes"] < args.max_bytes}
    if len(run) < len(fns):
      row[f"{mode}/not_run"] = {name: "temporaries exceed --max_bytes"
                                for name in fns if name not in run}
    if not args.skip_peak:
      row[f"{mode}/peak"] = {
          name: peak_in_subprocess(config, name, mode, args) for name in run
      }
    if args.repeats > 0:
      timed = dict(run)
      if args.floor:
        timed["floor"] = compiled("floor", mode, args.chunk_size,
                                  args.precision)
      row[f"{mode}/seconds"] = time_interleaved(timed, inputs, args.repeats)
    print(json.dumps(row), flush=True)
  return row


def gib(x):
  return "n/a" if x is None else f"{x / 2**30:.2f}"


def _secs(x):
  return "not run" if x is None else f"{x:.3f}"


def _ratio(a, b):
  return "n/a" if a is None or b is None else f"{a / b:.2f}"


def markdown(rows):
  floor = any("floor" in row.get(f"{mode}/seconds", {})
              for row in rows for mode in ("fwd", "fwd_bwd"))
  lines = [
      "| N x D x V | precision | pass | temp GiB mat. | temp GiB fused "
      "| temp ratio | peak GiB mat. | peak GiB fused | s mat. | s fused "
      "| time ratio |" + (" s floor | floor ratio |" if floor else ""),
      "|---|---|---|---|---|---|---|---|---|---|---|"
      + ("---|---|" if floor else ""),
  ]
  for row in rows:
    for mode in ("fwd", "fwd_bwd"):
      mem = row[f"{mode}/memory"]
      tm, tf = mem["materialised"]["temp_bytes"], mem["fused"]["temp_bytes"]
      peak = row.get(f"{mode}/peak", {})
      sec = row.get(f"{mode}/seconds", {})
      sm, sf, s0 = (sec.get(k) for k in ("materialised", "fused", "floor"))
      time_cols = f"{_secs(sm)} | {_secs(sf)} | {_ratio(sf, sm)}"
      if floor:
        time_cols += f" | {_secs(s0)} | {_ratio(s0, sm)}"
      lines.append(
          f"| {row['config']} | {row['precision']} | {mode} | {gib(tm)} | "
          f"{gib(tf)} | {tf / tm:.3f} | {gib(peak.get('materialised'))} | "
          f"{gib(peak.get('fused'))} | {time_cols} |"
      )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                      type=_config_arg, help="NxDxV, e.g. 4096x1024x32768")
  parser.add_argument("--precision", default="fp32",
                      choices=sorted(entropo.precision.PRESETS))
  parser.add_argument("--chunk_size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_bytes", type=float, default=None,
                      help="run (time, peak) only if materialised "
                      "temporaries are below this (default: 14 GiB on CPU, "
                      "80%% of device memory on an accelerator)")
  parser.add_argument("--skip_peak", action="store_true",
                      help="skip the per-variant peak-memory subprocesses")
  parser.add_argument("--floor", action="store_true",
                      help="also time the fused path's 4 head products "
                      "alone (its floor; chunk_size must divide V)")
  parser.add_argument("--out", default="benchmarks/out/fused_head.json")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--variant", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  if args.floor:
    uneven = [c for c in args.configs
              if parse_config(c)[2] % args.chunk_size]
    if uneven:
      parser.error(f"--floor needs --chunk_size {args.chunk_size} to divide "
                   f"V; it does not in {', '.join(uneven)}")
  if args.max_bytes is None:
    args.max_bytes = default_max_bytes()
  device = jax.devices()[0].device_kind
  print(f"jax {jax.__version__} on {device}, {os.cpu_count()} cpus, "
        f"precision {args.precision}", flush=True)
  rows = [run_config(c, args) for c in args.configs]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": device, "jax": jax.__version__,
               "argv": sys.argv[1:], "rows": rows}, f, indent=1)
  print(markdown(rows))


if __name__ == "__main__":
  main()
