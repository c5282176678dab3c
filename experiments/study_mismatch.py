"""The study's `mismatch` stage: a sampler with its own precision.

Real stacks sample with one program (vLLM or SGLang, bf16) and train with
another. This stage crosses the sampler's preset (`SAMPLERS`,
`sampling.precision`) with the trainer's (`TRAINERS`, `precision`), each
cell with no correction and with one mismatch correction (`CORRECTIONS`,
`--mismatch_correction`, IcePop's token masking by default), for the
study's seeds, on DAPO (`--mismatch_algorithm`; §1's settings otherwise:
old log-probs recomputed by the trainer, 4 minibatches per batch). It asks:

* how large is the sampler/trainer mismatch in each cell (per-token KL,
  chi-square, log-perplexity difference, ratio bias), and does fp16 shrink
  it against bf16;
* does the correction change the entropy trajectory;
* does the mismatch KL rise as entropy falls: `write_report` plots the
  per-iteration KL against the batch entropy and gives each run's Pearson
  correlation of the two over training.

Runs live in `runs/mismatch/<algo>/train_<t>_sample_<s>/<correction>/
seed<k>/`; `write_report(study_dir)` writes `report/mismatch.md` and its
PNGs.
"""

import json
import pathlib

import numpy as np

from experiments import reporting


STAGE = "mismatch"
SAMPLERS = ("fp32", "bf16", "fp16")
TRAINERS = ("fp32", "bf16")
# name: algo-section overrides (entropo.mismatch_correction, docs/api.md).
CORRECTIONS = {
    "none": {},
    "icepop": dict(correction="mask", correction_level="token",
                   correction_low=0.5, correction_high=5.0),
    "tis": dict(correction="truncate", correction_level="token",
                correction_high=2.0),
    "seq_mis": dict(correction="mask", correction_level="sequence",
                    correction_low=0.0, correction_high=2.0),
    # IcePop's two-sided token mask, narrowed to ratios within 5 % of 1:
    # at this scale no token leaves IcePop's [0.5, 5] (docs/results.md §11),
    # while a bf16 sampler's tokens differ by 0.012 nats on average and up
    # to 0.375, so this band masks some.
    "token_mask_5pct": dict(correction="mask", correction_level="token",
                            correction_low=0.95, correction_high=1.05),
}
ALGORITHM = "dapo"
# Per-iteration metrics the report averages over a run.
KEYS = ("mismatch/kl_token", "mismatch/kl_seq", "mismatch/chi2_token",
        "mismatch/log_ppl_abs_diff", "mismatch/ratio_bias",
        "mismatch/prob_corr")


def cell(trainer: str, sampler: str) -> str:
  return f"train_{trainer}_sample_{sampler}"


def mismatch(study, *, algorithm=ALGORITHM, correction="icepop",
             trainers=TRAINERS, samplers=SAMPLERS) -> None:
  """Runs every (trainer, sampler, correction in {none, correction}, seed),
  seed by seed, so that an interrupted stage has whole grids."""
  corrections = ("none",) if correction == "none" else ("none", correction)
  jobs = [(t, s, c, seed) for seed in study.seeds for t in trainers
          for s in samplers for c in corrections]
  for i, (trainer, sampler, corr, seed) in enumerate(jobs):
    c = study.config(algorithm, seed=seed)
    c.precision = trainer
    c.sampling.precision = sampler
    c.algo.update(**CORRECTIONS[corr])
    study.run(c, study.run_dir(STAGE, f"{algorithm}/{cell(trainer, sampler)}"
                               f"/{corr}", seed),
              f"({i + 1}/{len(jobs)}) {algorithm} trainer {trainer} sampler "
              f"{sampler} {corr} seed {seed}")


def _sci(values) -> str:
  """mean ± sd over seeds in scientific notation (the KLs are ~1e-6)."""
  values = np.asarray(values, float)
  if len(values) == 1:
    return f"{values[0]:.2e}"
  return f"{values.mean():.2e} ± {values.std(ddof=1):.1e}"


def _series(summary, key):
  return np.array([r[key] for r in summary["records"]], float)


def _run_numbers(summary) -> dict:
  """A run's means of `KEYS`, entropy change and the KL-entropy coupling."""
  out = {key: float(np.mean(_series(summary, key))) for key in KEYS}
  kl, ent = _series(summary, "mismatch/kl_token"), _series(summary,
                                                           "entropy/mean")
  ok = np.std(kl) > 0 and np.std(ent) > 0
  out["corr_kl_entropy"] = float(np.corrcoef(kl, ent)[0, 1]) if ok else 0.0
  out["entropy_change_pct"] = summary["entropy_change_pct"]
  out["pass1"] = summary["final"]["eval/pass@1"]
  out["seconds"] = summary.get("seconds", 0.0)
  masked = [r.get("corr/masked_frac") for r in summary["records"]]
  out["masked_frac"] = (float(np.mean(masked)) if masked[0] is not None
                        else None)
  return out


def write_report(study_dir) -> list[pathlib.Path]:
  """`report/mismatch.md`, `report/mismatch.json` and two PNGs."""
  study_dir = pathlib.Path(study_dir)
  runs = reporting.runs(study_dir, STAGE)
  if not runs:
    return []
  out = study_dir / "report"
  out.mkdir(exist_ok=True)
  numbers = {name: {seed: _run_numbers(s) for seed, s in seeds.items()}
             for name, seeds in sorted(runs.items())}
  header = ["run", "seeds", "KL token", "KL seq", "chi² token",
            "|Δ log PPL|", "ratio bias", "prob corr", "masked frac",
            "entropy change %", "pass@1", "corr(KL, H)", "s / run"]
  rows = []
  for name, seeds in numbers.items():
    v = lambda k, seeds=seeds: [x[k] for x in seeds.values()]  # noqa
    masked = v("masked_frac")
    rows.append([name, len(seeds)] + [
        _sci(v(k)) for k in ("mismatch/kl_token", "mismatch/kl_seq",
                             "mismatch/chi2_token",
                             "mismatch/log_ppl_abs_diff",
                             "mismatch/ratio_bias")] + [
        reporting.pm(v("mismatch/prob_corr"), 6),
        "—" if masked[0] is None else _sci(masked),
        reporting.pm(v("entropy_change_pct"), 3, pct=True),
        reporting.pm(v("pass1"), 3),
        reporting.pm(v("corr_kl_entropy"), 2), f"{np.mean(v('seconds')):.0f}"])
  text = "\n".join(["# Sampler/trainer mismatch", "",
                    "Means over iterations, then mean ± sd over seeds.", "",
                    reporting.table(header, rows), ""])
  (out / "mismatch.md").write_text(text)
  (out / "mismatch.json").write_text(json.dumps(numbers, indent=2))
  return [out / "mismatch.md", out / "mismatch.json",
          _kl_vs_entropy(runs, out), _entropy_curves(runs, out)]


def _kl_vs_entropy(runs, out) -> pathlib.Path:
  """Per-iteration mismatch KL against batch entropy, uncorrected runs."""
  fig, ax = reporting.subplots(figsize=(7, 4.5))
  for name, seeds in sorted(runs.items()):
    if not name.endswith("/none"):
      continue
    xs = np.concatenate([_series(s, "entropy/mean") for s in seeds.values()])
    ys = np.concatenate([_series(s, "mismatch/kl_token")
                         for s in seeds.values()])
    label = name.split("/")[1].replace("train_", "T ").replace(
        "_sample_", ", S ")
    ax.scatter(xs, np.maximum(ys, 1e-12), s=6, alpha=0.5, label=label)
  ax.set_yscale("log")
  ax.set_xlabel("batch entropy (nats/token)")
  ax.set_ylabel("KL(sampler || trainer) per token (nats, k3)")
  ax.set_title("Mismatch KL against entropy over training (each point an "
               "iteration)")
  ax.legend(fontsize=7)
  return reporting.figure(out / "mismatch_kl_vs_entropy.png", fig)


def _entropy_curves(runs, out) -> pathlib.Path:
  """Batch entropy over training, per cell, without and with correction."""
  cells = sorted({name.rsplit("/", 1)[0] for name in runs})
  cols = min(3, len(cells))
  rows = -(-len(cells) // cols)
  fig, axes = reporting.subplots(cols, nrows=rows,
                                 figsize=(3.6 * cols, 3 * rows), squeeze=False)
  for ax in axes.flat[len(cells):]:
    ax.set_visible(False)
  for ax, c in zip(axes.flat, cells):
    for name, seeds in sorted(runs.items()):
      if name.rsplit("/", 1)[0] != c:
        continue
      n = min(len(s["records"]) for s in seeds.values())
      ys = np.mean([_series(s, "entropy/mean")[:n] for s in seeds.values()],
                   axis=0)
      ax.plot(np.arange(n), ys, label=name.rsplit("/", 1)[1])
    ax.set_title(c.split("/")[-1].replace("train_", "T ").replace(
        "_sample_", ", S "), fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("entropy (nats/token)")
    ax.legend(fontsize=7)
  return reporting.figure(out / "mismatch_entropy.png", fig)
