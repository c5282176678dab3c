"""Minibatches by rows vs by tokens in the main job, side by side.

The main job (`experiments/configs/countdown.py`, GRPO + REPO-R, packing
on) from the warm start and data in `--workdir` (made by
`benchmarks/packing.py --trainer N --workdir DIR`), two `Trainer`s, one
iteration of each in turn: `algo.minibatches=4` (4 optax steps of 32 rows
per iteration) and `train.minibatch_tokens=--budget` (minibatches of at
most that many real tokens; about 4 steps at 600 on its ~2200-token
batches). Prints, per run, the optax steps per iteration, the training
phase's median seconds (iterations 2+) and total, the update's
compilations, and every 5th iteration's entropy and reward.

Usage:

    python benchmarks/minibatch_tokens.py --iterations 20 --budget 600 \\
        --workdir /tmp/wt3_demo
"""

import argparse
import pathlib
import shutil
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropo.training import loop  # noqa: E402
from experiments.configs import countdown  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--budget", type=int, default=600)
  parser.add_argument("--workdir", default="/tmp/entropo-bench-packing")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir)
  trainers = {}
  for name in ("rows4", f"tokens{args.budget}"):
    c = countdown.get_config("grpo+repo_r")
    c.train.update(iterations=args.iterations, progress=False,
                   tensorboard=False, plots=False, eval_every=10**6,
                   checkpoint_every=10**6)
    if name == "rows4":
      c.algo.minibatches = 4
    else:
      c.train.minibatch_tokens = args.budget
    c.data.data_dir = str(work / "data")
    c.model.init_from = str(work / "warm_start")
    run = work / f"minibatches_{name}"
    shutil.rmtree(run, ignore_errors=True)
    trainer = loop.Trainer(c, run)
    trainer.baseline()
    trainers[name] = trainer
  metrics = {name: [] for name in trainers}
  for it in range(args.iterations):
    for name, trainer in trainers.items():
      metrics[name].append(trainer.iteration())
      trainer.meta = trainer.meta.replace(iteration=it + 1)
  for name, trainer in trainers.items():
    spent = [m["time/train"] for m in metrics[name]]
    print(name, "steps", [m.get("train/optimizer_steps", 4.0)
                          for m in metrics[name]],
          "median train s (it 2+)", round(statistics.median(spent[2:]), 3),
          "total", round(sum(spent), 1),
          "compiles", trainer.learner.update._cache_size(),  # noqa
          "entropy", [round(m["entropy/mean"], 4)
                      for m in metrics[name]][::5],
          "reward", [round(m["reward/mean"], 3) for m in metrics[name]][::5],
          flush=True)


if __name__ == "__main__":
  main()
