"""The typed sections of a run's config, each validated where it is defined.

A run is described at the boundary by an `ml_collections.ConfigDict`
(config.py); `RunConfig.from_config` (run_config.py) converts it once into
these frozen, keyword-only dataclasses, whose `__post_init__` rejects a bad
value naming the field, and then checks what spans sections. Each field's
default is the main job's (`make demo`) and its comment says what it
holds. The `algo` section is the `Algorithm` (algorithm.py).
"""

import dataclasses
import json
import pathlib
from typing import Any

import jax

from entropo import _checks
from entropo import precision as precision_lib
from entropo import tasks as tasks_lib
from entropo.models import attention as attention_lib
from entropo.models import hf as hf_lib
from entropo.models import lora as lora_lib
from entropo.models import tokenizer as tokenizer_lib
from entropo.models import transformer as transformer_lib
from entropo.tasks import data as data_lib
from entropo.tasks import settings as task_settings
from entropo.training.validation import check_bool
from entropo.training.validation import check_number
from entropo.training.validation import check_range
from entropo.training.validation import fail


def _check_choice(field: str, value, options) -> None:
  _checks.check_choice(field, value, options, fail=fail)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSection:
  """What the policy is trained on."""

  # A name of entropo.tasks.TASKS, or your own task class as
  # path/to/file.py:ClassName (or module:ClassName).
  name: str = "countdown"
  # The task's own settings (its dataclass fields).
  settings: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
      num_count=3, max_value=12, max_target=50))
  path: str = ""  # file-backed tasks: the dir of train.jsonl and test.jsonl

  def __post_init__(self):
    try:
      tasks_lib.task_class(self.name)
    except ValueError as e:
      fail("task.name", str(e))
    if self.file_backed and not self.path:
      fail("task.path", f"the {self.name} task reads local JSONL files; set "
           "--config.task.path=<dir with train.jsonl and test.jsonl>")
    if self.file_backed:
      missing = [f"{split}.jsonl" for split in data_lib.FILE_SPLITS
                 if not (pathlib.Path(self.path) / f"{split}.jsonl").is_file()]
      if missing:
        fail("task.path", f"{self.path} has no {' or '.join(missing)} (the "
             f"{self.name} task reads one JSONL file per split)")
    self.make()  # every setting's name, type and the task's own checks

  def make(self) -> "tasks_lib.Task":
    """The task; a bad setting fails naming `task.settings.<field>`.

    The settings are the task class's dataclass fields (entropo/tasks/
    settings.py): an unknown name is refused with the closest one, a value
    of another type than the field's annotation by name, and a value the
    task's `__post_init__` refuses by the name it gives. Building a task
    generates no data.
    """
    settings = self.settings
    if hasattr(settings, "to_dict"):  # a ConfigDict
      settings = settings.to_dict()
    if not isinstance(settings, dict):
      fail("task.settings", f"must be a dict of the {self.name} task's "
           f"fields; got {settings!r}")
    extra = {"path": self.path} if self.file_backed else None
    if extra and "path" in settings:
      fail("task.settings.path", f"the {self.name} task's files are set by "
           f"task.path, not its settings")
    cls = tasks_lib.task_class(self.name)
    try:
      return task_settings.check(cls, settings, task_name=self.name,
                                 extra=extra)
    except task_settings.SettingError as e:
      fail(f"task.settings.{e.field}" if e.field else "task.settings",
           e.message)
    except (ValueError, TypeError) as e:  # a user task's own check
      message = str(e)
      named = [k for k in settings if message.startswith(k + " ")
               or f" {k}=" in message or f"{k} must" in message]
      fail(f"task.settings.{named[0]}" if named else "task.settings",
           message)

  @property
  def file_backed(self) -> bool:
    return tasks_lib.task_class(self.name).file_backed


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
  """The policy: a Hugging Face checkpoint, or the tiny model's shape."""

  init_from: str = ""  # a Hugging Face directory; "": the tiny warm start
  hidden_size: int = 128  # the tiny model's width D
  intermediate_size: int = 384  # its MLP width
  num_layers: int = 3
  num_heads: int = 4
  num_kv_heads: int = 2  # grouped-query attention
  max_position_embeddings: int = 64  # prompt plus completion, at most
  rope_theta: float = 10000.0
  # Attention implementation (entropo.models.attention): auto, reference
  # (materialised scores), blockwise (memory linear in length) or cudnn.
  attention: str = "auto"
  attention_chunk_size: int = 512  # keys per chunk of blockwise attention
  # Rematerialisation of decoder blocks: none, block (recompute each block
  # in the backward) or block_save_dots (keep its matmul outputs).
  remat: str = "none"
  # Run the blocks as one scan: compile time flat in depth, and the remat
  # holds on XLA:CPU (docs/benchmarks.md); costs a copy of block weights.
  scan_layers: bool = False
  # LoRA (entropo.models.add_lora): the adapters' rank (0: full
  # fine-tuning), alpha (their output is scaled by alpha / rank) and the
  # projections adapted, Hugging Face names separated by commas (or a tuple).
  lora_rank: int = 0
  lora_alpha: float = 32.0
  lora_targets: str | tuple[str, ...] = ",".join(lora_lib.TARGETS)
  # How the frozen base's projections are stored with LoRA: "param" (the
  # preset's param_dtype, float32) or "compute" (its compute dtype: half
  # the memory under bf16 presets, the same outputs; entropo.models.cast_base).
  lora_base_dtype: str = "param"

  def __post_init__(self):
    if self.init_from:
      _check_model_dir(self.init_from)
    else:
      self._check_shape()
    _check_choice("model.attention", self.attention,
                 attention_lib.IMPLEMENTATIONS)
    check_number("model.attention_chunk_size", self.attention_chunk_size,
                 integer=True)
    _check_choice("model.remat", self.remat, transformer_lib.REMAT_OPTIONS)
    _check_choice("model.scan_layers", self.scan_layers, (False, True))
    check_number("model.lora_rank", self.lora_rank, allow_zero=True,
                 integer=True)
    check_range("model.lora_alpha", self.lora_alpha, 0, None, low_open=True)
    try:
      targets = lora_lib.parse_targets(self.lora_targets)
    except ValueError as e:
      fail("model.lora_targets", str(e))
    object.__setattr__(self, "lora_targets", targets)
    _check_choice("model.lora_base_dtype", self.lora_base_dtype,
                 ("param", "compute"))
    if self.lora_base_dtype != "param" and not self.lora_rank:
      fail("model.lora_base_dtype", "applies to LoRA runs only "
           "(model.lora_rank > 0): trained weights keep param_dtype")

  def _check_shape(self) -> None:
    """The tiny model's shape: positive sizes, heads that divide the width
    and each other, an even head dimension (RoPE)."""
    for field in ("hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "max_position_embeddings"):
      check_number(f"model.{field}", getattr(self, field), integer=True)
    check_range("model.rope_theta", self.rope_theta, 0, None, low_open=True)
    if self.hidden_size % self.num_heads:
      fail("model.num_heads", f"{self.num_heads} does not divide "
           f"model.hidden_size={self.hidden_size}")
    if self.num_heads % self.num_kv_heads:
      fail("model.num_kv_heads", f"{self.num_kv_heads} does not divide "
           f"model.num_heads={self.num_heads}")
    if (self.hidden_size // self.num_heads) % 2:
      fail("model.num_heads", f"the head dimension hidden_size / num_heads "
           f"= {self.hidden_size // self.num_heads} must be even (RoPE)")

  def context_length(self) -> int:
    """The policy's `max_position_embeddings`: the tiny model's field, or
    read from `init_from`'s config.json (no weights are loaded)."""
    if not self.init_from:
      return self.max_position_embeddings
    return _hf_config(self.init_from).get("max_position_embeddings", 2048)


def _hf_config(directory: str) -> dict:
  """The `config.json` of a model directory, or a failure naming
  `model.init_from`."""
  path = pathlib.Path(directory) / hf_lib.CONFIG_NAME
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    fail("model.init_from", f"{directory} is not a Hugging Face model "
         f"directory: cannot read {path} ({e})")
  if not isinstance(config, dict):
    fail("model.init_from", f"{path} is not a JSON object")
  return config


def _check_model_dir(directory: str) -> None:
  """`directory` holds config.json, safetensors weights and tokenizer.json
  (cheap checks: nothing is loaded)."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    fail("model.init_from", f"{directory} is not a directory")
  _hf_config(directory)
  if not ((path / hf_lib.WEIGHTS_NAME).is_file()
          or (path / hf_lib.INDEX_NAME).is_file()):
    fail("model.init_from", f"{directory} has no weights: expected "
         f"{hf_lib.WEIGHTS_NAME} or {hf_lib.INDEX_NAME}")
  if not (path / tokenizer_lib.TOKENIZER_NAME).is_file():
    fail("model.init_from", f"{directory} has no "
         f"{tokenizer_lib.TOKENIZER_NAME} (the fast-tokenizer file)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartSection:
  """Supervised training of the tiny model on correct solutions."""

  steps: int = 600  # optimizer steps (0: the initial model as is)
  batch_size: int = 64  # sequences per step
  learning_rate: float = 3e-3  # peak of the warm-up / cosine schedule
  num_problems: int = 4000  # problems drawn for the SFT set
  samples_per_problem: int = 4  # solutions written per problem
  spread: float = 0.6  # in [0, 1]: how far solutions stray from canonical
  seed: int = 1_000_003  # draws the SFT problems (not the RL data)

  def __post_init__(self):
    check_number("warm_start.steps", self.steps, allow_zero=True,
                 integer=True)
    for field in ("batch_size", "num_problems", "samples_per_problem"):
      check_number(f"warm_start.{field}", getattr(self, field), integer=True)
    check_range("warm_start.learning_rate", self.learning_rate, 0, None,
                low_open=True)
    check_range("warm_start.spread", self.spread, 0, 1)
    check_number("warm_start.seed", self.seed, allow_zero=True, integer=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
  """The problems: train and held-out splits written once as TFDS files.

  `seed` generates the problems; the run's `seed` shuffles them and drives
  sampling, so runs that differ only in `seed` share one dataset and one
  held-out set.
  """

  train_size: int = 20_000  # generated training problems
  eval_size: int = 64  # held-out problems evaluated
  max_prompt_len: int = 16  # prompt tokens (left-padded)
  data_dir: str = ""  # the TFDS directory; "": <workdir>/data
  seed: int = 0

  def __post_init__(self):
    for field in ("train_size", "eval_size", "max_prompt_len"):
      check_number(f"data.{field}", getattr(self, field), integer=True)
    check_number("data.seed", self.seed, allow_zero=True, integer=True)
    if not isinstance(self.data_dir, str):
      fail("data.data_dir", f"must be a path (a string); got "
           f"{self.data_dir!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSection:
  """The rollout batch: P prompts x G completions."""

  prompts_per_batch: int = 16  # P
  group_size: int = 8  # G completions per prompt (>= 2)
  max_new_tokens: int = 16  # completion tokens, at most
  temperature: float = 1.0
  # Decode steps between two checks of whether every row has ended
  # (entropo.models.sample): a loop of known length per block, so XLA:GPU
  # syncs with the host once a block, not once a token; the tokens do not
  # depend on it.
  steps_per_check: int = 16
  # The sampler's own precision preset (entropo.PRESETS): "" samples under
  # the trainer's `precision`. A different one samples the same weights
  # under another recipe (entropo.models.with_precision), as a bf16 vLLM
  # beside an fp32 trainer: the mismatch the corrections (algo.correction)
  # and the `mismatch/*` metrics are about.
  precision: str = ""
  # In-flight batching (entropo.models.inflight): 0 samples the whole batch
  # in lock-step (entropo.models.sample); S >= 1 decodes S rows at a time
  # and prefills the next prompt into a row's slot as soon as it ends. The
  # tokens are the same either way (per-sample random streams); only the
  # speed differs (docs/benchmarks.md, "In-flight batching").
  in_flight_slots: int = 0
  # Prompts per batched refill of free slots (in-flight only): 0 means a
  # quarter of the slots; at most in_flight_slots.
  refill_rows: int = 0

  def __post_init__(self):
    for field in ("prompts_per_batch", "group_size", "max_new_tokens",
                  "steps_per_check"):
      check_number(f"sampling.{field}", getattr(self, field), integer=True)
    for field in ("in_flight_slots", "refill_rows"):
      check_number(f"sampling.{field}", getattr(self, field), integer=True,
                   allow_zero=True)
    if self.refill_rows > self.in_flight_slots:
      fail("sampling.refill_rows", f"must be at most sampling."
           f"in_flight_slots={self.in_flight_slots} (0: a quarter of "
           f"them); got {self.refill_rows}")
    if self.precision:
      try:
        precision_lib.get_precision(self.precision)
      except ValueError as e:
        fail("sampling.precision", f"{e} (or \"\": the trainer's)")
    check_range("sampling.temperature", self.temperature, 0, None,
                low_open=True)
    if self.group_size < 2:
      fail("sampling.group_size", f"group-relative advantages need >= 2 "
           f"completions per prompt; got {self.group_size}")

  @property
  def batch_size(self) -> int:
    return self.prompts_per_batch * self.group_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentSection:
  """Episodes of multi-turn environments (tasks that are an `AgentTask`;
  entropo.training.episodes). Ignored by single-turn tasks."""

  max_turns: int = 4  # actions per episode, at most (then turn_budget)
  max_action_tokens: int = 16  # tokens per action, at most
  # Tokens per observation, at most (a longer one ends the episode:
  # observation_too_long).
  max_observation_tokens: int = 8
  # Slots of an episode batch's shared context, prompt included: the
  # training sequences' width. Rows share slots turn by turn (an action
  # takes the batch's longest), so an episode ends with context_full when
  # the next observation and a whole action would not fit.
  max_context: int = 112
  step_timeout: float = 10.0  # seconds per environment call (env_timeout)
  # Environment calls of a batch running at once (a pool; each call's
  # step_timeout starts when it starts running); 0: sized to the machine
  # (4 per CPU, at least 8: entropo.training.env_calls).
  env_workers: int = 0
  # In-flight episodes (entropo.training.episodes_inflight): 0 plays a
  # batch's episodes in lock-step (every row acts, then every environment
  # steps); S >= 1 plays them S rows at a time, each row acting as soon as
  # its own environment answered and taking the next episode when its own
  # ended. Same tokens for a fixed key, but each episode counts only its
  # own tokens against max_context (fewer context_full ends). Faster when
  # environments take time (1.3-1.8x at 0-200 ms steps), slower on the
  # demo's instant ones (docs/benchmarks.md, "In-flight multi-turn
  # episodes"): off by default.
  in_flight_slots: int = 0

  def __post_init__(self):
    for field in ("max_turns", "max_action_tokens", "max_observation_tokens",
                  "max_context"):
      check_number(f"agent.{field}", getattr(self, field), integer=True)
    check_number("agent.step_timeout", self.step_timeout)
    check_number("agent.env_workers", self.env_workers, allow_zero=True,
                 integer=True)
    check_number("agent.in_flight_slots", self.in_flight_slots,
                 integer=True, allow_zero=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
  """AdamW with global-norm gradient clipping."""

  learning_rate: float = 1e-4
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0

  def __post_init__(self):
    check_range("optim.learning_rate", self.learning_rate, 0, None,
                low_open=True)
    check_range("optim.b1", self.b1, 0, 1, high_open=True)
    check_range("optim.b2", self.b2, 0, 1, high_open=True)
    check_range("optim.weight_decay", self.weight_decay, 0, None)
    check_range("optim.max_grad_norm", self.max_grad_norm, 0, None,
                low_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
  """How long the run is, and when it evaluates, saves and logs."""

  iterations: int = 60  # RL iterations
  eval_every: int = 20  # iterations between held-out evaluations
  eval_samples: int = 16  # completions per held-out problem (n of pass@k)
  pass_k: tuple[int, ...] = (1, 4, 16)  # the k of eval/pass@k
  checkpoint_every: int = 20  # iterations between checkpoints
  max_checkpoints: int = 2  # checkpoints kept
  log_every: int = 1
  tensorboard: bool = True  # event files under <workdir>/tensorboard
  plots: bool = True  # PNG curves under <workdir>/plots at the end
  progress: bool = True  # a progress bar
  # Resume a run in its workdir with a config that differs from the one it
  # was started with in fields outside config.RESUMABLE (the launcher's
  # --allow_config_change); without it such a resume is refused.
  allow_config_change: bool = False
  # A minibatch whose loss or gradient norm is NaN/inf is skipped (its
  # update not applied) and counted (train/skipped_minibatches) instead of
  # stopping the run with NonFiniteError.
  skip_non_finite: bool = False
  # The trainer's forwards and backward on packed rows (entropo.packing):
  # the pre-update pass and each minibatch's sequences packed into rows of
  # the batch's length with segment ids; loss, metrics and gradient equal
  # the padded ones to float32 rounding. On: the main job's training phase
  # runs 2.1x faster per iteration on CPU once compiled, 6 % faster over
  # its 60 iterations with the extra compilations (docs/benchmarks.md,
  # "Packing").
  packing: bool = True
  # Minibatches by tokens instead of rows (0: off, the batch split into
  # algo.minibatches minibatches of rows). Each epoch walks the batch in a
  # new random order and closes a minibatch before it would hold more than
  # this many real tokens (prompt and completion, the attention mask:
  # `entropo.packing.token_budget_batches`), one optax step per minibatch:
  # the number of steps per iteration is then epochs x (about the batch's
  # real tokens / this budget), more for a batch of long sequences, fewer
  # for short ones (logged as train/optimizer_steps). Each minibatch's loss
  # is the algorithm's loss on its sequences, normalised as for a minibatch
  # of rows (token_mean: by its loss tokens, the seq_mean_* modes: by its
  # sequences), except that seq_mean_token_sum_norm keeps the whole batch's
  # constant B x norm: every token weighs the same whatever minibatch, and
  # however many sequences, it falls in. Needs algo.minibatches = 1. Each
  # is padded with empty rows to one of `row_buckets` row counts,
  # multiples of data x fsdp: it splits over the devices.
  minibatch_tokens: int = 0
  # How many row counts a packed batch or a minibatch by tokens is padded
  # up to (`entropo.packing.rows_bucket`), each one compiled shape of the
  # steps: more pad fewer empty rows, fewer compile less often; 1 keeps
  # the batch's row count (one shape; packing then saves no rows).
  row_buckets: int = 8

  def __post_init__(self):
    for field in ("iterations", "eval_every", "eval_samples",
                  "checkpoint_every", "log_every"):
      check_number(f"train.{field}", getattr(self, field), integer=True)
    check_number("train.minibatch_tokens", self.minibatch_tokens,
                 integer=True, allow_zero=True)
    check_number("train.row_buckets", self.row_buckets, integer=True)
    # 0 would keep no checkpoint: a rerun would silently start over.
    check_number("train.max_checkpoints", self.max_checkpoints, integer=True)
    for field in ("tensorboard", "plots", "progress", "allow_config_change",
                  "skip_non_finite", "packing"):
      check_bool(f"train.{field}", getattr(self, field))
    if not isinstance(self.pass_k, (tuple, list)) or not self.pass_k or any(
        not isinstance(k, int) or isinstance(k, bool) for k in self.pass_k):
      fail("train.pass_k", f"must be a tuple of ints; got {self.pass_k!r}")
    if any(k > self.eval_samples or k < 1 for k in self.pass_k):
      fail("train.pass_k", f"every k must be in [1, eval_samples="
           f"{self.eval_samples}]; got {tuple(self.pass_k)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
  """The `(data, fsdp, tensor)` device mesh (docs/training.md)."""

  data: int = 1  # data parallelism
  fsdp: int = 1  # data parallelism with sharded parameters
  tensor: int = 1  # heads and MLP split

  def __post_init__(self):
    for field in ("data", "fsdp", "tensor"):
      check_number(f"mesh.{field}", getattr(self, field), integer=True)
    size = self.size
    if size > jax.device_count():
      fail("mesh", f"data x fsdp x tensor = {size} exceeds the "
           f"{jax.device_count()} devices")
    processes = jax.process_count()
    if processes > 1 and size != jax.device_count():
      fail("mesh", f"a run of {processes} processes uses all "
           f"{jax.device_count()} devices; data x fsdp x tensor = {size}")

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    """How many ways a batch is split (`data x fsdp`)."""
    return self.data * self.fsdp


SECTIONS = {"task": TaskSection, "model": ModelSection,
            "warm_start": WarmStartSection, "data": DataSection,
            "sampling": SamplingSection, "agent": AgentSection,
            "optim": OptimSection,
            "train": TrainSection, "mesh": MeshSection}


def defaults(cls) -> dict[str, Any]:
  """A section's default field values (without validating them: the mesh's
  checks depend on the devices of the process that runs the config)."""
  return {f.name: f.default if f.default is not dataclasses.MISSING
          else f.default_factory() for f in dataclasses.fields(cls)}
