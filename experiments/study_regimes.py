"""The study's regime stages: when do the paper's claims hold here?

docs/results.md found that clip-higher (DAPO) and ADAPO do not raise entropy
on the tiny model and that REPO-R's effect levels off. These stages vary
what the write-up suspects is the reason, one axis at a time, every run with
the algorithm stage's settings otherwise (100 iterations, the same warm
start, data and held-out set, 3 seeds):

* `offpolicy`: GRPO, DAPO and ADAPO over the updates per batch (`UPDATES`:
  minibatches x epochs; 1 x 1 is on-policy, so the band never acts) and the
  learning rate (`LR_SCALES` x 1e-4), and DAPO with a symmetric band
  (`dapo_sym`, learning rate x1) to isolate clip-higher. The clip band can
  only act once the policy moves away from the sampler within an
  iteration. ADAPO and `dapo_sym` at 1 x 1 are left out: with every ratio
  exactly 1 they would repeat DAPO's runs.
* `start_entropy`: GRPO, DAPO and GRPO + REPO-R from other warm starts
  (`STARTS`: other solution spreads, and a shorter warm start), i.e. lower
  and higher starting entropies.
* `repo_ceiling`: REPO-R on GRPO as in the algorithm stage, without its
  sign clamp, with the PI zeta controller, and the centred REPO
  (`A - zeta (log pi + H)`), all with |zeta| <= 1.
* `precision_band`: DAPO under `--band_presets`, old log-probs from the
  sampler, in the regime `--band_regime` (an `offpolicy` cell): does a band
  that binds make precision matter?
* `lora`: GRPO and GRPO + REPO-R training LoRA adapters (rank 8, alpha 16,
  every projection) instead of all weights, at `LORA_LR_SCALES` x 1e-4.

Every stage reads and writes the same study directory as experiments.study;
`regime_report.write_sections` adds their tables and plots to the report.
"""

import pathlib

# name: (minibatches, epochs); 4 x 1 is the algorithm stage's setting.
UPDATES = {"1x1": (1, 1), "4x1": (4, 1), "16x1": (16, 1), "4x4": (4, 4)}
LR_SCALES = (1, 4)
BASE_LR = 1e-4
# DAPO differs from GRPO in its aggregation and dynamic sampling too;
# `dapo_sym` (DAPO with the symmetric band [0.8, 1.2]) isolates clip-higher.
# It runs at learning rate x1 only.
VARIANTS = {"dapo_sym": ("dapo", {"clip_high": 0.2})}
OFFPOLICY_ALGORITHMS = ("grpo", "dapo", "adapo", "dapo_sym")
# Other warm starts: {name: warm_start section overrides}. The default
# (spread 0.6, 600 steps) gives about 0.67 nats/token; the spread alone
# reaches 0.53 (0.2) to 0.69 (1.0), so a shorter warm start (less trained,
# so also less competent) gives the high-entropy start.
STARTS = {"spread0.2": {"spread": 0.2}, "spread1": {"spread": 1.0},
          "spread1_steps150": {"spread": 1.0, "steps": 150}}
START_ALGORITHMS = ("grpo", "dapo", "grpo+repo_r")
# name: (algorithm, algo-section overrides); every variant has |zeta| <= 1.
CEILING = {
    "repo_r": ("grpo+repo_r", {}),
    "repo_r_no_sign_clamp": ("grpo+repo_r", {"repo_sign_clamp": False}),
    "repo_r_pi": ("grpo+repo_r", {"zeta": {"law": "pi"}}),
    "repo_centred": ("grpo+repo", {"zeta": {"max": 1.0}}),
}
BAND_PRESETS = ("fp32", "tf32", "bf16", "bf16_fp32_head")
LORA_ALGORITHMS = ("grpo", "grpo+repo_r")
LORA_LR_SCALES = (1, 10)
LORA = dict(lora_rank=8, lora_alpha=16.0)
REGIME_STAGES = ("offpolicy", "start_entropy", "repo_ceiling",
                 "precision_band", "lora")


def cell(updates: str, lr_scale: float) -> str:
  """The name of an off-policy cell, e.g. `mb16_ep1_lr4`."""
  minibatches, epochs = UPDATES[updates]
  return f"mb{minibatches}_ep{epochs}_lr{lr_scale:g}"


def parse_cell(name: str) -> tuple[int, int, float]:
  """(minibatches, epochs, lr scale) of a cell name; raises if malformed."""
  try:
    mb, ep, lr = name.split("_")
    assert mb.startswith("mb") and ep.startswith("ep") and lr.startswith("lr")
    out = int(mb[2:]), int(ep[2:]), float(lr[2:])
  except (ValueError, AssertionError):
    raise ValueError(f"Not an off-policy cell: {name!r}; expected e.g. "
                     f"'mb16_ep1_lr4'.") from None
  if out[0] < 1 or out[1] < 1 or not out[2] > 0:
    raise ValueError(f"Off-policy cell {name!r}: minibatches and epochs "
                     f"must be >= 1 and the learning-rate scale > 0.")
  return out


def warm_start_dir(study_dir: pathlib.Path, start: str | None = None
                   ) -> pathlib.Path:
  """The shared warm start (`start=None`) or the one named in `STARTS`."""
  return study_dir / ("warm_start" if start is None else f"warm_start_{start}")


def _regime(config, cell_name: str, smoke: bool = False):
  minibatches, epochs, lr_scale = parse_cell(cell_name)
  if smoke:  # the smoke batch (8 sequences) cannot split 16 ways
    s = config.sampling
    minibatches = min(minibatches, s.prompts_per_batch * s.group_size)
  config.algo.update(minibatches=minibatches, epochs=epochs)
  config.optim.learning_rate = BASE_LR * lr_scale
  return config


def base_algorithm(name: str) -> str:
  """The trainer's algorithm behind an off-policy name (`dapo_sym` -> dapo)."""
  return VARIANTS.get(name, (name, {}))[0]


def offpolicy(study, algorithms=OFFPOLICY_ALGORITHMS, updates=tuple(UPDATES),
              lr_scales=LR_SCALES) -> None:
  # With one step per batch every ratio is 1: ADAPO and dapo_sym would
  # repeat DAPO's runs exactly.
  jobs = [(a, cell(u, lr), s) for a in algorithms for u in updates
          for lr in lr_scales for s in study.seeds
          if not (a in ("adapo", "dapo_sym") and u == "1x1")
          and not (a == "dapo_sym" and lr != 1)]
  for i, (algo, name, seed) in enumerate(jobs):
    base, overrides = VARIANTS.get(algo, (algo, {}))
    c = _regime(study.config(base, seed=seed), name, study.smoke)
    c.algo.update(**overrides)
    study.run(c, study.run_dir("offpolicy", f"{algo}/{name}", seed),
              f"({i + 1}/{len(jobs)}) {algo} {name} seed {seed}")


def start_entropy(study, algorithms=START_ALGORITHMS, starts=tuple(STARTS)):
  for start in starts:
    study.warm_start(start)
  jobs = [(a, p, s) for p in starts for a in algorithms for s in study.seeds]
  for i, (algo, start, seed) in enumerate(jobs):
    c = study.config(algo, seed=seed)
    c.model.init_from = str(warm_start_dir(study.dir, start))
    c.warm_start.update(STARTS[start])  # a record only: init_from is used
    study.run(c, study.run_dir("start_entropy", f"{algo}/{start}", seed),
              f"({i + 1}/{len(jobs)}) {algo} from {start} seed {seed}")


def repo_ceiling(study, variants=tuple(CEILING)) -> None:
  jobs = [(v, s) for v in variants for s in study.seeds]
  for i, (variant, seed) in enumerate(jobs):
    algo, overrides = CEILING[variant]
    c = study.config(algo, seed=seed)
    c.algo.update(**overrides)
    study.run(c, study.run_dir("repo_ceiling", variant, seed),
              f"({i + 1}/{len(jobs)}) {variant} seed {seed}")


def precision_band(study, regime: str, presets=BAND_PRESETS,
                   algorithm="dapo") -> None:
  parse_cell(regime)
  jobs = [(p, s) for p in presets for s in study.seeds]
  for i, (preset, seed) in enumerate(jobs):
    c = _regime(study.config(algorithm, seed=seed), regime, study.smoke)
    c.precision = preset
    c.algo.old_logps = "sampler"
    study.run(c, study.run_dir("precision_band",
                               f"{algorithm}/{regime}/{preset}", seed),
              f"({i + 1}/{len(jobs)}) {algorithm} {regime} {preset} seed "
              f"{seed}")


def lora(study, algorithms=LORA_ALGORITHMS, lr_scales=LORA_LR_SCALES):
  jobs = [(a, lr, s) for a in algorithms for lr in lr_scales
          for s in study.seeds]
  for i, (algo, lr_scale, seed) in enumerate(jobs):
    c = study.config(algo, seed=seed)
    c.model.update(**LORA)
    c.optim.learning_rate = BASE_LR * lr_scale
    study.run(c, study.run_dir("lora", f"{algo}/lr{lr_scale:g}", seed),
              f"({i + 1}/{len(jobs)}) LoRA {algo} lr x{lr_scale:g} seed "
              f"{seed}")
