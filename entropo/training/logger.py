"""Metrics: JSONL, TensorBoard event files, a progress bar and end-of-run plots.

`MetricLogger(workdir)` appends one JSON object per iteration to
`metrics.jsonl` (resumed runs append after the last logged iteration),
mirrors scalars to TensorBoard event files under `tensorboard/` (written by
`tensorboardX`, no TensorFlow; tags by `tensorboard_tag`), shows a `tqdm` bar with the headline
numbers, and `plot()` draws entropy, reward and pass@k curves as PNGs.
Only the process that should write (process 0 in multi-host runs) creates a
logger with `enabled=True`.

The run's other files are written here too: `write_run_metadata` is the
one place that writes what describes a run (`config.json`, and
`run.json`: where and how each launch computed), and
`write_baseline` the evaluation before RL (`baseline.json`).
`iteration_metrics` names the per-iteration numbers of the rollout.

Every file is replaced atomically (`write_atomic`: a temporary file in the
same directory, then `os.replace`), so a run killed while writing leaves
the previous version, never a torn one. `metrics.jsonl` is appended to; a
torn last line (a kill in the middle of an append) is skipped with a
warning when the file is read.
"""

import json
import math
import os
import pathlib
import re
import tempfile
import time
import warnings

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from entropo import tasks as tasks_lib

HEADLINE = ("reward/mean", "entropy/mean", "entropy/change_pct")


def tensorboard_tag(key: str) -> str:
  """The TensorBoard tag of a metric: `@` spelled `_at_` (`eval/pass@4` ->
  `eval/pass_at_4`), any other character TensorBoard rejects as `_`.

  tensorboardX would otherwise rename such tags itself (`eval/pass_4`),
  logging a line for each.
  """
  return re.sub(r"[^\w./-]", "_", key.replace("@", "_at_"))


def log(message: str) -> None:
  """Prints a line of the run's log (process 0 only)."""
  if jax.process_index() == 0:
    print(f"[entropo] {message}", flush=True)


def warn(message: str) -> None:
  """A warning about the run's files (a `UserWarning`, so tests and callers
  can catch it; Python prints it to stderr)."""
  warnings.warn(message, UserWarning, stacklevel=3)


def write_atomic(path, text: str) -> None:
  """Replaces the file `path` by `text` atomically.

  The text goes to a temporary file in the same directory, flushed to disk,
  then renamed over `path` (`os.replace`), so readers (and a later launch
  after a kill) see either the old file or the new one, whole.
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the file private
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def read_json(path, *, default=None):
  """A JSON file's value; `default` (with a warning) if it is unreadable.

  A file that exists but does not parse (written by a version that did not
  write atomically, or damaged) is renamed to `<name>.bad` so that it is
  kept for inspection and not read again.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return default
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    warn(f"{path} is not valid JSON ({e}); moved it to {bad} and started a "
         f"new one.")
    return default


def launch_record(*, iteration: int, precision, model, model_section,
                  lora: bool = False, sampler_precision=None,
                  sampling_section=None, packing: bool = False,
                  minibatch_tokens: int = 0, agent_section=None) -> dict:
  """How this launch computes, for the `launches` of `run.json`.

  The precision policy's `describe()` (preset, backend, the dot algorithm
  of each operand dtype and whether it runs natively or emulated), the
  sampler's (`sampler_precision`: the trainer's when None), the
  attention implementation `auto` resolved to, remat and the layer scan,
  the sampler's batching (`sampler_batching`: static, or in-flight with
  its slots and refill rows, from `sampling_section`), the episodes'
  batching (`episode_batching`, from `agent_section`, None for a
  single-turn task), LoRA (rank,
  alpha, targets, the base projections' dtype; None for full
  fine-tuning), whether the trainer runs on packed rows
  (`train.packing`), its minibatches' token budget
  (`train.minibatch_tokens`, 0: minibatches of rows), versions and devices.
  """
  devices = jax.devices()
  return {
      "started_at_iteration": iteration,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "backend": jax.default_backend(),
      "devices": {"count": len(devices), "kind": devices[0].device_kind,
                  "processes": jax.process_count()},
      "precision": precision.describe(),
      "sampler_precision": (sampler_precision or precision).describe(),
      "attention": model.attention_implementation(),
      "attention_chunk_size": model.config.attention_chunk_size,
      "remat": model_section.remat,
      "scan_layers": model_section.scan_layers,
      "sampler_batching": sampler_batching(sampling_section),
      "episode_batching": episode_batching(agent_section),
      "packing": packing,
      "minibatch_tokens": minibatch_tokens,
      "lora": None if not lora else {
          "rank": model.lora_config.rank, "alpha": model.lora_config.alpha,
          "targets": list(model.lora_config.targets),
          "base_dtype": str(model.layers[0].attn.q_proj.get_value().dtype)},
  }


def sampler_batching(sampling) -> dict | None:
  """`{"mode": "static"}` or the in-flight slots and refill rows."""
  if sampling is None:
    return None
  if not sampling.in_flight_slots:
    return {"mode": "static"}
  return {"mode": "in_flight", "slots": sampling.in_flight_slots,
          "refill_rows": (sampling.refill_rows
                          or max(1, sampling.in_flight_slots // 4))}


def episode_batching(agent) -> dict | None:
  """`{"mode": "lock_step"}` or the in-flight episodes' slots; None
  without an agent section (single-turn tasks)."""
  if agent is None:
    return None
  if not agent.in_flight_slots:
    return {"mode": "lock_step"}
  return {"mode": "in_flight", "slots": agent.in_flight_slots}


def write_run_metadata(workdir, config, launch: dict | None = None) -> None:
  """Writes what describes the run (process 0).

  `config.json` is the run's current `ConfigDict`; `configs/config-<n>.json`
  keeps every config the run was launched with (a new file whenever the
  config differs from the newest kept one; the config.json of a run
  started before this history existed becomes `config-0.json`). `launch`
  (see `launch_record`: versions, backend, devices, the precision
  policy's effective dot algorithms, the attention implementation) is
  appended to the `launches` of `run.json`, with `config` naming its file
  in `configs/`, so a run resumed on another machine or jax keeps the
  record of each. The one place run metadata is written: add new fields
  here.
  """
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  text = config.to_json_best_effort(indent=2)
  history = workdir / "configs"
  history.mkdir(exist_ok=True)
  kept = sorted(history.glob("config-*.json"),
                key=lambda f: int(f.stem.split("-")[1]))
  current = workdir / "config.json"
  if not kept and current.is_file():
    kept = [history / "config-0.json"]
    write_atomic(kept[0], current.read_text())
  if not kept or kept[-1].read_text() != text:
    kept.append(history / f"config-{len(kept)}.json")
    write_atomic(kept[-1], text)
  write_atomic(current, text)
  if launch is not None:
    path = workdir / "run.json"
    run = read_json(path, default={})
    launch = {**launch, "config": str(kept[-1].relative_to(workdir))}
    run.setdefault("launches", []).append(launch)
    write_atomic(path, json.dumps(run, indent=2))


def write_baseline(workdir, evaluation: dict) -> None:
  """Writes `workdir/baseline.json`, the evaluation before RL (process 0)."""
  if jax.process_index() == 0:
    write_atomic(pathlib.Path(workdir) / "baseline.json",
                 json.dumps(evaluation, indent=2))


def rollout_metrics(roll) -> dict[str, float]:
  """Reward, pass@1, length and verdict shares of a `Rollout`."""
  generated = int(jnp.sum(roll.completion_mask))
  out = {
      "reward/mean": float(roll.rewards.mean()),
      "reward/pass@1": float(np.mean([r in ("ok", "solved")
                                      for r in roll.reasons])),
      "completion/length": generated / len(roll.rewards),
  }
  if roll.info:
    out.update(episode_metrics(roll))
    return out
  for reason in tasks_lib.REASONS:
    out[f"reason/{reason}"] = float(np.mean(
        [r == reason for r in roll.reasons]))
  return out


def episode_metrics(roll) -> dict[str, float]:
  """Turns, end reasons, token counts and entropy by turn of episodes.

  `entropy/turn<k>` is the sampler's mean entropy over the policy's tokens
  of turn k (where any episode reached it): whether entropy collapses
  first in early or late turns.
  """
  info = roll.info
  out = {f"agent/{k}": float(np.mean(info[k]))
         for k in ("turns", "truncated", "model_tokens", "env_tokens")}
  for reason in tasks_lib.END_REASONS:
    out[f"end/{reason}"] = float(np.mean([r == reason
                                          for r in roll.reasons]))
  tokens, entropy = info["turn_tokens"].sum(0), info["turn_entropy"].sum(0)
  for k in np.flatnonzero(tokens):
    out[f"entropy/turn{k}"] = float(entropy[k] / tokens[k])
  return out


def read_jsonl(path) -> list[dict]:
  """The records of a metrics file (empty if there is none).

  A last line that does not parse is what a kill in the middle of an
  append leaves: it is skipped with a warning. A bad line before the last
  raises ValueError naming it.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return []
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  records = []
  for n, (i, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError as e:
      if n + 1 < len(lines):
        raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
      warn(f"{path}:{i}: skipping a torn last line (the run was killed "
           f"while writing it): {line[:80]!r}")
  return records


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
    write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # A resumed run purges the steps it writes again (those logged after
      # its checkpoint by the launch before): TensorBoard hides events at
      # or after `purge_step` from earlier files, so no step shows twice.
      self._tb = tensorboardX.SummaryWriter(
          str(self.workdir / "tensorboard"), purge_step=start or None)
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
          self._tb.add_scalar(tensorboard_tag(key), value, iteration)
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


# The plots of a run: file name -> (title, y-axis label). Their metrics are
# `_panel_keys`'; `LEGEND` names each metric in a legend.
PANELS = {
    "entropy": ("Token entropy of the training batch", "nats / token"),
    "reward": ("Reward", "reward / pass@1"),
    "entropy_eval": ("Token entropy on held-out prompts", "nats / token"),
    "pass_at_k": ("Held-out pass@k", "pass@k"),
    # Agents only (drawn when a run has the metrics).
    "entropy_by_turn": ("Token entropy by turn of the episode",
                        "nats / token"),
}
LEGEND = {"entropy/mean": "entropy", "target_entropy": "target entropy",
          "reward/mean": "training reward",
          "eval/pass@1": "held-out pass@1", "eval/entropy": "held-out"}
X_LABEL = "RL iteration (held-out: after that many updates)"


def _panel_keys(records) -> dict[str, list[str]]:
  return {
      "entropy": ["entropy/mean", "target_entropy"],
      "reward": ["reward/mean", "eval/pass@1"],
      "entropy_eval": ["eval/entropy"],
      "pass_at_k": sorted({k for r in records for k in r
                           if k.startswith("eval/pass@")},
                          key=lambda k: int(k.split("@")[1])),
      "entropy_by_turn": sorted({k for r in records for k in r
                                 if k.startswith("entropy/turn")},
                                key=lambda k: int(k[len("entropy/turn"):])),
  }


def _legend(key: str, panel: str) -> str:
  if panel == "pass_at_k":
    return f"pass@{key.split('@')[1]}"
  if panel == "entropy_by_turn":
    return f"turn {key[len('entropy/turn'):]}"
  return LEGEND.get(key, key)


def _draw(runs: dict, out_dir) -> list[pathlib.Path]:
  """One PNG per panel of `PANELS`, a curve per run and metric.

  `runs` maps a legend prefix ("" for a single run) to `(records,
  baseline)`. Figures without pyplot: no global backend switch (inline
  plots in a notebook keep working after `train`), nothing to close.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  keys = _panel_keys([r for records, _ in runs.values() for r in records])
  styles = ("-", "--", ":", "-.")
  files = []
  for name, (title, y_label) in PANELS.items():
    if not keys[name] and name == "entropy_by_turn":
      continue
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (run, (records, baseline)) in enumerate(runs.items()):
      for j, key in enumerate(keys[name]):
        x, y = _series(records, key, baseline)
        if not x:
          continue
        label = _legend(key, name)
        label = f"{run}: {label}" if run else label
        ax.plot(x, y, marker="." if len(x) < 30 else None, label=label,
                color=f"C{i if run else j}",
                linestyle=styles[j % len(styles)] if run else "-")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize="small")
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    files.append(path)
  return files


def plot_run(metrics_path, out_dir, *, baseline=None) -> list[pathlib.Path]:
  """Draws a run's curves (matplotlib, headless) and returns the files.

  `baseline` (the evaluation before RL) adds the `eval/*` points at 0.
  """
  return _draw({"": (read_jsonl(metrics_path), baseline)}, out_dir)


def run_labels(workdirs) -> list[str]:
  """A legend label per workdir: its name, or as many of its last path
  parts as tell the runs apart (`seed0/grpo`, `seed1/grpo`)."""
  parts = [pathlib.Path(w).absolute().parts for w in workdirs]
  for n in range(1, max((len(p) for p in parts), default=0) + 1):
    labels = ["/".join(p[-n:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  return [f"{w} ({i})" for i, w in enumerate(workdirs)]  # one dir twice


def plot_runs(workdirs, out_dir) -> list[pathlib.Path]:
  """Overlays several runs' curves, one PNG per panel; returns the files.

  `workdirs` maps a legend label to a run's workdir (its `metrics.jsonl`
  and `baseline.json`); a list of workdirs is labelled by their names.
  `python -m experiments.plot` runs this from the command line.
  """
  if not isinstance(workdirs, dict):
    workdirs = dict(zip(run_labels(workdirs), workdirs))
  runs = {}
  for label, workdir in workdirs.items():
    workdir = pathlib.Path(workdir)
    if not (workdir / "metrics.jsonl").is_file():
      raise FileNotFoundError(f"{workdir} has no metrics.jsonl: not a run's "
                              f"workdir")
    baseline = workdir / "baseline.json"
    runs[label] = (read_jsonl(workdir / "metrics.jsonl"),
                   json.loads(baseline.read_text()) if baseline.is_file()
                   else None)
  return _draw(runs, out_dir)
