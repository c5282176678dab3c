"""Where an RL iteration's time goes: sampling, scoring, training, logging.

Runs the main job's configuration (`experiments/configs/countdown.py`, the
tiny model, 16 prompts x 8 completions, 16 new tokens) for `--iterations`
RL iterations from a warm-started model, timing each phase of every
iteration, and reports medians over the iterations after the first
`--skip` (which include compilation):

* sample: the KV-cache sampler (`entropo.models.sample`), including the
  host transfer of its outputs;
* score: decoding completions and running the task's verifier;
* train: the trainer's forward (old log-probs, advantages, REPO) and the
  optax updates;
* log: writing the JSONL record and the TensorBoard scalars;

plus generated tokens per second of sampling and trained tokens (prompt +
completion) per second of the training phase.

Usage:

    python benchmarks/trainer.py [--iterations 12] [--algo grpo+repo_r] \\
        [--workdir /tmp/entropo-bench]

The warm start is reused from `<workdir>/warm_start` when it is there.
Writes JSON to `--out` and prints a Markdown table.
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropo.training import logger as logger_lib  # noqa: E402
from entropo.training import loop  # noqa: E402
from experiments.configs import countdown  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iterations", type=int, default=12)
  parser.add_argument("--skip", type=int, default=2)
  parser.add_argument("--algo", default="grpo+repo_r")
  parser.add_argument("--workdir", default="/tmp/entropo-bench")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" /
                                           "trainer.json"))
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  run_dir = workdir / "run"
  shutil.rmtree(run_dir, ignore_errors=True)
  config = countdown.get_config(args.algo)
  config.train.progress = False
  config.train.iterations = args.iterations + 1
  if (workdir / "warm_start" / "config.json").is_file():
    config.model.init_from = str(workdir / "warm_start")
  config.data.data_dir = str(workdir / "data")
  trainer = loop.Trainer(config, run_dir)
  if not config.model.init_from:
    shutil.copytree(trainer.warm_start_dir, workdir / "warm_start")
  trainer.baseline()
  logger = logger_lib.MetricLogger(run_dir, total=args.iterations,
                                   progress=False)
  rows = []
  for it in range(args.iterations):
    metrics = trainer.iteration()
    trainer.meta = trainer.meta.replace(iteration=it + 1)
    t = time.perf_counter()
    logger.write(it, metrics)
    log_time = time.perf_counter() - t
    batch_tokens = metrics["throughput/train_tokens_per_s"] * metrics[
        "time/train"]
    rows.append({"sample": metrics["time/sample"],
                 "score": metrics["time/score"],
                 "train": metrics["time/train"], "log": log_time,
                 "generated_tokens": metrics["completion/length"]
                                     * config.sampling.prompts_per_batch
                                     * config.sampling.group_size,
                 "train_tokens": batch_tokens})
    print(f"iteration {it}: " + ", ".join(f"{k} {v:.3f}"
                                          for k, v in rows[-1].items()),
          flush=True)
  logger.close()
  trainer.checkpointer.close()
  timed = rows[args.skip:]
  med = {k: float(np.median([r[k] for r in timed])) for k in rows[0]}
  total = med["sample"] + med["score"] + med["train"] + med["log"]
  result = {
      "algo": args.algo, "iterations": len(timed),
      "batch": config.sampling.prompts_per_batch * config.sampling.group_size,
      "median_s": med, "iteration_s": total,
      "generated_tokens_per_s": med["generated_tokens"] / med["sample"],
      "train_tokens_per_s": med["train_tokens"] / med["train"],
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print("\n| phase | median s | share |\n|---|---|---|")
  for k in ("sample", "score", "train", "log"):
    print(f"| {k} | {med[k]:.4f} | {100 * med[k] / total:.0f} % |")
  print(f"| iteration | {total:.4f} | 100 % |")
  print(f"\ngenerated tokens/s (sampling): "
        f"{result['generated_tokens_per_s']:.0f}; trained tokens/s: "
        f"{result['train_tokens_per_s']:.0f}")


if __name__ == "__main__":
  main()
