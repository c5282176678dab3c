"""Padded vs packed updates, side by side: useful tokens per second.

One optax step of the trainer's `Learner.update` (GRPO's loss through the
fused head, AdamW) on the same batch, once padded to `[B, L]` and once
packed (`entropo.packing`: first-fit decreasing into rows of L tokens with
segment ids, the row count rounded up to one of 8 buckets as the trainer
does). Sequence lengths are log-normal with median L / 8 (sigma 1, clipped
to [2, L]), like reasoning traces; the `near_full` case instead draws
lengths uniformly in [L / 2, L] at the main job's batch shape (128 rows of
32 tokens): rows nearly full, nothing packs, only the overhead is left. Useful tokens are the valid ones; the packed
time includes the host's packing plan. Cases:

* `near_full`: the main job's tiny model (3 layers, width 128,
  99-character vocabulary) at its batch shape;
* `tiny`: the same model, B = 64, L = 512;
* `qwen_width`: the Qwen3-0.6B block (width 1024, 16 / 8 heads of 128,
  MLP 3072, qk-norm) with 2 layers and a 16384-token vocabulary (the full
  151936 head would take minutes per step on a CPU), B = 8, L = 512;
* `--trainer N`: the main job itself (`experiments/configs/countdown.py`,
  GRPO + REPO-R, from the warm start in `--workdir`, made there when it is
  missing), a padded and a packed `Trainer` side by side, one iteration of
  each in turn for N iterations: the training phase's seconds (trainer
  forward and update; recompilations for new packed row counts included),
  the compilations and the metrics of both runs; `--plot PNG` draws the
  two runs' reward, entropy and training-phase seconds per iteration side
  by side (docs/results/packing_demo.png);
* `qwen3_0.6b` (`--memory`): the whole Qwen3-0.6B (28 layers, 151936
  vocabulary, `scan_layers`, `remat=block`, bf16_fp32_head), B = 16,
  L = 4096, compiled only: XLA's temporary bytes of each update
  (`.lower().compile().memory_analysis()`), not run;
* `qwen3_0.6b` in `--cases` (not a default: minutes per step on a CPU):
  the same whole model timed like the others, for a GPU
  (`benchmarks/gpu.sh`, part `packing`).

`--batch` and `--length` replace the cases' B and L (0: the case's);
`--attention` picks the kernel (`blockwise`, as measured on CPU; `auto`
is cuDNN on a GPU for the bf16 preset).

Usage:

    python benchmarks/packing.py [--cases near_full tiny qwen_width] \\
        [--batch B] [--length L] [--attention blockwise] \\
        [--repeats 3] [--memory] [--trainer 14] [--workdir DIR] \\
        [--plot docs/results/packing_demo.png] \\
        [--out benchmarks/out/packing.json]

Writes JSON to `--out` and prints a Markdown table.
"""

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropo import packing  # noqa: E402
from entropo.models import ModelConfig  # noqa: E402
from entropo.models import Transformer  # noqa: E402
from entropo.training import config as config_lib  # noqa: E402
from entropo.training import step as step_lib  # noqa: E402
from entropo.training.algorithm import Algorithm  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=128, intermediate_size=384,
            num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32)
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 tie_word_embeddings=True, qk_norm=True, family="qwen3")
# name -> (model, rows B, length L, lengths, precision)
CASES = {
    "near_full": (TINY, 128, 32, "uniform", "fp32"),
    "tiny": (TINY, 64, 512, "lognormal", "fp32"),
    "qwen_width": (dict(QWEN3_06B, num_layers=2, vocab_size=16384), 8, 512,
                   "lognormal", "fp32"),
    "qwen3_0.6b": (QWEN3_06B, 16, 4096, "lognormal", "bf16_fp32_head"),
}
DEFAULT_CASES = ("near_full", "tiny", "qwen_width")
# The whole model's layers: scanned, each rematerialised in the backward.
MODEL_OPTIONS = {"qwen3_0.6b": dict(remat="block", scan_layers=True)}
MEMORY_CASE = ("qwen3_0.6b", QWEN3_06B, 16, 4096, "lognormal",
               "bf16_fp32_head")


def lengths_of(kind: str, b: int, length: int, rng) -> np.ndarray:
  """`[B]` sequence lengths: log-normal, median L / 8, or uniform."""
  if kind == "uniform":
    return rng.integers(length // 2, length + 1, b)
  drawn = rng.lognormal(np.log(length / 8), 1.0, b)
  return np.clip(drawn.astype(int), 2, length)


def padded_batch(lengths, length: int, vocab: int, rng) -> dict:
  """A right-padded training batch with the update's keys."""
  b = len(lengths)
  valid = np.arange(length)[None, :] < lengths[:, None]  # [B, L]
  mask = valid[:, 1:] & valid[:, :-1]
  tokens = rng.integers(1, vocab, (b, length)) * valid
  adv = np.repeat(rng.normal(size=(b, 1)), length - 1, axis=1) * mask
  zeros = np.zeros(mask.shape, np.float32)
  return dict(tokens=jnp.asarray(tokens, jnp.int32),
              attention_mask=jnp.asarray(valid), mask=jnp.asarray(mask),
              advantages=jnp.asarray(adv, jnp.float32),
              old_logps=jnp.asarray(zeros - 3.0), ref_logps=jnp.asarray(zeros),
              importance_weights=jnp.asarray(zeros + 1.0))


def packed_batch(batch: dict) -> dict:
  """`batch` with its packing plan, as `Trainer.minibatches.packed` makes it."""
  mask = np.asarray(batch["attention_mask"])
  b, length = mask.shape
  plan = packing.plan(mask, row_tokens=length)
  plan = packing.with_rows(plan, packing.rows_bucket(plan.rows, max_rows=b))
  return {**batch, **{k: jnp.asarray(v) for k, v in plan.arrays().items()}}


def learner_for(model_kwargs: dict, precision: str, length: int, *,
                abstract=False, attention="blockwise", **model_options):
  """`(learner, params, opt_state, hyper)` of GRPO on a random model."""
  config = ModelConfig(**model_kwargs, max_position_embeddings=length,
                       attention=attention)
  def make():
    return Transformer(config, precision=precision, rngs=nnx.Rngs(0),
                       **model_options)

  graphdef, params = nnx.split(nnx.eval_shape(make) if abstract else make())
  c = config_lib.default_config("grpo")
  algorithm = Algorithm.from_config(c.algo)
  learner = step_lib.Learner(graphdef, algorithm,
                             step_lib.make_optimizer(c.optim),
                             max_new_tokens=length, group_size=1)
  opt_state = (jax.eval_shape if abstract else lambda f, x: f(x))(
      learner.optimizer.init, params)
  hyper = algorithm.hyperparameters(algorithm.init_controllers(),
                                    algorithm.fixed_hyperparameters())
  return learner, params, opt_state, hyper


def time_case(name: str, repeats: int, seed: int, *, batch_rows: int = 0,
              row_length: int = 0, attention: str = "blockwise") -> dict:
  """The padded and packed update of case `name` (its B and L unless
  `batch_rows` / `row_length` are set), medians of `repeats` rounds."""
  model_kwargs, b, length, kind, precision = CASES[name]
  b, length = batch_rows or b, row_length or length
  rng = np.random.default_rng(seed)
  lengths = lengths_of(kind, b, length, rng)
  batch = padded_batch(lengths, length, model_kwargs["vocab_size"], rng)
  learner, params, opt_state, hyper = learner_for(
      model_kwargs, precision, length, attention=attention,
      **MODEL_OPTIONS.get(name, {}))
  key = jax.random.key(0)
  useful = int(lengths.sum())
  step = lambda mb: jax.block_until_ready(  # noqa
      learner.update(params, opt_state, mb, hyper, key))
  times = {"padded": [], "packed": []}
  for r in range(repeats + 1):  # round 0 compiles
    for variant in ("padded", "packed"):
      start = time.perf_counter()
      mb = packed_batch(batch) if variant == "packed" else batch
      step(mb)
      if r:
        times[variant].append(time.perf_counter() - start)
  packed_rows = packed_batch(batch)["segment_ids"].shape[0]
  row = {"case": name, "B": b, "L": length, "lengths": kind,
         "precision": precision, "attention": attention,
         "backend": jax.default_backend(), "useful_tokens": useful,
         "padded_slots": b * length, "packed_slots": packed_rows * length,
         "packed_rows": packed_rows}
  for variant, spent in times.items():
    row[f"{variant}_s"] = statistics.median(spent)
    row[f"{variant}_tok_s"] = useful / row[f"{variant}_s"]
  row["speedup"] = row["packed_tok_s"] / row["padded_tok_s"]
  return row


def memory_case() -> dict:
  """Compiled temporaries of the whole Qwen3-0.6B update, both layouts."""
  name, model_kwargs, b, length, kind, precision = MEMORY_CASE
  rng = np.random.default_rng(0)
  lengths = lengths_of(kind, b, length, rng)
  batch = padded_batch(lengths, length, 1000, rng)
  learner, params, opt_state, hyper = learner_for(
      model_kwargs, precision, length, abstract=True, remat="block",
      scan_layers=True)
  row = {"case": name, "B": b, "L": length, "lengths": kind,
         "precision": precision, "useful_tokens": int(lengths.sum())}
  for variant, mb in (("padded", batch), ("packed", packed_batch(batch))):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          mb)
    start = time.perf_counter()
    compiled = learner.update.lower(params, opt_state, shapes, hyper,
                                    jax.random.key(0)).compile()
    row[f"{variant}_compile_s"] = round(time.perf_counter() - start, 1)
    row[f"{variant}_temp_gib"] = round(
        compiled.memory_analysis().temp_size_in_bytes / 2**30, 2)
    if variant == "packed":
      row["packed_rows"] = mb["segment_ids"].shape[0]
  return row


def trainer_case(iterations: int, workdir: pathlib.Path) -> dict:
  """The main job padded and packed, one iteration of each in turn."""
  from entropo.training import loop  # pylint: disable=g-import-not-at-top
  from experiments.configs import countdown  # pylint: disable=g-import-not-at-top
  trainers = {}
  for packing_on in (False, True):
    c = countdown.get_config("grpo+repo_r")
    c.train.update(iterations=iterations, progress=False, tensorboard=False,
                   plots=False, eval_every=10**6, checkpoint_every=10**6,
                   packing=packing_on)
    c.data.data_dir = str(workdir / "data")
    warm = workdir / "warm_start"
    if (warm / "config.json").is_file():
      c.model.init_from = str(warm)
    run = workdir / f"run_packing_{packing_on}"
    shutil.rmtree(run, ignore_errors=True)
    trainer = loop.Trainer(c, run)
    if not c.model.init_from:
      shutil.copytree(trainer.warm_start_dir, warm)
    trainers[packing_on] = trainer
  # Trainers of one configuration share their jitted steps (step.Learner),
  # so each run's compilations are counted as the growth of the shared
  # caches during its own calls.
  compiles = {False: 0, True: 0}
  def counted(packing_on, call):
    steps = (trainers[packing_on].learner.update,
             trainers[packing_on].learner.pre_update)
    before = sum(f._cache_size() for f in steps)  # noqa
    result = call()
    compiles[packing_on] += sum(f._cache_size() for f in steps) - before  # noqa
    return result
  for packing_on, trainer in trainers.items():
    counted(packing_on, trainer.baseline)
  metrics = {False: [], True: []}
  for it in range(iterations):
    for packing_on, trainer in trainers.items():
      metrics[packing_on].append(counted(packing_on, trainer.iteration))
      trainer.meta = trainer.meta.replace(iteration=it + 1)
  row = {"case": "trainer", "iterations": iterations}
  for packing_on, trainer in trainers.items():
    name = "packed" if packing_on else "padded"
    spent = [m["time/train"] for m in metrics[packing_on]]
    row[f"{name}_train_s"] = [round(x, 3) for x in spent]
    row[f"{name}_train_total_s"] = sum(spent)
    row[f"{name}_train_median_s"] = statistics.median(spent[2:] or spent)
    row[f"{name}_compiles"] = compiles[packing_on]
    row[f"{name}_entropy"] = [m["entropy/mean"] for m in metrics[packing_on]]
    row[f"{name}_reward"] = [m["reward/mean"] for m in metrics[packing_on]]
  return row


def plot_trainer(row: dict, path: pathlib.Path) -> None:
  """The `--trainer` row's two runs per iteration, side by side: reward,
  entropy and training-phase seconds, padded and packed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = (("reward", "reward/mean"), ("entropy", "entropy/mean (nats)"),
            ("train_s", "training phase (s), log scale"))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (key, label) in zip(axes, panels):
    for name, style in (("padded", dict(color="tab:blue", lw=2.5,
                                        alpha=0.6)),
                        ("packed", dict(color="tab:orange", lw=1.2,
                                        ls="--"))):
      ys = row[f"{name}_{key}"]
      ax.plot(range(len(ys)), ys, label=f"train.packing="
              f"{name == 'packed'} ({name})", **style)
    ax.set_xlabel("iteration")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes[2].set_yscale("log")
  gap = max(abs(a - b) for a, b in zip(row["padded_entropy"],
                                       row["packed_entropy"]))
  same = sum(a == b for a, b in zip(row["padded_reward"],
                                    row["packed_reward"]))
  axes[0].text(0.02, 0.02, f"rewards equal in {same} of "
               f"{row['iterations']} iterations", transform=axes[0].transAxes)
  axes[1].text(0.02, 0.02, f"max |packed - padded| = {gap:.1e}",
               transform=axes[1].transAxes)
  axes[2].text(0.02, 0.02, f"median it. 2+: padded "
               f"{row['padded_train_median_s']:.3f} s, packed "
               f"{row['packed_train_median_s']:.3f} s",
               transform=axes[2].transAxes)
  axes[0].legend()
  fig.suptitle(f"main job (countdown, GRPO + REPO-R), same seed and warm "
               f"start, padded vs packed, {row['iterations']} iterations")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def table(rows) -> str:
  out = ["| case | B x L | lengths | useful tokens | packed rows | "
         "padded s | packed s | padded tok/s | packed tok/s | speedup |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "speedup" not in r:
      continue
    out.append(
        f"| {r['case']} | {r['B']} x {r['L']} | {r['lengths']} | "
        f"{r['useful_tokens']} | {r['packed_rows']} | {r['padded_s']:.3f} | "
        f"{r['packed_s']:.3f} | {r['padded_tok_s']:.0f} | "
        f"{r['packed_tok_s']:.0f} | {r['speedup']:.2f}x |")
  for r in rows:
    if r["case"] == "trainer":
      out.append(
          f"\nmain job, {r['iterations']} iterations in turn: training "
          f"phase padded {r['padded_train_total_s']:.1f} s (median "
          f"{r['padded_train_median_s']:.3f} s, {r['padded_compiles']} "
          f"compilations), packed {r['packed_train_total_s']:.1f} s (median "
          f"{r['packed_train_median_s']:.3f} s, {r['packed_compiles']} "
          f"compilations).")
  for r in rows:
    if "padded_temp_gib" in r:
      out.append(
          f"\n{r['case']} ({r['precision']}, B x L = {r['B']} x {r['L']}, "
          f"{r['useful_tokens']} useful tokens, {r['packed_rows']} packed "
          f"rows): update temporaries padded {r['padded_temp_gib']} GiB, "
          f"packed {r['packed_temp_gib']} GiB (compiled in "
          f"{r['padded_compile_s']} s, {r['packed_compile_s']} s).")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES),
                      choices=list(CASES))
  parser.add_argument("--batch", type=int, default=0, metavar="B",
                      help="rows of every case (0: the case's)")
  parser.add_argument("--length", type=int, default=0, metavar="L",
                      help="row length of every case (0: the case's)")
  parser.add_argument("--attention", default="blockwise",
                      choices=["blockwise", "auto", "reference", "cudnn"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--memory", action="store_true",
                      help="also compile the whole Qwen3-0.6B update")
  parser.add_argument("--trainer", type=int, default=0, metavar="N",
                      help="also run the main job padded and packed, N "
                      "iterations each, in turn")
  parser.add_argument("--workdir", default="/tmp/entropo-bench-packing")
  parser.add_argument("--plot", default="", metavar="PNG",
                      help="with --trainer: plot both runs' reward, "
                      "entropy and training seconds per iteration here")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" /
                                           "packing.json"))
  args = parser.parse_args(argv)
  if args.batch < 0:
    parser.error(f"--batch must be >= 1 (0: each case's); got {args.batch}")
  if args.length < 0 or 0 < args.length < 8:
    parser.error(f"--length must be >= 8 (median length L / 8; 0: each "
                 f"case's); got {args.length}")
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1; got {args.repeats}")
  rows = []
  for name in args.cases:
    rows.append(time_case(name, args.repeats, args.seed,
                          batch_rows=args.batch, row_length=args.length,
                          attention=args.attention))
    print(json.dumps(rows[-1]), flush=True)
  if args.memory:
    rows.append(memory_case())
    print(json.dumps(rows[-1]), flush=True)
  if args.trainer:
    rows.append(trainer_case(args.trainer, pathlib.Path(args.workdir)))
    print(json.dumps(rows[-1]), flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"backend": jax.default_backend(),
                             "devices": jax.device_count(), "rows": rows},
                            indent=2))
  print(table(rows))
  if args.trainer and args.plot:
    plot_trainer(rows[-1], pathlib.Path(args.plot))


if __name__ == "__main__":
  main()
