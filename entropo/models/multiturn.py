"""Generation over a persistent KV cache: the sampler of multi-turn episodes.

An agent's episode alternates the policy's actions and the environment's
observations in one context. `sample` (sampler.py) generates one
completion of a prompt; here the context lives on between calls, so an
episode's turns cost one forward pass per new token and no prefix is ever
recomputed:

    ctx = start(model, prompt_tokens, prompt_mask, slots=S)   # prefill
    ctx, turn = act(model, ctx, live, key=k0, max_tokens=A,
                    stop_ids=..., eos_ids=...)                 # an action
    ctx = extend(model, ctx, obs_tokens, obs_mask)             # observation
    ctx, turn = act(model, ctx, live, key=k1, ...)             # next action

`Context` holds the cache, the final hidden state of each row's last token
(the next token's logits come from it), each row's next rotary position
and the next free slot. The rows of a batch share the slots (`ctx.slot`):
an action takes as many slots as the batch's longest action of that turn
(the loop ends when every live row has stopped), an observation chunk as
many as the longest observation; a row's unused slots are holes (their
cache entries are marked invalid and never attended to), and positions
count each row's valid tokens only, as `default_positions` does in
training. So the tokens of a row, with the holes removed, are exactly the
sequence the trainer sees, and `ctx.fed` counts every token the model was
fed: it equals `ctx.slot * B`, one pass per slot, never a second.

Sampling is `sample`'s: `act` draws step `j` of row `b` from
`fold_in(fold_in(key, b), j)` (`sampler.step_keys`) with the same
`_choose` (temperature, top-k, top-p, greedy), so for a fixed key an
action equals `sample(model, <the row's whole context>, key=key,
eos_id=stop_ids + eos_ids)` on the same batch, up to float rounding of the
logits (tested). Log-probs are those of the untruncated temperature-1
policy, as in `sample`.

A row stops acting at a stop id (ends the action) or an EOS id (the policy
ends the episode), both kept in the action, or after `max_tokens`. Rows
not `live` (episodes that ended) take no slot of their own: their tokens
in later turns are all holes.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entropo.models import sampler as sampler_lib


class Context(NamedTuple):
  """A batch of episodes' context on the device (see the module docstring).

  Attributes:
    cache: the model's KV cache (`init_cache`) of `S` slots.
    hidden: `[B, D]` final hidden state of each row's last valid token.
    positions: `[B]` int32, each row's number of valid tokens so far (the
      rotary position of its next token).
    slot: the next free slot (host int; shared by the rows).
    fed: tokens fed to the model so far, holes included (host int).
  """

  cache: dict
  hidden: jax.Array
  positions: jax.Array
  slot: int
  fed: int

  @property
  def slots(self) -> int:
    """S, the context's capacity in slots."""
    return self.cache["valid"].shape[1]


class Action(NamedTuple):
  """One turn's action of every row, `[B, W]` (W: the turn's slots).

  Attributes:
    tokens: int32 action tokens, the pad id after a row stopped.
    mask: bool, the row's sampled tokens (stop or EOS token included).
    logps: float32 `log pi` of the temperature-1 policy (0 off the mask).
    processed_logps: float32 log-prob under the distribution sampled from.
    entropy: float32 full-vocabulary entropy at each sampled token.
    ended_by_eos: `[B]` bool, the row's action ended with an EOS id.
    stopped: `[B]` bool, the action ended with a stop or EOS id (False:
      it ran to `max_tokens`, or the row was not live).
  """

  tokens: np.ndarray
  mask: np.ndarray
  logps: np.ndarray
  processed_logps: np.ndarray
  entropy: np.ndarray
  ended_by_eos: np.ndarray
  stopped: np.ndarray


def right_align(tokens, mask, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's valid tokens, in order, at the right end (pads first)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  order = np.argsort(mask, axis=1, kind="stable")
  mask = np.take_along_axis(mask, order, axis=1)
  tokens = np.take_along_axis(tokens, order, axis=1)
  return np.where(mask, tokens, pad_id).astype(np.int32), mask


def start(model, prompt_tokens, prompt_mask, *, slots: int,
          pad_id: int = 0) -> Context:
  """A context of `slots` slots holding each row's prompt (prefilled).

  Prompts may be padded anywhere; each row's tokens are moved, in order,
  to the right end of the first `P` slots, so its last prompt token's
  hidden state starts the first action.
  """
  tokens, mask, _ = sampler_lib._check_prompts(  # pylint: disable=protected-access
      prompt_tokens, prompt_mask, model.config.vocab_size,
      model.config.max_position_embeddings)
  batch, width = tokens.shape
  if not 0 < width <= slots <= model.config.max_position_embeddings:
    raise ValueError(f"slots={slots} must hold the {width} prompt slots and "
                     f"fit the model's context of "
                     f"{model.config.max_position_embeddings}.")
  cache = model.init_cache(batch, slots, dtype=model.precision.sampler_dtype)
  ctx = Context(cache, jnp.zeros((batch, model.config.hidden_size),
                                 model.precision.compute_dtype),
                jnp.zeros((batch,), jnp.int32), 0, 0)
  return extend(model, ctx, tokens, mask, pad_id=pad_id)


def extend(model, ctx: Context, tokens, mask, *, pad_id: int = 0) -> Context:
  """Appends a chunk `[B, C]` (each row's valid tokens, in order; a row
  with none adds only holes) at `ctx.slot`: only the new tokens are fed."""
  tokens, mask = right_align(tokens, mask, pad_id)
  width = tokens.shape[1]
  if ctx.slot + width > ctx.slots:
    raise ValueError(f"A chunk of {width} slots does not fit: {ctx.slot} of "
                     f"{ctx.slots} slots are used.")
  graphdef, state = nnx.split(model)
  cache, hidden, positions = _extend_jit(
      graphdef, state, ctx.cache, ctx.hidden, ctx.positions,
      jnp.asarray(tokens), jnp.asarray(mask), jnp.int32(ctx.slot))
  return Context(cache, hidden, positions, ctx.slot + width,
                 ctx.fed + tokens.size)


def _extend(graphdef, state, cache, hidden, positions, tokens, mask, slot):
  model = nnx.merge(graphdef, state)
  pos = positions[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
  out, cache = model(tokens, attention_mask=mask, positions=pos, cache=cache,
                     cache_index=slot)
  has = mask[:, -1]  # right-aligned: a row with tokens has its last here
  hidden = jnp.where(has[:, None], out[:, -1], hidden)
  return cache, hidden, positions + jnp.sum(mask, axis=1, dtype=jnp.int32)


_extend_jit = jax.jit(_extend, static_argnums=0)


def act(model, ctx: Context, live, *, key, max_tokens: int,
        stop_ids: Sequence[int] = (), eos_ids: Sequence[int] = (),
        temperature: float = 1.0, top_k: int | None = None,
        top_p: float | None = None, pad_id: int = 0
        ) -> tuple[Context, Action]:
  """Samples one action per `live` row, from `ctx.slot` on.

  Each live row samples until a stop id or EOS id (kept) or `max_tokens`
  tokens; every sampled token is fed back at once, so the context holds the
  whole action afterwards. The turn takes `W` slots, W the longest action
  (`max_tokens` at most; `ctx.slot + max_tokens` must fit).
  """
  live = np.asarray(live, bool)
  if not sampler_lib._is_int(max_tokens) or max_tokens < 1:  # pylint: disable=protected-access
    raise ValueError(f"max_tokens must be a positive int; got "
                     f"{max_tokens!r}.")
  if ctx.slot + max_tokens > ctx.slots:
    raise ValueError(f"An action of up to {max_tokens} tokens does not fit: "
                     f"{ctx.slot} of {ctx.slots} slots are used.")
  vocab = model.config.vocab_size
  ends = tuple(int(i) for i in stop_ids) + tuple(int(i) for i in eos_ids)
  if any(not 0 <= i < vocab for i in ends):
    raise ValueError(f"stop and EOS ids must be in [0, {vocab}); got "
                     f"{ends}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0; got {temperature}.")
  greedy = temperature == 0
  top_k = None if greedy or top_k is None or top_k >= vocab else int(top_k)
  use_top_p = not greedy and top_p is not None and top_p < 1
  graphdef, state = nnx.split(model)
  out = _act_jit(
      graphdef, state, ctx.cache, ctx.hidden, ctx.positions,
      jnp.int32(ctx.slot), jnp.asarray(live), sampler_lib._check_key(key),  # pylint: disable=protected-access
      jnp.float32(1.0 if greedy else temperature),
      jnp.float32(1.0 if top_p is None else top_p),
      jnp.asarray(ends, jnp.int32).reshape(len(ends)),
      jnp.asarray([int(i) for i in eos_ids], jnp.int32).reshape(-1),
      jnp.int32(pad_id), max_tokens=int(max_tokens), greedy=greedy,
      top_k=top_k, use_top_p=use_top_p)
  cache, hidden, positions, steps, bufs, eos, stopped = out
  steps = int(steps)
  batch = live.shape[0]
  tokens, mask, lps, plps, ents = (np.asarray(b)[:, :steps] for b in bufs)
  action = Action(tokens, mask, lps, plps, ents, np.asarray(eos),
                  np.asarray(stopped))
  return Context(cache, hidden, positions, ctx.slot + steps,
                 ctx.fed + steps * batch), action


def _act(graphdef, state, cache, hidden, positions, slot, live, key,
         temperature, top_p, ends, eos_ids, pad_id, *, max_tokens, greedy,
         top_k, use_top_p):
  model = nnx.merge(graphdef, state)
  lm_head = model.lm_head_matrix()
  batch, n = live.shape[0], max_tokens
  choose = functools.partial(
      sampler_lib._choose, precision=model.precision, greedy=greedy,  # pylint: disable=protected-access
      top_k=top_k, use_top_p=use_top_p)

  keys = sampler_lib.row_keys(key, jnp.arange(batch, dtype=jnp.int32))

  def step(carry):
    j, cache, h, pos, live, bufs, eos, stopped = carry
    row, cache, h, hit, ends_episode = sample_and_feed(
        model, choose, lm_head, h, cache, sampler_lib.step_keys(keys, j),
        live, positions=pos, cache_index=slot + j, temperature=temperature,
        top_p=top_p, ends=ends, eos_ids=eos_ids, pad_id=pad_id)
    bufs = write_column(bufs, row, j)
    pos = pos + live.astype(jnp.int32)
    return (j + 1, cache, h, pos, live & ~hit, bufs, eos | ends_episode,
            stopped | hit)

  def cond(carry):
    return (carry[0] < n) & jnp.any(carry[4])

  zeros = jnp.zeros((batch, n), jnp.float32)
  bufs = (jnp.full((batch, n), pad_id, jnp.int32), jnp.zeros((batch, n), bool),
          zeros, zeros, zeros)
  flags = jnp.zeros((batch,), bool)
  j, cache, hidden, positions, _, bufs, eos, stopped = jax.lax.while_loop(
      cond, step, (jnp.int32(0), cache, hidden, positions, live, bufs, flags,
                   flags))
  return cache, hidden, positions, j, bufs, eos, stopped


def sample_and_feed(model, choose, lm_head, h, cache, keys, live, *,
                    positions, cache_index, temperature, top_p, ends,
                    eos_ids, pad_id):
  """One decode step of a batch of agent rows (here and in agent_slots).

  Samples each row's next token from its hidden state `h` with `keys`
  (`choose`: `sampler._choose` with the static settings bound), feeds it
  to the model at `positions` / `cache_index`, and returns
  `((token, live, logp, policy logp, entropy), cache, h, hit, eos)`: the
  step's column (pad and zeros where a row is not `live`), the new cache
  and hidden states (kept where not live), and which live rows sampled a
  stop-or-EOS id (`ends`) and an EOS id.
  """
  precision = model.precision
  z = precision.round_logits(precision.head_product(h, lm_head))
  token, lp, plp, ent = choose(z, keys, temperature, top_p)
  token = jnp.where(live, token, pad_id)
  zero = jnp.zeros_like(lp)
  row = (token, live) + tuple(jnp.where(live, v, zero) for v in (lp, plp, ent))
  out, cache = model(token[:, None], attention_mask=live[:, None],
                     positions=positions[:, None], cache=cache,
                     cache_index=cache_index)
  h = jnp.where(live[:, None], out[:, 0], h)
  hit = live & jnp.any(token[:, None] == ends[None, :], axis=1)
  eos = live & jnp.any(token[:, None] == eos_ids[None, :], axis=1)
  return row, cache, h, hit, eos


def write_column(bufs, values, i):
  """Writes `values[k]` (`[B]`) into column `i` of `bufs[k]` (`[B, W]`)."""
  return tuple(
      jax.lax.dynamic_update_slice_in_dim(b, v[:, None].astype(b.dtype), i,
                                          axis=1)
      for b, v in zip(bufs, values))


_act_jit = jax.jit(
    _act, static_argnums=0,
    static_argnames=("max_tokens", "greedy", "top_k", "use_top_p"))

