"""Static vs in-flight batching of the sampler: useful tokens/s, one run.

Every variant samples the same `B` prompts with the same key and settings
and returns the same tokens (checked: `same_tokens`); only the batching
differs:

* static: `entropo.models.sample` on the whole batch, in lock-step until
  its last row ends (what the trainer runs with `sampling.in_flight_slots
  = 0`);
* waves@S: `sample` on `B / S` consecutive batches of `S` rows (the same
  number of rows in flight as in-flight with `S` slots), under the rows'
  identities (`sample_ids`), so the tokens are the same;
* inflight@S: `entropo.models.sample_in_flight(slots=S)`.

Completion lengths are set by construction: each row gets a token budget
(`row_max_new_tokens`) and the model has no EOS id, so row `b` ends by
length after exactly `L_b` tokens, through the same per-row `done` flag and
loop exit an EOS would take. Distributions (`--dist`):

* `lognormal`: `L = clip(round(exp(N(log(N / 8), sigma))), 1, N)`, median
  `N / 8` (sigma 1 by default: about 2% of rows reach `N`, as a few
  reasoning traces run to the limit);
* `equal`: every `L = N / 8` (the static sampler's best case: no row ever
  idles).

Useful tokens/s = the sampled tokens (`sum(L)`) / the median wall time of
`--repeats` executions after one warm-up (compiling) call, the variants
interleaved; tokens per CPU second divides by the process's CPU time
instead (all threads), a steadier measure on a machine shared with other
work. The in-flight
rows also report the loop counts (`InFlightStats`): one host call; its
trips, each one device-to-host sync on XLA:GPU. A static call's loop makes
one trip per block of `steps_per_check` steps until its longest row ends
(computed, not measured); waves make one host call per wave.

Usage:

    python benchmarks/inflight.py                       # the documented runs
    python benchmarks/inflight.py --runs tiny:256 --slots 16 32

A run is `MODEL[@LAYERS]:N` (models of benchmarks/sampler.py: `tiny`, and
`qwen3-0.6b`, Qwen3-0.6B's width with random weights, `@LAYERS` its
depth). Writes JSON to `--out` and prints a Markdown table.
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

from entropo.models import Transformer
from entropo.models import sample
from entropo.models import sample_in_flight
from entropo.models import sampler as sampler_lib
from sampler import MODELS  # pylint: disable=g-bad-import-order
from sampler import prompts  # pylint: disable=g-bad-import-order

DEFAULT_RUNS = ("tiny:256", "qwen3-0.6b@2:128")


def lengths(dist, batch, n, sigma, seed=0):
  """`[B]` completion lengths in `[1, N]` (module docstring)."""
  if dist == "equal":
    return np.full((batch,), max(1, n // 8), np.int64)
  rng = np.random.default_rng(seed)
  raw = np.exp(rng.normal(np.log(n / 8), sigma, batch))
  return np.clip(np.round(raw), 1, n).astype(np.int64)


def variants(slots_list, batch, waves=True):
  out = ["static"]
  for s in slots_list:
    if s < batch:
      out += ([f"waves@{s}"] if waves else []) + [f"inflight@{s}"]
  return out


def call(name, model, tokens, mask, budget, n, args):
  """One execution of variant `name`; returns `(result, stats)`."""
  kw = dict(key=jax.random.key(0), max_new_tokens=n,
            steps_per_check=args.steps_per_check)
  if name == "static":
    return sample(model, tokens, mask, row_max_new_tokens=budget, **kw), None
  kind, slots = name.split("@")
  slots = int(slots)
  if kind == "inflight":
    return sample_in_flight(model, tokens, mask, slots=slots,
                            row_max_new_tokens=budget, return_stats=True,
                            refill_rows=args.refill_rows or None, **kw)
  parts = []
  for start in range(0, tokens.shape[0], slots):
    rows = np.arange(start, min(start + slots, tokens.shape[0]))
    parts.append(sample(model, tokens[rows], mask[rows], sample_ids=rows,
                        row_max_new_tokens=budget[rows], **kw))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts), None


def static_trips(budget, n, steps_per_check):
  """Trips of `sample`'s loop over blocks for rows of lengths `budget`
  (host calls: 1): blocks until the longest row ends."""
  block = sampler_lib._block_length(n - 1, steps_per_check)  # pylint: disable=protected-access
  return -(-(int(budget.max()) - 1) // block)


def timed(name, *inputs):
  """`(wall s, process CPU s, result, stats)` of one execution."""
  start, cpu = time.perf_counter(), time.process_time()
  result, stats = call(name, *inputs)
  jax.block_until_ready(result)
  return (time.perf_counter() - start, time.process_time() - cpu, result,
          stats)


def run(spec, dist, model, args):
  cfg = model.config
  n, batch = spec["new_tokens"], args.batch
  tokens, mask = prompts(batch, args.prompt_len, cfg.vocab_size)
  budget = lengths(dist, batch, n, args.sigma)
  useful = int(budget.sum())
  row = dict(model=spec["name"], layers=cfg.num_layers,
             hidden=cfg.hidden_size, batch=batch, new_tokens=n, dist=dist,
             useful_tokens=useful, mean_length=float(budget.mean()),
             max_length=int(budget.max()),
             steps_per_check=args.steps_per_check)
  names = variants(args.slots, batch, waves=not args.skip_waves)
  inputs = (model, tokens, mask, budget, n, args)
  times, cpus, results = {v: [] for v in names}, {v: [] for v in names}, {}
  for i in range(1 + args.repeats):  # the first call compiles
    for v in names:  # interleaved, so that a load spike hits all variants
      seconds, cpu, results[v], stats = timed(v, *inputs)
      print(f"# {spec['name']}@{cfg.num_layers} {dist} {v} #{i}: "
            f"{seconds:.2f}s wall, {cpu:.2f}s CPU", flush=True)
      if i:
        times[v].append(seconds)
        cpus[v].append(cpu)
      if stats is not None:
        row[f"{v}/stats"] = stats._asdict()
  ref = np.asarray(results["static"].tokens)
  row["same_tokens"] = all(np.array_equal(ref, np.asarray(r.tokens))
                           for r in results.values())
  assert all(np.array_equal(np.asarray(r.lengths), budget)
             for r in results.values())
  row["static/stats"] = dict(host_calls=1, trips=static_trips(
      budget, n, args.steps_per_check))
  for v in names:
    if v.startswith("waves@"):
      size = int(v.split("@")[1])
      waves = [budget[i:i + size] for i in range(0, batch, size)]
      row[f"{v}/stats"] = dict(
          host_calls=len(waves),
          trips=sum(static_trips(w, n, args.steps_per_check) for w in waves))
  medians = {v: statistics.median(times[v]) for v in names}
  cpu = {v: statistics.median(cpus[v]) for v in names}
  for v in names:
    row[f"{v}/seconds"] = times[v]
    row[f"{v}/cpu_seconds"] = cpus[v]
    row[f"{v}/tokens_per_s"] = useful / medians[v]
    row[f"{v}/vs_static"] = medians["static"] / medians[v]
    row[f"{v}/tokens_per_cpu_s"] = useful / cpu[v]
    row[f"{v}/cpu_vs_static"] = cpu["static"] / cpu[v]
  print(json.dumps(row), flush=True)
  return row


def markdown(rows):
  lines = ["| model | layers | N | lengths (mean / max) | variant | useful "
           "tok/s | vs static | tok per CPU s | vs static (CPU) | trips "
           "(host calls) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    for key in r:
      if not key.endswith("/tokens_per_s"):
        continue
      v = key.split("/")[0]
      st = r.get(f"{v}/stats")
      trips = f"{st['trips']} ({st['host_calls']})" if st else "-"
      lines.append(
          f"| {r['model']} | {r['layers']} | {r['new_tokens']} | {r['dist']} "
          f"{r['mean_length']:.1f} / {r['max_length']} | {v} | "
          f"{r[key]:.0f} | {r[f'{v}/vs_static']:.2f}x | "
          f"{r[f'{v}/tokens_per_cpu_s']:.0f} | "
          f"{r[f'{v}/cpu_vs_static']:.2f}x | {trips} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
  parser.add_argument("--dist", nargs="+", default=["lognormal", "equal"])
  parser.add_argument("--slots", nargs="+", type=int, default=[16])
  parser.add_argument("--refill_rows", type=int, default=0,
                      help="rows per refill (0: a quarter of the slots)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--sigma", type=float, default=1.0)
  parser.add_argument("--steps_per_check", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--skip_waves", action="store_true",
                      help="time static and in-flight only")
  parser.add_argument("--out", default="benchmarks/out/inflight.json")
  args = parser.parse_args()
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs", flush=True)
  rows, start = [], time.perf_counter()
  for text in args.runs:
    name, _, rest = text.partition("@") if "@" in text else (
        text.split(":")[0], "", "")
    layers, _, n = (rest.partition(":") if rest
                    else ("", "", text.split(":")[1]))
    cfg = MODELS[name].replace(
        num_layers=int(layers) if layers else MODELS[name].num_layers)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    spec = dict(name=name, new_tokens=int(n))
    for dist in args.dist:
      rows.append(run(spec, dist, model, args))
  print(f"# total {time.perf_counter() - start:.0f}s", flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "args": vars(args),
               "rows": rows}, f, indent=1)
  print(markdown(rows))


if __name__ == "__main__":
  main()
