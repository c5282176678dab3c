"""The agents stage of the study: algorithms on a multi-turn environment.

    python -m experiments.study_agents --workdir=workdir/agents
    python -m experiments.study_agents --workdir=/tmp/agents --smoke

Each of `--algorithms` x `--seeds` trains for `--iterations` on `--env`
(experiments/configs/agents.py) from one shared warm start, with the same
data and held-out set; the seed changes the prompt order and the sampling.
As in the single-turn study, an iteration takes `--minibatches` optimizer
steps, so the importance ratios leave 1 and the clip band (DAPO's
clip-higher, ADAPO's controller) takes effect. Finished runs are skipped on
a rerun. Then the report: `report/agents.md` (entropy change, pass@k,
reward, turns, entropy of the first and last turn, per algorithm, mean ±
s.e. over seeds) and plots `report/agents_entropy.png` (training entropy
per algorithm) and `report/agents_entropy_by_turn.png` (entropy change by
turn index).
"""

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np
from absl import logging

from experiments.study_report import summarize


@dataclasses.dataclass(frozen=True)
class Settings:
  """The stage's settings (the command line's flags)."""

  env: str = "quiz"  # an environment of experiments/configs/agents.py
  algorithms: tuple[str, ...] = ("grpo", "loop", "dapo", "loop+repo_r",
                                 "adapo")
  seeds: tuple[int, ...] = (0, 1, 2)
  iterations: int = 20
  minibatches: int = 4  # optimizer steps per iteration
  smoke: bool = False  # seconds-scale settings


PASS_K = (1, 4, 16)


def config(algo: str, directory: pathlib.Path, seed: int, s: Settings):
  from experiments.configs import agents  # pylint: disable=g-import-not-at-top
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  c = agents.get_config(f"{s.env}:{algo}")
  c.seed = seed
  c.model.init_from = str(directory / "warm_start")
  c.data.update(data_dir=str(directory / "data"), eval_size=32)
  c.algo.minibatches = s.minibatches
  iterations = s.iterations
  c.train.update(iterations=iterations, eval_every=max(1, iterations // 2),
                 eval_samples=16, pass_k=PASS_K, checkpoint_every=iterations,
                 max_checkpoints=1, progress=False, tensorboard=False,
                 plots=False)
  if s.smoke:
    tiny.shrink(c, warm_start_steps=20)
    c.algo.minibatches = 2
    c.train.update(eval_every=iterations, eval_samples=4, pass_k=(1, 4))
  return c


def warm_start(directory: pathlib.Path, s: Settings) -> None:
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start as warm_lib  # pylint: disable=g-import-not-at-top
  c = config("loop", directory, 0, s)
  warm_lib.warm_start(c, config_lib.make_task(c.task), tasks.char_tokenizer(),
                      directory / "warm_start")


def run_dir(directory, algo, seed) -> pathlib.Path:
  return directory / "runs" / algo.replace("+", "_") / f"seed{seed}"


def run_all(directory: pathlib.Path, s: Settings) -> None:
  from entropo.training import train  # pylint: disable=g-import-not-at-top
  timing_path = directory / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
  jobs = [(a, seed) for a in s.algorithms for seed in s.seeds]
  for i, (algo, seed) in enumerate(jobs):
    out = run_dir(directory, algo, seed)
    key = str(out.relative_to(directory))
    if key in timing:
      continue
    t = time.perf_counter()
    train(config(algo, directory, seed, s), out)
    timing[key] = round(time.perf_counter() - t, 1)
    timing_path.write_text(json.dumps(timing, indent=2))
    done = summarize(out)
    print(f"[agents] ({i + 1}/{len(jobs)}) {algo} seed {seed}: "
          f"{timing[key]:.0f} s, entropy {done['entropy_change_pct']:+.0f} "
          f"%, pass@1 {done['final']['eval/pass@1']:.3f}", flush=True)


def _mean_se(values) -> str:
  values = np.asarray(values, np.float64)
  se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
  return f"{values.mean():.3f} ± {se:.3f}"


def _turn_change(records, turn: int) -> float:
  """% change of turn `turn`'s entropy: last 10 % vs first 10 % of
  iterations (NaN if the turn never occurs)."""
  key = f"entropy/turn{turn}"
  values = [r[key] for r in records if key in r]
  if len(values) < 2:
    return float("nan")
  n = max(1, len(values) // 10)
  first, last = np.mean(values[:n]), np.mean(values[-n:])
  return 100.0 * (last / first - 1)


def _turns_seen(runs) -> int:
  """Turns present in at least half of the iterations of every run."""
  def seen(records, t):
    return sum(f"entropy/turn{t}" in r for r in records) >= len(records) / 2
  turns = 1
  while all(seen(r["records"], turns) for r in runs):
    turns += 1
  return turns


def report(directory: pathlib.Path, s: Settings) -> str:
  """Writes report/agents.md and the plots; returns the Markdown."""
  rows, curves, by_turn = [], {}, {}
  for algo in s.algorithms:
    runs = [summarize(run_dir(directory, algo, seed)) for seed in s.seeds
            if (run_dir(directory, algo, seed) / "metrics.jsonl").is_file()]
    if not runs:
      continue
    turns = _turns_seen(runs)
    stat = lambda f: _mean_se([f(r) for r in runs])  # noqa: E731
    rows.append([algo, str(len(runs)),
                 stat(lambda r: r["baseline"]["eval/entropy"]),
                 stat(lambda r: r["entropy_change_pct"]),
                 stat(lambda r: r["reward_first"]),
                 stat(lambda r: r["reward_last"]),
                 stat(lambda r: r["final"]["eval/pass@1"]),
                 stat(lambda r: r["final"][f"eval/pass@{r['max_k']}"]),
                 stat(lambda r: np.mean([x["agent/turns"]
                                         for x in r["records"][-5:]])),
                 stat(lambda r: _turn_change(r["records"], 0)),
                 stat(lambda r, t=turns: _turn_change(r["records"], t - 1))])
    curves[algo] = np.mean([[x["entropy/mean"] for x in r["records"]]
                            for r in runs], axis=0)
    by_turn[algo] = [np.nanmean([_turn_change(r["records"], t)
                                 for r in runs]) for t in range(turns)]
  header = ["algorithm", "seeds", "entropy before", "entropy change %",
            "reward (first 10 %)", "reward (last 10 %)", "pass@1",
            "pass@k (largest k)", "turns", "turn 0 entropy change %",
            "last turn entropy change %"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  text = "\n".join(lines) + "\n"
  out = directory / "report"
  out.mkdir(parents=True, exist_ok=True)
  (out / "agents.md").write_text(text)
  _plots(out, curves, by_turn, s.env)
  return text


def _plots(out: pathlib.Path, curves: dict, by_turn: dict, env: str
           ) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for algo, values in curves.items():
    ax.plot(np.arange(len(values)), values, label=algo)
  ax.set(xlabel="RL iteration", ylabel="nats / token (mean over seeds)",
         title=f"Entropy of the policy's tokens, {env}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(out / "agents_entropy.png", dpi=100)
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for algo, changes in by_turn.items():
    ax.plot(np.arange(len(changes)), changes, marker="o", label=algo)
  ax.axhline(0, color="k", lw=0.5)
  ax.set(xlabel="turn of the episode",
         ylabel="entropy change, last vs first 10 % (%)",
         title=f"Where entropy falls, by turn ({env})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(out / "agents_entropy_by_turn.png", dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--env", default=Settings.env)
  parser.add_argument("--algorithms", default=",".join(Settings.algorithms))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--iterations", type=int, default=Settings.iterations)
  parser.add_argument("--minibatches", type=int,
                      default=Settings.minibatches)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args()
  s = Settings(env=args.env, algorithms=tuple(args.algorithms.split(",")),
               seeds=tuple(int(x) for x in args.seeds.split(",")),
               iterations=args.iterations, minibatches=args.minibatches,
               smoke=args.smoke)
  logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines
  directory = pathlib.Path(args.workdir)
  directory.mkdir(parents=True, exist_ok=True)
  t = time.perf_counter()
  if not args.report_only:
    warm_start(directory, s)
    run_all(directory, s)
  print(report(directory, s))
  print(f"[agents] {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
  main()
