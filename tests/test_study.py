"""The study driver (experiments/study.py) and its report."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from entropo.training import logger
from experiments import study as study_lib
from experiments import study_report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fake_run(directory: pathlib.Path, rng, iterations=20, eval_every=5):
  """A run directory with random metrics, as the trainer writes them."""
  directory.mkdir(parents=True)
  baseline = {"eval/entropy": 0.7, "eval/pass@1": 0.1, "eval/pass@4": 0.3}
  (directory / "baseline.json").write_text(json.dumps(baseline))
  cumulative = 0.0
  records = []
  for i in range(iterations):
    h = float(rng.uniform(0.2, 1.0))
    cumulative += h
    r = {"iteration": i, "entropy/mean": h,
         "entropy/change_pct": 100 * (h - 0.7) / 0.7,
         "entropy/cumulative": cumulative,
         "reward/mean": float(rng.uniform()),
         "mismatch/ratio_bias": float(rng.normal(0, 1e-3)),
         "mismatch/phantom_clipfrac_low": float(rng.uniform(0, 1e-3)),
         "mismatch/phantom_clipfrac_high": float(rng.uniform(0, 1e-3)),
         "mismatch/max_abs_diff": float(rng.uniform())}
    if (i + 1) % eval_every == 0:
      r.update({"eval/entropy": float(rng.uniform()),
                "eval/pass@1": float(rng.uniform()),
                "eval/pass@4": float(rng.uniform())})
    records.append(r)
  with open(directory / "metrics.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return records, baseline


def test_summarize_matches_float64_reference(tmp_path, rng):
  records, baseline = _fake_run(tmp_path / "run", rng)
  s = study_report.summarize(tmp_path / "run")
  n = len(records)
  tail = records[n - n // 10:]
  head = records[:n // 10]
  want_change = np.mean([r["entropy/change_pct"] for r in tail])
  np.testing.assert_allclose(s["entropy_change_pct"], want_change, rtol=1e-12)
  np.testing.assert_allclose(
      s["final_entropy"], np.mean([r["entropy/mean"] for r in tail]),
      rtol=1e-12)
  cumulative = 0.0
  for r in records:
    cumulative += r["entropy/mean"]
  np.testing.assert_allclose(s["cumulative_entropy"], cumulative, rtol=1e-12)
  last_eval = [r for r in records if "eval/pass@1" in r][-1]
  assert s["final"]["eval/pass@1"] == last_eval["eval/pass@1"]
  assert s["max_k"] == 4
  assert s["baseline"] == baseline
  np.testing.assert_allclose(
      s["reward_first"], np.mean([r["reward/mean"] for r in head]))
  np.testing.assert_allclose(
      s["ratio_bias"], np.mean([r["mismatch/ratio_bias"] for r in records]))
  np.testing.assert_allclose(
      s["eval_entropy_change_pct"],
      100 * (last_eval["eval/entropy"] / 0.7 - 1))


def test_report_from_fake_runs(tmp_path, rng):
  timing = {}
  for algo in ("grpo", "grpo_repo_r"):
    for seed in (0, 1):
      key = f"runs/algorithms/{algo}/seed{seed}"
      _fake_run(tmp_path / key, rng)
      timing[key] = 60.0
  (tmp_path / "timing.json").write_text(json.dumps(timing))
  files = study_report.write_report(tmp_path)
  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  assert sorted(summary["algorithms"]) == [
      "corr_cumulative_entropy_pass@1", "corr_cumulative_entropy_pass@4",
      "grpo", "grpo_repo_r"]
  # The correlation over runs, against NumPy on the same numbers.
  cum, acc = [], []
  for algo in ("grpo", "grpo_repo_r"):
    for seed in (0, 1):
      s = study_report.summarize(tmp_path / f"runs/algorithms/{algo}/seed{seed}")
      cum.append(s["cumulative_entropy"])
      acc.append(s["final"]["eval/pass@1"])
  np.testing.assert_allclose(summary["algorithms"][
      "corr_cumulative_entropy_pass@1"], np.corrcoef(cum, acc)[0, 1])
  text = (tmp_path / "report" / "summary.md").read_text()
  assert "| grpo+REPO-R | 2 |" in text
  for f in files:
    assert f.stat().st_size > 0, f
  assert {f.name for f in files} >= {"entropy_curves.png",
                                     "accuracy_vs_entropy.png",
                                     "pass_at_k.png", "cumulative_entropy.png"}


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
  """Every stage on the tiny model; reruns skip what is done."""
  study = study_lib.Study(tmp_path, seeds=[0], iterations=2, smoke=True)
  study.warm_start()
  # The smoke model solves nothing, so GRPO's advantages are all zero and
  # its parameters never move; the entropy bonus moves them regardless.
  study.algorithms(["grpo", "entropy_bonus"])
  study.sequential(["entropy_bonus", "warm_start"], "grpo")
  study.precision(["dapo"], ["fp32", "bf16"], [0])
  result = study.ratio_bias(["fp32", "bf16"])
  study.bounds((("grpo+repo_r", "zeta.max", (4.0,)),))
  files = study_report.write_report(tmp_path)

  timing = json.loads((tmp_path / "timing.json").read_text())
  assert sorted(timing) == sorted([
      "warm_start", "ratio_bias", "runs/algorithms/grpo/seed0",
      "runs/algorithms/entropy_bonus/seed0",
      "runs/sequential/entropy_bonus/seed0",
      "runs/sequential/warm_start/seed0", "runs/precision/dapo/fp32/seed0",
      "runs/precision/dapo/bf16/seed0",
      "runs/bounds/grpo_repo_r/zeta.max=4/seed0"])
  for key in timing:
    if key.startswith("runs/"):
      records = logger.read_jsonl(tmp_path / key / "metrics.jsonl")
      assert [r["iteration"] for r in records] == [0, 1], key

  # Task B starts from the final task-A policy, not from the warm start.
  from entropo.models import from_pretrained  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  seq_config = json.loads(
      (tmp_path / "runs/sequential/entropy_bonus/seed0/config.json"
       ).read_text())
  source = tmp_path / "runs/algorithms/entropy_bonus/seed0"
  exported = pathlib.Path(seq_config["model"]["init_from"])
  assert exported == source / "final_policy"
  assert seq_config["task"]["name"] == "countdown_all"
  from entropo.training import load_policy  # pylint: disable=g-import-not-at-top
  policy, _ = load_policy(study.config("entropy_bonus", seed=0), source)
  final = nnx.state(from_pretrained(exported), nnx.Param)
  start = nnx.state(from_pretrained(tmp_path / "warm_start"), nnx.Param)
  leaves = lambda t: [np.asarray(x) for x in __import__("jax").tree.leaves(t)]  # noqa
  for a, b in zip(leaves(final), leaves(nnx.state(policy, nnx.Param))):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b)
             for a, b in zip(leaves(final), leaves(start)))

  # Precision runs take the old log-probs from the sampler.
  prec = json.loads(
      (tmp_path / "runs/precision/dapo/bf16/seed0/config.json").read_text())
  assert prec["precision"] == "bf16"
  assert prec["algo"]["old_logps"] == "sampler"
  bound = json.loads((tmp_path / "runs/bounds/grpo_repo_r/zeta.max=4/seed0/"
                      "config.json").read_text())
  assert bound["algo"]["zeta"]["max"] == 4.0
  assert bound["algo"]["repo"] == "repo_r"

  # The controlled measurement: float32 sampler and trainer agree.
  fp32 = result["presets"]["fp32"]
  assert abs(fp32["ratio_bias"]) < 1e-5
  assert fp32["phantom_clipfrac_low"] == fp32["phantom_clipfrac_high"] == 0
  for r in result["presets"].values():
    assert r["tokens"] > 0
    np.testing.assert_allclose(r["ratio_bias_library"], r["ratio_bias"],
                               atol=1e-6)
  assert result["presets"]["bf16"]["trainer_max_abs_diff_vs_fp32"] > 1e-3

  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  assert set(summary) >= {"algorithms", "sequential", "precision",
                          "ratio_bias", "bounds", "timing"}
  assert list(summary["bounds"]) == ["grpo_repo_r/zeta.max=4"]
  assert {f.name for f in files} >= {
      "summary.md", "entropy_curves.png", "accuracy_vs_entropy.png",
      "pass_at_k.png", "sequential.png", "precision_entropy.png",
      "precision_mismatch.png", "ratio_bias.png", "bounds_entropy.png"}

  # A rerun trains nothing again.
  before = (tmp_path / "runs/algorithms/grpo/seed0/metrics.jsonl").stat()
  study = study_lib.Study(tmp_path, seeds=[0], iterations=2, smoke=True)
  study.algorithms(["grpo"])
  after = (tmp_path / "runs/algorithms/grpo/seed0/metrics.jsonl").stat()
  assert before.st_mtime_ns == after.st_mtime_ns
  # ... but never reuses a run made with other settings.
  study = study_lib.Study(tmp_path, seeds=[0], iterations=3, smoke=True)
  with pytest.raises(ValueError, match="trained with train.checkpoint_every"
                     "=2, but this study asks for 3"):
    study.algorithms(["grpo"])
  # A field added to entropo after a run counts as its default there.
  path = tmp_path / "runs/algorithms/grpo/seed0/config.json"
  saved = json.loads(path.read_text())
  del saved["model"]["lora_base_dtype"]
  path.write_text(json.dumps(saved))
  study = study_lib.Study(tmp_path, seeds=[0], iterations=2, smoke=True)
  study.algorithms(["grpo"])  # reused: the default is what it ran with
  assert path.with_name("metrics.jsonl").stat().st_mtime_ns == (
      after.st_mtime_ns)
  del saved["algo"]["clip_low"]  # ... but only the default
  path.write_text(json.dumps(saved))
  c = study.config("grpo", seed=0)
  c.algo.clip_low = 0.1
  with pytest.raises(ValueError, match="algo.clip_low=0.2, but this study "
                     "asks for 0.1"):
    study.run(c, path.parent, "grpo")


@pytest.mark.slow
def test_regime_stages_smoke(tmp_path):
  """The regime stages (issue 18) and the LoRA stage at smoke size: each
  run gets the setting its name says, and the report shows every stage."""
  from experiments import study_regimes as regimes  # pylint: disable=g-import-not-at-top
  study = study_lib.Study(tmp_path, seeds=[0], iterations=2, smoke=True)
  study.warm_start()
  regimes.offpolicy(study, ["dapo", "dapo_sym"], updates=("1x1", "4x4"),
                    lr_scales=(4, 1))
  regimes.start_entropy(study, ["grpo"], starts=("spread1_steps150",))
  regimes.repo_ceiling(study, ("repo_r", "repo_r_no_sign_clamp",
                               "repo_centred"))
  regimes.precision_band(study, "mb4_ep1_lr1", ["bf16"])
  regimes.lora(study, ["grpo"], lr_scales=(10,))
  files = study_report.write_report(tmp_path)

  def config(key):
    return json.loads((tmp_path / "runs" / key / "seed0" / "config.json"
                       ).read_text())
  c = config("offpolicy/dapo/mb4_ep4_lr4")
  assert (c["algo"]["minibatches"], c["algo"]["epochs"]) == (4, 4)
  np.testing.assert_allclose(c["optim"]["learning_rate"], 4e-4)
  assert config("offpolicy/dapo/mb1_ep1_lr4")["algo"]["minibatches"] == 1
  c = config("offpolicy/dapo_sym/mb4_ep4_lr1")  # DAPO without clip-higher
  assert (c["algo"]["name"], c["algo"]["clip_high"]) == ("dapo", 0.2)
  assert config("offpolicy/dapo/mb4_ep4_lr1")["algo"]["clip_high"] == 0.28
  # The high-entropy start is its own warm start: spread 1, fewer steps.
  c = config("start_entropy/grpo/spread1_steps150")
  start = pathlib.Path(c["model"]["init_from"])
  assert start == tmp_path / "warm_start_spread1_steps150"
  made = json.loads((start / "warm_start.json").read_text())
  assert (made["spread"], made["steps"]) == (1.0, 150)
  assert not config("repo_ceiling/repo_r_no_sign_clamp")["algo"][
      "repo_sign_clamp"]
  assert config("repo_ceiling/repo_r")["algo"]["repo_sign_clamp"]
  assert config("repo_ceiling/repo_centred")["algo"]["repo"] == "repo"
  c = config("precision_band/dapo/mb4_ep1_lr1/bf16")
  assert (c["precision"], c["algo"]["old_logps"]) == ("bf16", "sampler")
  c = config("lora/grpo/lr10")
  assert (c["model"]["lora_rank"], c["model"]["lora_alpha"]) == (8, 16.0)
  np.testing.assert_allclose(c["optim"]["learning_rate"], 1e-3)

  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  # dapo_sym runs off-policy at learning rate x1 only.
  assert sorted(summary["offpolicy"]) == [
      "dapo/mb1_ep1_lr1", "dapo/mb1_ep1_lr4", "dapo/mb4_ep4_lr1",
      "dapo/mb4_ep4_lr4", "dapo_sym/mb4_ep4_lr1"]
  # On-policy (one step per batch): every ratio is 1, nothing clips.
  assert summary["offpolicy"]["dapo/mb1_ep1_lr4"]["clipfrac_high"] == [0.0]
  assert sorted(summary["start_entropy"]) == ["grpo/spread1_steps150"]
  assert sorted(summary["repo_ceiling"]) == [
      "repo_centred", "repo_r", "repo_r_no_sign_clamp"]
  assert list(summary["precision_band"]) == ["dapo/mb4_ep1_lr1/bf16"]
  assert sorted(summary["lora"]) == ["grpo/LoRA r=8, lr ×10"]
  text = (tmp_path / "report" / "summary.md").read_text()
  assert "| clip-higher: DAPO − DAPO with ε_high = 0.2 | mb4_ep4_lr1 |" in text
  for title in ("## Off-policy sweep", "## Starting entropy",
                "## REPO's ceiling", "## Precision where the band binds",
                "## LoRA against full fine-tuning"):
    assert title in text
  assert {f.name for f in files} >= {
      "offpolicy_clip_entropy.png", "offpolicy_effect.png",
      "start_entropy.png", "repo_ceiling.png", "precision_band.png",
      "lora.png"}


def _study(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "experiments.study", *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--stages=bogus"], "Unknown stages ['bogus']"),
    (["--algorithms=grpo,ppo"], "Unknown algorithm 'ppo'"),
    (["--sources=dapo", "--algorithms=grpo"], "--sources: 'dapo'"),
    (["--presets=fp8"], "unknown preset 'fp8'"),
    (["--band_presets=fp32,bf8"], "--band_presets: unknown preset 'bf8'"),
    (["--mismatch_trainers=fp32,fp8"],
     "--mismatch_trainers: unknown preset 'fp8'"),
    (["--mismatch_samplers=int8"],
     "--mismatch_samplers: unknown preset 'int8'"),
    (["--band_regime=mb16_lr4"], "--band_regime: Not an off-policy cell"),
    (["--offpolicy_algorithms=grpo,ppo"], "Unknown algorithm 'ppo'"),
])
def test_bad_flags_fail_before_compute(tmp_path, args, message):
  proc = _study(f"--workdir={tmp_path}", *args)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr
  assert not (tmp_path / "timing.json").exists()


def test_mismatch_stage_configs_and_report(tmp_path, rng):
  """The mismatch stage's jobs (without training) and its report."""
  from entropo.training import validate  # pylint: disable=g-import-not-at-top
  from experiments import study_mismatch  # pylint: disable=g-import-not-at-top
  study = study_lib.Study(tmp_path, seeds=[0, 1], iterations=4, smoke=True)
  jobs = []
  study.run = lambda c, directory, label: jobs.append((c, directory))
  study_mismatch.mismatch(study, correction="icepop")
  assert len(jobs) == 3 * 2 * 2 * 2  # samplers x trainers x corr x seeds
  for c, directory in jobs:
    c.model.init_from = ""  # no warm start written here
    typed = validate(c)
    name = directory.parent.parent.name  # train_<t>_sample_<s>
    assert name == study_mismatch.cell(typed.precision.name,
                                       typed.sampler_precision.name)
    corrected = directory.parent.name == "icepop"
    assert (typed.algorithm.correction == "mask") == corrected
  # Fewer cells (--mismatch_trainers / --mismatch_samplers): fp16 training.
  jobs.clear()
  study_mismatch.mismatch(study, correction="token_mask_5pct",
                          trainers=("fp16",), samplers=("fp16",))
  assert [d.relative_to(tmp_path / "runs/mismatch/dapo").as_posix()
          for _, d in jobs] == [
              f"train_fp16_sample_fp16/{corr}/seed{seed}" for seed in (0, 1)
              for corr in ("none", "token_mask_5pct")]
  c = jobs[1][0]
  c.model.init_from = ""
  typed = validate(c)
  assert (typed.precision.name, typed.sampler_precision.name) == (
      "fp16", "fp16")
  assert (typed.algorithm.correction_low,
          typed.algorithm.correction_high) == (0.95, 1.05)
  # The report on fake runs that carry the mismatch metrics.
  timing = {}
  for corr in ("none", "icepop"):
    for seed in (0, 1):
      key = f"runs/mismatch/dapo/train_fp32_sample_bf16/{corr}/seed{seed}"
      records, _ = _fake_run(tmp_path / key, rng)
      for r in records:
        for k in study_mismatch.KEYS:
          r[k] = float(rng.uniform(0, 1e-3))
        if corr != "none":
          r["corr/masked_frac"] = 0.0
      with open(tmp_path / key / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      timing[key] = 1.0
  (tmp_path / "timing.json").write_text(json.dumps(timing))
  files = study_mismatch.write_report(tmp_path)
  numbers = json.loads((tmp_path / "report" / "mismatch.json").read_text())
  run = numbers["dapo/train_fp32_sample_bf16/none"]["0"]
  records = logger.read_jsonl(
      tmp_path / "runs/mismatch/dapo/train_fp32_sample_bf16/none/seed0"
      / "metrics.jsonl")
  kl = [r["mismatch/kl_token"] for r in records]
  np.testing.assert_allclose(run["mismatch/kl_token"], np.mean(kl))
  np.testing.assert_allclose(
      run["corr_kl_entropy"],
      np.corrcoef(kl, [r["entropy/mean"] for r in records])[0, 1])
  for f in files:
    assert f.stat().st_size > 0, f
