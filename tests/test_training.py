"""The RL trainer: presets, controllers, resume, sharding, failures."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import entropo
from entropo.training import ALGORITHMS
from entropo.training import NonFiniteError
from entropo.training import Trainer
from entropo.training import algorithm
from entropo.training import load_policy
from entropo.training import train
from entropo.training import validate
from entropo.training import logger as logger_lib
from entropo.training import step as step_lib
from tests.training_setup import tiny_config
from tests.training_setup import warm_started

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOLATILE = ("time/", "throughput/")


@pytest.fixture(scope="module", name="init_from")
def _init_from(tmp_path_factory):
  return warm_started(tmp_path_factory.mktemp("warm"))


@pytest.fixture(scope="module", name="data_dir")
def _data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _config(init_from, data_dir, algo="grpo", **sections):
  c = tiny_config(algo, **sections)
  c.model.init_from = init_from
  c.data.data_dir = data_dir
  return c


def _records(workdir):
  return logger_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")


def _stable(record):
  return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


PRESETS = sorted(ALGORITHMS) + ["grpo+repo", "grpo+repo_d", "dapo+repo_r",
                                "dr_grpo+repo_r"]


@pytest.mark.parametrize("algo", PRESETS)
def test_every_preset_trains(algo, init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, algo, train=dict(iterations=2,
                                                    eval_every=2))
  if algo == "dapo":
    c.algo.minibatches = 2  # also covers the minibatch path
  final = train(c, tmp_path)
  records = _records(tmp_path)
  assert [r["iteration"] for r in records] == [0, 1]
  for r in records:
    assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
    assert r["entropy/mean"] > 0
    assert 0 <= r["reward/mean"] <= 1
    assert r["mismatch/max_abs_diff"] < 1e-4  # fp32 sampler == trainer
  assert "eval/pass@4" in final and final["eval/pass@4"] >= (
      final["eval/pass@1"])
  baseline = json.loads((tmp_path / "baseline.json").read_text())
  assert baseline["eval/entropy"] > 0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("algo,key", [
    ("grpo+repo_r", "controller/zeta"),
    ("adapo", "controller/clip_high"),
    ("entropy_adaptive", "controller/entropy_coef"),
])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_controllers_move_toward_the_target(algo, key, direction, init_from,
                                            data_dir, tmp_path):
  # A target far above (below) any entropy: the knob must rise (fall).
  target = 50.0 if direction == "up" else 1e-6
  c = _config(init_from, data_dir, algo,
              train=dict(iterations=3, eval_every=10))
  c.algo.target_entropy = target
  if algo == "adapo":
    c.algo.clip_high = 0.3  # room to move either way in [0.2, 0.4]
  if algo == "entropy_adaptive" and direction == "down":
    c.algo.entropy_coef = 0.01
  if algo == "grpo+repo_r":
    c.algo.zeta_sign_flip = False
  train(c, tmp_path)
  values = [r[key] for r in _records(tmp_path)]
  steps = np.diff(values)
  if direction == "up":
    assert np.all(steps > 0), values
  else:
    assert np.all(steps < 0), values


def test_resume_equals_an_uninterrupted_run(init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, "dapo+repo_r",
              train=dict(iterations=4, eval_every=2, checkpoint_every=2))
  train(c, tmp_path / "whole")
  whole = _records(tmp_path / "whole")
  c.train.iterations = 2
  train(c, tmp_path / "split")
  assert len(_records(tmp_path / "split")) == 2
  c.train.iterations = 4
  train(c, tmp_path / "split")
  split = _records(tmp_path / "split")
  assert [_stable(r) for r in split] == [_stable(r) for r in whole]
  a = Trainer(c, tmp_path / "whole").state["params"]
  b = Trainer(c, tmp_path / "split").state["params"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Each launch is recorded: where it started, how it computed.
  launches = json.loads((tmp_path / "split" / "run.json").read_text())[
      "launches"]
  assert [l["started_at_iteration"] for l in launches] == [0, 2]
  for launch in launches:
    assert launch["jax"] == jax.__version__
    assert launch["backend"] == jax.default_backend()
    assert launch["precision"] == entropo.get_precision("fp32").describe()
    assert launch["precision"]["dots"]["float32"]["algorithm"] == "F32_F32_F32"
    assert launch["attention"] == "blockwise"  # what auto means on CPU
    assert launch["remat"] == "none"
    assert launch["lora"] is None


def test_model_section_picks_attention_and_remat(init_from, data_dir,
                                                tmp_path):
  c = _config(init_from, data_dir,
              model=dict(attention="reference", remat="block"),
              train=dict(iterations=1))
  c.precision = "tf32"
  train(c, tmp_path)
  launch = json.loads((tmp_path / "run.json").read_text())["launches"][0]
  assert launch["attention"] == "reference"
  assert launch["remat"] == "block"
  assert launch["precision"]["preset"] == "tf32"
  dot = launch["precision"]["dots"]["float32"]
  assert dot["algorithm"] == "TF32_TF32_F32"
  assert dot["native"] == (jax.default_backend() == "gpu")
  trainer = Trainer(c, tmp_path)
  assert trainer.model.attention_implementation() == "reference"
  assert trainer.model.remat == "block"
  c.model.update(attention="blockwise", attention_chunk_size=4, remat="none")
  trainer = Trainer(c, tmp_path)
  assert trainer.model.attention_implementation() == "blockwise"
  assert trainer.model.config.attention_chunk_size == 4


# ------------------------------------------------------------------ LoRA

LORA = dict(lora_rank=4, lora_alpha=8.0,
            lora_targets="q_proj,v_proj,o_proj,down_proj")


def _lora_config(init_from, data_dir, algo="grpo", **sections):
  c = _config(init_from, data_dir, algo, **sections)
  c.model.update(LORA)
  return c


def _base_weights(init_from):
  model = entropo.models.from_pretrained(init_from)
  return nnx.to_flat_state(nnx.state(model))


def _assert_only_adapters_train(trainer, init_from):
  """The state holds adapters only; the frozen weights are init_from's."""
  params = nnx.to_flat_state(trainer.state["params"])
  assert params and all(isinstance(v, nnx.LoRAParam) for _, v in params)
  # 4 targets x (A, B) x 1 layer, and the optimizer's moments match them.
  assert len(params) == 8
  adapter_size = sum(v.get_value().size for _, v in params)
  opt_size = sum(np.size(x) for x in jax.tree.leaves(
      trainer.state["opt_state"]))
  assert adapter_size < opt_size <= 2 * adapter_size + 8
  frozen = dict(nnx.to_flat_state(trainer.frozen))
  base = _base_weights(init_from)
  assert set(frozen) == {path for path, _ in base}
  for path, var in base:
    np.testing.assert_array_equal(np.asarray(frozen[path].get_value()),
                                  np.asarray(var.get_value()))


@pytest.mark.parametrize("algo", ["dapo+repo_r", "adapo", "kl_cov", "gspo",
                                  "grpo+kl"])
def test_lora_trains_every_preset(algo, init_from, data_dir, tmp_path):
  c = _lora_config(init_from, data_dir, algo.removesuffix("+kl"),
                   train=dict(iterations=2, eval_every=2))
  if algo.endswith("+kl"):
    c.algo.kl_coef = 0.1
  train(c, tmp_path)
  records = _records(tmp_path)
  assert [r["iteration"] for r in records] == [0, 1]
  for r in records:
    assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
    assert r["mismatch/max_abs_diff"] < 1e-4  # the sampler is the policy
  if algo.endswith("+kl"):
    assert all(np.isfinite(r["kl/mean"]) for r in records)
  trainer = Trainer(c, tmp_path)
  assert trainer.meta["iteration"] == 2
  _assert_only_adapters_train(trainer, init_from)
  launch = json.loads((tmp_path / "run.json").read_text())["launches"][0]
  assert launch["lora"] == {"rank": 4, "alpha": 8.0, "targets": [
      "q_proj", "v_proj", "o_proj", "down_proj"]}


def _random_adapters(trainer, seed=0, scale=0.3):
  """Random non-zero adapters, each keeping its sharding."""
  rng = np.random.default_rng(seed)
  trainer.state["params"] = jax.tree.map(
      lambda x: jax.device_put(
          np.asarray(rng.normal(size=x.shape) * scale, x.dtype), x.sharding),
      trainer.state["params"])


def test_lora_samples_the_adapted_policy_and_kl_is_to_the_base(
    init_from, data_dir, tmp_path):
  c = _lora_config(init_from, data_dir)
  c.algo.kl_coef = 0.1
  trainer = Trainer(c, tmp_path)
  assert trainer.ref_params is None  # no second copy of the weights
  _random_adapters(trainer)
  roll, _ = trainer.collect(jax.random.key(3))
  roll.rewards = np.tile(np.float32([1, 0, 0, 1]), len(roll.rewards) // 4)
  batch, dyn = trainer.pre_update(roll)
  # The sampler's log-probs are the adapted trainer's.
  assert float(dyn["mismatch/max_abs_diff"]) < 1e-4
  mask = np.asarray(batch["mask"])
  base = entropo.models.from_pretrained(init_from)
  base_logps, _ = jax.jit(step_lib.sequence_logps)(
      base, batch["tokens"], batch["attention_mask"])
  # The KL reference is the base model (adapters off) ...
  np.testing.assert_allclose(np.asarray(batch["ref_logps"])[mask],
                             np.asarray(base_logps)[mask], rtol=1e-5,
                             atol=1e-5)
  # ... which the adapters really changed.
  assert np.abs(np.asarray(batch["old_logps"]) - np.asarray(
      batch["ref_logps"]))[mask].max() > 1e-2
  # One update moves the adapters, never the frozen base.
  before = jax.tree.map(np.asarray, trainer.state["params"])
  metrics = trainer.update(batch, jax.random.key(4))
  assert metrics["grad_norm"] > 0 and metrics["kl/mean"] > 0
  moved = [np.abs(np.asarray(x) - y).max() for x, y in zip(
      jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(before))]
  assert min(moved) > 0
  _assert_only_adapters_train(trainer, init_from)


def test_lora_resume_equals_an_uninterrupted_run(init_from, data_dir,
                                                 tmp_path):
  c = _lora_config(init_from, data_dir, "dapo+repo_r",
                   train=dict(iterations=4, eval_every=2, checkpoint_every=2))
  c.algo.kl_coef = 0.05
  train(c, tmp_path / "whole")
  whole = _records(tmp_path / "whole")
  c.train.iterations = 2
  train(c, tmp_path / "split")
  c.train.iterations = 4
  train(c, tmp_path / "split")
  split = _records(tmp_path / "split")
  assert [_stable(r) for r in split] == [_stable(r) for r in whole]
  a = Trainer(c, tmp_path / "whole")
  b = Trainer(c, tmp_path / "split")
  for tree in ("params", "opt_state"):
    for x, y in zip(jax.tree.leaves(a.state[tree]),
                    jax.tree.leaves(b.state[tree])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  _assert_only_adapters_train(b, init_from)
  # The checkpoint holds the adapters and their optimizer state only.
  saved = b.checkpointer.manager.item_metadata(4)["state"]
  names = {"/".join(map(str, path)) for path, _ in
           jax.tree_util.tree_flatten_with_path(saved)[0]}
  assert any("lora" in n for n in names)
  assert not any("embed_tokens" in n or n.endswith("q_proj") for n in names)
  b.checkpointer.close()
  a.checkpointer.close()
  # The trained policy hands off as a PEFT folder and as merged weights.
  policy, _ = load_policy(c, tmp_path / "split")
  tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 20, jnp.int32)
  want = np.asarray(policy.logits(tokens))
  entropo.models.save_lora(policy, tmp_path / "adapter")
  again = entropo.models.load_lora(
      entropo.models.from_pretrained(init_from), tmp_path / "adapter")
  np.testing.assert_array_equal(np.asarray(again.logits(tokens)), want)
  entropo.models.save_pretrained(entropo.models.merge_lora(policy),
                                 tmp_path / "merged")
  merged = entropo.models.from_pretrained(tmp_path / "merged")
  np.testing.assert_allclose(np.asarray(merged.logits(tokens)), want,
                             rtol=1e-5, atol=1e-5)


def test_half_written_checkpoint_is_ignored(init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=2,
                                              checkpoint_every=2))
  train(c, tmp_path)
  # What a crash in the middle of saving step 4 leaves behind.
  junk = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "partial").write_bytes(b"\0" * 10)
  trainer = Trainer(c, tmp_path)
  assert trainer.meta["iteration"] == 2


@pytest.mark.multidevice
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharded_update_equals_one_device(init_from, data_dir, tmp_path,
                                          lora):
  make = _lora_config if lora else _config
  one = Trainer(make(init_from, data_dir), tmp_path / "one")
  eight = Trainer(make(init_from, data_dir,
                       mesh=dict(data=2, fsdp=2, tensor=2)),
                  tmp_path / "eight")
  if lora:  # non-zero adapters, the same on both
    _random_adapters(one)
    _random_adapters(eight)
  assert len(eight.mesh.devices.flat) == 8
  roll, _ = one.collect(jax.random.key(3))
  # Mixed rewards in every group, whatever the tiny policy wrote.
  roll.rewards = np.tile(np.float32([1, 0, 0, 1]), len(roll.rewards) // 4)
  results = []
  for trainer in (one, eight):
    batch, dyn = trainer.pre_update(roll)
    metrics = trainer.update(batch, jax.random.key(4))
    results.append((dyn, metrics, trainer.state["params"]))
  (dyn1, m1, p1), (dyn8, m8, p8) = results
  assert m1["grad_norm"] > 0
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6,
                               err_msg=k)
  np.testing.assert_allclose(float(dyn8["entropy/mean"]),
                             float(dyn1["entropy/mean"]), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5,
                               atol=1e-6)
  if lora:
    spec = eight.frozen["embed_tokens"][...].sharding.spec
    adapter = eight.state["params"]["layers"][0]["mlp"]["lora"]["down_proj"]
    assert any(axis is not None for axis in adapter["a"][...].sharding.spec)
  else:
    spec = eight.state["params"]["embed_tokens"][...].sharding.spec
  assert any(axis is not None for axis in spec)  # really sharded


def test_non_finite_loss_stops_with_a_message(init_from, data_dir, tmp_path,
                                              monkeypatch):
  c = _config(init_from, data_dir, train=dict(iterations=4,
                                              checkpoint_every=2))
  train(c, tmp_path)  # checkpoints at iterations 2 and 4
  c.train.iterations = 6
  trainer = Trainer(c, tmp_path)
  update = trainer.learner.update

  def poisoned(*args):
    params, opt_state, metrics = update(*args)
    return params, opt_state, {**metrics, "grad_norm": np.float32("nan")}

  monkeypatch.setattr(trainer.learner, "update", poisoned)
  with pytest.raises(NonFiniteError, match="grad_norm=nan at iteration 4"):
    trainer.run()
  assert Trainer(c, tmp_path).meta["iteration"] == 4


def test_warm_start_of_zero_steps_saves_the_initial_model(tmp_path):
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.models import from_pretrained  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
  c = tiny_config(warm_start=dict(steps=0))
  path = warm_start.warm_start(c, config_lib.make_task(c.task),
                               tasks.char_tokenizer(), tmp_path / "ws")
  assert json.loads((path / "warm_start_loss.json").read_text()) == []
  assert from_pretrained(path).config.hidden_size == 32


@pytest.mark.parametrize("field,value,match", [
    ("algo.objective", "ppo2", "algo.objective"),
    ("algo.agg", "mean", "algo.agg"),
    ("algo.clip_high", -0.1, "algo.clip_high"),
    ("algo.minibatches", 3, "algo.minibatches"),
    ("algo.dual_clip", 0.5, "algo.dual_clip"),
    ("sampling.group_size", 1, "sampling.group_size"),
    ("train.pass_k", (1, 64), "train.pass_k"),
    ("precision", "fp8", "precision"),
    ("mesh.data", 16, "mesh"),
    ("warm_start.spread", 2.0, "warm_start.spread"),
    ("model.attention", "flash", "model.attention"),
    ("model.attention_chunk_size", 0, "model.attention_chunk_size"),
    ("model.remat", "full", "model.remat"),
    ("model.lora_rank", -1, "model.lora_rank"),
    ("model.lora_alpha", 0.0, "model.lora_alpha"),
    ("model.lora_targets", "q_proj,qkv", "model.lora_targets.*'qkv'"),
    ("model.lora_targets", "", "model.lora_targets.*empty"),
])
def test_bad_configs_name_the_field(field, value, match):
  c = tiny_config()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    validate(c)


def test_unknown_algorithm():
  with pytest.raises(ValueError, match="Unknown algorithm 'ppo'"):
    algorithm("ppo")
  with pytest.raises(ValueError, match="modifier 'repo_x'"):
    algorithm("grpo+repo_x")
  assert algorithm("dapo+repo_r")["repo"] == "repo_r"
  assert algorithm("dapo+repo_r")["clip_high"] == 0.28


def test_launcher_rejects_a_bad_override_before_compute(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/countdown.py:dapo",
       f"--workdir={tmp_path}", "--config.algo.agg=mean"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "algo.agg" in proc.stderr + proc.stdout
  assert not (tmp_path / "warm_start").exists()


@pytest.mark.slow
def test_launcher_runs_a_tiny_experiment(init_from, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/countdown.py:adapo",
       f"--workdir={tmp_path}", f"--init_from={init_from}",
       "--config.model.num_layers=1", "--config.data.train_size=64",
       "--config.data.eval_size=4", "--config.sampling.prompts_per_batch=2",
       "--config.sampling.group_size=4", "--config.sampling.max_new_tokens=8",
       "--config.train.iterations=2", "--config.train.eval_every=2",
       "--config.train.eval_samples=4", "--config.train.pass_k=(1,4)",
       "--config.train.progress=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final:" in proc.stdout
  assert len(_records(tmp_path)) == 2
  for name in ("entropy", "reward", "pass_at_k"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_gsm8k_config_names_what_is_missing(tmp_path):
  from experiments.configs import gsm8k_hf  # pylint: disable=g-import-not-at-top
  c = gsm8k_hf.get_config("dapo+repo_r")
  with pytest.raises(ValueError, match="task.path"):
    validate(c)
  c.task.path = str(tmp_path)
  with pytest.raises(ValueError, match="model.init_from"):
    validate(c)
  c.model.init_from = str(tmp_path)
  validate(c)
  assert c.precision == "bf16_fp32_head" and c.algo.repo == "repo_r"
