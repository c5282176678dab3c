"""The RL trainer: presets, controllers, resume, sharding, failures."""

import importlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import entropo
from entropo.training import ALGORITHMS
from entropo.training import NonFiniteError
from entropo.training import Trainer
from entropo.training import guards
from entropo.training import load_policy
from entropo.training import preset
from entropo.training import train
from entropo.training import validate
from entropo.training import logger as logger_lib
from entropo.training import step as step_lib
from entropo.training.state import LaunchCounts
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
    c.algo.zeta.sign_flip = False
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
  a = Trainer(c, tmp_path / "whole").state.params
  b = Trainer(c, tmp_path / "split").state.params
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


def test_resume_with_a_changed_config_is_refused(init_from, data_dir,
                                                 tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=2,
                                              checkpoint_every=2))
  train(c, tmp_path)
  first = (tmp_path / "config.json").read_text()
  c.train.update(iterations=3, eval_every=3)  # these may change
  c.algo.clip_high = 0.3
  c.seed = 5
  with pytest.raises(ValueError) as error:
    train(c, tmp_path)
  message = str(error.value)
  assert "algo.clip_high: 0.2 -> 0.3" in message
  assert "seed: 0 -> 5" in message
  assert "train.iterations:" not in message and "eval_every:" not in message
  assert "--allow_config_change" in message
  assert (tmp_path / "config.json").read_text() == first  # refused: untouched
  assert len(_records(tmp_path)) == 2
  # A workdir from before the config history: its config.json is kept too.
  shutil.rmtree(tmp_path / "configs")
  c.train.allow_config_change = True
  train(c, tmp_path)
  assert [r["iteration"] for r in _records(tmp_path)] == [0, 1, 2]
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 5
  kept = sorted(p.name for p in (tmp_path / "configs").iterdir())
  assert kept == ["config-0.json", "config-1.json"]
  assert (tmp_path / "configs" / "config-0.json").read_text() == first
  launches = json.loads((tmp_path / "run.json").read_text())["launches"]
  assert [l["config"] for l in launches] == ["configs/config-0.json",
                                             "configs/config-1.json"]


def test_launcher_refuses_a_changed_config_before_compute(tmp_path):
  from experiments.configs import countdown  # pylint: disable=g-import-not-at-top
  saved = countdown.get_config("dapo")
  saved.optim.learning_rate = 3e-4
  (tmp_path / "config.json").write_text(saved.to_json_best_effort())
  (tmp_path / "checkpoints" / "20").mkdir(parents=True)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/countdown.py:dapo",
       f"--workdir={tmp_path}", "--config.train.iterations=100"],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode != 0
  assert "optim.learning_rate: 0.0003 -> 0.0001" in proc.stderr + proc.stdout
  assert "iterations" not in (proc.stderr + proc.stdout).split(
      "would silently change")[1].split("Use another")[0]
  assert not (tmp_path / "warm_start").exists()


def test_rerun_of_a_finished_run_returns_its_final_metrics(
    init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=2, eval_every=2))
  final = train(c, tmp_path)
  assert "eval/pass@1" in final
  again = train(c, tmp_path)
  assert _stable(again) == _stable(final)
  assert len(_records(tmp_path)) == 2


def _tensorboard_tags(directory) -> set[str]:
  """The scalar tags of the event files under `directory`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in pathlib.Path(directory).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecords: length, crc, payload, crc
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      offset += 16 + length
  return tags


def test_tensorboard_tags_spell_pass_at_k(tmp_path):
  assert logger_lib.tensorboard_tag("eval/pass@16") == "eval/pass_at_16"
  assert logger_lib.tensorboard_tag("reward/mean") == "reward/mean"
  logger = logger_lib.MetricLogger(tmp_path, total=1, progress=False)
  logger.write(0, {"eval/pass@4": 0.5, "entropy/mean": 1.0})
  logger.close()
  assert _tensorboard_tags(tmp_path / "tensorboard") == {
      "eval/pass_at_4", "entropy/mean"}


def _tensorboard_steps(directory) -> list[tuple[str, int]]:
  """`(tag, step)` of every scalar TensorBoard shows: events read file by
  file, a SessionLog START at step s hiding the earlier events at s or
  later (its purge rule)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  shown = []
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        shown = [(t, s) for t, s in shown if s < event.step]
      shown += [(v.tag, event.step) for v in event.summary.value]
  return shown


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
  logger = logger_lib.MetricLogger(tmp_path, total=4, progress=False)
  for i in range(4):  # a launch killed after logging 4 iterations ...
    logger.write(i, {"reward/mean": float(i)})
  logger.close()
  time.sleep(1.1)  # event file names hold the second they were made
  logger = logger_lib.MetricLogger(tmp_path, total=4, start=2,
                                   progress=False)  # ... resumed from 2
  for i in range(2, 4):
    logger.write(i, {"reward/mean": 10.0 + i})
  logger.close()
  steps = _tensorboard_steps(tmp_path / "tensorboard")
  assert sorted(steps) == [("reward/mean", i) for i in range(4)]


def _write_run(workdir, entropies, pass_at_1):
  workdir.mkdir()
  logger = logger_lib.MetricLogger(workdir, total=len(entropies),
                                   tensorboard=False, progress=False)
  for i, (h, p) in enumerate(zip(entropies, pass_at_1)):
    logger.write(i, {"entropy/mean": h, "target_entropy": 0.5,
                     "reward/mean": p, "eval/pass@1": p, "eval/pass@4": p,
                     "eval/entropy": h})
  logger.close()
  logger_lib.write_baseline(workdir, {"eval/pass@1": 0.1, "eval/pass@4": 0.2,
                                      "eval/entropy": 0.7})


def test_plots_have_axis_labels_and_overlay_runs(tmp_path, monkeypatch):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  _write_run(tmp_path / "grpo", [0.7, 0.5, 0.3], [0.1, 0.2, 0.3])
  _write_run(tmp_path / "repo", [0.7, 0.65, 0.6], [0.1, 0.25, 0.35])
  drawn = {}
  savefig = Figure.savefig

  def record(fig, path, **kwargs):
    ax = fig.axes[0]
    drawn[pathlib.Path(path).stem] = (
        ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
        [line.get_label() for line in ax.lines])
    return savefig(fig, path, **kwargs)

  monkeypatch.setattr(Figure, "savefig", record)
  logger_lib.plot_run(tmp_path / "grpo" / "metrics.jsonl", tmp_path / "one")
  title, x_label, y_label, labels = drawn["entropy"]
  assert y_label == "nats / token" and "iteration" in x_label
  assert labels == ["entropy", "target entropy"]
  assert drawn["pass_at_k"][2:] == ("pass@k", ["pass@1", "pass@4"])
  assert all(d[2] for d in drawn.values())  # every panel labels its y axis
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.plot", f"--out={tmp_path / 'cmp'}",
       f"GRPO={tmp_path / 'grpo'}", str(tmp_path / "repo")],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("entropy", "reward", "entropy_eval", "pass_at_k"):
    assert (tmp_path / "cmp" / f"{name}.png").stat().st_size > 1000
  logger_lib.plot_runs({"GRPO": tmp_path / "grpo", "REPO": tmp_path / "repo"},
                       tmp_path / "cmp2")
  assert drawn["pass_at_k"][3] == ["GRPO: pass@1", "GRPO: pass@4",
                                   "REPO: pass@1", "REPO: pass@4"]
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    logger_lib.plot_runs([tmp_path / "one"], tmp_path / "cmp3")
  # Workdirs that share a name keep one curve each.
  for seed in (0, 1):
    shutil.copytree(tmp_path / "grpo", tmp_path / f"seed{seed}" / "grpo")
  logger_lib.plot_runs([tmp_path / "seed0/grpo", tmp_path / "seed1/grpo"],
                       tmp_path / "cmp4")
  assert drawn["pass_at_k"][3] == ["seed0/grpo: pass@1", "seed0/grpo: pass@4",
                                   "seed1/grpo: pass@1", "seed1/grpo: pass@4"]
  assert logger_lib.run_labels(["a/grpo", "b/repo"]) == ["grpo", "repo"]


def test_sampling_steps_per_check_reaches_the_sampler(init_from, data_dir,
                                                     tmp_path, monkeypatch):
  # The block length changes no token (tests/test_sampler.py), so only the
  # call can show that the field arrives.
  from entropo.training import rollouts as rollouts_lib  # pylint: disable=g-import-not-at-top
  seen, real = [], rollouts_lib.sample
  def spy(*args, **kwargs):
    seen.append(kwargs["steps_per_check"])
    return real(*args, **kwargs)
  monkeypatch.setattr(rollouts_lib, "sample", spy)
  c = _config(init_from, data_dir, sampling=dict(steps_per_check=3),
              train=dict(iterations=1, eval_every=1))
  train(c, tmp_path)
  assert len(seen) >= 2 and set(seen) == {3}  # rollouts and evaluation


def test_in_flight_sampling_trains_the_static_run(init_from, data_dir,
                                                  tmp_path):
  # Same key, same tokens (tests/test_inflight.py): one iteration with
  # in-flight batching logs the static run's rewards and lengths, and
  # run.json records the batching.
  runs = {}
  for name, slots in (("static", 0), ("inflight", 3)):
    c = _config(init_from, data_dir, sampling=dict(in_flight_slots=slots),
                train=dict(iterations=1))
    train(c, tmp_path / name)
    runs[name] = _records(tmp_path / name)[-1]
    launch = json.loads((tmp_path / name / "run.json").read_text())[
        "launches"][0]
    runs[name + "/batching"] = launch["sampler_batching"]
  assert runs["static/batching"] == {"mode": "static"}
  assert runs["inflight/batching"] == {"mode": "in_flight", "slots": 3,
                                       "refill_rows": 1}
  for key in ("reward/mean", "completion/length"):
    assert runs["inflight"][key] == runs["static"][key], key
  assert runs["inflight"]["loss"] == pytest.approx(runs["static"]["loss"],
                                                   abs=1e-5)


def test_model_section_picks_attention_and_remat(init_from, data_dir,
                                                tmp_path):
  c = _config(init_from, data_dir,
              model=dict(attention="reference", remat="block",
                         scan_layers=True),
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
  assert trainer.model.scan_layers and launch["scan_layers"]
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
  params = nnx.to_flat_state(trainer.state.params)
  assert params and all(isinstance(v, nnx.LoRAParam) for _, v in params)
  # 4 targets x (A, B) x 1 layer, and the optimizer's moments match them.
  assert len(params) == 8
  adapter_size = sum(v.get_value().size for _, v in params)
  opt_size = sum(np.size(x) for x in jax.tree.leaves(
      trainer.state.opt_state))
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
  assert trainer.meta.iteration == 2
  _assert_only_adapters_train(trainer, init_from)
  launch = json.loads((tmp_path / "run.json").read_text())["launches"][0]
  assert launch["lora"] == {"rank": 4, "alpha": 8.0, "targets": [
      "q_proj", "v_proj", "o_proj", "down_proj"], "base_dtype": "float32"}


@pytest.mark.slow
def test_lora_base_in_the_compute_dtype_trains_identically(
    init_from, data_dir, tmp_path):
  """`model.lora_base_dtype="compute"` under bf16: the base's projections
  are stored in bfloat16 (half the bytes), and since every use cast them
  to bfloat16 anyway, the run is bitwise the float32-stored one."""
  records = {}
  for base in ("param", "compute"):
    c = _lora_config(init_from, data_dir, train=dict(iterations=2,
                                                     eval_every=2))
    c.precision = "bf16"
    c.model.lora_base_dtype = base
    train(c, tmp_path / base)
    records[base] = _records(tmp_path / base)
    trainer = Trainer(c, tmp_path / base)
    frozen = dict(nnx.to_flat_state(trainer.frozen))
    want = jnp.bfloat16 if base == "compute" else jnp.float32
    proj = [v for path, v in frozen.items() if path[-1].endswith("_proj")]
    assert len(proj) == 7 and all(v.get_value().dtype == want for v in proj)
    assert frozen[("embed_tokens",)].get_value().dtype == jnp.float32
    launch = json.loads((tmp_path / base / "run.json").read_text())
    assert launch["launches"][0]["lora"]["base_dtype"] == jnp.dtype(
        want).name
  for a, b in zip(records["param"], records["compute"]):
    for key in ("loss", "grad_norm", "entropy/mean", "reward/mean"):
      assert a[key] == b[key], (key, a[key], b[key])


def _random_adapters(trainer, seed=0, scale=0.3):
  """Random non-zero adapters, each keeping its sharding."""
  rng = np.random.default_rng(seed)
  trainer.state = trainer.state.replace(params=jax.tree.map(
      lambda x: jax.device_put(
          np.asarray(rng.normal(size=x.shape) * scale, x.dtype), x.sharding),
      trainer.state.params))


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
  before = jax.tree.map(np.asarray, trainer.state.params)
  metrics = trainer.update(batch, jax.random.key(4))
  assert metrics["grad_norm"] > 0 and metrics["kl/mean"] > 0
  moved = [np.abs(np.asarray(x) - y).max() for x, y in zip(
      jax.tree.leaves(trainer.state.params), jax.tree.leaves(before))]
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
    for x, y in zip(jax.tree.leaves(getattr(a.state, tree)),
                    jax.tree.leaves(getattr(b.state, tree))):
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
  _check_load_policy_reads_the_run(c, tmp_path, tokens, want)


def _check_load_policy_reads_the_run(c, tmp_path, tokens, want):
  """`load_policy(workdir)` uses the run's config.json; a config that
  differs from it is refused naming each field, before any work."""
  policy, _ = load_policy(tmp_path / "split")
  np.testing.assert_array_equal(np.asarray(policy.logits(tokens)), want)
  # The same folder spelt relative to the working directory is no change.
  relative = c.copy_and_resolve_references()
  relative.model.init_from = os.path.relpath(c.model.init_from)
  load_policy(relative, tmp_path / "split")
  for field, value, change in [
      ("lora_alpha", 32.0, "model.lora_alpha: 8.0 -> 32.0"),
      ("lora_rank", 0, "model.lora_rank: 4 -> 0"),
      ("init_from", "", "model.init_from: '.*' -> ''")]:
    wrong = c.copy_and_resolve_references()
    wrong.model[field] = value
    with pytest.raises(ValueError, match=f"differs from the run's in .*"
                       f"config.json \\(run's -> given\\):\n  {change}"):
      load_policy(wrong, tmp_path / "split")
  assert not (tmp_path / "split" / "warm_start").exists()  # nothing trained
  with pytest.raises(ValueError, match="holds no run: no config.json"):
    load_policy(tmp_path / "adapter")
  # docs/training.md's hand-off runs as written, outside the repository.
  doc = (ROOT / "docs" / "training.md").read_text().split("## LoRA")[1]
  code = textwrap.dedent(re.search(r"```python\n(.*?)```", doc,
                                   re.S).group(1))
  code = code.replace("/tmp/entropo/gsm8k_lora", str(tmp_path / "split"))
  for name in ("adapter", "merged"):
    code = code.replace(f"/tmp/{name}", f"{tmp_path}/doc_{name}")
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    exec(compile(code, "docs/training.md", "exec"), {})  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
  for name in ("doc_adapter/adapter_model.safetensors",
               "doc_merged/model.safetensors", "doc_merged/tokenizer.json"):
    mode = (tmp_path / name).stat().st_mode & 0o777
    assert mode & 0o044 == 0o044, (name, oct(mode))  # not private


def test_half_written_checkpoint_is_ignored(init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=2,
                                              checkpoint_every=2))
  train(c, tmp_path)
  # What a crash in the middle of saving step 4 leaves behind.
  junk = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "partial").write_bytes(b"\0" * 10)
  trainer = Trainer(c, tmp_path)
  assert trainer.meta.iteration == 2


def _damage(step_dir: pathlib.Path, how: str) -> None:
  """Damages the files of a complete Orbax step the way `how` says."""
  files = [f for f in step_dir.rglob("*") if f.is_file()]
  if how == "truncated_data":
    targets = [f for f in files if f.parent.name == "d"]
  elif how == "garbage_manifest":
    targets = [f for f in files if f.name == "manifest.ocdbt"]
  else:  # garbage_metadata
    targets = [f for f in files if f.name in ("_METADATA", "metadata")]
  assert targets, how
  for f in targets:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2] if how == "truncated_data"
                  else b"\x00garbage" * 8)


@pytest.mark.parametrize("how", ["truncated_data", "garbage_manifest",
                                 "garbage_metadata"])
def test_a_damaged_latest_checkpoint_falls_back(how, init_from, data_dir,
                                                tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=4,
                                              checkpoint_every=2))
  train(c, tmp_path)
  whole = _records(tmp_path)
  _damage(tmp_path / "checkpoints" / "4", how)
  with pytest.warns(UserWarning, match="checkpoints/4 does not restore"):
    trainer = Trainer(c, tmp_path)
  trainer.checkpointer.close()
  assert trainer.meta.iteration == 2
  assert (tmp_path / "checkpoints_corrupt" / "4").is_dir()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2"]
  # The rerun redoes iterations 2 and 3 exactly and saves step 4 again.
  train(c, tmp_path)
  assert [_stable(r) for r in _records(tmp_path)] == [_stable(r)
                                                       for r in whole]
  assert Trainer(c, tmp_path).meta.iteration == 4


def test_no_checkpoint_restores_is_a_clear_error(init_from, data_dir,
                                                 tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=4,
                                              checkpoint_every=2))
  train(c, tmp_path)
  for step in ("2", "4"):
    _damage(tmp_path / "checkpoints" / step, "garbage_metadata")
  with pytest.warns(UserWarning, match="does not restore"):
    with pytest.raises(RuntimeError, match="No checkpoint in .* restores:"
                       "\n  step 4: .*\n  step 2: "):
      Trainer(c, tmp_path)
  assert not (tmp_path / "checkpoints_corrupt").exists()  # nothing moved


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
    results.append((dyn, metrics, trainer.state.params))
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
    adapter = eight.state.params["layers"][0]["mlp"]["lora"]["down_proj"]
    assert any(axis is not None for axis in adapter["a"][...].sharding.spec)
  else:
    spec = eight.state.params["embed_tokens"][...].sharding.spec
  assert any(axis is not None for axis in spec)  # really sharded


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", [None, dict(data=2, fsdp=2, tensor=2)],
                         ids=["one", "eight"])
def test_packed_update_equals_the_padded_update(init_from, data_dir, tmp_path,
                                                mesh):
  """`train.packing`: the pre-update pass over the packed batch and the
  same minibatches, each packed, give the padded pre-update metrics, the
  update's metrics and parameters to float32 rounding (two minibatches,
  so the packed rows are gathered per minibatch; on 8 devices the packed
  rows are a multiple of the 4 data shards)."""
  def config(packing):
    c = _config(init_from, data_dir, train=dict(packing=packing),
                **({"mesh": mesh} if mesh else {}))
    c.algo.minibatches = 2
    return c

  padded = Trainer(config(False), tmp_path / "padded")
  packed = Trainer(config(True), tmp_path / "packed")
  roll, _ = padded.collect(jax.random.key(3))
  roll.rewards = np.tile(np.float32([1, 0, 0, 1]), len(roll.rewards) // 4)
  results = []
  for trainer in (padded, packed):
    batch, dyn = trainer.pre_update(roll)
    assert ("segment_ids" in trainer.minibatches.packed(batch)) == (
        trainer is packed)
    metrics = trainer.update(batch, jax.random.key(4))
    results.append(({**dyn, **metrics}, trainer.state.params))
  (m1, p1), (m2, p2) = results
  assert m1["grad_norm"] > 0 and m1.keys() == m2.keys()
  for k in m1:  # the pre-update metrics (entropy, mismatch) too
    np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=1e-6,
                               err_msg=k)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.multidevice
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_minibatches_by_tokens_on_four_data_shards(init_from, data_dir,
                                                   tmp_path, packing):
  """`train.minibatch_tokens` on data x fsdp = 4 shards: each minibatch by
  tokens (here of 2 to 3 rows) is padded with empty rows to a multiple of
  the 4 shards, and the update's metrics and parameters equal one
  device's (minibatches of their real rows, no padding) to float32
  rounding, padded and packed (8 row buckets: on one device each row
  count is its own). (The pre-update pass does not depend on
  minibatch_tokens; its metrics on a mesh are
  test_sharded_update_equals_one_device's.)"""
  def config(mesh):
    c = _config(init_from, data_dir,
                train=dict(packing=packing, row_buckets=8),
                **({"mesh": mesh} if mesh else {}))
    c.train.minibatch_tokens = 2 * (c.data.max_prompt_len
                                    + c.sampling.max_new_tokens)
    return c

  one = Trainer(config(None), tmp_path / "one")
  eight = Trainer(config(dict(data=2, fsdp=2, tensor=2)), tmp_path / "eight")
  assert eight.placement.shards == 4
  roll, _ = one.collect(jax.random.key(3))
  roll.rewards = np.tile(np.float32([1, 0, 0, 1]), len(roll.rewards) // 4)
  sizes = {one: [], eight: []}
  results = []
  for trainer in (one, eight):
    real = trainer.learner.update
    def spy(params, opt_state, mb, *args, real=real, seen=sizes[trainer]):
      has_tokens = np.asarray(mb["attention_mask"]).any(axis=1)
      seen.append((len(has_tokens), np.asarray(mb["tokens"])[has_tokens]))
      return real(params, opt_state, mb, *args)
    trainer.learner.update = spy
    batch, dyn = trainer.pre_update(roll)
    metrics = trainer.update(batch, jax.random.key(4))
    results.append(({**metrics, "entropy/mean": float(dyn["entropy/mean"])},
                    trainer.state.params))
  # The same minibatches; on one device unpadded, on 4 shards padded to
  # 4 or 8 rows, from minibatches of row counts 4 does not divide.
  assert len(sizes[one]) == len(sizes[eight]) > 1
  for (rows1, mb1), (rows8, mb8) in zip(sizes[one], sizes[eight]):
    np.testing.assert_array_equal(mb8, mb1)
    assert rows1 == len(mb1) and rows8 % 4 == 0
  assert any(len(mb) % 4 for _, mb in sizes[one])  # the padding is exercised
  (m1, p1), (m8, p8) = results
  assert m1["grad_norm"] > 0 and m1.keys() == m8.keys()
  assert m1["train/optimizer_steps"] == len(sizes[one])
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6,
                               err_msg=k)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5,
                               atol=1e-6)


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
  assert Trainer(c, tmp_path).meta.iteration == 4


@pytest.fixture(name="resumed")
def _resumed(init_from, data_dir, tmp_path):
  """A run of 4 iterations (checkpoints at 2 and 4) and its config, set to
  continue to 6."""
  c = _config(init_from, data_dir, train=dict(iterations=4,
                                              checkpoint_every=2))
  train(c, tmp_path)
  c.train.iterations = 6
  return c, tmp_path


def _poison(monkeypatch, trainer, times=None, **values):
  """Makes `trainer`'s next `times` updates (all: None) report `values`."""
  update = trainer.learner.update
  calls = []

  def poisoned(*args):
    params, opt_state, metrics = update(*args)
    calls.append(1)
    if times is None or len(calls) <= times:
      metrics = {**metrics, **{k: np.float32(v) for k, v in values.items()}}
    return params, opt_state, metrics

  monkeypatch.setattr(trainer.learner, "update", poisoned)


def test_infinite_loss_stops_and_names_it(resumed, monkeypatch):
  c, workdir = resumed
  trainer = Trainer(c, workdir)
  _poison(monkeypatch, trainer, loss=np.inf)
  with pytest.raises(NonFiniteError, match="Non-finite loss=inf at iteration "
                     "4 \\(epoch 0, minibatch 0\\); stopping"):
    trainer.run()
  assert Trainer(c, workdir).meta.iteration == 4


def test_a_broken_policy_stops_before_the_controllers_step(resumed):
  c, workdir = resumed
  trainer = Trainer(c, workdir)
  trainer.state = trainer.state.replace(params=jax.tree.map(
      lambda x: x * np.nan, trainer.state.params))
  with pytest.raises(NonFiniteError, match="Non-finite entropy/mean=nan at "
                     "iteration 4; also non-finite: .* and \\d+ more; "
                     "stopping"):
    trainer.run()
  assert Trainer(c, workdir).meta.iteration == 4


def test_non_finite_parameters_are_never_saved(resumed):
  c, workdir = resumed
  trainer = Trainer(c, workdir)
  trainer.state = trainer.state.replace(params=jax.tree.map(
      lambda x: x * np.inf, trainer.state.params))
  trainer.meta = trainer.meta.replace(iteration=6)
  with pytest.raises(NonFiniteError, match="Non-finite state\\['params'\\]"
                     ".* after iteration 5 .*; not saving it"):
    trainer.save()
  trainer.checkpointer.close()
  assert Trainer(c, workdir).meta.iteration == 4


def test_skip_non_finite_skips_and_counts(resumed, monkeypatch):
  c, workdir = resumed
  c.train.skip_non_finite = True
  trainer = Trainer(c, workdir)
  before = jax.tree.map(np.asarray, trainer.state.params)
  _poison(monkeypatch, trainer, times=1, grad_norm=np.nan)
  update = trainer.update
  applied = []

  def checked(*args):
    out = update(*args)
    applied.append(jax.tree.map(np.asarray, trainer.state.params))
    return out

  monkeypatch.setattr(trainer, "update", checked)
  with pytest.warns(UserWarning, match="skipping the update of iteration 4 "
                    "\\(epoch 0, minibatch 0\\): non-finite grad_norm"):
    trainer.run()
  # Iteration 4's only minibatch was skipped: its parameters did not move.
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(applied[0])):
    np.testing.assert_array_equal(x, y)
  records = _records(workdir)[4:]
  assert [r["train/skipped_minibatches"] for r in records] == [1, 0]
  assert [r["train/skipped_minibatches_total"] for r in records] == [1, 1]
  assert "loss" not in records[0] and np.isfinite(records[1]["loss"])
  assert Trainer(c, workdir).meta.skipped_minibatches == 1


def _adam_with_b2_one(trainer):
  """Gives `trainer` AdamW with b2 = 1: finite losses and gradients, but
  NaN updates (the bias correction divides 0 by 1 - b2^t = 0)."""
  import optax  # pylint: disable=g-import-not-at-top
  c = trainer.config
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(1e-4, b1=0.9, b2=1.0))
  trainer.learner = step_lib.Learner(
      trainer.graphdef, trainer.algorithm, optimizer,
      max_new_tokens=c.sampling.max_new_tokens,
      group_size=c.sampling.group_size)


def test_a_non_finite_update_is_caught_before_it_is_applied(resumed):
  c, workdir = resumed
  trainer = Trainer(c, workdir)
  _adam_with_b2_one(trainer)
  with pytest.raises(NonFiniteError, match="Non-finite update: the "
                     "parameters or optimizer state after the update of "
                     "iteration 4 \\(epoch 0, minibatch 0\\) are "
                     "non-finite, with a finite loss and gradient norm.*not "
                     "applied; stopping. The latest checkpoint, iteration 4 "
                     "in .*checkpoints, is good"):
    trainer.run()
  assert all(np.isfinite(x).all()
             for x in jax.tree.leaves(trainer.state.params))
  assert Trainer(c, workdir).meta.iteration == 4


def test_a_non_finite_update_before_any_checkpoint_says_so(
    init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=2,
                                              checkpoint_every=2))
  trainer = Trainer(c, tmp_path)
  _adam_with_b2_one(trainer)
  with pytest.raises(NonFiniteError, match="iteration 0 .*No checkpoint was "
                     "written yet \\(the first is at iteration 2"):
    trainer.run()
  c.train.skip_non_finite = True
  trainer = Trainer(c, tmp_path)
  _adam_with_b2_one(trainer)
  with pytest.warns(UserWarning, match="skipping the update: the parameters "
                    "or optimizer state after the update of iteration 0"):
    trainer.run()
  assert _records(tmp_path)[-1]["train/skipped_minibatches_total"] == 2


def test_ctrl_c_during_a_save_finishes_it_and_says_so(init_from, data_dir,
                                                     tmp_path, monkeypatch,
                                                     capsys):
  c = _config(init_from, data_dir, train=dict(iterations=2,
                                              checkpoint_every=2))
  trainer = Trainer(c, tmp_path)
  save = trainer.checkpointer.save

  def interrupted_save(*args):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the save starts
    save(*args)

  monkeypatch.setattr(trainer.checkpointer, "save", interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    trainer.run()
  assert ("interrupted while saving the checkpoint of iteration 2; finished "
          "the save first" in capsys.readouterr().out)
  assert Trainer(c, tmp_path).meta.iteration == 2


def test_ctrl_c_during_an_iteration_saves_the_state_before_it(
    resumed, monkeypatch, capsys):
  c, workdir = resumed  # checkpoints at 2 and 4, continuing to 6
  for calls, line in [(2, "interrupted in iteration 5; saved the state "
                       "before it"),
                      (1, "interrupted in iteration 5; the checkpoint of the "
                       "state before it exists already")]:
    trainer = Trainer(c, workdir)
    iteration, count = trainer.iteration, []

    def interrupted(iteration=iteration, count=count, calls=calls):
      count.append(1)
      if len(count) == calls:
        raise KeyboardInterrupt
      return iteration()

    monkeypatch.setattr(trainer, "iteration", interrupted)
    with pytest.raises(KeyboardInterrupt):
      trainer.run()
    assert line in capsys.readouterr().out
    assert Trainer(c, workdir).meta.iteration == 5


def test_a_ctrl_c_in_training_waits_for_a_safe_point(capfd):
  """The first Ctrl-C is raised at the next `check()`, not where the main
  thread happens to be (inside a library, which a raise there can leave
  half-done); a second raises at once; outside the block, the previous
  handler is back."""
  interrupts, before = guards.DeferredInterrupts(), signal.getsignal(
      signal.SIGINT)
  with interrupts:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs: nothing raised here
    assert "stopping at the next safe point" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      interrupts.check()
    interrupts.check()  # once only
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before
  interrupts.check()  # nothing pending after the block


def test_ctrl_c_in_the_warm_start_keeps_its_progress(tmp_path, monkeypatch,
                                                     capsys):
  """A warm start interrupted at step 10 (a Ctrl-C: SIGINT) or 25 (an
  interrupt raised in the step), then rerun, equals one never interrupted:
  the same losses and the same weights."""
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
  stale = tmp_path / "split.tmp-999999999"  # a killed process's
  stale.mkdir()
  c = tiny_config()
  task, tok = config_lib.make_task(c.task), tasks.char_tokenizer()
  whole = warm_start.warm_start(c, task, tok, tmp_path / "whole")
  sft_step, calls = step_lib.sft_step, []

  def step(*args):
    calls.append(1)
    if len(calls) == 10:
      os.kill(os.getpid(), signal.SIGINT)  # held until this step is done
    if len(calls) == 10 + 16:
      raise KeyboardInterrupt
    return sft_step(*args)

  monkeypatch.setattr(step_lib, "sft_step", step)
  for stopped_at in (10, 25):
    with pytest.raises(KeyboardInterrupt):
      warm_start.warm_start(c, task, tok, tmp_path / "split")
    out = capsys.readouterr().out
    assert (f"interrupted in the warm start at step {stopped_at} of 40; "
            f"saved its progress to {tmp_path}/split.partial.npz") in out
    assert not (tmp_path / "split").exists() and not stale.exists()
  split = warm_start.warm_start(c, task, tok, tmp_path / "split")
  assert "continuing from step 25" in capsys.readouterr().out
  assert not (tmp_path / "split.partial.npz").exists()
  for name in ("warm_start_loss.json", "model.safetensors"):
    assert (whole / name).read_bytes() == (split / name).read_bytes(), name


def test_warm_start_of_zero_steps_saves_the_initial_model(tmp_path):
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.models import from_pretrained  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
  c = tiny_config(warm_start=dict(steps=0))
  path = warm_start.warm_start(c, config_lib.make_task(c.task),
                               tasks.char_tokenizer(), tmp_path / "ws")
  assert json.loads((path / "warm_start_loss.json").read_text()) == []
  settings = json.loads((path / "warm_start.json").read_text())
  assert (settings["steps"], settings["spread"]) == (0, c.warm_start.spread)
  assert settings["model_seed"] == c.seed
  assert from_pretrained(path).config.hidden_size == 32


def _interrupt_writes(monkeypatch):
  """Every file opened for writing gets half of its first write, then a
  KeyboardInterrupt: what a kill in the middle of writing leaves."""

  class Torn:

    def __init__(self, f):
      self.f = f

    def write(self, text):
      self.f.write(text[:len(text) // 2])
      self.f.flush()
      raise KeyboardInterrupt

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def __getattr__(self, name):
      return getattr(self.f, name)

  def wrap(real):
    def opener(target, mode="r", *args, **kwargs):
      f = real(target, mode, *args, **kwargs)
      return Torn(f) if "w" in mode else f
    return opener

  monkeypatch.setattr(pathlib.Path, "open", wrap(pathlib.Path.open))
  monkeypatch.setattr(os, "fdopen", wrap(os.fdopen))


def test_run_files_survive_a_kill_while_writing(tmp_path, monkeypatch):
  c = tiny_config()
  logger_lib.write_run_metadata(tmp_path, c, {"launch": 1})
  logger_lib.write_baseline(tmp_path, {"eval/entropy": 1.0})

  def files():
    return {str(f.relative_to(tmp_path)): f.read_text()
            for f in tmp_path.rglob("*") if f.is_file()}

  before = files()
  assert {"baseline.json", "config.json", "run.json"} <= before.keys()
  _interrupt_writes(monkeypatch)
  c.train.iterations = 7
  with pytest.raises(KeyboardInterrupt):
    logger_lib.write_run_metadata(tmp_path, c, {"launch": 2})
  with pytest.raises(KeyboardInterrupt):
    logger_lib.write_baseline(tmp_path, {"eval/entropy": 2.0})
  monkeypatch.undo()
  assert files() == before  # nothing torn, no temporary file left


def test_torn_files_do_not_break_a_resume(init_from, data_dir, tmp_path):
  c = _config(init_from, data_dir, train=dict(iterations=2,
                                              checkpoint_every=2))
  train(c, tmp_path)
  # A kill in the middle of appending iteration 2's record, and a run.json
  # torn by an older version.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"iteration": 2, "loss": 0.')
  (tmp_path / "run.json").write_text('{"launches": [')
  with pytest.warns(UserWarning, match="metrics.jsonl:3: skipping a torn"):
    assert len(_records(tmp_path)) == 2
  c.train.iterations = 3
  with pytest.warns(UserWarning, match="run.json is not valid JSON"):
    train(c, tmp_path)
  assert [r["iteration"] for r in _records(tmp_path)] == [0, 1, 2]
  launches = json.loads((tmp_path / "run.json").read_text())["launches"]
  assert [l["started_at_iteration"] for l in launches] == [2]
  assert (tmp_path / "run.json.bad").read_text() == '{"launches": ['
  # A bad record before the last is not a torn append: it is named.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  lines[1] = lines[1][:10]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
    _records(tmp_path)


@pytest.mark.parametrize("damage", ["empty_config", "truncated_weights",
                                    "no_tokenizer"])
def test_an_incomplete_warm_start_is_rebuilt(damage, tmp_path):
  from entropo import tasks  # pylint: disable=g-import-not-at-top
  from entropo.models import from_pretrained  # pylint: disable=g-import-not-at-top
  from entropo.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from entropo.training import warm_start  # pylint: disable=g-import-not-at-top
  c = tiny_config(warm_start=dict(steps=0))
  task, tokenizer = config_lib.make_task(c.task), tasks.char_tokenizer()
  path = warm_start.warm_start(c, task, tokenizer, tmp_path / "ws")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]
  if damage == "empty_config":
    (path / "config.json").write_text("")
  elif damage == "truncated_weights":
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[:len(weights) // 2])
  else:
    (path / "tokenizer.json").unlink()
  with pytest.warns(UserWarning, match=f"warm start {path} is incomplete"):
    assert warm_start.warm_start(c, task, tokenizer, path) == path
  assert warm_start.incomplete_reason(path) is None
  assert from_pretrained(path).config.hidden_size == 32
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


@pytest.mark.parametrize("field,value,match", [
    ("algo.objective", "ppo2", "algo.objective"),
    ("algo.agg", "mean", "algo.agg"),
    ("algo.clip_high", -0.1, "algo.clip_high"),
    ("algo.clip_low", -0.1, "algo.clip_low"),
    ("algo.clip_low", 1.0, "algo.clip_low"),
    ("data.max_prompt_len", 0, "data.max_prompt_len"),
    ("model.max_position_embeddings", 20,
     "data.max_prompt_len \\+ sampling.max_new_tokens: 16 \\+ 8 = 24"),
    ("algo.minibatches", 3, "algo.minibatches"),
    ("algo.dual_clip", 0.5, "algo.dual_clip"),
    ("sampling.group_size", 1, "sampling.group_size"),
    ("sampling.steps_per_check", 0, "sampling.steps_per_check"),
    ("sampling.in_flight_slots", -2, "sampling.in_flight_slots"),
    ("sampling.refill_rows", 3,  # more than in_flight_slots (0)
     "sampling.refill_rows: must be at most sampling.in_flight_slots=0"),
    ("train.pass_k", (1, 64), "train.pass_k"),
    ("precision", "fp8", "precision"),
    ("mesh.data", 16, "mesh"),
    ("warm_start.spread", 2.0, "warm_start.spread"),
    ("model.attention", "flash", "model.attention"),
    ("model.attention_chunk_size", 0, "model.attention_chunk_size"),
    ("model.remat", "full", "model.remat"),
    ("model.attention", "cudnn",
     "model.attention: attention='cudnn' needs bfloat16.*precision 'fp32'"),
    ("model.lora_rank", -1, "model.lora_rank"),
    ("model.lora_alpha", 0.0, "model.lora_alpha"),
    ("model.lora_targets", "q_proj,qkv", "model.lora_targets.*'qkv'"),
    ("model.lora_targets", "", "model.lora_targets.*empty"),
    ("model.lora_base_dtype", "bf16", "model.lora_base_dtype"),
    ("model.lora_base_dtype", "compute", "applies to LoRA runs only"),
])
def test_bad_configs_name_the_field(field, value, match):
  c = tiny_config()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    validate(c)


def test_zero_clip_widths_are_valid():
  c = tiny_config()
  c.algo.update(clip_low=0.0, clip_high=0.0)
  validate(c)
  c.algo.update(band="reciprocal", clip_low=1.5)  # 1/(1+lo) stays in (0, 1]
  validate(c)


def test_context_length_is_checked_before_any_work(init_from, tmp_path):
  c = tiny_config()
  c.sampling.max_new_tokens = 60  # 16 + 60 > the tiny model's 64
  with pytest.raises(ValueError, match="Invalid config: data.max_prompt_len "
                     "\\+ sampling.max_new_tokens: 16 \\+ 60 = 76 tokens "
                     "exceed the model's context of 64"):
    validate(c)
  # A Hugging Face directory's context comes from its config.json.
  model = tmp_path / "model"
  shutil.copytree(init_from, model)
  hf = json.loads((model / "config.json").read_text())
  (model / "config.json").write_text(json.dumps(
      {**hf, "max_position_embeddings": 20}))
  c = tiny_config()
  c.model.init_from = str(model)
  with pytest.raises(ValueError, match=f"16 \\+ 8 = 24 tokens exceed the "
                     f"model's context of 20 .*{model}/config.json"):
    validate(c)


def test_launcher_rejects_a_too_long_context_within_seconds(tmp_path):
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/countdown.py",
       f"--workdir={tmp_path}", "--config.sampling.max_new_tokens=100"],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode != 0
  assert ("Invalid config: data.max_prompt_len + sampling.max_new_tokens"
          in proc.stderr + proc.stdout)
  assert time.monotonic() - start < 60
  assert not (tmp_path / "warm_start").exists()


@pytest.mark.parametrize("remove", ["config.json", "model.safetensors",
                                    "tokenizer.json", "directory"])
def test_init_from_must_be_a_model_directory(remove, init_from, tmp_path):
  model = tmp_path / "model"
  shutil.copytree(init_from, model)
  if remove == "directory":
    shutil.rmtree(model)
  else:
    (model / remove).unlink()
  c = tiny_config()
  c.model.init_from = str(model)
  with pytest.raises(ValueError, match="Invalid config: model.init_from: "
                     f"{model}"):
    validate(c)
  if remove == "config.json":  # an empty or torn config.json, too
    (model / "config.json").write_text("")
    with pytest.raises(ValueError, match="model.init_from: .*cannot read"):
      validate(c)


def test_unknown_algorithm():
  with pytest.raises(ValueError, match="Unknown algorithm 'ppo'"):
    preset("ppo")
  with pytest.raises(ValueError, match="modifier 'repo_x'"):
    preset("grpo+repo_x")
  assert preset("dapo+repo_r")["repo"] == "repo_r"
  assert preset("dapo+repo_r")["clip_high"] == 0.28


@pytest.mark.parametrize("sign_clamp", [True, False])
def test_repo_r_sign_clamp_option(sign_clamp):
  """`algo.repo_sign_clamp` reaches REPO-R: float64 reference of
  A - zeta |A| log pi, with and without clamping at 0."""
  from entropo.training.algorithm import Algorithm  # pylint: disable=g-import-not-at-top
  c = tiny_config("grpo+repo_r")
  c.algo.repo_sign_clamp = sign_clamp
  algo = Algorithm.from_config(c.algo)
  rewards = np.array([1., 0., 0., 0.], np.float32)  # one group of 4
  logps = np.log(np.array([[0.9, 0.01], [0.5, 1e-4], [0.7, 0.2],
                           [0.99, 0.3]], np.float32))
  mask = np.ones((4, 2), bool)
  zeta = 0.5
  got = algo.advantages(jnp.asarray(rewards), jnp.asarray(logps),
                        jnp.zeros((4, 2)), jnp.asarray(mask),
                        {"zeta": zeta}, group_size=4)
  r = rewards.astype(np.float64)
  a = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
  a = np.broadcast_to(a[:, None], (4, 2))
  want = a - zeta * np.abs(a) * logps.astype(np.float64)
  if sign_clamp:
    want = np.where(a > 0, np.maximum(want, 0), np.minimum(want, 0))
  # zeta |log 1e-4| > 1: the clamp decides the sign of that token.
  assert (want[1, 1] > 0) == (not sign_clamp)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


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
  assert not re.search(r"^I\d{4} ", proc.stderr, re.M)  # no absl INFO
  assert len(_records(tmp_path)) == 2
  for name in ("entropy", "reward", "pass_at_k"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
# It hung in both full CI runs of 2026-12-06 while a Ctrl-C could raise
# anywhere (inside a library: a half-done saver or loader); the trainer now
# raises it only at its own safe points (guards.DeferredInterrupts), and 34
# of 34 loaded runs of this scenario exited after that change.
def test_launcher_ends_a_ctrl_c_with_one_line(init_from, tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/tiny.py", f"--workdir={tmp_path}",
       f"--init_from={init_from}", "--config.train.iterations=100000",
       "--config.train.progress=False", "--config.train.plots=False"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out = []
  for line in proc.stdout:  # wait until RL has started
    out.append(line)
    if "before RL" in line:
      break
  time.sleep(1)  # into the first iterations
  proc.send_signal(signal.SIGINT)
  try:
    rest, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()  # leave no hung launcher behind
    proc.communicate()
    raise
  out = "".join(out) + rest
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[-1] == (
      "[entropo] interrupted; rerun the same command to resume from the "
      "latest checkpoint")
  assert re.search(r"interrupted (in iteration \d+|while saving)", out), out
  assert any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_gsm8k_config_names_what_is_missing(tmp_path):
  from experiments.configs import gsm8k_hf  # pylint: disable=g-import-not-at-top
  c = gsm8k_hf.get_config("dapo+repo_r")
  with pytest.raises(ValueError, match="task.path"):
    validate(c)
  c.task.path = str(tmp_path)
  with pytest.raises(ValueError, match="task.path: .* has no train.jsonl or "
                     "test.jsonl"):
    validate(c)
  (tmp_path / "train.jsonl").write_text("")
  with pytest.raises(ValueError, match="task.path: .* has no test.jsonl"):
    validate(c)
  (tmp_path / "test.jsonl").write_text("")
  with pytest.raises(ValueError, match="model.init_from"):
    validate(c)
  c.model.init_from = str(tmp_path)
  with pytest.raises(ValueError, match="model.init_from: .* not a Hugging "
                     "Face model directory"):
    validate(c)
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    (tmp_path / name).write_text("{}")
  validate(c)
  assert c.precision == "bf16_fp32_head" and c.algo.repo == "repo_r"


@pytest.mark.parametrize("algo,inert", [
    ("adapo", "ADAPO's adapted epsilon_high"), ("dapo", "asymmetric band"),
    ("gspo", "gspo's band"), ("grpo", None), ("rloo", None)])
def test_a_band_that_cannot_bind_is_reported(algo, inert):
  algorithm_lib = importlib.import_module("entropo.training.algorithm")
  c = tiny_config(algo)
  message = algorithm_lib.inert_band(
      algorithm_lib.Algorithm.from_config(c.algo))
  if inert is None:
    assert message is None
    return
  assert inert in message and "every importance ratio is 1" in message
  c.algo.minibatches = 4  # several optax steps per batch: the band binds
  assert algorithm_lib.inert_band(
      algorithm_lib.Algorithm.from_config(c.algo)) is None


def test_a_band_that_never_clipped_is_reported():
  algorithm_lib = importlib.import_module("entropo.training.algorithm")
  c = tiny_config("dapo")
  c.algo.minibatches = 4
  trainer = Trainer.__new__(Trainer)  # only the counters are needed
  trainer.algorithm = algorithm_lib.Algorithm.from_config(c.algo)
  trainer.clipping = LaunchCounts()
  for _ in range(10):
    trainer._count_clipping({"pg/clipfrac_high": 0.0,  # pylint: disable=protected-access
                             "pg/clipfrac_low": 0.0})
  with pytest.warns(UserWarning, match="clipped no token in 10 iterations"):
    trainer._warn_if_never_clipped()  # pylint: disable=protected-access
  trainer._count_clipping({"pg/clipfrac_high": 0.01})  # pylint: disable=protected-access
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    trainer._warn_if_never_clipped()  # pylint: disable=protected-access


# -- the sampler's own precision and the mismatch corrections


def _mismatch_run(init_from, data_dir, workdir, algo="grpo", **sections):
  """The stable metrics of a one-iteration run."""
  c = _config(init_from, data_dir, algo, train=dict(iterations=1,
                                                    eval_every=1),
              **sections)
  train(c, workdir)
  return [_stable(r) for r in _records(workdir)]


def test_equal_sampler_precision_is_bit_identical(init_from, data_dir,
                                                  tmp_path):
  """Naming the trainer's preset as the sampler's changes nothing at all."""
  default = _mismatch_run(init_from, data_dir, tmp_path / "default")
  named = _mismatch_run(init_from, data_dir, tmp_path / "named",
                        sampling=dict(precision="fp32"))
  assert default == named
  for r in default:
    # Same precision, two codes (sampler head vs fused head): rounding only.
    assert r["mismatch/kl_token"] < 1e-9
    assert r["mismatch/prob_corr"] == pytest.approx(1.0, abs=1e-6)
  launch = json.loads((tmp_path / "named" / "run.json").read_text())[
      "launches"][0]
  assert launch["precision"]["preset"] == launch["sampler_precision"][
      "preset"] == "fp32"


def test_bf16_sampler_fp32_trainer_with_icepop(init_from, data_dir,
                                               tmp_path):
  records = _mismatch_run(init_from, data_dir, tmp_path, "grpo+icepop",
                          sampling=dict(precision="bf16"))
  for r in records:
    assert r["mismatch/kl_token"] > 0 and r["mismatch/max_abs_diff"] > 1e-4
    assert r["mismatch/prob_corr"] < 1.0
    assert 0 < r["corr/ess"] <= 1.0
    assert 0 <= r["corr/masked_frac"] <= 1.0
    assert np.isfinite(r["loss"])
  launch = json.loads((tmp_path / "run.json").read_text())["launches"][0]
  assert launch["precision"]["preset"] == "fp32"
  assert launch["sampler_precision"]["preset"] == "bf16"


@pytest.mark.parametrize("fields,match", [
    (dict(sampling=dict(precision="fp8")), "sampling.precision"),
    (dict(algo=dict(correction="clip")), "algo.correction"),
    (dict(algo=dict(correction_level="seq")), "algo.correction_level"),
    (dict(algo=dict(correction="mask", correction_low=1.5)),
     "algo.correction.*low <= 1 <= high"),
    (dict(algo=dict(correction="truncate", tis_cap=2.0)), "algo.tis_cap"),
    (dict(algo=dict(correction="mask", old_logps="sampler")),
     "algo.old_logps"),
    (dict(algo=dict(correction_veto=-1.0)), "algo.correction_veto"),
])
def test_bad_mismatch_configs_name_the_field(fields, match):
  c = tiny_config()
  for section, values in fields.items():
    c[section].update(values)
  with pytest.raises(ValueError, match=match):
    validate(c)


def test_minibatches_by_tokens(init_from, data_dir, tmp_path, monkeypatch):
  """`train.minibatch_tokens`: a tiny training runs and records it; the
  update takes one optax step per minibatch of the token-budget batcher's
  plan (two epochs, each of a fresh permutation), each within the budget
  and padded with empty rows to its row bucket (here even counts: 8 rows
  make 8 buckets of 1); and a budget that holds the whole batch is the row
  split's one minibatch, bit for bit."""
  from entropo import packing  # pylint: disable=g-import-not-at-top
  real_bucket = packing.rows_bucket
  monkeypatch.setattr(packing, "rows_bucket", lambda needed, **kw: (
      real_bucket(needed + needed % 2, **kw)))
  rows = Trainer(_config(init_from, data_dir), tmp_path / "rows")
  roll, _ = rows.collect(jax.random.key(3))
  budget = 2 * roll.tokens.shape[1]  # two rows' slots: every sequence fits
  c = _config(init_from, data_dir, train=dict(
      iterations=1, minibatch_tokens=budget, row_buckets=8))
  c.algo.epochs = 2
  train(c, tmp_path / "tokens")
  launch = json.loads((tmp_path / "tokens" / "run.json").read_text())[
      "launches"][0]
  assert launch["minibatch_tokens"] == budget
  assert _records(tmp_path / "tokens")[-1]["train/optimizer_steps"] > 2

  trainer = Trainer(c, tmp_path / "tokens2")
  seen, real = [], trainer.learner.update
  def spy(params, opt_state, mb, *args):
    seen.append(np.asarray(mb["tokens"]))
    assert np.asarray(mb["attention_mask"]).sum() <= budget
    return real(params, opt_state, mb, *args)
  trainer.learner.update = spy
  batch, _ = trainer.pre_update(roll)
  metrics = trainer.update(batch, jax.random.key(4))
  lengths = roll.attention_mask.sum(axis=1)
  key, want = jax.random.key(4), []
  for _ in range(2):  # the update's keys: a permutation, then one per step
    key, perm_key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(perm_key, len(lengths)))
    plan = packing.token_budget_batches(lengths, tokens_per_batch=budget,
                                        order=order)
    want += [np.asarray(roll.tokens)[np.sort(b)] for b in plan]
    for _ in plan:
      key, _ = jax.random.split(key)
  assert 2 < len(want) < 2 * len(lengths)  # it splits, not row by row
  assert any(len(w) % 2 for w in want)  # and pads
  assert metrics["train/optimizer_steps"] == len(seen) == len(want)
  for got, expected in zip(seen, want):  # then empty rows to the bucket
    assert len(got) == len(expected) + len(expected) % 2
    np.testing.assert_array_equal(got[:len(expected)], expected)
    assert not got[len(expected):].any()

  # A budget >= the batch's tokens: one minibatch, the whole batch.
  whole = _config(init_from, data_dir,
                  train=dict(minibatch_tokens=int(lengths.sum())))
  results = []
  for t in (rows, Trainer(whole, tmp_path / "whole")):
    batch, _ = t.pre_update(roll)
    metrics = t.update(batch, jax.random.key(4))
    results.append((metrics, t.state.params))
  (m1, p1), (m2, p2) = results
  assert m2.pop("train/optimizer_steps") == 1.0
  assert m1 == m2
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
