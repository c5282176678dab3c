"""grain input pipelines: prompt batches for RL, token batches for SFT.

Both pipelines read a random-access sequence (`entropo.tasks.data.load`'s
records, or a list) and build the same chain:

    source indices -> shuffle (seeded, reshuffled every epoch) -> repeat
    -> global batches of indices -> this process's slice -> load, tokenize

Global batches are the same on every process. Process `shard_index` of
`shard_count` loads and tokenizes only its contiguous slice of each: rows
`[shard_index * n, (shard_index + 1) * n)` with `n = batch / shard_count`
(for prompt batches, `n` prompts, each repeated G times, so a group never
straddles processes). Concatenating the processes' batches in process
order gives exactly the batch of a single process: what a run trains on
does not depend on how many processes share it. The batch size must
divide by `shard_count`.

Batches are dicts of numpy arrays with static shapes (a last partial batch
is dropped). Sequences are left-aligned: real tokens first, then `pad_id`.
Nothing is truncated: a sequence longer than its budget raises an error
naming the record.

Resuming: the returned `grain.IterDataset` gives iterators whose
`get_state()` is a small JSON-serialisable dict (the position in the global
stream, the same on every process); `set_state` on a fresh iterator of the
same pipeline (same source and arguments, any `shard_index`) continues with
exactly the batch that would have come next, across epoch boundaries too:

    it = iter(prompt_batches(...))
    state = iterator_state(it)   # save with the checkpoint
    ...
    it = restore(iter(prompt_batches(...)), state)
"""

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np


def _check_int(name: str, value, low: int, high: int | None = None):
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < low or (high is not None and value >= high)):
    bounds = f">= {low}" if high is None else f"in [{low}, {high})"
    raise ValueError(f"{name} must be an int {bounds}; got {value!r}.")


def _global_batches(source: Sequence[Any], *, name: str, batch_size: int,
                    seed: int, shard_index: int, shard_count: int,
                    num_epochs: int | None) -> grain.IterDataset:
  """Global batches of shuffled source indices, sliced to this process.

  Only indices are shuffled and batched, so a process loads just the
  records of its own slice. The iterator's state counts elements of the
  global stream, whatever the slice.
  """
  _check_int(name, batch_size, 1)
  _check_int("seed", seed, 0, 2**32)
  _check_int("shard_count", shard_count, 1)
  _check_int("shard_index", shard_index, 0, shard_count)
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, 1)
  if batch_size % shard_count:
    raise ValueError(f"{name}={batch_size} does not split over shard_count="
                     f"{shard_count} processes: each process takes an equal "
                     f"contiguous slice of every global batch.")
  if not len(source):
    raise ValueError("The source is empty.")
  size = batch_size // shard_count
  start = shard_index * size
  indices = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(
      num_epochs)
  return indices.to_iter_dataset().batch(
      batch_size, drop_remainder=True,
      batch_fn=lambda rows: [int(i) for i in rows[start:start + size]])


def _left_aligned(ids: Sequence[int], length: int, pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full(length, pad_id, np.int32)
  tokens[:len(ids)] = ids
  return tokens, np.arange(length) < len(ids)


def _encode_prompt(item, *, tokenizer, max_len: int,
                   add_special_tokens: bool) -> dict[str, Any]:
  _, record = item
  ids = tokenizer.encode(record["prompt"],
                         add_special_tokens=add_special_tokens)
  if not 0 < len(ids) <= max_len:
    raise ValueError(f"Record id {record['id']}: its prompt has {len(ids)} "
                     f"tokens; max_prompt_len={max_len} (prompts are never "
                     f"truncated; raise max_prompt_len or drop the record).")
  tokens, mask = _left_aligned(ids, max_len, tokenizer.pad_id)
  return {"prompt_tokens": tokens, "prompt_mask": mask,
          "id": np.int64(record["id"]), "problem": record["problem"]}


def _group_batch(elements: Sequence[Mapping[str, Any]], *, group_size: int
                 ) -> dict[str, np.ndarray]:
  """Stacks the prompts and repeats each `group_size` times, adjacently."""
  return {key: np.repeat(np.stack([e[key] for e in elements]), group_size,
                         axis=0) for key in elements[0]}


def prompt_batch(records: Sequence[Mapping[str, Any]], tokenizer, *,
                 max_prompt_len: int, group_size: int = 1,
                 add_special_tokens: bool = True) -> dict[str, np.ndarray]:
  """One batch of `records` in order, laid out as `prompt_batches` does.

  For evaluation: no shuffling, no state. Each record's prompt is repeated
  `group_size` times in adjacent rows; a prompt longer than
  `max_prompt_len` raises, naming the record.
  """
  _check_int("group_size", group_size, 1)
  _check_int("max_prompt_len", max_prompt_len, 1)
  return _group_batch([_encode_prompt(
      (i, r), tokenizer=tokenizer, max_len=max_prompt_len,
      add_special_tokens=add_special_tokens) for i, r in enumerate(records)],
                      group_size=group_size)


def prompt_batches(source: Sequence[Mapping[str, Any]], tokenizer, *,
                   prompts_per_batch: int, group_size: int,
                   max_prompt_len: int, seed: int, shard_index: int = 0,
                   shard_count: int = 1, num_epochs: int | None = None,
                   add_special_tokens: bool = True) -> grain.IterDataset:
  """Batches of P prompts, each repeated G times, for group-relative RL.

  Args:
    source: records (`{"id", "prompt", "problem", ...}`) with `len` and
      random access, e.g. `entropo.tasks.data.load(...)`.
    tokenizer: has `encode(text, add_special_tokens=...)` and `pad_id`
      (e.g. `entropo.models.Tokenizer`).
    prompts_per_batch: P, prompts per global batch (all processes); must
      divide by `shard_count`.
    group_size: G, completions per prompt.
    max_prompt_len: the width of `prompt_tokens`; longer prompts raise.
    seed: the shuffle seed, in [0, 2**32).
    shard_index, shard_count: this process's slice of each global batch.
    num_epochs: passes over the source (None: forever).
    add_special_tokens: passed to `encode` (e.g. a model's BOS).

  Returns:
    A `grain.IterDataset` of dicts with `B = P / shard_count * G` rows
    (this process's prompts of the global batch), rows
    `[g * G, (g + 1) * G)` holding the same prompt (the layout of
    `entropo.advantages`):
      prompt_tokens: int32 [B, max_prompt_len], left-aligned, pad_id after.
      prompt_mask: bool [B, max_prompt_len], True on the real tokens.
      id: int64 [B], the records' ids.
      problem: str [B], the records' problems (JSON), for the verifier.

  Raises:
    ValueError: bad arguments; when iterating, a prompt of no tokens or of
      more than `max_prompt_len` (naming the record id and the lengths).
  """
  _check_int("group_size", group_size, 1)
  _check_int("max_prompt_len", max_prompt_len, 1)
  return _global_batches(
      source, name="prompts_per_batch", batch_size=prompts_per_batch,
      seed=seed, shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs).map(functools.partial(
          _load_prompts, source=source, tokenizer=tokenizer,
          max_len=max_prompt_len, add_special_tokens=add_special_tokens,
          group_size=group_size))


def _load_prompts(indices: Sequence[int], *, source, group_size: int,
                  **encode) -> dict[str, np.ndarray]:
  return _group_batch([_encode_prompt((i, source[i]), **encode)
                       for i in indices], group_size=group_size)


def _encode_example(item, *, tokenizer, max_len: int,
                    add_special_tokens: bool) -> dict[str, np.ndarray]:
  index, example = item
  if isinstance(example, Mapping):
    name = f"Record id {example['id']}"
    prompt, completion = example["prompt"], example["solution"]
  else:
    name = f"Example {index}"
    prompt, completion = example
  prompt_ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
  if isinstance(completion, str):
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    ids = prompt_ids + completion_ids + [tokenizer.eos_id]
    learn = [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
    parts = f"{len(prompt_ids)} + {len(completion_ids)} + 1 = "
  else:  # a transcript: the policy's and the environment's segments
    ids, learn = list(prompt_ids), [False] * len(prompt_ids)
    for segment in completion:
      seg_ids = tokenizer.encode(segment.text, add_special_tokens=False)
      ids += seg_ids
      learn += [segment.by_model] * len(seg_ids)
    parts = ""
  if len(ids) > max_len:
    raise ValueError(f"{name}: prompt, completion and EOS have {parts}"
                     f"{len(ids)} tokens; max_len={max_len} (examples are "
                     f"never truncated).")
  tokens, mask = _left_aligned(ids, max_len, tokenizer.pad_id)
  loss_mask = np.zeros(max_len, bool)
  loss_mask[:len(learn)] = learn
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def sft_batches(examples: Sequence[Any], tokenizer, *, batch_size: int,
                max_len: int, seed: int, shard_index: int = 0,
                shard_count: int = 1, num_epochs: int | None = None,
                add_special_tokens: bool = True) -> grain.IterDataset:
  """Batches of prompt + completion + EOS for supervised warm starts.

  The prompt and the completion are tokenized separately (the prompt as in
  `prompt_batches`, the completion without special tokens), as a sampler
  sees them during RL.

  Args:
    examples: (prompt, completion) str pairs (e.g.
      `entropo.tasks.warm_start_examples`), or records whose `solution` is
      the completion; `len` and random access. A completion may instead be
      a transcript, a list of `entropo.tasks.Segment` (agent tasks): its
      segments are tokenized one by one, the loss is on the policy's
      segments only, and no EOS is added (the environment ends episodes).
    tokenizer: has `encode`, `pad_id` and `eos_id`.
    batch_size: examples per global batch (all processes); each process
      gets `batch_size / shard_count` of them.
    max_len: L, the width of the batch; longer examples raise.
    seed, shard_index, shard_count, num_epochs, add_special_tokens: as in
      `prompt_batches`.

  Returns:
    A `grain.IterDataset` of dicts:
      tokens: int32 [B, L] (B: this process's examples), left-aligned,
        pad_id after.
      mask: bool [B, L], True on the real tokens.
      loss_mask: bool [B, L], True on the completion and EOS tokens (the
        tokens to predict: position t is predicted from tokens before t).
  """
  _check_int("max_len", max_len, 1)
  return _global_batches(
      examples, name="batch_size", batch_size=batch_size, seed=seed,
      shard_index=shard_index, shard_count=shard_count,
      num_epochs=num_epochs).map(functools.partial(
          _load_examples, source=examples, tokenizer=tokenizer,
          max_len=max_len, add_special_tokens=add_special_tokens))


def _load_examples(indices: Sequence[int], *, source,
                   **encode) -> dict[str, np.ndarray]:
  encoded = [_encode_example((i, source[i]), **encode) for i in indices]
  return {key: np.stack([e[key] for e in encoded]) for key in encoded[0]}


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """The position of `iterator`, as a JSON-serialisable dict."""
  return json.loads(json.dumps(iterator.get_state()))


def restore(iterator: grain.DatasetIterator, state: Mapping[str, Any]
            ) -> grain.DatasetIterator:
  """Moves a fresh iterator of the same pipeline to `state`; returns it."""
  iterator.set_state(dict(state))
  return iterator
