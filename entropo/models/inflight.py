"""In-flight batching: a fixed number of slots, refilled as rows end.

`sample(model, prompts, ...)` (sampler.py) runs its whole batch in
lock-step until the last row ends: a row that stops early idles in its
slot for the rest of the batch. `sample_in_flight(model, prompts, ...,
slots=S)` decodes `S` rows at a time, and as soon as rows end (EOS, a
stop id, `max_new_tokens`) it prefills the next pending prompts into their
slots and decoding goes on. It returns the same `SampleResult` as `sample`,
rows in the prompts' order, and for a fixed key the same tokens: every
sample draws from its own key (`fold_in(fold_in(key, sample_id), j)`, see
"Randomness" in sampler.py), never from its slot's or batch's, so the
tokens of a row do not depend on when or beside whom it ran. Log-probs
equal `sample`'s to float32 rounding (the rows' forward passes run in
batches of other shapes; tested at 2e-5 like the multi-turn sampler).

Everything runs in one compiled call: a `lax.while_loop` whose every trip
first refills free slots (`_refill`: batched prefills of `refill_rows`
pending prompts each) and then runs `steps_per_check` decode steps in a
loop of known length (as `sample`'s blocks: XLA:GPU copies a data-dependent
loop condition to the host once per trip, not once per token). The host
dispatches one call and reads the result once; `return_stats=True` also
returns the loop's counts (`InFlightStats`: trips, decode steps, prefills),
so the device-to-host synchronisations of XLA:GPU (one per trip) are
counted, not guessed.

Cache layout. Each slot row has the static sampler's layout: the prompt
right-aligned in slots `[0, P)`, completion token `j` at slot `P + j`, so
rows at different steps write at different slots (the transformer's
per-row `cache_index`, `[B]`). A refill writes the whole row: keys, values
and validity of the prefilled prompt, every later slot invalid, so nothing
of the slot's previous row is ever attended to.

Refill policy. A free slot waits until `refill_rows` slots are free (or
none is live, or the pending prompts all fit): each prefill runs a fixed
number of rows, so refilling one slot at a time would pay a whole prefill
per row. The prefill sizes are `slots`, its halves down to `refill_rows`,
and `refill_rows` (`prefill_sizes`: one compiled branch each); a refill
runs the largest one the free slots and pending prompts fill, so the
first fill of all slots is one prefill. Smaller `refill_rows` keeps slots
busier at more prefill calls; the default is a quarter of the slots. A
freed slot also waits for the end of its block of `steps_per_check`
steps.

Multi-turn episodes, whose turns wait for the environment on the host,
run in flight too: `entropo.training.episodes_inflight.play_in_flight`
drives one compiled decode call per `steps_per_check` steps over
`entropo.models.agent_slots` (the same per-row cache index), hands each
ended action to its environment while the other rows decode, and refills
a row when its episode ends; same tokens as the lock-step `play` for a
fixed key (docs/benchmarks.md, "In-flight multi-turn episodes").
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from entropo.models import sampler as sampler_lib
from entropo.models import transformer as transformer_lib
from entropo.models.sampler import SampleResult


class InFlightStats(NamedTuple):
  """What one `sample_in_flight` call ran (host ints).

  Attributes:
    host_calls: compiled calls the host dispatched (1).
    trips: trips of the outer loop (a refill, then a block of decode
      steps); on XLA:GPU each copies the loop condition to the host.
    decode_steps: decode steps, each one forward pass of every slot.
    prefills: batched prefills (`prefill_sizes` rows each).
    prefill_rows: prompts prefilled (every row once).
  """

  host_calls: int
  trips: int
  decode_steps: int
  prefills: int
  prefill_rows: int


class _Slots(NamedTuple):
  """The slots' state on the device (`S` slots, `B` rows)."""

  cache: dict  # the model's KV cache, [S] rows of P + N slots
  h: jax.Array  # [S, D] hidden state that predicts the slot's next token
  row: jax.Array  # [S] int32, the row in the slot (B: none yet)
  j: jax.Array  # [S] int32, completion tokens the slot's row has sampled
  pos: jax.Array  # [S] int32, rotary position of the row's next token
  live: jax.Array  # [S] bool, the slot's row is still sampling
  next: jax.Array  # int32, the first row not yet prefilled


class _Out(NamedTuple):
  """The result's arrays, `[B, P + N]`, written as rows sample."""

  tokens: jax.Array
  completion_mask: jax.Array
  logps: jax.Array
  processed_logps: jax.Array
  entropy: jax.Array


def sample_in_flight(model, prompt_tokens, prompt_mask, *, key,
                     max_new_tokens: int, slots: int,
                     temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, eos_id=None,
                     steps_per_check: int = 16,
                     refill_rows: int | None = None, sample_ids=None,
                     row_max_new_tokens=None, return_stats: bool = False):
  """`sample`'s result, computed `slots` rows at a time (module docstring).

  Args:
    model, prompt_tokens, prompt_mask, key, max_new_tokens, temperature,
      top_k, top_p, eos_id, sample_ids, row_max_new_tokens: as for
      `entropo.models.sample`
      (stop strings are stop ids in `eos_id`: `episodes.stop_token_ids`).
    slots: rows decoded at once (>= 1; more than the prompts: one per
      prompt, and `refill_rows` at most as many).
    steps_per_check: decode steps between two refills (a loop of known
      length on the device); 1 refills after every step.
    refill_rows: rows per batched prefill, in `[1, slots]`; None: a
      quarter of the slots (at least 1).
    return_stats: also return an `InFlightStats`.

  Returns:
    A `SampleResult`, or `(SampleResult, InFlightStats)`.
  """
  _, args, kwargs = sampler_lib._prepare(  # pylint: disable=protected-access
      model, prompt_tokens, prompt_mask, key=key,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_id=eos_id, use_cache=True,
      steps_per_check=steps_per_check, sample_ids=sample_ids,
      row_max_new_tokens=row_max_new_tokens)
  batch = args[2].shape[0]
  if not sampler_lib._is_int(slots) or slots < 1:  # pylint: disable=protected-access
    raise ValueError(f"slots must be a positive int; got {slots!r}.")
  if refill_rows is None:
    refill_rows = max(1, slots // 4)
  if not sampler_lib._is_int(refill_rows) or not 1 <= refill_rows <= slots:  # pylint: disable=protected-access
    raise ValueError(f"refill_rows must be an int in [1, slots={slots}]; "
                     f"got {refill_rows!r}.")
  # Fewer prompts than slots (an evaluation batch): a slot per prompt.
  slots = min(int(slots), batch)
  refill_rows = min(int(refill_rows), slots)
  del kwargs["use_cache"], kwargs["block"]
  result, counts = _in_flight_jit(
      *args, **kwargs, slots=slots, refill_rows=int(refill_rows),
      block=int(steps_per_check))
  if not return_stats:
    return result
  trips, steps, prefills, rows = (int(c) for c in counts)
  return result, InFlightStats(1, trips, steps, prefills, rows)


def _start(model, tokens, mask, *, slots, total, pad_id, n):
  """Empty slots and the result's arrays with the prompts in place."""
  batch, width = tokens.shape
  precision, cfg = model.precision, model.config
  s = _Slots(
      cache=model.init_cache(slots, total, dtype=precision.sampler_dtype),
      h=jnp.zeros((slots, cfg.hidden_size), precision.compute_dtype),
      row=jnp.full((slots,), batch, jnp.int32),
      j=jnp.zeros((slots,), jnp.int32), pos=jnp.zeros((slots,), jnp.int32),
      live=jnp.zeros((slots,), bool), next=jnp.int32(0))
  zeros = jnp.zeros((batch, total), jnp.float32)
  out = _Out(
      tokens=jnp.concatenate(
          [tokens, jnp.full((batch, n), pad_id, jnp.int32)], axis=1),
      completion_mask=jnp.zeros((batch, total), bool), logps=zeros,
      processed_logps=zeros, entropy=zeros)
  return s, out


def _prefill(model, s: _Slots, *, tokens, mask, prompt_len, rows):
  """Prefills the next `rows` pending prompts (fewer if fewer are free or
  pending) into free slots: one forward pass of `[rows, P]`; returns the
  slots and the number of rows taken."""
  batch, width = tokens.shape
  slots, total = s.cache["valid"].shape
  free = ~s.live
  take = jnp.minimum(jnp.minimum(rows, jnp.sum(free, dtype=jnp.int32)),
                     batch - s.next)
  i = jnp.arange(rows, dtype=jnp.int32)
  first_free = jnp.argsort(s.live, stable=True)[:rows]  # free slots first
  target = jnp.where(i < take, first_free, slots)  # slots: dropped
  new_rows = jnp.minimum(s.next + i, batch - 1)
  t, m = tokens[new_rows], mask[new_rows]  # [rows, P]
  cache = model.init_cache(rows, total, dtype=model.precision.sampler_dtype)
  hidden, cache = model(t, attention_mask=m,
                        positions=transformer_lib.default_positions(m),
                        cache=cache, cache_index=0)
  # Whole rows replace the slots' rows: the old row's later slots turn
  # invalid.
  put = lambda a, v: a.at[target].set(v.astype(a.dtype), mode="drop")  # noqa
  return s._replace(
      cache=jax.tree.map(put, s.cache, cache),
      h=put(s.h, hidden[:, width - 1]),
      row=put(s.row, s.next + i),
      j=put(s.j, jnp.zeros_like(i)),
      pos=put(s.pos, prompt_len[new_rows]),
      live=put(s.live, jnp.ones((rows,), bool)),
      next=s.next + take), take


def prefill_sizes(slots: int, rows: int) -> tuple[int, ...]:
  """The batched prefills' sizes, largest first: `slots`, halved while it
  stays above `rows`, then `rows`."""
  sizes = [slots]
  while sizes[-1] // 2 > rows:
    sizes.append(sizes[-1] // 2)
  return tuple(sizes) + ((rows,) if rows < slots else ())


def _refill(model, s: _Slots, tokens, mask, prompt_len, *, rows):
  """Prefills until no slot is free, nothing is pending, or fewer than
  `rows` slots are free while some row is live and more prompts are
  pending than slots free (see "Refill policy"). Each prefill is the
  largest of `prefill_sizes` that the free slots and pending prompts fill
  (the smallest, `rows`, otherwise): a loop per size, largest first (a
  `lax.switch` between the sizes made XLA:CPU copy the whole cache at
  every prefill). Returns the slots, the prefills run and the rows
  prefilled."""
  batch = tokens.shape[0]
  sizes = prefill_sizes(s.live.shape[0], rows)

  def may_refill(s):
    free = jnp.sum(~s.live, dtype=jnp.int32)
    pending = batch - s.next
    return (pending > 0) & (free > 0) & (
        (free >= rows) | ~jnp.any(s.live) | (free >= pending))

  def fills(size):  # the free slots and pending prompts fill `size` rows
    def cond(c):
      fill = jnp.minimum(jnp.sum(~c[0].live), batch - c[0].next)
      return may_refill(c[0]) & ((fill >= size) | (size == sizes[-1]))
    return cond

  c = (s, jnp.int32(0), jnp.int32(0))
  for size in sizes:
    def body(c, size=size):
      s, calls, taken = c
      s, take = _prefill(model, s, tokens=tokens, mask=mask,
                         prompt_len=prompt_len, rows=size)
      return s, calls + 1, taken + take
    c = jax.lax.while_loop(fills(size), body, c)
  return c


def _decode_step(model, s: _Slots, out: _Out, keys, limits, eos_ids, pad_id,
                 choose, lm_head, *, width, n):
  """Every live slot samples its next token from `s.h`, records it in its
  row of `out` and feeds it to the model at its own cache slot."""
  precision = model.precision
  batch = out.tokens.shape[0]
  live = s.live
  z = precision.round_logits(precision.head_product(s.h, lm_head))
  row = jnp.minimum(s.row, batch - 1)
  token, lp, plp, ent = choose(z, sampler_lib.step_keys(keys[row], s.j))
  token = jnp.where(live, token, pad_id)
  r, col = jnp.where(live, s.row, batch), width + s.j  # r = B: dropped
  put = lambda a, v: a.at[r, col].set(v.astype(a.dtype), mode="drop")  # noqa
  out = _Out(put(out.tokens, token), put(out.completion_mask, live),
             put(out.logps, lp), put(out.processed_logps, plp),
             put(out.entropy, ent))
  stops = jnp.any(token[:, None] == eos_ids[None, :], axis=1)
  ended = live & (stops | (s.j + 1 >= limits[row]))
  hidden, cache = model(
      token[:, None], attention_mask=live[:, None], positions=s.pos[:, None],
      cache=s.cache, cache_index=width + jnp.minimum(s.j, n - 1))
  step = live.astype(jnp.int32)
  s = s._replace(cache=cache, h=jnp.where(live[:, None], hidden[:, 0], s.h),
                 j=s.j + step, pos=s.pos + step, live=live & ~ended)
  return s, out


def _in_flight(graphdef, state, tokens, mask, key, temperature, top_p,
               eos_ids, sample_ids, row_limits, *, max_new_tokens, greedy,
               top_k, use_top_p, slots, refill_rows, block):
  model = nnx.merge(graphdef, state)
  precision = model.precision
  pad_id = eos_ids[0] if eos_ids.shape[0] else jnp.int32(0)
  batch, width = tokens.shape
  n = max_new_tokens
  tokens, mask = sampler_lib._left_align(tokens, mask, pad_id)  # pylint: disable=protected-access
  prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
  if sample_ids is None:
    sample_ids = jnp.arange(batch, dtype=jnp.int32)
  keys = sampler_lib.row_keys(key, sample_ids)  # [B]
  limits = (jnp.full((batch,), n, jnp.int32) if row_limits is None
            else row_limits)
  lm_head = model.lm_head_matrix()
  choose = lambda z, k: sampler_lib._choose(  # pylint: disable=protected-access  # noqa
      z, k, temperature, top_p, precision=precision, greedy=greedy, top_k=top_k,
      use_top_p=use_top_p)
  s, out = _start(model, tokens, mask, slots=slots, total=width + n,
                  pad_id=pad_id, n=n)

  def trip(c):
    s, out, counts = c
    s, calls, taken = _refill(model, s, tokens, mask, prompt_len,
                              rows=refill_rows)
    s, out = jax.lax.fori_loop(
        0, block, lambda _, so: _decode_step(
            model, *so, keys, limits, eos_ids, pad_id, choose, lm_head,
            width=width, n=n), (s, out))
    return s, out, counts + jnp.stack([1, block, calls, taken])

  def going(c):
    return jnp.any(c[0].live) | (c[0].next < batch)

  s, out, counts = jax.lax.while_loop(
      going, trip, (s, out, jnp.zeros((4,), jnp.int32)))
  prompt_mask = jnp.concatenate([mask, jnp.zeros((batch, n), bool)], axis=1)
  return SampleResult(
      tokens=out.tokens, prompt_mask=prompt_mask,
      completion_mask=out.completion_mask, logps=out.logps,
      processed_logps=out.processed_logps, entropy=out.entropy,
      lengths=jnp.sum(out.completion_mask, axis=1, dtype=jnp.int32)), counts


_in_flight_jit = jax.jit(
    _in_flight, static_argnums=(0,),
    static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p",
                     "slots", "refill_rows", "block"))
