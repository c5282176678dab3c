"""Slots of agent episodes, each row at its own place: in-flight turns.

`entropo.models.multiturn` keeps a batch of episodes in one context whose
rows share the slots and advance together: a turn ends when the batch's
longest action does, and the next starts after every environment
answered. Here each row of the KV cache (a *slot row*) holds one episode
and has its own write position (the transformer's per-row `cache_index`,
as in `entropo.models.inflight`), so the host can drive the rows apart
(`entropo.training.episodes_inflight`): some rows decode their action
while others wait for their environment, a row takes its observation
alone, and a row whose episode ended takes the next episode's prompt.

    bound = bind(model)                  # split once: flat weights
    s = open_slots(model, rows=S, context=C)
    s = feed(bound, s, tokens, mask, rows=..., start=..., reset=...)
    s, block = decode(bound, s, slot=..., active=..., ...)

Layout. A row's tokens are contiguous from slot 0, without holes: the
prompt left-aligned at `[0, P_b)`, then each action and observation where
the previous chunk ended. So a token's slot is its rotary position (the
count of valid tokens before it, as in `multiturn` and in training), and
the host keeps each row's next slot (`slot`, `[S]`). Rows outside a call
(`rows`/`active` false) are frozen: their write index is `C`, past the
cache, so the transformer's scatter drops their keys, values and validity
(`mode="drop"`), and their hidden state is kept.

Randomness. `decode` draws the action token `j` of turn `t` of episode
`e` from `fold_in(fold_in(fold_in(key, t), e), j)`: `multiturn.act`'s key
of row `e` under `play`'s turn key `fold_in(key, t)`. So a row's tokens do
not depend on its slot, its neighbours or when it ran, and equal `play`'s
for the same key (log-probs to float32 rounding: other batch shapes).
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entropo.models import multiturn
from entropo.models import sampler as sampler_lib


class Slots(NamedTuple):
  """The rows' device state: the cache `[S, C]` and each row's last hidden
  state `[S, D]` (the next token's logits come from it)."""

  cache: dict
  hidden: jax.Array

  @property
  def context(self) -> int:
    """C, slots per row."""
    return self.cache["valid"].shape[1]


class Block(NamedTuple):
  """What one `decode` call sampled, `[S, W]` (W: the steps it ran).

  Attributes:
    tokens: int32 sampled tokens (the pad id where a row did not sample).
    mask: bool, the row sampled this token.
    logps: float32 `log pi` of the temperature-1 policy (0 off the mask).
    entropy: float32 full-vocabulary entropy (0 off the mask).
    active: `[S]` bool, the row is still acting after the block.
    eos: `[S]` bool, the row sampled an EOS id in this block.
    fed: token slots the call computed (its batch size times its steps).
  """

  tokens: np.ndarray
  mask: np.ndarray
  logps: np.ndarray
  entropy: np.ndarray
  active: np.ndarray
  eos: np.ndarray
  fed: int


class Sampling(NamedTuple):
  """Validated sampling settings (`sampling`)."""

  ends: jax.Array  # stop and EOS ids
  eos_ids: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  greedy: bool
  top_k: int | None
  use_top_p: bool


def sampling(model, *, stop_ids: Sequence[int], eos_ids: Sequence[int],
             temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None) -> Sampling:
  """`multiturn.act`'s checks and settings, once per episode batch."""
  vocab = model.config.vocab_size
  ends = tuple(int(i) for i in stop_ids) + tuple(int(i) for i in eos_ids)
  if any(not 0 <= i < vocab for i in ends):
    raise ValueError(f"stop and EOS ids must be in [0, {vocab}); got "
                     f"{ends}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0; got {temperature}.")
  greedy = temperature == 0
  return Sampling(
      jnp.asarray(ends, jnp.int32).reshape(len(ends)),
      jnp.asarray([int(i) for i in eos_ids], jnp.int32).reshape(-1),
      jnp.float32(1.0 if greedy else temperature),
      jnp.float32(1.0 if top_p is None else top_p), greedy,
      None if greedy or top_k is None or top_k >= vocab else int(top_k),
      not greedy and top_p is not None and top_p < 1)


def open_slots(model, *, rows: int, context: int) -> Slots:
  """`rows` empty rows of `context` slots each."""
  if not 0 < context <= model.config.max_position_embeddings:
    raise ValueError(f"context={context} must fit the model's context of "
                     f"{model.config.max_position_embeddings}.")
  precision = model.precision
  return Slots(model.init_cache(rows, context,
                                dtype=precision.sampler_dtype),
               jnp.zeros((rows, model.config.hidden_size),
                         precision.compute_dtype))


class Bound(NamedTuple):
  """A model's weights as flat leaves and its compiled calls (`bind`)."""

  leaves: list
  feed: Callable
  decode: Callable


def bind(model) -> Bound:
  """The model split once per episode batch: a call then passes a flat list
  of arrays (no module graph to flatten and hash per call, which cost more
  than a short decode call on the host)."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  return Bound(leaves, *_compiled(graphdef, treedef))


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, treedef):
  merge = lambda leaves: nnx.merge(  # noqa: E731
      graphdef, jax.tree.unflatten(treedef, leaves))
  # The cache and hidden states (arguments 1 and 2) are donated: updated
  # in place, not copied whole at every call.
  feed_fn = jax.jit(lambda leaves, *a: _feed(merge(leaves), *a),
                    donate_argnums=(1, 2))
  decode_fn = jax.jit(
      lambda leaves, *a, **k: _decode(merge(leaves), *a, **k),
      static_argnames=("max_tokens", "block", "greedy", "top_k",
                       "use_top_p"), donate_argnums=(1, 2))
  return feed_fn, decode_fn


def feed(bound: Bound, s: Slots, tokens, mask, *, rows, start,
         reset) -> Slots:
  """Appends a chunk `[S, W]` to the `rows` (`[S]` bool), row `b`'s valid
  tokens left-aligned and written from slot `start[b]`; a `reset` row
  first forgets its whole cache (a new episode's prompt, `start` 0). The
  other rows are untouched; only the `rows` are computed (gathered into
  the next size of `row_buckets`, as in `decode`)."""
  take = _take(rows)
  per_row = np.stack([rows, start, reset])[:, take]
  cache, hidden = bound.feed(bound.leaves, s.cache, s.hidden,
                             _copy(take, np.int32),
                             _copy(np.asarray(tokens)[take], np.int32),
                             _copy(np.asarray(mask)[take], bool),
                             _copy(per_row, np.int32))
  return Slots(cache, hidden)


def computed_rows(rows) -> int:
  """How many rows a call on the `rows` (`[S]` bool) computes."""
  return _take(rows).size


def _take(rows) -> np.ndarray:
  """The `rows` (`[S]` bool) first, then others, `row_buckets` long."""
  rows = np.asarray(rows, bool)
  size = min(b for b in row_buckets(rows.shape[0]) if b >= rows.sum())
  return np.argsort(~rows, kind="stable")[:size]


def _on_rows(fn, cache, hidden, take, *args, **kwargs):
  """`fn` on the rows `take` of the cache and hidden states, written
  back; returns the cache, the hidden states and `fn`'s other outputs."""
  sub = jax.tree.map(lambda a: a[take], cache)
  sub, h, *out = fn(sub, hidden[take], *args, **kwargs)
  cache = jax.tree.map(lambda a, b: a.at[take].set(b), cache, sub)
  return (cache, hidden.at[take].set(h), *out)


def _feed(model, cache, hidden, take, tokens, mask, per_row):
  return _on_rows(functools.partial(_feed_rows, model), cache, hidden, take,
                  tokens, mask, per_row)


def _feed_rows(model, cache, hidden, tokens, mask, per_row):
  rows, start, reset = per_row[0] > 0, per_row[1], per_row[2] > 0
  batch, width = tokens.shape
  context = cache["valid"].shape[1]
  cache = {**cache, "valid": cache["valid"] & ~reset[:, None]}
  mask = mask & rows[:, None]
  index = jnp.where(rows, start, context)  # past the cache: dropped
  positions = start[:, None] + jnp.arange(width, dtype=jnp.int32)
  out, cache = model(tokens, attention_mask=mask, positions=positions,
                     cache=cache, cache_index=index)
  count = jnp.sum(mask, axis=1, dtype=jnp.int32)
  last = out[jnp.arange(batch), jnp.maximum(count - 1, 0)]
  hidden = jnp.where((count > 0)[:, None], last, hidden)
  return cache, hidden


def _copy(a, dtype):
  """A device copy of host array `a`: the call runs asynchronously, and
  `jnp.asarray` may alias a numpy buffer that the caller updates next."""
  return jnp.asarray(np.array(a, dtype, copy=True))


def decode(bound: Bound, s: Slots, *, key, slot, active, step, turn,
           episode, settings: Sampling, max_tokens: int, block: int,
           pad_id: int = 0) -> tuple[Slots, Block]:
  """Up to `block` decode steps of the `active` rows (`[S]` host arrays).

  Row `b` samples its action's token `step[b]` at slot `slot[b]` from the
  key of (`turn[b]`, `episode[b]`, `step[b]`) (module docstring), and
  stops acting after a stop or EOS id (kept) or its `max_tokens`-th
  token. The call returns after `block` steps or once no row is active.
  Only the active rows are computed: they are gathered into a batch of
  the next size of `row_buckets` (padded with frozen rows), so a step
  costs what its active rows do (one compiled call per size).
  """
  rows = active.shape[0]
  take = _take(active)
  per_row = np.stack([slot, active, step, turn, episode])[:, take]
  out = bound.decode(
      bound.leaves, s.cache, s.hidden, _copy(take, np.int32),
      sampler_lib._check_key(key), _copy(per_row, np.int32),  # pylint: disable=protected-access
      settings.ends, settings.eos_ids, settings.temperature, settings.top_p,
      jnp.int32(pad_id), max_tokens=int(max_tokens), block=int(block),
      greedy=settings.greedy, top_k=settings.top_k,
      use_top_p=settings.use_top_p)
  cache, hidden = out[:2]
  steps, bufs, live, eos = jax.device_get(out[2:])  # one wait
  full = []
  for b, fill in zip(bufs, (pad_id, False, 0.0, 0.0)):
    a = np.full((rows, int(steps)), fill, b.dtype)
    a[take] = b[:, :int(steps)]
    full.append(a)
  flags = [np.zeros(rows, bool) for _ in range(2)]
  flags[0][take], flags[1][take] = live, eos
  return Slots(cache, hidden), Block(*full, *flags, take.size * int(steps))


def row_buckets(rows: int) -> tuple[int, ...]:
  """The decode batch sizes of `rows` slots: powers of two below, and
  `rows`."""
  return tuple(1 << i for i in range(rows.bit_length())
               if 1 << i < rows) + (rows,)


def _decode(model, cache, hidden, take, *args, **kwargs):
  return _on_rows(functools.partial(_decode_rows, model), cache, hidden,
                  take, *args, **kwargs)


def _decode_rows(model, cache, hidden, key, per_row, ends, eos_ids,
                 temperature, top_p, pad_id, *, max_tokens, block, greedy,
                 top_k, use_top_p):
  slot, active, step, turn, episode = per_row
  active = active > 0
  lm_head = model.lm_head_matrix()
  batch, context = slot.shape[0], cache["valid"].shape[1]
  choose = functools.partial(
      sampler_lib._choose, precision=model.precision, greedy=greedy,  # pylint: disable=protected-access
      top_k=top_k, use_top_p=use_top_p)
  fold = jax.vmap(jax.random.fold_in)
  keys = fold(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, turn),
              episode)

  def body(carry):
    i, cache, h, slot, live, j, bufs, eos = carry
    row, cache, h, hit, ends_episode = multiturn.sample_and_feed(
        model, choose, lm_head, h, cache, sampler_lib.step_keys(keys, j),
        live, positions=slot, cache_index=jnp.where(live, slot, context),
        temperature=temperature, top_p=top_p, ends=ends, eos_ids=eos_ids,
        pad_id=pad_id)
    token, mask, lp, _, ent = row
    bufs = multiturn.write_column(bufs, (token, mask, lp, ent), i)
    grow = live.astype(jnp.int32)
    live = live & ~hit & (j + 1 < max_tokens)
    return (i + 1, cache, h, slot + grow, live, j + grow, bufs,
            eos | ends_episode)

  def cond(carry):
    return (carry[0] < block) & jnp.any(carry[4])

  zeros = jnp.zeros((batch, block), jnp.float32)
  bufs = (jnp.full((batch, block), pad_id, jnp.int32),
          jnp.zeros((batch, block), bool), zeros, zeros)
  i, cache, hidden, _, active, _, bufs, eos = jax.lax.while_loop(
      cond, body, (jnp.int32(0), cache, hidden, slot, active, step, bufs,
                   jnp.zeros((batch,), bool)))
  return cache, hidden, i, bufs, active, eos

