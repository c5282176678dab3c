"""Multi-turn rollouts: play a batch of episodes of an `AgentTask`.

`play(...)` runs one environment per row of a prompt batch
(entropo.tasks.environment) against the policy, with the context kept on
the device between turns (entropo.models.multiturn):

1. every row's environment is built and `reset` (in parallel threads);
2. each turn, the live rows sample an action (until a stop id, an EOS id
   or `max_action_tokens`); their actions are decoded and handed to
   `step`, on a pool of `env_workers` threads (`call_all`), each call with
   its own time limit from the moment it starts;
3. the observations are tokenized and appended to the context (only the
   new tokens are fed), and the next turn starts;
4. when every episode has ended, `final_reward` and `close` run once per
   environment.

Whatever an environment does, the batch goes on: an exception ends that
episode with `env_error`, a step past `step_timeout` seconds with
`env_timeout` (the thread is abandoned: an in-process environment cannot be
killed, so environments that may hang should bound their own time, as the
code sandbox does), an observation over `max_observation_tokens` with
`observation_too_long`. Episodes that run out of turns or of context end
with `turn_budget` / `context_full` and count as truncated. EOS from the
policy ends its episode (`gave_up`, unless the environment ended it on
that action).

The result (`Episodes`) holds each row's whole episode in the sampler's
layout (rows share slots; a row's unused slots are holes) with its
sampler log-probs and entropies, the action mask (the loss mask: true on
the policy's own tokens only), the turn of each action token, the return
(the sum of per-turn rewards plus the final reward) and the end reason.
`Episodes.sequences(width)` moves each row's tokens together: one training
sequence per episode.
"""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from entropo.models import multiturn
from entropo.tasks import environment as env_lib
from entropo.training.env_calls import call_all

# An observation longer than this many characters per allowed token is too
# long without tokenizing it (a guard against huge strings).
_CHARS_PER_TOKEN = 64


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
  """How long episodes may run (the `agent` config section's values)."""

  max_turns: int = 4
  max_action_tokens: int = 16
  max_observation_tokens: int = 16
  context: int = 128  # slots of the shared context
  step_timeout: float = 10.0  # seconds per environment call
  # Environment calls running at once (env_calls.call_all's pool); 0:
  # sized to the machine (env_calls.default_workers()).
  env_workers: int = 0
  observation_bucket: int = 4  # observation chunks padded to a multiple


def stop_token_ids(tokenizer, stops: Sequence[str]) -> list[int]:
  """Ids whose text contains a stop string: they end an action."""
  ids = []
  for i in range(tokenizer.vocab_size):
    text = tokenizer.decode([i], skip_special_tokens=False)
    if text and any(s in text for s in stops):
      ids.append(i)
  return ids


@dataclasses.dataclass
class Episodes:
  """A batch of played episodes (see the module docstring), `[B, S]` in
  the sampler's layout (`S` slots used)."""

  tokens: np.ndarray  # int32
  valid: np.ndarray  # bool: prompt, action and observation tokens
  action_mask: np.ndarray  # bool: the policy's tokens
  logps: np.ndarray  # float32 sampler log-probs of the action tokens
  entropy: np.ndarray  # float32 sampler entropy at the action tokens
  turn: np.ndarray  # int32 turn of each action token, -1 elsewhere
  returns: np.ndarray  # [B] float32
  reasons: list[str]  # [B]
  turns: np.ndarray  # [B] int32 actions taken
  fed: int  # tokens fed to the model (holes included)
  env_seconds: float  # wall time in environment calls

  @property
  def truncated(self) -> np.ndarray:
    return np.asarray([r in env_lib.TRUNCATED for r in self.reasons])

  @property
  def solved(self) -> np.ndarray:
    return np.asarray([r == env_lib.SOLVED for r in self.reasons])

  def sequences(self, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Each row's valid tokens moved to the front (in order), padded to
    `width`: `tokens`, `attention_mask`, `completion_mask`, `logps`,
    `turn`."""
    order = np.argsort(~self.valid, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, axis=1)
    count = int(self.valid.sum(axis=1).max())
    if count > width:
      raise ValueError(f"An episode of {count} tokens does not fit in "
                       f"{width}.")
    out = {}
    for name, array, fill in (("tokens", self.tokens, pad_id),
                              ("attention_mask", self.valid, False),
                              ("completion_mask", self.action_mask, False),
                              ("logps", self.logps, 0.0),
                              ("turn", self.turn, -1)):
      moved = take(array)[:, :width]
      full = np.full((array.shape[0], width), fill, array.dtype)
      full[:, :moved.shape[1]] = np.where(take(self.valid)[:, :width], moved,
                                          fill)
      out[name] = full
    return out


class _Columns:
  """The host copy of the layout, built chunk by chunk."""

  def __init__(self):
    self.parts = {k: [] for k in ("tokens", "valid", "action_mask", "logps",
                                  "entropy", "turn")}

  def add(self, tokens, valid, action=None, logps=None, entropy=None,
          turn: int = -1):
    zeros = np.zeros(tokens.shape, np.float32)
    action = np.zeros(tokens.shape, bool) if action is None else action
    for k, v in (("tokens", tokens), ("valid", valid),
                 ("action_mask", action),
                 ("logps", zeros if logps is None else logps),
                 ("entropy", zeros if entropy is None else entropy),
                 ("turn", np.where(action, turn, -1).astype(np.int32))):
      self.parts[k].append(np.asarray(v))

  def arrays(self) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v, axis=1) for k, v in self.parts.items()}


class _Book:
  """Per-episode bookkeeping: environments, returns, reasons, turns."""

  def __init__(self, envs, limits: EpisodeLimits):
    self.envs = envs
    self.limits = limits
    n = len(envs)
    self.returns = np.zeros(n, np.float64)
    self.reasons = [""] * n
    self.turns = np.zeros(n, np.int32)
    self.env_seconds = 0.0

  @property
  def live(self) -> np.ndarray:
    return np.asarray([not r for r in self.reasons])

  def end(self, row: int, reason: str) -> None:
    if not self.reasons[row]:
      self.reasons[row] = reason

  def call(self, rows, fn) -> list[tuple[str, Any]]:
    """`fn(row)` for each of `rows` on the pool (`call_all`); errors and
    time-outs end their episode."""
    t = time.perf_counter()
    results = call_all([lambda r=r: fn(r) for r in rows],
                       self.limits.step_timeout, self.limits.env_workers)
    self.env_seconds += time.perf_counter() - t
    for row, (status, _) in zip(rows, results):
      if status != "ok":
        self.end(row, env_lib.ENV_ERROR if status == "error"
                 else env_lib.ENV_TIMEOUT)
    return results

  def finish(self) -> None:
    """`final_reward` and `close` of every environment, once.

    A final reward that fails (or is not a finite number) makes the
    episode's end `env_error`: its return is unknown. An episode that timed
    out gets no final reward (its environment may still be busy) but is
    closed, which is where an environment kills what it runs.
    """
    rows = [r for r, env in enumerate(self.envs) if env is not None]
    scored = [r for r in rows if self.reasons[r] != env_lib.ENV_TIMEOUT]
    t = time.perf_counter()
    finals = call_all([lambda r=r: self.envs[r].final_reward(self.reasons[r])
                       for r in scored], self.limits.step_timeout,
                       self.limits.env_workers)
    for row, (status, value) in zip(scored, finals):
      if status == "ok" and _is_number(value):
        self.returns[row] += float(value)
      else:
        self.reasons[row] = env_lib.ENV_ERROR
    call_all([lambda r=r: self.envs[r].close() for r in rows],
             self.limits.step_timeout, self.limits.env_workers)
    self.env_seconds += time.perf_counter() - t


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and (
      not isinstance(value, bool)) and bool(np.isfinite(value))


def _environments(task, num: int) -> list:
  envs = []
  for _ in range(num):
    try:
      envs.append(task.environment())
    except Exception:  # pylint: disable=broad-except
      envs.append(None)
  return envs


def _observation_ids(text, tokenizer, limit: int) -> list[int] | str:
  """The observation's token ids, or the reason it ends the episode."""
  if not isinstance(text, str):
    return env_lib.ENV_ERROR
  if len(text) > limit * _CHARS_PER_TOKEN:
    return env_lib.OBSERVATION_TOO_LONG
  ids = tokenizer.encode(text, add_special_tokens=False) if text else []
  if len(ids) > limit:
    return env_lib.OBSERVATION_TOO_LONG
  return ids


def _answer(book: _Book, row: int, status: str, out, ended_by_eos: bool,
            last_turn: bool, tokenizer) -> list[int] | None:
  """Books one environment answer; the observation's ids if the episode
  goes on."""
  if status != "ok":
    return None
  if not isinstance(out, env_lib.Turn) or not _is_number(out.reward):
    book.end(row, env_lib.ENV_ERROR)
    return None
  book.returns[row] += float(out.reward)
  if out.done:
    book.end(row, out.reason)
  elif ended_by_eos:
    book.end(row, env_lib.GAVE_UP)
  elif last_turn:
    book.end(row, env_lib.TURN_BUDGET)
  else:
    ids = _observation_ids(out.observation, tokenizer,
                           book.limits.max_observation_tokens)
    if isinstance(ids, str):
      book.end(row, ids)
      return None
    return ids
  return None


def play(model, task, tokenizer, prompt_tokens, prompt_mask, problems, *,
         key, limits: EpisodeLimits, stop_ids: Sequence[int],
         temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> Episodes:
  """Plays one episode per row (see the module docstring).

  Args:
    model: the policy.
    task: an `entropo.tasks.AgentTask`.
    tokenizer: the policy's tokenizer (`encode`, `decode`, `pad_id`,
      `eos_ids`).
    prompt_tokens, prompt_mask: `[B, P]` the tokenized first observations
      (`task.prompt(problem)`), padded anywhere.
    problems: `B` problems (dicts or their JSON).
    key: PRNG key; turn `t` samples with `fold_in(key, t)`.
    limits: `EpisodeLimits`.
    stop_ids: ids that end an action (`stop_token_ids`).
    temperature, top_k, top_p: as in `entropo.models.sample`.
  """
  pad, eos = tokenizer.pad_id, [int(i) for i in tokenizer.eos_ids]
  book = _Book(_environments(task, len(problems)), limits)
  for row, env in enumerate(book.envs):
    if env is None:
      book.end(row, env_lib.ENV_ERROR)
  book.call(np.flatnonzero(book.live), lambda r: book.envs[r].reset(
      env_lib.problem_dict(problems[r])))
  cols = _Columns()
  tokens, mask = multiturn.right_align(prompt_tokens, prompt_mask, pad)
  ctx = multiturn.start(model, tokens, mask, slots=limits.context,
                        pad_id=pad)
  cols.add(tokens, mask)
  for turn in range(limits.max_turns):
    live = book.live
    if not live.any():
      break
    if ctx.slot + limits.max_action_tokens > ctx.slots:
      for row in np.flatnonzero(live):
        book.end(row, env_lib.CONTEXT_FULL)
      break
    ctx, act = multiturn.act(
        model, ctx, live, key=jax.random.fold_in(key, turn),
        max_tokens=limits.max_action_tokens, stop_ids=stop_ids, eos_ids=eos,
        temperature=temperature, top_k=top_k, top_p=top_p, pad_id=pad)
    cols.add(act.tokens, act.mask, act.mask, act.logps, act.entropy, turn)
    rows = np.flatnonzero(live)
    book.turns[rows] += 1
    texts = {r: tokenizer.decode([int(t) for t in act.tokens[r][act.mask[r]]
                                  if int(t) not in eos]) for r in rows}
    results = book.call(rows, lambda r: book.envs[r].step(texts[r]))
    observations = {}
    for row, (status, out) in zip(rows, results):
      ids = _answer(book, row, status, out, bool(act.ended_by_eos[row]),
                    turn == limits.max_turns - 1, tokenizer)
      if ids is not None:
        observations[row] = ids
    ctx = _append(model, ctx, cols, book, observations, pad)
  book.finish()
  return Episodes(**cols.arrays(), returns=book.returns.astype(np.float32),
                  reasons=book.reasons, turns=book.turns, fed=ctx.fed,
                  env_seconds=book.env_seconds)


def _append(model, ctx, cols: _Columns, book: _Book, observations: dict,
            pad: int):
  """Feeds the observations (one chunk, rows without one get holes); ends
  the episodes with `context_full` when the chunk and a whole next action
  would not fit."""
  longest = max((len(ids) for ids in observations.values()), default=0)
  if not longest:
    return ctx
  bucket = book.limits.observation_bucket
  width = -(-longest // bucket) * bucket
  if ctx.slot + width + book.limits.max_action_tokens > ctx.slots:
    width = longest
  if ctx.slot + width + book.limits.max_action_tokens > ctx.slots:
    for row in observations:
      book.end(row, env_lib.CONTEXT_FULL)
    return ctx
  batch = len(book.envs)
  tokens = np.full((batch, width), pad, np.int32)
  mask = np.zeros((batch, width), bool)
  for row, ids in observations.items():
    tokens[row, width - len(ids):] = ids
    mask[row, width - len(ids):] = True
  ctx = multiturn.extend(model, ctx, tokens, mask, pad_id=pad)
  cols.add(tokens, mask)
  return ctx
