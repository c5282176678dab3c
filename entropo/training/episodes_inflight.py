"""In-flight episodes: each row acts, waits and refills on its own.

`play` (episodes.py) runs a batch of episodes in lock-step: every live row
acts, then every environment steps, then every observation is appended,
so a turn lasts as long as its longest action plus its slowest
environment, and a slot whose episode ended idles until the batch does.
`play_in_flight(..., slots=S)` plays the same episodes on `S` rows of the
KV cache (`entropo.models.agent_slots`), each row at its own position:

* the acting rows decode together, `steps_per_check` steps per compiled
  call; a row whose action ends (stop id, EOS, `max_action_tokens`) hands
  it to its environment's `step` in a thread of its own, and the other
  rows go on decoding meanwhile;
* an answer is booked as soon as it comes (`_answer`: returns, end
  reasons, limits as in `play`); its observation is fed into that row
  alone (rows answered at the same time share one call, `[rows,
  max_observation_tokens]`: one width, so no call compiles mid-rollout
  for a new one) and the row acts again;
* when an episode ends its row is freed, and the next pending episode's
  prompt is prefilled into it (its `reset` runs meanwhile; it acts once
  the reset answered).

Rows waiting for their environment, or free, are frozen: a call computes
only its own rows (gathered into a power-of-two batch and written back),
and the frozen rows that pad that batch write past the cache, where the
writes are dropped. Each environment call runs in a daemon thread of its
own (at most one per row at a time, so `slots` bounds how many run at
once; `agent.env_workers`, the lock-step pool's size, applies here only
to `finish`) and is booked as `play` books it: a
call that raises ends its episode with `env_error`, one past
`step_timeout` with `env_timeout` (its thread is abandoned); the others
go on. `final_reward` and `close` run once per environment at the end
(`_Book.finish`), as in `play`.

Randomness and identity. Turn `t` of episode `e` (its index in
`problems`) samples its step `j` from `fold_in(fold_in(fold_in(key, t),
e), j)`, which is `play`'s draw for row `e`. So for a fixed key and
deterministic environments the two give the same tokens, end reasons,
turns and returns (log-probs to float32 rounding), whatever the slots and
the environments' timing; tested.

Differences from `play`: a row's tokens have no holes, so the context
counts its own tokens only: `context_full` ends an episode when its own
next observation and a whole action would not fit (`play` counts the
batch's shared slots, holes included, so it ends episodes sooner).
`Episodes` holds each episode in one row (no holes), which gives the
same `sequences()` as `play`; `fed` counts the token slots of every
forward pass (a decode step runs the active rows, padded to a power of
two), and `env_seconds` the time the host waited on environments with no
row to decode (plus `finish`): the time environments added to the
rollout.
"""

import collections
import queue
import threading
import time
from typing import Any

import numpy as np

from entropo.models import agent_slots
from entropo.tasks import environment as env_lib
from entropo.training import episodes as ep_lib


class _Calls:
  """Environment calls in flight: a daemon thread each, answers queued."""

  def __init__(self, timeout: float):
    self.timeout = timeout
    self.answers = queue.Queue()
    self.open = {}  # call id -> (episode, kind, deadline)
    self.count = 0

  def submit(self, episode: int, kind: str, fn) -> None:
    ident, self.count = self.count, self.count + 1
    self.open[ident] = (episode, kind, time.monotonic() + self.timeout)

    def run():
      try:
        answer = ("ok", fn())
      except BaseException as e:  # pylint: disable=broad-except
        answer = ("error", e)
      self.answers.put((ident, *answer))

    threading.Thread(target=run, daemon=True).start()

  def collect(self, wait: bool) -> list[tuple[int, str, str, Any]]:
    """`(episode, kind, status, value)` of the calls that answered or
    timed out; `wait`: block until one does (if any is open)."""
    got = []
    if wait and self.open:
      deadline = min(d for _, _, d in self.open.values())
      try:
        got.append(self.answers.get(
            timeout=max(0.0, deadline - time.monotonic())))
      except queue.Empty:
        pass
    while True:
      try:
        got.append(self.answers.get_nowait())
      except queue.Empty:
        break
    out = [(*self.open.pop(i)[:2], status, value)
           for i, status, value in got if i in self.open]  # late: dropped
    now = time.monotonic()
    for i, (episode, kind, deadline) in list(self.open.items()):
      if deadline <= now:
        del self.open[i]
        out.append((episode, kind, "timeout", None))
    return out


def _left_align(tokens, mask, pad: int):
  """Each row's valid tokens, in order, at the left end (pads after)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  order = np.argsort(~mask, axis=1, kind="stable")
  mask = np.take_along_axis(mask, order, axis=1)
  tokens = np.take_along_axis(tokens, order, axis=1)
  return np.where(mask, tokens, pad).astype(np.int32), mask


def play_in_flight(model, task, tokenizer, prompt_tokens, prompt_mask,
                   problems, *, key, limits: ep_lib.EpisodeLimits,
                   stop_ids, slots: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   steps_per_check: int = 8) -> ep_lib.Episodes:
  """`play`'s episodes, `slots` rows at a time (module docstring).

  Args:
    model, task, tokenizer, prompt_tokens, prompt_mask, problems, key,
      limits, stop_ids, temperature, top_k, top_p: as for `play`.
    slots: rows of the KV cache (episodes at once), >= 1.
    steps_per_check: decode steps per compiled call; an ended action waits
      for the end of its call before it goes to the environment.
  """
  if not isinstance(slots, int) or slots < 1:
    raise ValueError(f"slots must be a positive int; got {slots!r}.")
  if not isinstance(steps_per_check, int) or steps_per_check < 1:
    raise ValueError(f"steps_per_check must be a positive int; got "
                     f"{steps_per_check!r}.")
  tokens, mask = _left_align(prompt_tokens, prompt_mask, tokenizer.pad_id)
  if tokens.shape[1] > limits.context:
    raise ValueError(f"Prompts of {tokens.shape[1]} slots do not fit the "
                     f"context of {limits.context}.")
  book = ep_lib._Book(ep_lib._environments(task, len(problems)), limits)  # pylint: disable=protected-access
  player = _Player(model, tokenizer, book, (tokens, mask), problems,
                   key=key, stop_ids=stop_ids, slots=min(slots, len(problems)),
                   block=steps_per_check, sampling=dict(
                       temperature=temperature, top_k=top_k, top_p=top_p))
  player.run()
  book.finish()
  return player.episodes()


class _Player:
  """The host's side of `play_in_flight`: rows, episodes, calls."""

  def __init__(self, model, tokenizer, book, prompts, problems, *, key,
               stop_ids, slots: int, block: int, sampling: dict):
    self.model, self.tokenizer, self.book = model, tokenizer, book
    self.prompts, self.problems, self.key, self.block = (
        prompts, problems, key, block)
    self.pad, self.eos = tokenizer.pad_id, [int(i) for i in
                                            tokenizer.eos_ids]
    self.bound = agent_slots.bind(model)
    self.settings = agent_slots.sampling(model, stop_ids=stop_ids,
                                         eos_ids=self.eos, **sampling)
    self.s = agent_slots.open_slots(model, rows=slots,
                                    context=book.limits.context)
    self.calls = _Calls(book.limits.step_timeout)
    self.episode = np.full(slots, -1)  # -1: a free row
    self.slot = np.zeros(slots, np.int32)  # the row's next write slot
    self.active = np.zeros(slots, bool)
    self.step = np.zeros(slots, np.int32)
    self.action = [[] for _ in range(slots)]  # the current action's blocks
    self.cols = []
    for e, env in enumerate(book.envs):
      if env is None:
        book.end(e, env_lib.ENV_ERROR)
      self.cols.append(ep_lib._Columns())  # pylint: disable=protected-access
      self.cols[e].add(*(a[e:e + 1, :prompts[1][e].sum()] for a in prompts))
    self.pending = collections.deque(np.flatnonzero(book.live))
    self.fed = 0

  @property
  def rows(self) -> int:
    return self.episode.shape[0]

  def run(self) -> None:
    """Admits, decodes and books answers until every episode ended."""
    while self.pending or (self.episode >= 0).any():
      self._admit()
      if self.active.any():
        self._decode()
      t = time.perf_counter()
      wait = not self.active.any()
      answers = self.calls.collect(wait)
      if wait:
        self.book.env_seconds += time.perf_counter() - t
      self._book(answers)

  def _admit(self) -> None:
    """Prefills pending episodes' prompts into the free rows (one call)
    and starts their `reset`s."""
    free = np.flatnonzero(self.episode < 0)[:len(self.pending)]
    if not free.size:
      return
    tokens, mask = self.prompts
    rows = np.zeros(self.rows, bool)
    chunk = np.full((self.rows, tokens.shape[1]), self.pad, np.int32)
    valid = np.zeros(chunk.shape, bool)
    for r in free:
      e = int(self.pending.popleft())
      self.episode[r], self.slot[r], rows[r] = e, 0, True
      chunk[r], valid[r] = tokens[e], mask[e]
      problem = env_lib.problem_dict(self.problems[e])
      self.calls.submit(e, "reset",
                        lambda e=e, p=problem: self.book.envs[e].reset(p))
    self.s = agent_slots.feed(self.bound, self.s, chunk, valid, rows=rows,
                              start=np.zeros(self.rows, np.int32),
                              reset=rows)
    self.slot[rows] = valid[rows].sum(axis=1)
    self.fed += agent_slots.computed_rows(rows) * chunk.shape[1]

  def _decode(self) -> None:
    """One `decode` call; ended actions go to their environments."""
    was = self.active.copy()
    turn = np.asarray([self.book.turns[e] if e >= 0 else 0
                       for e in self.episode], np.int32)
    self.s, out = agent_slots.decode(
        self.bound, self.s, key=self.key, slot=self.slot, active=was,
        step=self.step, turn=turn, episode=np.maximum(self.episode, 0),
        settings=self.settings,
        max_tokens=self.book.limits.max_action_tokens, block=self.block,
        pad_id=self.pad)
    self.fed += out.fed
    grew = out.mask.sum(axis=1).astype(np.int32)
    self.slot += grew
    self.step += grew
    self.active = out.active
    for r in np.flatnonzero(was):
      self.action[r].append((out.tokens[r], out.mask[r], out.logps[r],
                             out.entropy[r], bool(out.eos[r])))
      if not out.active[r]:
        self._submit_action(r, int(turn[r]))

  def _submit_action(self, r: int, turn: int) -> None:
    """Records row `r`'s ended action and hands it to `step`."""
    parts, self.action[r] = self.action[r], []
    mask = np.concatenate([p[1] for p in parts])
    tokens, logps, entropy = (np.concatenate([p[i] for p in parts])[mask]
                              for i in (0, 2, 3))
    e = int(self.episode[r])
    ones = np.ones((1, tokens.size), bool)
    self.cols[e].add(tokens[None], ones, ones, logps[None], entropy[None],
                     turn)
    self.book.turns[e] += 1
    eos = any(p[4] for p in parts)
    text = self.tokenizer.decode([int(t) for t in tokens
                                  if int(t) not in self.eos])
    self.calls.submit(e, ("step", eos, turn),
                      lambda e=e: self.book.envs[e].step(text))

  def _book(self, answers) -> None:
    """Books the environments' answers; feeds the observations (one call
    for all), starts the next actions and frees ended rows."""
    row_of = {int(e): r for r, e in enumerate(self.episode) if e >= 0}
    observations = {}
    for e, kind, status, value in answers:
      r = row_of[e]
      if status != "ok":
        self.book.end(e, env_lib.ENV_ERROR if status == "error"
                      else env_lib.ENV_TIMEOUT)
      if kind == "reset":
        ids = [] if status == "ok" else None
      else:
        _, eos, turn = kind
        ids = ep_lib._answer(  # pylint: disable=protected-access
            self.book, e, status, value, eos,
            turn == self.book.limits.max_turns - 1, self.tokenizer)
      limits = self.book.limits
      if ids is not None and (self.slot[r] + len(ids)
                              + limits.max_action_tokens > limits.context):
        self.book.end(e, env_lib.CONTEXT_FULL)
        ids = None
      if ids is None:
        self.episode[r] = -1
      else:
        observations[r] = ids
    self._observe({r: ids for r, ids in observations.items() if ids})
    for r in observations:
      self.active[r], self.step[r] = True, 0

  def _observe(self, observations: dict) -> None:
    """Feeds each row's observation ids (one call)."""
    if not observations:
      return
    # One width, the longest observation allowed: the calls' shapes are
    # then the row batches only, so no call compiles mid-rollout for a
    # width that the rows' timing happened to make new.
    chunk = np.full((self.rows, self.book.limits.max_observation_tokens),
                    self.pad, np.int32)
    valid = np.zeros(chunk.shape, bool)
    rows = np.zeros(self.rows, bool)
    for r, ids in observations.items():
      chunk[r, :len(ids)], valid[r, :len(ids)], rows[r] = ids, True, True
      self.cols[self.episode[r]].add(chunk[r:r + 1, :len(ids)],
                                     valid[r:r + 1, :len(ids)])
    self.s = agent_slots.feed(self.bound, self.s, chunk, valid, rows=rows,
                              start=self.slot, reset=np.zeros_like(rows))
    self.slot += valid.sum(axis=1).astype(np.int32)
    self.fed += agent_slots.computed_rows(rows) * chunk.shape[1]

  def episodes(self) -> ep_lib.Episodes:
    """The played episodes, one row each (the longest's width)."""
    parts = [c.arrays() for c in self.cols]
    width = max(p["tokens"].shape[1] for p in parts)
    fills = {"tokens": self.pad, "valid": False, "action_mask": False,
             "logps": 0.0, "entropy": 0.0, "turn": -1}
    arrays = {}
    for name, fill in fills.items():
      full = np.full((len(parts), width), fill, parts[0][name].dtype)
      for e, p in enumerate(parts):
        full[e, :p[name].shape[1]] = p[name][0]
      arrays[name] = full
    book = self.book
    return ep_lib.Episodes(**arrays, returns=book.returns.astype(np.float32),
                           reasons=book.reasons, turns=book.turns,
                           fed=self.fed, env_seconds=book.env_seconds)
