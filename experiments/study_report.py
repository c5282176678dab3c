"""Tables and plots of an `experiments.study` directory.

`write_report(study_dir)` reads every finished run under `runs/` (their
`metrics.jsonl` and `baseline.json`), `ratio_bias.json` and `timing.json`,
and writes `report/summary.json`, `report/summary.md` and the plots:

* `entropy_curves.png`: train-batch token entropy over iterations, mean
  over seeds with the min-max band, per algorithm;
* `accuracy_vs_entropy.png`: held-out pass@1 against held-out entropy at
  each evaluation, from the start (the paper's Figure 1 shape);
* `pass_at_k.png`: final pass@k against k, per algorithm, and the start;
* `cumulative_entropy.png`: final pass@1 and pass@16 against cumulative
  entropy, one point per run;
* `sequential.png`: task-B reward and held-out pass@1 per source policy;
* `precision_entropy.png`, `precision_mismatch.png`: entropy and the
  sampler-trainer ratio statistics per precision preset;
* `ratio_bias.png`: the controlled measurement;
* `bounds_entropy.png`: entropy under other controller bounds.
"""

import collections
import json
import pathlib

import numpy as np

from experiments import regime_report
from experiments import reporting
# `summarize` is read from here by experiments.study and the tests.
from experiments.reporting import summarize  # pylint: disable=unused-import


def _algorithm_section(runs, out, files) -> tuple[list[str], dict]:
  md, data = [], {}
  if not runs:
    return md, data
  first = next(iter(next(iter(runs.values())).values()))
  ks = sorted(int(k.split("@")[1]) for k in first["final"] if "pass@" in k)
  # The evaluation before RL samples with each run's seed: average them.
  everyone = [x["baseline"] for v in runs.values() for x in v.values()]
  base = {k: float(np.mean([b[k] for b in everyone])) for k in first["baseline"]}
  header = ["algorithm", "seeds", "entropy change %", "cumulative entropy",
            "pass@1", f"pass@{ks[-1]}", "train reward first → last 10 %",
            "min per run"]
  rows = []
  for name, seeds in runs.items():
    s = list(seeds.values())
    rows.append([
        reporting.label(name), len(s),
        reporting.pm([x["entropy_change_pct"] for x in s], 2, pct=True),
        reporting.pm([x["cumulative_entropy"] for x in s], 1),
        reporting.pm([x["final"]["eval/pass@1"] for x in s]),
        reporting.pm([x["final"][f"eval/pass@{ks[-1]}"] for x in s]),
        f"{np.mean([x['reward_first'] for x in s]):.3f} → "
        f"{np.mean([x['reward_last'] for x in s]):.3f}",
        f"{np.mean([x['seconds'] for x in s]) / 60:.1f}"])
    data[name] = {
        "entropy_change_pct": [x["entropy_change_pct"] for x in s],
        "cumulative_entropy": [x["cumulative_entropy"] for x in s],
        **{f"pass@{k}": [x["final"][f"eval/pass@{k}"] for x in s]
           for k in ks}}
  md.append(f"Before RL (the shared warm start, mean of the {len(everyone)} "
            f"runs' evaluations): entropy "
            f"{base['eval/entropy']:.3f} nats/token, " + ", ".join(
                f"pass@{k} {base[f'eval/pass@{k}']:.3f}" for k in ks) + ".")
  md.append(reporting.table(header, rows))
  # Correlation of cumulative entropy and final accuracy over all runs.
  cum = np.array([x["cumulative_entropy"] for v in runs.values()
                  for x in v.values()])
  for k in (1, ks[-1]):
    acc = np.array([x["final"][f"eval/pass@{k}"] for v in runs.values()
                    for x in v.values()])
    if len(cum) > 2 and cum.std() > 0 and acc.std() > 0:
      r = float(np.corrcoef(cum, acc)[0, 1])
      data[f"corr_cumulative_entropy_pass@{k}"] = r
      md.append(f"Pearson correlation of cumulative entropy and final "
                f"pass@{k} over all {len(cum)} runs: {r:+.2f}.")
  _algorithm_plots(runs, base, ks, out, files)
  return md, data


def _algorithm_plots(runs, base, ks, out, files) -> None:
  """The algorithm stage's four figures (entropy curves, accuracy against
  entropy, pass@k, cumulative entropy), appended to `files`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  colors = matplotlib.colormaps["tab10"](np.linspace(0, 1, 10))
  fig, ax = reporting.subplots(figsize=(8, 5))
  for (name, seeds), color in zip(runs.items(), colors):
    x, mean, lo, hi = reporting.curve(seeds, "entropy/mean")
    ax.plot(x, reporting.smooth(mean), color=color, label=reporting.label(name))
    ax.fill_between(x, reporting.smooth(lo), reporting.smooth(hi),
                    color=color, alpha=0.12)
  ax.axhline(base["eval/entropy"], color="k", ls=":", lw=1,
             label="start (target)")
  ax.set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
         title="Entropy during RL (mean over seeds, min-max band)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  files.append(reporting.figure(out / "entropy_curves.png", fig))

  fig, ax = reporting.subplots(figsize=(7, 5))
  for (name, seeds), color in zip(runs.items(), colors):
    ent = np.mean([reporting.evals(s, "eval/entropy")[1]
                   for s in seeds.values()], 0)
    acc = np.mean([reporting.evals(s, "eval/pass@1")[1]
                   for s in seeds.values()], 0)
    ax.plot(ent, acc, marker="o", ms=3, color=color,
            label=reporting.label(name))
    ax.plot(ent[-1], acc[-1], marker="*", ms=11, color=color)
  ax.plot(base["eval/entropy"], base["eval/pass@1"], "ks", label="start")
  ax.set(xlabel="held-out token entropy (nats)", ylabel="held-out pass@1",
         title="Accuracy against entropy during RL (mean over seeds; "
               "star = end)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  files.append(reporting.figure(out / "accuracy_vs_entropy.png", fig))

  fig, ax = reporting.subplots(figsize=(7, 5))
  for (name, seeds), color in zip(runs.items(), colors):
    ys = np.mean([[s["final"][f"eval/pass@{k}"] for k in ks]
                  for s in seeds.values()], 0)
    ax.plot(ks, ys, marker="o", color=color, label=reporting.label(name))
  ax.plot(ks, [base[f"eval/pass@{k}"] for k in ks], "k--", marker="s",
          label="start")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="k", ylabel="held-out pass@k",
         title="pass@k after RL (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  files.append(reporting.figure(out / "pass_at_k.png", fig))

  fig, axes = reporting.subplots(2, figsize=(10, 4))
  for ax, k in zip(axes, (1, ks[-1])):
    for (name, seeds), color in zip(runs.items(), colors):
      ax.scatter([s["cumulative_entropy"] for s in seeds.values()],
                 [s["final"][f"eval/pass@{k}"] for s in seeds.values()],
                 color=color, label=reporting.label(name), s=18)
    ax.set(xlabel="cumulative entropy (sum over iterations)",
           ylabel=f"final held-out pass@{k}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  files.append(reporting.figure(out / "cumulative_entropy.png", fig))


def _sequential_section(runs, out, files) -> tuple[list[str], dict]:
  md, data = [], {}
  if not runs:
    return md, data
  header = ["task-B run from", "seeds", "task-B pass@1 before → after",
            "pass@16 before → after", "train reward first → last 10 %",
            "reward AUC (mean over iterations)", "entropy change %"]
  rows = []
  for name, seeds in runs.items():
    s = list(seeds.values())
    k = s[0]["max_k"]
    auc = [np.mean([r["reward/mean"] for r in x["records"]]) for x in s]
    rows.append([
        reporting.label(name), len(s),
        f"{reporting.pm([x['baseline']['eval/pass@1'] for x in s])} → "
        f"{reporting.pm([x['final']['eval/pass@1'] for x in s])}",
        f"{reporting.pm([x['baseline'][f'eval/pass@{k}'] for x in s])} → "
        f"{reporting.pm([x['final'][f'eval/pass@{k}'] for x in s])}",
        f"{np.mean([x['reward_first'] for x in s]):.3f} → "
        f"{np.mean([x['reward_last'] for x in s]):.3f}",
        reporting.pm(auc),
        reporting.pm([x["entropy_change_pct"] for x in s], 2, pct=True)])
    data[name] = {"reward_auc": auc,
                  "pass@1_before": [x["baseline"]["eval/pass@1"] for x in s],
                  "pass@1_after": [x["final"]["eval/pass@1"] for x in s]}
  md.append(reporting.table(header, rows))
  fig, axes = reporting.subplots(3, figsize=(14, 4))
  for name, seeds in runs.items():
    x, mean, _, _ = reporting.curve(seeds, "reward/mean")
    axes[0].plot(x, reporting.smooth(mean, 9), label=reporting.label(name))
    ev = [reporting.evals(s, "eval/pass@1") for s in seeds.values()]
    axes[1].plot(ev[0][0], np.mean([e[1] for e in ev], 0), marker="o",
                 label=reporting.label(name))
    x, mean, _, _ = reporting.curve(seeds, "entropy/mean")
    axes[2].plot(x, reporting.smooth(mean), label=reporting.label(name))
  axes[0].set(xlabel="iteration", ylabel="task-B train reward (9-it. mean)")
  axes[1].set(xlabel="updates", ylabel="task-B held-out pass@1")
  axes[2].set(xlabel="iteration", ylabel="token entropy (nats)")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("Sequential learning: GRPO on task B from each task-A policy "
               "(mean over seeds)")
  files.append(reporting.figure(out / "sequential.png", fig))
  return md, data


def _precision_section(runs, out, files) -> tuple[list[str], dict]:
  md, data = [], {}
  if not runs:
    return md, data
  header = ["algorithm", "preset", "ratio bias (mean ρ − 1)",
            "phantom clip low", "phantom clip high", "max \\|Δ log π\\|",
            "entropy change %", "pass@1", "min"]
  rows = []
  by_algo = collections.defaultdict(dict)
  for name, seeds in runs.items():
    algo, preset = name.split("/")
    by_algo[algo][preset] = seeds
    s = list(seeds.values())
    rows.append([
        reporting.label(algo), preset,
        f"{np.mean([x['ratio_bias'] for x in s]):+.2e}",
        f"{np.mean([x['phantom_clipfrac_low'] for x in s]):.2e}",
        f"{np.mean([x['phantom_clipfrac_high'] for x in s]):.2e}",
        f"{max(x['max_abs_diff'] for x in s):.3f}",
        reporting.pm([x["entropy_change_pct"] for x in s], 2, pct=True),
        reporting.pm([x["final"]["eval/pass@1"] for x in s]),
        f"{np.mean([x['seconds'] for x in s]) / 60:.1f}"])
    data[name] = {k: [x[k] for x in s] for k in (
        "ratio_bias", "phantom_clipfrac_low", "phantom_clipfrac_high",
        "entropy_change_pct")}
  md.append(reporting.table(header, rows))
  fig, axes = reporting.subplots(len(by_algo), figsize=(6 * len(by_algo), 4),
                                 squeeze=False)
  for ax, (algo, presets) in zip(axes[0], by_algo.items()):
    for preset, seeds in presets.items():
      x, mean, _, _ = reporting.curve(seeds, "entropy/mean")
      ax.plot(x, reporting.smooth(mean), label=preset)
    ax.set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
           title=f"{reporting.label(algo)}: old log-probs from the sampler")
    ax.grid(alpha=0.3)
    ax.legend()
  files.append(reporting.figure(out / "precision_entropy.png", fig))
  fig, axes = reporting.subplots(3, figsize=(15, 4))
  for algo, presets in by_algo.items():
    for ax, key in zip(axes, ("mismatch/ratio_bias",
                              "mismatch/phantom_clipfrac_low",
                              "mismatch/phantom_clipfrac_high")):
      for preset, seeds in presets.items():
        x, mean, _, _ = reporting.curve(seeds, key)
        ax.plot(x, reporting.smooth(mean),
                label=f"{reporting.label(algo)} {preset}")
      ax.set(xlabel="iteration", title=key)
      ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  files.append(reporting.figure(out / "precision_mismatch.png", fig))
  return md, data


def _bounds_section(runs, reference, out, files) -> tuple[list[str], dict]:
  """Controllers with other bounds, next to the algorithm stage's runs."""
  md, data = [], {}
  if not runs:
    return md, data
  defaults = {"grpo_repo_r": "zeta.max=1",
              "adapo": "clip_high_control.max=0.4"}
  controller = {"zeta.max": "controller/zeta",
                "clip_high_control.max": "controller/clip_high"}
  rows_by_algo = collections.defaultdict(dict)
  for name, seeds in runs.items():
    algo, variant = name.split("/")
    rows_by_algo[algo][variant] = seeds
  for algo, variant in defaults.items():
    if algo in rows_by_algo and algo in reference:
      rows_by_algo[algo][f"{variant} (algorithms stage)"] = reference[algo]
  header = ["algorithm", "bound", "seeds", "entropy change %",
            "cumulative entropy", "pass@1", "pass@16",
            "controller at the end"]
  rows = []
  fig, axes = reporting.subplots(
      len(rows_by_algo), figsize=(6 * len(rows_by_algo), 4), squeeze=False)
  for ax, (algo, variants) in zip(axes[0], sorted(rows_by_algo.items())):
    for variant, seeds in sorted(variants.items(), key=lambda kv: float(
        kv[0].split("=")[1].split()[0])):
      s = list(seeds.values())
      key = controller[variant.split("=")[0]]
      k = s[0]["max_k"]
      rows.append([
          reporting.label(algo), variant, len(s),
          reporting.pm([x["entropy_change_pct"] for x in s], 2, pct=True),
          reporting.pm([x["cumulative_entropy"] for x in s], 1),
          reporting.pm([x["final"]["eval/pass@1"] for x in s]),
          reporting.pm([x["final"][f"eval/pass@{k}"] for x in s]),
          reporting.pm([x["records"][-1][key] for x in s], 3)])
      data[f"{algo}/{variant}"] = {
          "entropy_change_pct": [x["entropy_change_pct"] for x in s],
          "pass@1": [x["final"]["eval/pass@1"] for x in s],
          f"pass@{k}": [x["final"][f"eval/pass@{k}"] for x in s]}
      x, mean, _, _ = reporting.curve(seeds, "entropy/mean")
      ax.plot(x, reporting.smooth(mean), label=variant)
    ax.set(xlabel="iteration", ylabel="token entropy (nats), 5-it. mean",
           title=f"{reporting.label(algo)}: controller bounds (mean over "
           "seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  md.append(reporting.table(header, rows))
  files.append(reporting.figure(out / "bounds_entropy.png", fig))
  return md, data


def _ratio_bias_section(result, out, files) -> list[str]:
  if not result:
    return []
  header = ["preset", "tokens", "mean ρ − 1 (± 2 s.e.)",
            "exp(μ + σ²/2) − 1",
            "mean log ρ (μ)", "std log ρ (σ)",
            "share ρ > 1 / ρ < 1", "phantom clip low / high",
            "max \\|log ρ\\|", "trainer / sampler max \\|Δ log π\\| vs fp32"]
  rows = []
  for preset, r in result["presets"].items():
    rows.append([
        preset, r["tokens"],
        f"{r['ratio_bias']:+.2e} ± {2 * r['ratio_bias_se']:.1e}",
        f"{np.expm1(r['log_ratio_mean'] + r['log_ratio_std'] ** 2 / 2):+.2e}",
        f"{r['log_ratio_mean']:+.2e}", f"{r['log_ratio_std']:.2e}",
        f"{r['share_above_1']:.3f} / {r['share_below_1']:.3f}",
        f"{r['phantom_clipfrac_low']:.1e} / {r['phantom_clipfrac_high']:.1e}",
        f"{r['max_abs_log_ratio']:.3f}",
        f"{r['trainer_max_abs_diff_vs_fp32']:.3f} / "
        f"{r['sampler_max_abs_diff_vs_fp32']:.3f}"])
  md = [f"Completion tokens of {result['prompts']} held-out prompts × "
        f"{result['group_size']} samples × {result['batches']} batches, "
        f"sampled under each preset; band "
        f"[1 − {result['clip_low']}, 1 + {result['clip_high']}].",
        reporting.table(header, rows)]
  presets = list(result["presets"])
  fig, axes = reporting.subplots(2, figsize=(11, 4))
  x = np.arange(len(presets))
  axes[0].bar(x, [result["presets"][p]["ratio_bias"] for p in presets],
              yerr=[2 * result["presets"][p]["ratio_bias_se"]
                    for p in presets], capsize=4, color="tab:blue")
  axes[0].axhline(0, color="k", lw=0.8)
  axes[0].set(xticks=x, xticklabels=presets, ylabel="mean ρ − 1 (± 2 s.e.)",
              title="Ratio bias, identical parameters")
  w = 0.38
  axes[1].bar(x - w / 2, [result["presets"][p]["phantom_clipfrac_low"]
                          for p in presets], w, label="ρ < 1 − ε_low")
  axes[1].bar(x + w / 2, [result["presets"][p]["phantom_clipfrac_high"]
                          for p in presets], w, label="ρ > 1 + ε_high")
  axes[1].set(xticks=x, xticklabels=presets, ylabel="share of tokens",
              title="Phantom clips")
  axes[1].legend()
  for ax in axes:
    ax.grid(alpha=0.3, axis="y")
  files.append(reporting.figure(out / "ratio_bias.png", fig))
  return md


def write_report(study_dir) -> list[pathlib.Path]:
  """Writes report/summary.{md,json} and the plots; returns the files."""
  study_dir = pathlib.Path(study_dir)
  out = study_dir / "report"
  out.mkdir(parents=True, exist_ok=True)
  files: list[pathlib.Path] = []
  summary, md = {}, ["# Study report", ""]
  sections = (("Algorithms (task A: countdown)", "algorithms",
               _algorithm_section),
              ("Sequential learning (task B: countdown_all)", "sequential",
               _sequential_section),
              ("Precision presets (old log-probs from the sampler)",
               "precision", _precision_section))
  runs = {stage: reporting.runs(study_dir, stage) for stage in (
      "algorithms", "sequential", "precision", "bounds")}
  for title, stage, section in sections:
    lines, data = section(runs[stage], out, files)
    if lines:
      md += [f"## {title}", ""] + [line + "\n" for line in lines]
      summary[stage] = data
  lines, data = _bounds_section(runs["bounds"], runs["algorithms"], out,
                                files)
  if lines:
    md += ["## Controller bounds (task A)", ""] + [
        line + "\n" for line in lines]
    summary["bounds"] = data
  sections, data = regime_report.write_sections(study_dir, out, files)
  for title, lines in sections:
    md += [f"## {title}", ""] + [line + "\n" for line in lines]
  summary.update(data)
  path = study_dir / "ratio_bias.json"
  if path.is_file():
    result = json.loads(path.read_text())
    md += ["## Controlled ratio bias (identical parameters)", ""] + [
        line + "\n" for line in _ratio_bias_section(result, out, files)]
    summary["ratio_bias"] = result
  timing_path = study_dir / "timing.json"
  if timing_path.is_file():
    timing = json.loads(timing_path.read_text())
    summary["timing"] = timing
    md.append(f"Total run time: {sum(timing.values()) / 60:.1f} min over "
              f"{len(timing)} jobs.\n")
  (out / "summary.md").write_text("\n".join(md))
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  return [out / "summary.md", out / "summary.json"] + files
