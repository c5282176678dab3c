"""The entropo study: the paper's claims at small scale, rerunnable.

    python -m experiments.study --workdir=workdir/study          # the full study
    python -m experiments.study --workdir=/tmp/study --smoke     # a 1-minute check
    python -m experiments.study --workdir=workdir/study --stages=report

Stages (`--stages`, in this order; each skips the runs it already finished,
so an interrupted study continues where it stopped):

* `warm_start`: trains the tiny model once on correct countdown solutions
  (`experiments/configs/countdown.py`); every run starts from this policy.
* `algorithms`: each of `--algorithms` x `--seeds` for `--iterations` RL
  iterations on countdown (task A), the same data, held-out set and settings
  for all; the seed changes the prompt order and the sampling.
* `sequential`: the final policies of `--sources` (an entropy-collapsing and
  an entropy-preserving algorithm, and the warm start itself as a control)
  are trained with GRPO on `countdown_all` (task B: every number used
  exactly once).
* `precision`: `--precision_algorithms` under each of `--presets`, with the
  old log-probs taken from the sampler, so that the sampler-trainer gap of a
  preset enters the importance ratio as it does in systems that reuse the
  inference engine's log-probs.
* `ratio_bias`: the controlled measurement. With identical parameters, the
  warm-started policy samples a fixed batch under each preset and the
  trainer recomputes its log-probs; the true ratio is exactly 1, so the
  measured ratio is pure numerical error.
* `bounds`: REPO-R with other bounds on zeta and ADAPO with other bounds
  on epsilon_high (`BOUNDS`), each for `--seeds`: whether a controller that
  sits at its bound would hold the entropy target with more room.
* `offpolicy`, `start_entropy`, `repo_ceiling`, `precision_band`, `lora`:
  when do the paper's claims hold here? The updates per batch and the
  learning rate, the starting entropy, REPO variants, precision where the
  clip band binds (`--band_regime`), and LoRA adapters
  (`experiments/study_regimes.py`).
* `mismatch`: the sampler's own precision (`sampling.precision`,
  `--mismatch_samplers`) crossed with the trainer's
  (`--mismatch_trainers`), without and with a mismatch correction
  (`--mismatch_correction`), on `--mismatch_algorithm`; writes
  `report/mismatch.md` and its plots (`experiments/study_mismatch.py`).
* `report`: tables (`report/summary.md`, `report/summary.json`) and plots
  (`report/*.png`) from everything above.

Several study processes may share one `--workdir` (each on other stages
or algorithms): `timing.json` is updated under a lock.

Layout of `--workdir`: `warm_start/` (a Hugging Face directory; the
`start_entropy` stage adds `warm_start_<start>/`), `data/`
(the TFDS datasets every run shares), `runs/<stage>/<name>/seed<k>/` (each a
normal entropo run directory: metrics.jsonl, baseline.json, checkpoints),
`ratio_bias.json`, `report/`, `timing.json` (wall time of every run).
"""

import json
import math
import os
import pathlib
import time

from absl import app
from absl import flags
from absl import logging

from experiments import study_mismatch
from experiments import study_regimes
from experiments import study_report
from experiments.study_report import summarize

STAGES = ("warm_start", "algorithms", "sequential", "precision", "ratio_bias",
          "bounds", *study_regimes.REGIME_STAGES, study_mismatch.STAGE,
          "report")
# The controllers' bounds, varied one at a time (the `bounds` stage): REPO-R's
# algo.zeta.max (the algorithms stage uses 1, the paper 0.05) and ADAPO's
# algo.clip_high_control.max (the algorithms stage uses 0.4).
BOUNDS = (("grpo+repo_r", "zeta.max", (0.05, 4.0, 16.0)),
          ("adapo", "clip_high_control.max", (1.0, 2.0)))
# The paper's comparison at small scale (ISSUE: GRPO, RLOO, DAPO, GSPO,
# entropy bonus, REPO-R on GRPO and on DAPO, REPO-D, ADAPO).
ALGORITHMS = ("grpo", "rloo", "dapo", "gspo", "entropy_bonus", "grpo+repo_r",
              "dapo+repo_r", "grpo+repo_d", "adapo")
PRESETS = ("fp32", "tf32", "bf16", "bf16_fp32_head", "fp16")
PASS_K = (1, 2, 4, 8, 16)

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the study lives.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Any of {STAGES}.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every run.")
_ITERATIONS = flags.DEFINE_integer("iterations", 100,
                                   "RL iterations of every run.")
_ALGORITHMS = flags.DEFINE_list("algorithms", list(ALGORITHMS),
                                "Algorithms of the algorithm stage.")
_SOURCES = flags.DEFINE_list(
    "sources", ["grpo", "grpo+repo_r", "warm_start"],
    "Task-A policies trained on task B: algorithms of the algorithm stage, "
    "or warm_start.")
_SEQ_ALGORITHM = flags.DEFINE_string("sequential_algorithm", "grpo",
                                     "The algorithm used on task B.")
_PRECISION_ALGORITHMS = flags.DEFINE_list(
    "precision_algorithms", ["dapo", "grpo+repo_r"],
    "Algorithms of the precision stage.")
_PRESETS = flags.DEFINE_list("presets", list(PRESETS), "Precision presets.")
_PRECISION_SEEDS = flags.DEFINE_list("precision_seeds", ["0", "1", "2"],
                                     "Seeds of the precision stage.")
_OFFPOLICY_ALGORITHMS = flags.DEFINE_list(
    "offpolicy_algorithms", list(study_regimes.OFFPOLICY_ALGORITHMS),
    "Algorithms of the offpolicy stage.")
_BAND_REGIME = flags.DEFINE_string(
    "band_regime", "mb16_ep1_lr1", "The offpolicy cell (minibatches, epochs, "
    "learning-rate scale) of the precision_band stage.")
_BAND_PRESETS = flags.DEFINE_list(
    "band_presets", list(study_regimes.BAND_PRESETS),
    "Precision presets of the precision_band stage.")
_MISMATCH_CORRECTION = flags.DEFINE_enum(
    "mismatch_correction", "icepop", list(study_mismatch.CORRECTIONS),
    "The correction the mismatch stage compares with none.")
_MISMATCH_TRAINERS = flags.DEFINE_list(
    "mismatch_trainers", list(study_mismatch.TRAINERS),
    "Trainer precision presets of the mismatch stage.")
_MISMATCH_SAMPLERS = flags.DEFINE_list(
    "mismatch_samplers", list(study_mismatch.SAMPLERS),
    "Sampler precision presets of the mismatch stage.")
_MISMATCH_ALGORITHM = flags.DEFINE_string(
    "mismatch_algorithm", study_mismatch.ALGORITHM,
    "The algorithm of the mismatch stage.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny model and settings (seconds per run): checks the "
    "pipeline end to end, measures nothing.")
flags.mark_flag_as_required("workdir")


def _log(message: str) -> None:
  print(f"[study] {message}", flush=True)


# --------------------------------------------------------------- configs


def base_config(algo: str, study_dir: pathlib.Path, *, iterations: int,
                smoke: bool, seed: int = 0):
  """The config of one study run: the main job's, with the study settings.

  All runs share the warm start, the data (and so the held-out set) and
  these settings; only the algorithm, precision, task and seed differ.
  """
  from experiments.configs import countdown  # pylint: disable=g-import-not-at-top
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  c = countdown.get_config(algo)
  c.seed = seed
  c.model.init_from = str(study_dir / "warm_start")
  c.data.update(data_dir=str(study_dir / "data"), eval_size=128)
  # Four optimizer steps per batch of 128 completions: after the first,
  # the policy has moved, so importance ratios and the clip band (and with
  # them DAPO's clip-higher and ADAPO's controller) take effect. With one
  # step per batch every ratio is exactly 1 and the band does nothing.
  c.algo.minibatches = 4
  c.train.update(iterations=iterations, eval_every=max(1, iterations // 4),
                 eval_samples=16, pass_k=PASS_K, checkpoint_every=iterations,
                 max_checkpoints=1, progress=False, tensorboard=False,
                 plots=False)
  if smoke:
    tiny.shrink(c, warm_start_steps=30)
    c.algo.minibatches = 2
    c.train.update(eval_every=max(1, iterations), eval_samples=4,
                   pass_k=(1, 2, 4))
  return c


def run_dir(study_dir, stage, name, seed) -> pathlib.Path:
  return study_dir / "runs" / stage / name.replace("+", "_") / f"seed{seed}"


# ------------------------------------------------------------------ runs


class Study:
  """Runs the stages into one directory; see the module docstring."""

  def __init__(self, directory, *, seeds, iterations, smoke=False):
    self.dir = pathlib.Path(directory)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.seeds = [int(s) for s in seeds]
    self.iterations = iterations
    self.smoke = smoke
    self.timing_path = self.dir / "timing.json"
    self.timing = (json.loads(self.timing_path.read_text())
                   if self.timing_path.is_file() else {})

  def config(self, algo, *, seed=0):
    return base_config(algo, self.dir, iterations=self.iterations,
                       smoke=self.smoke, seed=seed)

  def _record(self, name: str, seconds: float) -> None:
    """Adds one job's time to timing.json, keeping what other study
    processes on the same directory recorded meanwhile (locked, atomic)."""
    import fcntl  # pylint: disable=g-import-not-at-top
    with open(self.dir / ".timing.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if self.timing_path.is_file():
        self.timing.update(json.loads(self.timing_path.read_text()))
      self.timing[name] = round(seconds, 1)
      tmp = self.timing_path.with_suffix(f".tmp{os.getpid()}")
      tmp.write_text(json.dumps(self.timing, indent=2))
      os.replace(tmp, self.timing_path)

  def run_dir(self, stage: str, name: str, seed: int) -> pathlib.Path:
    return run_dir(self.dir, stage, name, seed)

  def warm_start(self, start: str | None = None) -> None:
    """The shared warm start, or the other one named `start` in
    `study_regimes.STARTS` (another starting entropy)."""
    from entropo import tasks  # pylint: disable=g-import-not-at-top
    from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
    from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
    out = study_regimes.warm_start_dir(self.dir, start)
    if (out / "config.json").is_file():
      _log(f"{out.name}: exists")
      return
    t = time.perf_counter()
    c = self.config("grpo")
    if start is not None:
      c.warm_start.update(study_regimes.STARTS[start])
    warm_start.warm_start(c, config_lib.make_task(c.task),
                          tasks.char_tokenizer(), out)
    self._record(out.name, time.perf_counter() - t)

  def run(self, config, directory: pathlib.Path, label: str) -> None:
    """Trains one run to completion (or skips it if it is complete)."""
    from entropo.training import train  # pylint: disable=g-import-not-at-top
    key = str(directory.relative_to(self.dir))
    if key in self.timing:
      _check_same_config(config, directory)
      _log(f"{label}: done earlier")
      return
    t = time.perf_counter()
    train(config, directory)
    seconds = time.perf_counter() - t
    self._record(key, seconds)
    s = summarize(directory)
    k = s["max_k"]
    _log(f"{label}: {seconds:.0f} s, entropy {s['entropy_change_pct']:+.0f} "
         f"%, pass@1 {s['final']['eval/pass@1']:.3f}, pass@{k} "
         f"{s['final'][f'eval/pass@{k}']:.3f}")

  def algorithms(self, algorithms) -> None:
    jobs = [(a, s) for a in algorithms for s in self.seeds]
    for i, (algo, seed) in enumerate(jobs):
      self.run(self.config(algo, seed=seed),
               run_dir(self.dir, "algorithms", algo, seed),
               f"({i + 1}/{len(jobs)}) {algo} seed {seed}")

  def export(self, source: str, seed: int) -> pathlib.Path:
    """The final task-A policy of `source` as a Hugging Face directory."""
    if source == "warm_start":
      return self.dir / "warm_start"
    from entropo import tasks  # pylint: disable=g-import-not-at-top
    from entropo.models import save_pretrained  # pylint: disable=g-import-not-at-top
    src = run_dir(self.dir, "algorithms", source, seed)
    out = src / "final_policy"
    if (out / "config.json").is_file():
      return out
    if str(src.relative_to(self.dir)) not in self.timing:
      raise ValueError(f"Sequential source {source!r} seed {seed} has no "
                       f"finished task-A run in {src}; run the algorithms "
                       f"stage with it first.")
    from entropo.training import load_policy  # pylint: disable=g-import-not-at-top
    policy, tokenizer = load_policy(self.config(source, seed=seed), src)
    save_pretrained(policy, out)
    tasks.save_tokenizer(tokenizer, out)
    return out

  def sequential(self, sources, algorithm) -> None:
    jobs = [(src, s) for src in sources for s in self.seeds]
    for i, (source, seed) in enumerate(jobs):
      c = self.config(algorithm, seed=seed)
      c.task.name = "countdown_all"
      c.model.init_from = str(self.export(source, seed))
      self.run(c, run_dir(self.dir, "sequential", source, seed),
               f"({i + 1}/{len(jobs)}) task B from {source} seed {seed}")

  def precision(self, algorithms, presets, seeds) -> None:
    jobs = [(a, p, s) for a in algorithms for p in presets for s in seeds]
    for i, (algo, preset, seed) in enumerate(jobs):
      c = self.config(algo, seed=seed)
      c.precision = preset
      c.algo.old_logps = "sampler"
      self.run(c, run_dir(self.dir, "precision", f"{algo}/{preset}", seed),
               f"({i + 1}/{len(jobs)}) {algo} {preset} seed {seed}")

  def bounds(self, variants=BOUNDS) -> None:
    jobs = [(a, f, v, s) for a, f, values in variants for v in values
            for s in self.seeds]
    for i, (algo, field, value, seed) in enumerate(jobs):
      c = self.config(algo, seed=seed)
      section, name = field.split(".")
      c.algo[section][name] = value
      self.run(c, run_dir(self.dir, "bounds", f"{algo}/{field}={value:g}",
                          seed),
               f"({i + 1}/{len(jobs)}) {algo} {field}={value:g} seed {seed}")

  def ratio_bias(self, presets) -> dict:
    key = "ratio_bias"
    path = self.dir / "ratio_bias.json"
    if path.is_file() and key in self.timing:
      result = json.loads(path.read_text())
      if list(result["presets"]) == list(presets):
        _log("ratio bias: done earlier")
        return result
    t = time.perf_counter()
    c = self.config("grpo")
    result = measure_ratio_bias(
        self.dir / "warm_start", c, presets,
        batches=1 if self.smoke else 32, seed=c.seed)
    path.write_text(json.dumps(result, indent=2))
    self._record(key, time.perf_counter() - t)
    for preset, r in result["presets"].items():
      _log(f"ratio bias {preset}: {r['ratio_bias']:+.2e} "
           f"(+-{2 * r['ratio_bias_se']:.1e}), phantom clips "
           f"{r['phantom_clipfrac_low']:.2e} / {r['phantom_clipfrac_high']:.2e}")
    return result


def _flatten(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


def _check_same_config(config, directory: pathlib.Path) -> None:
  """A finished run is only reused if it was made with `config`.

  A field the run's config.json lacks (added to entropo after the run)
  counts as its default, the behaviour the run had.
  """
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  saved = _flatten(json.loads((directory / "config.json").read_text()))
  wanted = _flatten(json.loads(config.to_json_best_effort()))
  defaults = _flatten(json.loads(
      config_lib.default_config(config.algo.name).to_json_best_effort()))
  for field in sorted(saved.keys() | wanted.keys()):
    if field not in saved and field in defaults:
      saved[field] = defaults[field]
    if saved.get(field) != wanted.get(field):
      raise ValueError(
          f"{directory} was trained with {field}={saved.get(field)!r}, but "
          f"this study asks for {wanted.get(field)!r}. Use another "
          f"--workdir, or delete that run to retrain it.")


def measure_ratio_bias(model_dir, config, presets, *, batches: int,
                       seed: int) -> dict:
  """The importance ratio of identical parameters under each preset.

  For each preset, the policy loaded under it samples `batches` batches of
  held-out prompts (its own sampler, KV cache, its precision); the trainer's
  forward under the same preset recomputes the log-probs of the same tokens,
  and so does the float32 trainer. `rho = pi_trainer / pi_sampler` is then
  the first-step importance ratio a PPO update would see if the old
  log-probs came from the sampler; its true value is exactly 1.

  Returns per preset: the mean of rho - 1 with its standard error over
  tokens, phantom clip fractions outside [1 - clip_low, 1 + clip_high],
  max |log rho|, and the trainer's and sampler's max |delta log pi| against
  the float32 trainer.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import entropo  # pylint: disable=g-import-not-at-top
  from entropo import precision as precision_lib  # pylint: disable=g-import-not-at-top
  from entropo.models import from_pretrained  # pylint: disable=g-import-not-at-top
  from entropo.models import load_tokenizer  # pylint: disable=g-import-not-at-top
  from entropo.models import sample  # pylint: disable=g-import-not-at-top
  from entropo.tasks import pipeline  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import datasets  # pylint: disable=g-import-not-at-top
  from entropo.training import step  # pylint: disable=g-import-not-at-top

  task = config_lib.make_task(config.task)
  tokenizer = load_tokenizer(model_dir)
  data_dir = config.data.data_dir
  builder = datasets.write_dataset(config, task, data_dir)
  records = datasets.held_out_records(config, task, data_dir, builder)
  s, a = config.sampling, config.algo
  batch = pipeline.prompt_batch(records[:s.prompts_per_batch * 4], tokenizer,
                                group_size=s.group_size,
                                max_prompt_len=config.data.max_prompt_len)
  forward = jax.jit(lambda model, tokens, mask: step.sequence_logps(
      model, tokens, mask)[0])
  reference = from_pretrained(model_dir, precision="fp32")
  out = {"prompts": len(batch["prompt_tokens"]) // s.group_size,
         "group_size": s.group_size, "batches": batches,
         "clip_low": a.clip_low, "clip_high": a.clip_high, "presets": {}}
  for preset in presets:
    model = from_pretrained(model_dir, precision=preset)
    log_rho, d_trainer, d_sampler = [], [], []
    for b in range(batches):
      result = sample(model, batch["prompt_tokens"], batch["prompt_mask"],
                      key=jax.random.key(seed * 1000 + b),
                      max_new_tokens=s.max_new_tokens, temperature=1.0,
                      eos_id=tokenizer.eos_ids)
      tokens, attn = result.tokens, result.attention_mask
      mask = np.asarray(result.completion_mask)[:, 1:]
      sampler = np.asarray(result.logps)[:, 1:]
      trainer = np.asarray(forward(model, tokens, attn))
      exact = np.asarray(forward(reference, tokens, attn))
      log_rho.append((trainer - sampler)[mask])
      d_trainer.append((trainer - exact)[mask])
      d_sampler.append((sampler - exact)[mask])
    log_rho = np.concatenate(log_rho).astype(np.float64)
    bound = precision_lib.DEFAULT_MAX_LOG_RATIO
    rho = np.exp(np.clip(log_rho, -bound, bound))
    n = rho.size
    # The library's metric on the same numbers (a check on this function).
    lib = entropo.precision_mismatch(
        jnp.asarray(log_rho[None].astype(np.float32)),
        jnp.zeros((1, n), jnp.float32), jnp.ones((1, n), bool),
        clip_low=a.clip_low, clip_high=a.clip_high)
    out["presets"][preset] = {
        # Each preset samples its own completions, so the counts differ.
        "tokens": n,
        "ratio_bias": float(np.mean(rho - 1)),
        "ratio_bias_se": float(np.std(rho - 1) / math.sqrt(n)),
        "ratio_bias_library": float(lib["mismatch/ratio_bias"]),
        "log_ratio_mean": float(np.mean(log_rho)),
        "log_ratio_std": float(np.std(log_rho)),
        "max_abs_log_ratio": float(np.max(np.abs(log_rho))),
        "share_above_1": float(np.mean(log_rho > 0)),
        "share_below_1": float(np.mean(log_rho < 0)),
        "phantom_clipfrac_low": float(np.mean(rho < 1 - a.clip_low)),
        "phantom_clipfrac_high": float(np.mean(rho > 1 + a.clip_high)),
        "trainer_max_abs_diff_vs_fp32": float(np.max(np.abs(
            np.concatenate(d_trainer)))),
        "sampler_max_abs_diff_vs_fp32": float(np.max(np.abs(
            np.concatenate(d_sampler)))),
        "log_ratio_quantiles": [float(q) for q in np.quantile(
            log_rho, [0.001, 0.01, 0.5, 0.99, 0.999])],
    }
  return out


def _check_flags() -> None:
  """Every flag error before any work (a UsageError naming the flag)."""
  unknown = sorted(set(_STAGES.value) - set(STAGES))
  if unknown:
    raise app.UsageError(f"Unknown stages {unknown}; choose from {STAGES}.")
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  for name in (_ALGORITHMS.value + _PRECISION_ALGORITHMS.value
               + [study_regimes.base_algorithm(a)
                  for a in _OFFPOLICY_ALGORITHMS.value]
               + [_SEQ_ALGORITHM.value, _MISMATCH_ALGORITHM.value]):
    try:
      config_lib.preset(name)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  if "sequential" in _STAGES.value:
    for source in _SOURCES.value:
      if source != "warm_start" and source not in _ALGORITHMS.value:
        raise app.UsageError(
            f"--sources: {source!r} is neither warm_start nor one of "
            f"--algorithms {_ALGORITHMS.value}.")
  for flag in (_PRESETS, _BAND_PRESETS, _MISMATCH_TRAINERS,
               _MISMATCH_SAMPLERS):
    for preset in flag.value:
      if preset not in PRESETS:
        raise app.UsageError(f"--{flag.name}: unknown preset {preset!r}; "
                             f"choose from {PRESETS}.")
  try:
    study_regimes.parse_cell(_BAND_REGIME.value)
  except ValueError as e:
    raise app.UsageError(f"--band_regime: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _check_flags()
  logging.set_verbosity(logging.WARNING)
  study = Study(_WORKDIR.value, seeds=_SEEDS.value,
                iterations=_ITERATIONS.value, smoke=_SMOKE.value)
  run_stage = {
      "warm_start": study.warm_start,
      "algorithms": lambda: study.algorithms(_ALGORITHMS.value),
      "sequential": lambda: study.sequential(_SOURCES.value,
                                             _SEQ_ALGORITHM.value),
      "precision": lambda: study.precision(
          _PRECISION_ALGORITHMS.value, _PRESETS.value,
          [int(s) for s in _PRECISION_SEEDS.value]),
      "ratio_bias": lambda: study.ratio_bias(_PRESETS.value),
      "bounds": study.bounds,
      "offpolicy": lambda: study_regimes.offpolicy(
          study, _OFFPOLICY_ALGORITHMS.value),
      "start_entropy": lambda: study_regimes.start_entropy(study),
      "repo_ceiling": lambda: study_regimes.repo_ceiling(study),
      "precision_band": lambda: study_regimes.precision_band(
          study, _BAND_REGIME.value, _BAND_PRESETS.value),
      "lora": lambda: study_regimes.lora(study),
      "mismatch": lambda: (study_mismatch.mismatch(
          study, algorithm=_MISMATCH_ALGORITHM.value,
          correction=_MISMATCH_CORRECTION.value,
          trainers=_MISMATCH_TRAINERS.value,
          samplers=_MISMATCH_SAMPLERS.value), _log(
              "mismatch report: " + ", ".join(
                  str(f) for f in study_mismatch.write_report(study.dir)))),
      "report": lambda: _log("report: " + ", ".join(
          str(f) for f in study_report.write_report(study.dir))),
  }
  t = time.perf_counter()
  stages = [s for s in STAGES if s in _STAGES.value]
  for stage in stages:
    _log(f"stage {stage}")
    run_stage[stage]()
  _log(f"stages {stages} took {time.perf_counter() - t:.0f} s; total run "
       f"time so far {sum(study.timing.values()) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
