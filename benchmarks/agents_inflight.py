"""Lock-step against in-flight multi-turn episodes, side by side.

The same `N` episodes played two ways in one process, same model, same
key (so the same tokens), interleaved, median of `--repeats`:

* lock-step: `entropo.training.episodes.play` on all `N` rows: every
  turn, all live rows act, then all environments step, then all
  observations are appended;
* in-flight: `entropo.training.episodes_inflight.play_in_flight` with `S`
  slots (`--slots`, one run per value): each row acts, waits for its own
  environment and is refilled on its own.

The episodes vary: each has 1 to `--turns` turns, its environment sleeps
a random 0 to `--latency_ms` per step and answers with 1 to `--obs`
tokens; actions end at one of `--stops` stop ids (about `stops / vocab`
per token) or at `--action` tokens. Random weights, float32.

Reported per variant: seconds per batch, episodes/s, useful tokens/s (the
tokens of the training sequences: prompts, actions, observations),
action tokens/s, the token slots the model ran (`fed`, holes and frozen
rows included), the host's seconds waiting on environments, and the
speed-up over lock-step.

`--demo ENV` plays the demo-scale agent config instead
(experiments/configs/agents.py:ENV: its task, character tokenizer, model
shape and `agent` limits, 8 x 8 episodes), with random weights: the
actions are noise, so episodes mostly run to their turn budget or end on
a malformed action; its environments answer in microseconds.

Usage:

    python benchmarks/agents_inflight.py            # the documented run
    python benchmarks/agents_inflight.py --latency_ms 200
    python benchmarks/agents_inflight.py --demo countdown_calc --slots 64 16
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from entropo.models import Transformer
from entropo.tasks import environment as env_lib
from entropo.training import episodes as episodes_lib
from entropo.training.episodes_inflight import play_in_flight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler import MODELS  # pylint: disable=g-import-not-at-top,wrong-import-position
from sampler import prompts  # pylint: disable=g-import-not-at-top,wrong-import-position

PAD, EOS = 0, 1


class _Ids:
  """A tokenizer whose text is the ids, space-separated."""

  pad_id, eos_ids = PAD, (EOS,)

  def decode(self, ids, **_):
    return " ".join(str(int(i)) for i in ids)

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [int(t) for t in text.split()]


class _Env(env_lib.Environment):
  """Plays the problem's script: `turns` steps, each sleeping its latency
  and answering its observation ids; solved after the last."""

  def reset(self, problem):
    self.p, self.t = problem, 0  # pylint: disable=attribute-defined-outside-init
    return ""

  def step(self, action):
    time.sleep(self.p["latency"][self.t])
    self.t += 1
    if self.t >= self.p["turns"]:
      return env_lib.Turn(done=True, reward=1.0, reason=env_lib.SOLVED)
    return env_lib.Turn(observation=" ".join(map(str,
                                                 self.p["obs"][self.t])))


class _Task(env_lib.AgentTask):
  name = "bench"

  def environment(self):
    return _Env()

  def prompt(self, problem):
    return ""

  def transcripts(self, problem):
    return []


def _problems(args, vocab):
  rng = np.random.default_rng(2)
  out = []
  for i in range(args.episodes):
    turns = int(rng.integers(1, args.turns + 1))
    out.append({
        "id": i, "turns": turns,
        "latency": (rng.uniform(0, args.latency_ms, turns) / 1e3).tolist(),
        "obs": [rng.integers(2, vocab, rng.integers(1, args.obs + 1)).tolist()
                for _ in range(turns)]})
  return out


def _run(fn):
  t = time.perf_counter()
  ep = fn()
  seconds = time.perf_counter() - t
  return {"seconds": seconds, "episodes": len(ep.reasons),
          "useful_tokens": int(ep.valid.sum()),
          "action_tokens": int(ep.action_mask.sum()), "fed": int(ep.fed),
          "env_wait_seconds": ep.env_seconds, "turns": int(ep.turns.sum()),
          "reasons": sorted(set(ep.reasons)),
          "tokens": [ep.sequences(ep.valid.sum(1).max(), PAD)["tokens"]]}


def _synthetic(args):
  """The synthetic episodes of the module docstring."""
  cfg = MODELS[args.model]
  model = Transformer(cfg, precision="fp32", rngs=nnx.Rngs(0))
  tokens, mask = prompts(args.episodes, args.prompt_len, cfg.vocab_size)
  problems = _problems(args, cfg.vocab_size)
  limits = episodes_lib.EpisodeLimits(
      max_turns=args.turns, max_action_tokens=args.action,
      max_observation_tokens=args.obs, step_timeout=30.0,
      context=args.prompt_len + args.turns * (args.action + args.obs)
      + args.action)
  common = dict(key=jax.random.key(0), limits=limits,
                stop_ids=list(range(2, 2 + args.stops)))
  return (model, _Task(), _Ids(), tokens, mask, problems), common


def _demo(args):
  """The demo-scale agent config's episodes (`--demo ENV`)."""
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.tasks import pipeline  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
  from experiments.configs import agents  # pylint: disable=g-import-not-at-top
  c = agents.get_config(args.demo)
  task, tok = config_lib.make_task(c.task), tasks.char_tokenizer()
  model = Transformer(warm_start.tiny_model_config(c.model, tok.vocab_size),
                      precision="fp32", rngs=nnx.Rngs(0))
  n = c.sampling.prompts_per_batch * c.sampling.group_size
  batch = pipeline.prompt_batch(list(task.records(0, n)), tok,
                                max_prompt_len=c.data.max_prompt_len)
  a = c.agent
  limits = episodes_lib.EpisodeLimits(
      max_turns=a.max_turns, max_action_tokens=a.max_action_tokens,
      max_observation_tokens=a.max_observation_tokens, context=a.max_context,
      step_timeout=a.step_timeout)
  common = dict(key=jax.random.key(0), limits=limits,
                stop_ids=episodes_lib.stop_token_ids(tok, task.stop))
  args.episodes = n
  return (model, task, tok, batch["prompt_tokens"], batch["prompt_mask"],
          list(batch["problem"])), common


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
  parser.add_argument("--episodes", type=int, default=32)
  parser.add_argument("--slots", type=int, nargs="+", default=[32, 8])
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--turns", type=int, default=6)
  parser.add_argument("--action", type=int, default=32)
  parser.add_argument("--obs", type=int, default=16)
  parser.add_argument("--stops", type=int, default=64)
  parser.add_argument("--latency_ms", type=float, default=50.0)
  parser.add_argument("--steps_per_check", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--demo", default="")
  parser.add_argument("--out", default="benchmarks/out/agents_inflight.json")
  args = parser.parse_args()
  play_args, common = _demo(args) if args.demo else _synthetic(args)
  variants = {"lock-step": lambda: episodes_lib.play(*play_args, **common)}
  for s in args.slots:
    variants[f"in-flight S={s}"] = lambda s=s: play_in_flight(
        *play_args, slots=s, steps_per_check=args.steps_per_check, **common)
  for _ in range(2):  # compile every shape
    for fn in variants.values():
      fn()
  runs = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, fn in variants.items():
      runs[name].append(_run(fn))
  _report(args, runs)


def _report(args, runs):
  base = statistics.median(r["seconds"] for r in runs["lock-step"])
  first = runs["lock-step"][0]
  rows = []
  for name, results in runs.items():
    r0 = results[0]
    same = all(np.array_equal(a, b) for a, b in zip(r0["tokens"],
                                                    first["tokens"]))
    seconds = statistics.median(r["seconds"] for r in results)
    rows.append({
        "variant": name, "seconds": seconds,
        "episodes_per_s": r0["episodes"] / seconds,
        "useful_tokens_per_s": r0["useful_tokens"] / seconds,
        "action_tokens_per_s": r0["action_tokens"] / seconds,
        "fed": r0["fed"], "useful_tokens": r0["useful_tokens"],
        "env_wait_seconds": statistics.median(
            r["env_wait_seconds"] for r in results),
        "speedup": base / seconds, "same_tokens_as_lock_step": same})
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "backend": jax.default_backend(),
               "turns": first["turns"], "reasons": first["reasons"],
               "rows": rows}, f, indent=2)
  what = (f"demo {args.demo}" if args.demo else
          f"{args.model} P={args.prompt_len} turns 1-{args.turns} "
          f"A<={args.action} O<=1-{args.obs} latency 0-{args.latency_ms:g} "
          f"ms")
  print(f"{what} N={args.episodes}; {first['turns']} turns, "
        f"{first['useful_tokens']} useful tokens ({jax.default_backend()})")
  print("| variant | s / batch | episodes/s | useful tokens/s | "
        "action tokens/s | token slots fed | env wait s | speed-up | "
        "same tokens |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['seconds']:.2f} | "
          f"{r['episodes_per_s']:.1f} | {r['useful_tokens_per_s']:.0f} | "
          f"{r['action_tokens_per_s']:.0f} | {r['fed']} | "
          f"{r['env_wait_seconds']:.2f} | {r['speedup']:.2f}x | "
          f"{r['same_tokens_as_lock_step']} |")


if __name__ == "__main__":
  main()
