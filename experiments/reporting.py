"""Helpers shared by the study reports (`study_report`, `regime_report`,
`study_mismatch`): reading finished runs, averaging their curves over seeds,
and writing markdown tables and matplotlib figures.

Public so that each report imports them from here and no report imports
another's private names (they used to import each other).
"""

import collections
import json
import pathlib

import numpy as np

from entropo.training import logger


def summarize(directory) -> dict:
  """The headline numbers of one finished run directory (and, under
  `records`, its per-iteration metrics)."""
  directory = pathlib.Path(directory)
  records = logger.read_jsonl(directory / "metrics.jsonl")
  baseline = json.loads((directory / "baseline.json").read_text())
  evals = [r for r in records if r.get("eval/pass@1") is not None]
  final = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
  ks = sorted(int(k.split("@")[1]) for k in final if "pass@" in k)
  tail = records[-max(1, len(records) // 10):]
  mean = lambda key, rs: float(sum(r[key] for r in rs) / len(rs))  # noqa
  return {
      "iterations": len(records),
      "initial_entropy": baseline["eval/entropy"],
      "final_entropy": mean("entropy/mean", tail),
      # Train-batch entropy of the last 10 % of iterations vs the entropy
      # before RL.
      "entropy_change_pct": mean("entropy/change_pct", tail),
      "eval_entropy_change_pct": 100 * (final["eval/entropy"]
                                        / baseline["eval/entropy"] - 1),
      "cumulative_entropy": records[-1]["entropy/cumulative"],
      "baseline": baseline,
      "final": final,
      "max_k": ks[-1],
      "reward_first": mean("reward/mean", records[:max(1, len(records) // 10)]),
      "reward_last": mean("reward/mean", tail),
      "ratio_bias": mean("mismatch/ratio_bias", records),
      "phantom_clipfrac_low": mean("mismatch/phantom_clipfrac_low", records),
      "phantom_clipfrac_high": mean("mismatch/phantom_clipfrac_high", records),
      "max_abs_diff": max(r["mismatch/max_abs_diff"] for r in records),
      "records": records,
  }


def runs(study_dir: pathlib.Path, stage: str) -> dict[str, dict[int, dict]]:
  """{name: {seed: summary}} of the finished runs of a stage."""
  timing_path = study_dir / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
  out = collections.defaultdict(dict)
  root = study_dir / "runs" / stage
  for key, seconds in timing.items():
    path = study_dir / key
    if not key.startswith(f"runs/{stage}/") or not path.is_dir():
      continue
    name = str(path.parent.relative_to(root))
    seed = int(path.name.removeprefix("seed"))
    summary = summarize(path)
    summary["seconds"] = seconds
    out[name][seed] = summary
  return dict(out)


def label(name: str) -> str:
  return name.replace("_repo_r", "+REPO-R").replace("_repo_d", "+REPO-D")


def curve(runs: dict[int, dict], key: str):
  """Iterations and the mean, min and max over seeds of a per-iteration key."""
  series = [np.array([r.get(key) if r.get(key) is not None else np.nan
                      for r in s["records"]], float) for s in runs.values()]
  n = min(len(s) for s in series)
  stack = np.stack([s[:n] for s in series])
  return (np.arange(n), np.nanmean(stack, 0), np.nanmin(stack, 0),
          np.nanmax(stack, 0))


def evals(summary: dict, key: str):
  """(updates, values) of an eval metric, starting with the baseline."""
  xs, ys = [0], [summary["baseline"][key]]
  for r in summary["records"]:
    if r.get(key) is not None:
      xs.append(r["iteration"] + 1)
      ys.append(r[key])
  return np.array(xs), np.array(ys)


def smooth(y, width=5):
  """A centred moving average of `width`, edges padded with the ends."""
  if len(y) < width:
    return y
  kernel = np.ones(width) / width
  padded = np.concatenate([np.full(width // 2, y[0]), y,
                           np.full(width - 1 - width // 2, y[-1])])
  return np.convolve(padded, kernel, mode="valid")


def pm(values, digits=3, pct=False) -> str:
  """`mean ± std` over seeds (the value alone for one seed)."""
  values = np.asarray(values, float)
  fmt = f"{{:+.{digits}g}}" if pct else f"{{:.{digits}f}}"
  if len(values) == 1:
    return fmt.format(values[0])
  return f"{fmt.format(values.mean())} ± {values.std(ddof=1):.{digits}f}"


def table(header, rows) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def subplots(ncols=1, *, nrows=1, figsize, squeeze=True):
  """A figure and its axes, without pyplot: no global backend switch (a
  notebook's inline plots keep working), nothing to close."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def figure(path, fig):
  """Saves `fig` to `path` (tight layout, 110 dpi); returns `path`."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
