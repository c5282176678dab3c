"""Tables and plots of the study's regime stages (experiments.study_regimes).

`write_sections(study_dir, out, files)` returns the markdown sections and
the numbers behind them, and writes:

* `offpolicy_clip_entropy.png`: entropy change against the high- (and low-)
  side clip fraction, one point per run of the off-policy sweep;
* `offpolicy_effect.png`: entropy change per update setting and learning
  rate, per algorithm (mean and seeds);
* `start_entropy.png`: entropy curves from each warm start;
* `repo_ceiling.png`: entropy and zeta of each REPO variant;
* `precision_band.png`: entropy per preset in the band-binding regime;
* `lora.png`: entropy of full fine-tuning against LoRA.
"""

import collections
import pathlib

import numpy as np

from entropo.training import sections
from experiments import reporting
from experiments import study_regimes as regimes

# The algorithm stage's setting, as an off-policy cell.
DEFAULT_CELL = regimes.cell("4x1", 1)


def _mean_metric(summary: dict, key: str) -> float:
  values = [r[key] for r in summary["records"] if r.get(key) is not None]
  return float(np.mean(values)) if values else float("nan")


def _add_reference_runs(table, offpolicy, ceiling, label: str) -> None:
  """Adds, as `table[algo][label]`, each algorithm's runs at the algorithm
  stage's settings (shared warm start, full fine-tuning, 4 x 1 steps,
  learning rate x1), which the off-policy sweep and the REPO stage made."""
  reference = {"grpo": offpolicy.get(f"grpo/{DEFAULT_CELL}"),
               "dapo": offpolicy.get(f"dapo/{DEFAULT_CELL}"),
               "grpo_repo_r": ceiling.get("repo_r")}
  for algo, seeds in reference.items():
    if seeds and algo in table:
      table[algo][label] = seeds


def _headline(s: list[dict]) -> dict:
  """Per-seed lists of the numbers every regime table shows."""
  k = s[0]["max_k"]
  return {
      "entropy_change_pct": [x["entropy_change_pct"] for x in s],
      "final_entropy": [x["final_entropy"] for x in s],
      "clipfrac_high": [_mean_metric(x, "pg/clipfrac_high") for x in s],
      "clipfrac_low": [_mean_metric(x, "pg/clipfrac_low") for x in s],
      "approx_kl": [_mean_metric(x, "pg/approx_kl") for x in s],
      "pass@1": [x["final"]["eval/pass@1"] for x in s],
      f"pass@{k}": [x["final"][f"eval/pass@{k}"] for x in s],
      "minutes": [x["seconds"] / 60 for x in s],
  }


def _cells(h: dict, k: int) -> list[str]:
  return [reporting.pm(h["entropy_change_pct"], 2, pct=True),
          f"{100 * np.mean(h['clipfrac_high']):.2f}",
          f"{100 * np.mean(h['clipfrac_low']):.2f}",
          f"{np.mean(h['approx_kl']):.1e}",
          reporting.pm(h["pass@1"]), reporting.pm(h[f"pass@{k}"]),
          f"{np.mean(h['minutes']):.1f}"]


def _columns(runs) -> list[str]:
  k = next(iter(next(iter(runs.values())).values()))["max_k"]
  return ["entropy change %", "clip high %", "clip low %",
          "approx KL per step", "pass@1", f"pass@{k}", "min per run"]


def _offpolicy(runs, out, files):
  if not runs:
    return [], {}
  by_algo = collections.defaultdict(dict)
  for name, seeds in runs.items():
    algo, name_cell = name.split("/")
    by_algo[algo][name_cell] = seeds
  order = [regimes.cell(u, lr) for u in regimes.UPDATES
           for lr in regimes.LR_SCALES]
  rows, data = [], {}
  for algo, cells in by_algo.items():
    for name_cell in [c for c in order if c in cells]:
      s = list(cells[name_cell].values())
      h = _headline(s)
      mb, ep, lr = regimes.parse_cell(name_cell)
      eps = (reporting.pm([x["records"][-1]["controller/clip_high"]
                           for x in s], 2) if algo == "adapo" else "")
      rows.append([reporting.label(algo), f"{mb} × {ep}", f"×{lr:g}", len(s),
                   *_cells(h, s[0]["max_k"]), eps])
      data[f"{algo}/{name_cell}"] = h
  md = [reporting.table(["algorithm", "minibatches × epochs", "learning rate",
                         "seeds", *_columns(runs), "ε_high at the end"], rows)]
  md += _contrasts(data, order)
  # Entropy change against the clip fractions, one point per run.
  markers = dict(zip(regimes.UPDATES.values(), "os^D"))
  colors = dict(zip(regimes.OFFPOLICY_ALGORITHMS,
                    ("tab:blue", "tab:orange", "tab:green", "tab:red")))
  fig, axes = reporting.subplots(2, figsize=(13, 5))
  for ax, side in zip(axes, ("high", "low")):
    for key, h in data.items():
      algo, name_cell = key.split("/")
      mb, ep, lr = regimes.parse_cell(name_cell)
      color = colors.get(algo, "tab:gray")
      ax.scatter(100 * np.array(h[f"clipfrac_{side}"]),
                 h["entropy_change_pct"], marker=markers.get((mb, ep), "x"),
                 s=30, color=color if lr > 1 else "none", edgecolors=color)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel=f"{side}-side clip fraction, mean over iterations (%)",
           ylabel="entropy change (%)",
           title=f"Entropy change against {side}-side clipping")
    ax.grid(alpha=0.3)
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  handles = [Line2D([], [], color=c, marker="o", ls="",
                    label=reporting.label(a))
             for a, c in colors.items() if a in by_algo]
  handles += [Line2D([], [], color="k", marker=m, ls="", mfc="none",
                     label=f"{mb} minibatches × {ep} epochs")
              for (mb, ep), m in markers.items()]
  handles.append(Line2D([], [], color="k", marker="o", ls="",
                        label="filled: learning rate ×4; hollow: ×1"))
  axes[0].legend(handles=handles, fontsize=7)
  fig.suptitle("Off-policy sweep: one point per run (3 seeds per setting)")
  files.append(reporting.figure(out / "offpolicy_clip_entropy.png", fig))

  fig, axes = reporting.subplots(len(by_algo), figsize=(5 * len(by_algo), 4),
                                 squeeze=False)
  for ax, (algo, cells) in zip(axes[0], by_algo.items()):
    names = [c for c in order if c in cells]
    ys = [data[f"{algo}/{c}"]["entropy_change_pct"] for c in names]
    x = np.arange(len(names))
    ax.bar(x, [np.mean(y) for y in ys], color=colors.get(algo, "tab:gray"),
           alpha=0.5)
    for xi, y in zip(x, ys):
      ax.scatter([xi] * len(y), y, color="k", s=10, zorder=3)
    ax.set_xticks(x, [c.replace("_", "\n") for c in names], fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(ylabel="entropy change (%)", title=reporting.label(algo))
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle("Entropy change per setting (bars: mean; dots: seeds)")
  files.append(reporting.figure(out / "offpolicy_effect.png", fig))
  return md, data


# (label, algorithm, baseline): entropy change of the one minus the other.
CONTRASTS = (("clip-higher: DAPO − DAPO with ε_high = 0.2", "dapo", "dapo_sym"),
             ("ADAPO's controller: ADAPO − DAPO", "adapo", "dapo"),
             ("DAPO − GRPO", "dapo", "grpo"))


def _contrasts(data, order) -> list[str]:
  """Per cell, the mean difference in entropy change between two
  algorithms, ± the standard error of that difference."""
  rows = []
  for label, a, b in CONTRASTS:
    for name_cell in order:
      x, y = data.get(f"{a}/{name_cell}"), data.get(f"{b}/{name_cell}")
      if not x or not y:
        continue
      x, y = (np.asarray(v["entropy_change_pct"]) for v in (x, y))
      se = np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y)) if min(
          len(x), len(y)) > 1 else float("nan")
      rows.append([label, name_cell, f"{x.mean() - y.mean():+.1f} ± "
                   f"{se:.1f}"])
  if not rows:
    return []
  return [reporting.table(["contrast", "setting", "difference in entropy "
                           "change (points, ± s.e.)"], rows)]


_DEFAULT_START = {
    k: getattr(sections.WarmStartSection, k) for k in ("spread", "steps")}


def _start_entropy(runs, offpolicy, ceiling, out, files):
  if not runs:
    return [], {}
  table = collections.defaultdict(dict)
  for name, seeds in runs.items():
    algo, start = name.split("/")
    table[algo][start] = seeds
  _add_reference_runs(table, offpolicy, ceiling, "default")
  rows, data = [], {}
  fig, axes = reporting.subplots(len(table), figsize=(5 * len(table), 4),
                                 squeeze=False)
  for ax, (algo, starts) in zip(axes[0], table.items()):
    start_h = {k: np.mean([x["initial_entropy"] for x in v.values()])
               for k, v in starts.items()}
    for start in sorted(starts, key=start_h.get):
      s = list(starts[start].values())
      h = _headline(s)
      settings = {**_DEFAULT_START, **regimes.STARTS.get(start, {})}
      rows.append([reporting.label(algo), start, settings["spread"],
                   settings["steps"], f"{start_h[start]:.3f}",
                   reporting.pm([x["baseline"]["eval/pass@1"] for x in s]),
                   reporting.pm(h["final_entropy"]), *_cells(h, s[0]["max_k"])])
      data[f"{algo}/{start}"] = {
          **h, "initial_entropy": [x["initial_entropy"] for x in s]}
      x, mean, _, _ = reporting.curve(starts[start], "entropy/mean")
      line, = ax.plot(x, reporting.smooth(mean), label=start)
      ax.axhline(start_h[start], color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
           title=f"{reporting.label(algo)} (dotted: start)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  files.append(reporting.figure(out / "start_entropy.png", fig))
  return [reporting.table(["algorithm", "warm start", "spread", "steps",
                           "entropy before RL", "pass@1 before RL",
                           "final entropy", *_columns(runs)], rows)], data


def _repo_ceiling(runs, out, files):
  if not runs:
    return [], {}
  rows, data = [], {}
  fig, axes = reporting.subplots(2, figsize=(12, 4))
  for name in [v for v in regimes.CEILING if v in runs]:
    seeds = runs[name]
    s = list(seeds.values())
    h = _headline(s)
    algo, overrides = regimes.CEILING[name]
    zeta_max = overrides.get("zeta", {}).get("max", 1.0)
    zetas = [np.array([r["controller/zeta"] for r in x["records"]])
             for x in s]
    at_bound = [float(np.mean(np.abs(z) >= 0.999 * zeta_max)) for z in zetas]
    target = [x["records"][-1]["target_entropy"] for x in s]
    rows.append([name, len(s), reporting.pm(h["final_entropy"]),
                 f"{np.mean(target):.3f}",
                 reporting.pm([z[-1] for z in zetas], 2),
                 f"{100 * np.mean(at_bound):.0f}",
                 *_cells(h, s[0]["max_k"])])
    data[name] = {**h, "zeta_at_bound": at_bound, "target": target}
    x, mean, _, _ = reporting.curve(seeds, "entropy/mean")
    line, = axes[0].plot(x, reporting.smooth(mean), label=name)
    x, mean, _, _ = reporting.curve(seeds, "controller/zeta")
    axes[1].plot(x, mean, color=line.get_color(), label=name)
  axes[0].axhline(np.mean(target), color="k", ls=":", lw=1, label="target")
  axes[0].set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
              title="REPO variants on GRPO (mean over seeds)")
  axes[1].set(xlabel="iteration", ylabel="ζ (mean over seeds)",
              title="The controller's ζ (|ζ| ≤ 1)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  files.append(reporting.figure(out / "repo_ceiling.png", fig))
  return [reporting.table(["variant", "seeds", "final entropy", "target",
                           "ζ at the end", "iterations at the bound %",
                           *_columns(runs)], rows)], data


def _precision_band(runs, out, files):
  if not runs:
    return [], {}
  rows, data = [], {}
  fig, ax = reporting.subplots(figsize=(7, 4))
  for name, seeds in runs.items():
    algo, name_cell, preset = name.split("/")
    s = list(seeds.values())
    h = _headline(s)
    h.update({k: [x[k] for x in s] for k in (
        "ratio_bias", "phantom_clipfrac_low", "phantom_clipfrac_high")})
    rows.append([reporting.label(algo), name_cell, preset, len(s),
                 f"{np.mean(h['ratio_bias']):+.2e}",
                 f"{np.mean(h['phantom_clipfrac_low']):.1e} / "
                 f"{np.mean(h['phantom_clipfrac_high']):.1e}",
                 *_cells(h, s[0]["max_k"])])
    data[name] = h
    x, mean, _, _ = reporting.curve(seeds, "entropy/mean")
    ax.plot(x, reporting.smooth(mean),
            label=f"{reporting.label(algo)} {preset}")
  ax.set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
         title="Precision where the band binds (old log-probs: sampler)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  files.append(reporting.figure(out / "precision_band.png", fig))
  return [reporting.table(["algorithm", "regime", "preset", "seeds",
                           "ratio bias", "phantom clip low / high",
                           *_columns(runs)], rows)], data


def _lora(runs, offpolicy, ceiling, out, files):
  if not runs:
    return [], {}
  table = collections.defaultdict(dict)
  for name, seeds in runs.items():
    algo, lr = name.split("/")
    table[algo][f"LoRA r={regimes.LORA['lora_rank']}, "
                f"lr ×{lr.removeprefix('lr')}"] = seeds
  _add_reference_runs(table, offpolicy, ceiling, "full, lr ×1")
  rows, data = [], {}
  fig, axes = reporting.subplots(len(table), figsize=(6 * len(table), 4),
                                 squeeze=False)
  for ax, (algo, variants) in zip(axes[0], table.items()):
    for variant in sorted(variants, key=lambda v: not v.startswith("full")):
      s = list(variants[variant].values())
      h = _headline(s)
      rows.append([reporting.label(algo), variant, len(s),
                   *_cells(h, s[0]["max_k"])])
      data[f"{algo}/{variant}"] = h
      x, mean, _, _ = reporting.curve(variants[variant], "entropy/mean")
      ax.plot(x, reporting.smooth(mean), label=variant)
    ax.set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
           title=f"{reporting.label(algo)}: full fine-tuning and LoRA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  files.append(reporting.figure(out / "lora.png", fig))
  return [reporting.table(["algorithm", "trained", "seeds", *_columns(runs)],
                          rows)], data


def write_sections(study_dir, out: pathlib.Path, files: list):
  """[(title, markdown lines)] and {stage: numbers} of the regime stages."""
  study_dir = pathlib.Path(study_dir)
  runs = {s: reporting.runs(study_dir, s) for s in regimes.REGIME_STAGES}
  sections, summary = [], {}
  for title, stage, lines_data in (
      ("Off-policy sweep (updates per batch, learning rate)", "offpolicy",
       lambda: _offpolicy(runs["offpolicy"], out, files)),
      ("Starting entropy", "start_entropy",
       lambda: _start_entropy(runs["start_entropy"], runs["offpolicy"],
                              runs["repo_ceiling"], out, files)),
      ("REPO's ceiling", "repo_ceiling",
       lambda: _repo_ceiling(runs["repo_ceiling"], out, files)),
      ("Precision where the band binds", "precision_band",
       lambda: _precision_band(runs["precision_band"], out, files)),
      ("LoRA against full fine-tuning", "lora",
       lambda: _lora(runs["lora"], runs["offpolicy"], runs["repo_ceiling"],
                     out, files))):
    lines, data = lines_data()
    if lines:
      sections.append((title, lines))
      summary[stage] = data
  return sections, summary
