"""Metrics: JSONL, TensorBoard event files, a progress bar and end-of-run plots.

`MetricLogger(workdir)` appends one JSON object per iteration to
`metrics.jsonl` (resumed runs append after the last logged iteration),
mirrors scalars to TensorBoard event files under `tensorboard/` (written by
`tensorboardX`, no TensorFlow), shows a `tqdm` bar with the headline
numbers, and `plot()` draws entropy, reward and pass@k curves as PNGs.
Only the process that should write (process 0 in multi-host runs) creates a
logger with `enabled=True`.

The run's other files are written here too: `write_run_metadata` is the
one place that writes what describes a run (`config.json`, and
`run.json`: where and how each launch computed), and
`write_baseline` the evaluation before RL (`baseline.json`).
`iteration_metrics` names the per-iteration numbers of the rollout.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from entropo import tasks as tasks_lib

HEADLINE = ("reward/mean", "entropy/mean", "entropy/change_pct")


def log(message: str) -> None:
  """Prints a line of the run's log (process 0 only)."""
  if jax.process_index() == 0:
    print(f"[entropo] {message}", flush=True)


def write_run_metadata(workdir, config, launch: dict | None = None) -> None:
  """Writes what describes the run (process 0).

  `config.json` is the run's `ConfigDict`. `launch` (see
  `Trainer.launch_metadata`: versions, backend, devices, the precision
  policy's effective dot algorithms, the attention implementation) is
  appended to the `launches` of `run.json`, so a run resumed on another
  machine or jax keeps the record of each. The one place run metadata is
  written: add new fields here.
  """
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  if launch is not None:
    path = workdir / "run.json"
    run = json.loads(path.read_text()) if path.is_file() else {}
    run.setdefault("launches", []).append(launch)
    path.write_text(json.dumps(run, indent=2))


def write_baseline(workdir, evaluation: dict) -> None:
  """Writes `workdir/baseline.json`, the evaluation before RL (process 0)."""
  if jax.process_index() == 0:
    (pathlib.Path(workdir) / "baseline.json").write_text(
        json.dumps(evaluation, indent=2))


def rollout_metrics(roll) -> dict[str, float]:
  """Reward, pass@1, length and verdict shares of a `Rollout`."""
  generated = int(jnp.sum(roll.completion_mask))
  out = {
      "reward/mean": float(roll.rewards.mean()),
      "reward/pass@1": float(np.mean([r == "ok" for r in roll.reasons])),
      "completion/length": generated / len(roll.rewards),
  }
  for reason in tasks_lib.REASONS:
    out[f"reason/{reason}"] = float(np.mean(
        [r == reason for r in roll.reasons]))
  return out


def read_jsonl(path) -> list[dict]:
  """The records of a metrics file (empty if there is none)."""
  path = pathlib.Path(path)
  if not path.is_file():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricLogger:
  """Writes each iteration's metrics; see the module docstring."""

  def __init__(self, workdir, *, total: int, start: int = 0,
               tensorboard: bool = True, progress: bool = True,
               enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self.path = self.workdir / "metrics.jsonl"
    self._tb = self._bar = None
    if not enabled:
      return
    # Drop records past the resume point (a crash after logging but before
    # the checkpoint), so that the file is exactly one uninterrupted run.
    kept = [r for r in read_jsonl(self.path) if r["iteration"] < start]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, desc="RL",
                            unit="it", dynamic_ncols=True)

  def write(self, iteration: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"iteration": int(iteration)}
    record.update({k: _number(v) for k, v in sorted(metrics.items())})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if key != "iteration" and value is not None:
          self._tb.add_scalar(key, value, iteration)
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix({k.split("/")[0] + ("%" if "pct" in k else ""):
                             f"{record[k]:.3g}" for k in HEADLINE
                             if record.get(k) is not None})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()

def _number(value):
  value = float(np.asarray(value))
  return value if math.isfinite(value) else None


def _series(records, key, baseline):
  """(x, y) of a metric; `eval/*` sits at the number of updates behind it."""
  shift = 1 if key.startswith("eval/") else 0
  pairs = [(r["iteration"] + shift, r[key]) for r in records
           if r.get(key) is not None]
  if shift and baseline and key in baseline:
    pairs.insert(0, (0, baseline[key]))
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(metrics_path, out_dir, *, baseline=None) -> list[pathlib.Path]:
  """Draws a run's curves (matplotlib, headless) and returns the files.

  `baseline` (the evaluation before RL) adds the `eval/*` points at 0.
  """
  # Figures without pyplot: no global backend switch (inline plots in a
  # notebook keep working after `train`), nothing to close.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  records = read_jsonl(metrics_path)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  panels = {
      "entropy": ["entropy/mean", "target_entropy"],
      "reward": ["reward/mean", "eval/pass@1"],
      "entropy_eval": ["eval/entropy"],
      "pass_at_k": sorted({k for r in records for k in r
                           if k.startswith("eval/pass@")},
                          key=lambda k: int(k.split("@")[1])),
  }
  files = []
  for name, keys in panels.items():
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key in keys:
      x, y = _series(records, key, baseline)
      if x:
        ax.plot(x, y, marker="." if len(x) < 30 else None, label=key)
    ax.set_xlabel("iteration")
    ax.set_title(name.replace("_", " "))
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    files.append(path)
  return files
