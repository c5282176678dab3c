"""The pieces of the sampler's fixed-batch decode loop (`sampler._generate`):
`prefill` the prompts, then per step `next_hidden` (the forward that gives
the hidden state a token is sampled from) and `record` (sample it and write
it, its log-probs and entropy into the carry), in the loop `decode` runs.

The carry is `(buf, comp, lps, plps, ents, done)`: the token buffer
`[B, P + N + spare]` (prompts left-aligned in the first `P` slots), the
completion mask, the log-probs, processed log-probs and entropies at the
completion slots, and which rows are done `[B]`.
"""

import jax
import jax.numpy as jnp

from entropo.models import transformer as transformer_lib


def prefill(model, tokens, mask, buf, prompt_mask, *, total, use_cache):
  """`(h, cache)`: the hidden state `[B, D]` of the last prompt slot (always
  valid: prompts are left-aligned) and the KV cache of the prompts (None
  without `use_cache`: each step then reruns the whole buffer)."""
  batch, width = tokens.shape
  if use_cache:
    cache = model.init_cache(batch, total,
                             dtype=model.precision.sampler_dtype)
    hidden, cache = model(
        tokens, attention_mask=mask,
        positions=transformer_lib.default_positions(mask), cache=cache,
        cache_index=0)
  else:
    cache = None
    hidden = model(buf[:, :total], attention_mask=prompt_mask)
  return hidden[:, width - 1], cache


def next_hidden(model, buf, comp, cache, j, *, width, prompt_len,
                prompt_mask, use_cache):
  """`(h, cache)` of step `j`: the hidden state `[B, D]` from which token
  `j` is sampled. With the cache, feeds token `j - 1` (slot `P + j - 1`)
  alone; without, reruns the buffer over the prompts and the completion
  so far (`comp`)."""
  batch, total = prompt_mask.shape
  if use_cache:
    last = jax.lax.dynamic_slice_in_dim(buf, width + j - 1, 1, axis=1)
    hidden, cache = model(
        last, attention_mask=jnp.ones((batch, 1), bool),
        positions=(prompt_len + j - 1)[:, None], cache=cache,
        cache_index=width + j - 1)
    return hidden[:, 0], cache
  seen = (prompt_mask | comp[:, :total])
  hidden = model(buf[:, :total], attention_mask=seen)
  return jax.lax.dynamic_index_in_dim(hidden, width + j - 1, axis=1,
                                      keepdims=False), cache


def record(carry, j, h, *, choose, width, pad_id, eos_ids, row_limits):
  """The carry after sampling token `j` of each row from `h`: the token,
  its log-probs and entropy written at slot `width + j` of live rows
  (pads and zeros for finished rows), and the rows that stop with it (an
  EOS id, or the row's budget `row_limits`)."""
  buf, comp, lps, plps, ents, done = carry
  token, lp, plp, ent = choose(h, j)
  live = ~done
  token = jnp.where(live, token, pad_id)
  slot = width + j
  put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(
      a, v[:, None].astype(a.dtype), slot, axis=1)
  zero = jnp.zeros_like(lp)
  buf = put(buf, token)
  comp = put(comp, live)
  lps = put(lps, jnp.where(live, lp, zero))
  plps = put(plps, jnp.where(live, plp, zero))
  ents = put(ents, jnp.where(live, ent, zero))
  done = done | jnp.any(token[:, None] == eos_ids[None, :], axis=1)
  if row_limits is not None:
    done = done | (j + 1 >= row_limits)
  return buf, comp, lps, plps, ents, done


def decode(step, state, *, n, block, can_stop):
  """Runs `step` from token 1 to `n - 1`: with `can_stop` (EOS ids or row
  budgets), a while loop that ends when every row is done, checked every
  `block` steps; else one loop of known length."""
  def cond(state):
    j, _, carry = state
    return (j < n) & ~jnp.all(carry[-1])

  def run_block(state):  # a loop of known length: no check inside
    return jax.lax.fori_loop(0, block, lambda _, s: step(s), state)

  if can_stop:
    return jax.lax.while_loop(cond, step if block == 1 else run_block, state)
  return jax.lax.fori_loop(1, n, lambda _, s: step(s), state)
