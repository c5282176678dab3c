"""A whole run's configuration: the typed sections and the checks across them.

`RunConfig.from_config` converts the `ConfigDict` (config.py) once: each
section becomes its dataclass of sections.py (which checks its own fields),
the `algo` section the `Algorithm` (algorithm.py), and then the checks that
need several sections at once run here (the batch splits, the context
holds a prompt and its completion or an agent's episode, the attention
kernel suits both presets). Every failure names the field.
"""

import dataclasses

import jax

from entropo import precision as precision_lib
from entropo import tasks as tasks_lib
from entropo.models import attention as attention_lib
from entropo.training import algorithm as algorithm_lib
from entropo.training.sections import SECTIONS
from entropo.training.sections import AgentSection
from entropo.training.sections import DataSection
from entropo.training.sections import MeshSection
from entropo.training.sections import ModelSection
from entropo.training.sections import OptimSection
from entropo.training.sections import SamplingSection
from entropo.training.sections import TaskSection
from entropo.training.sections import TrainSection
from entropo.training.sections import WarmStartSection
from entropo.training.validation import check_number
from entropo.training.validation import did_you_mean
from entropo.training.validation import fail


def _section(cls, name: str, values):
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    fail(f"{name}.{unknown[0]}", f"no such field"
         f"{did_you_mean(unknown[0], known)}; the fields are "
         f"{sorted(known)}")
  return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """A whole run's configuration, typed and validated (see config.py)."""

  seed: int  # shuffles the data, drives sampling
  precision: precision_lib.Precision
  # The sampler's: `sampling.precision`, or the trainer's when "".
  sampler_precision: precision_lib.Precision
  algorithm: algorithm_lib.Algorithm
  task: TaskSection
  model: ModelSection
  warm_start: WarmStartSection
  data: DataSection
  sampling: SamplingSection
  agent: AgentSection
  optim: OptimSection
  train: TrainSection
  mesh: MeshSection

  @classmethod
  def from_config(cls, config) -> "RunConfig":
    """The typed form of a `ConfigDict`; raises naming the first bad field."""
    check_number("seed", config.seed, allow_zero=True, integer=True)
    try:
      precision = precision_lib.get_precision(config.precision)
    except ValueError as e:
      fail("precision", str(e))
    algorithm = algorithm_lib.Algorithm.from_config(config.algo)
    sections = {}
    for name in ("sampling", "mesh"):  # the batch's checks come first
      sections[name] = _section(SECTIONS[name], name, config[name])
    _check_batch(sections["sampling"], sections["mesh"], algorithm)
    for name, section_cls in SECTIONS.items():
      if name not in sections:
        sections[name] = _section(section_cls, name, config[name])
    _check_minibatch_tokens(sections["train"], algorithm)
    if sections["task"].file_backed and not sections["model"].init_from:
      fail("model.init_from", "the tiny warm start is for the tasks "
           f"generated in code; start {sections['task'].name} from a "
           "Hugging Face checkpoint with --init_from=<dir>")
    if issubclass(tasks_lib.task_class(sections["task"].name),
                  tasks_lib.AgentTask):
      _check_agent(sections)
    else:
      _check_context(sections["data"], sections["sampling"],
                     sections["model"])
      _check_prompts(sections["task"], sections["data"], sections["model"],
                     sections["sampling"], sections["warm_start"])
    sampler = precision_lib.get_precision(sections["sampling"].precision
                                          or precision)
    for name, chosen in (("precision", precision),
                         ("sampling.precision", sampler)):
      _check_attention(sections["model"].attention, chosen,
                       f"{name} {chosen.name!r}")
    return cls(seed=config.seed, precision=precision,
               sampler_precision=sampler, algorithm=algorithm, **sections)


def _check_context(data: DataSection, sampling: SamplingSection,
                   model: ModelSection) -> None:
  """A prompt and its completion fit in the model's context."""
  length = data.max_prompt_len + sampling.max_new_tokens
  context = model.context_length()
  if length > context:
    where = (f"{model.init_from}/config.json" if model.init_from
             else "model.max_position_embeddings")
    fail("data.max_prompt_len + sampling.max_new_tokens",
         f"{data.max_prompt_len} + {sampling.max_new_tokens} = {length} "
         f"tokens exceed the model's context of {context} "
         f"(max_position_embeddings, {where})")


def _check_agent(sections: dict) -> None:
  """An episode's context fits the model; one process drives episodes."""
  agent, model, data = sections["agent"], sections["model"], sections["data"]
  context = model.context_length()
  if agent.max_context > context:
    fail("agent.max_context", f"{agent.max_context} slots exceed the "
         f"model's context of {context} (max_position_embeddings)")
  need = data.max_prompt_len + agent.max_action_tokens
  if need > agent.max_context:
    fail("agent.max_context", f"{agent.max_context} slots cannot hold a "
         f"prompt and one action: data.max_prompt_len + "
         f"agent.max_action_tokens = {need}")
  if jax.process_count() > 1:
    fail("task.name", f"{sections['task'].name} is a multi-turn "
         "environment; its episodes are driven from one process (multi-"
         "process runs are for single-turn tasks)")


def _check_attention(attention: str, precision, which: str) -> None:
  """A fused kernel runs the preset's compute dtype on this backend;
  `which` names the preset in the message (`precision 'bf16'`)."""
  try:
    attention_lib.check_compute_dtype(attention, precision.compute_dtype)
  except ValueError as e:
    fail("model.attention", f"{e} ({which})")
  backend = jax.default_backend()
  needs = {"cudnn": ("gpu", "cuda"), "pallas": ("tpu",)}.get(attention)
  if needs and backend not in needs:
    fail("model.attention", f"{attention!r} runs on {needs[0].upper()}s "
         f"only; this process's backend is {backend!r} (use 'auto' or "
         f"'blockwise')")


def _check_prompts(task: TaskSection, data: DataSection,
                   model: ModelSection, sampling: SamplingSection,
                   warm_start: WarmStartSection) -> None:
  """The task's longest prompt fits in `data.max_prompt_len`, and the warm
  start's longest example (prompt, solution, EOS) in the sequence (tasks
  generated in code on the character tokenizer, where both are known)."""
  if model.init_from or task.file_backed:
    return
  made = task.make()
  longest = made.longest_prompt()
  if longest is not None and len(longest) > data.max_prompt_len:
    fail("data.max_prompt_len", f"{data.max_prompt_len} characters do not "
         f"hold the {task.name} task's longest prompt, {longest!r} "
         f"({len(longest)} characters)")
  solution = made.longest_solution()
  width = data.max_prompt_len + sampling.max_new_tokens
  if (longest is not None and solution is not None and warm_start.steps
      and len(longest) + solution + 1 > width):
    fail("sampling.max_new_tokens", f"the warm start trains on whole "
         f"examples: the longest prompt ({len(longest)}), solution "
         f"({solution}) and EOS take {len(longest) + solution + 1} tokens, "
         f"more than data.max_prompt_len + sampling.max_new_tokens = "
         f"{data.max_prompt_len} + {sampling.max_new_tokens}")


def _check_minibatch_tokens(train: TrainSection, algorithm) -> None:
  """Minibatches by tokens replace the row split (on any number of data
  shards: each minibatch is padded with empty rows to a multiple of them,
  minibatches.py)."""
  if train.minibatch_tokens and algorithm.minibatches != 1:
    fail("train.minibatch_tokens", f"{train.minibatch_tokens} forms the "
         f"minibatches by tokens; algo.minibatches must then be 1, got "
         f"{algorithm.minibatches}")


def _check_batch(sampling: SamplingSection, mesh: MeshSection,
                 algorithm) -> None:
  """The batch splits into minibatches, over devices and processes."""
  batch, minibatches = sampling.batch_size, algorithm.minibatches
  if batch % minibatches:
    fail("algo.minibatches", f"{minibatches} does not divide the batch "
         f"of {batch} sequences (prompts_per_batch x group_size)")
  if (batch // minibatches) % mesh.batch_shards:
    fail("mesh.data", f"the minibatch of {batch // minibatches} "
         f"sequences does not split over data x fsdp = "
         f"{mesh.batch_shards} devices")
  processes = jax.process_count()
  if sampling.prompts_per_batch % processes:
    fail("sampling.prompts_per_batch", f"{sampling.prompts_per_batch} "
         f"prompts do not split over {processes} processes (each loads an "
         f"equal slice of every batch, whole groups)")
