"""A jit-compiled KV-cache sampler that returns the log-probs RL needs.

`sample(model, prompt_tokens, prompt_mask, key=..., max_new_tokens=N)`
continues a batch of prompts of different lengths and returns, for every
sampled token `y_t`, two log-probabilities:

* `logps`: `log pi(y_t)` under the untruncated temperature-1 policy,
  `softmax(z_t)`. It is computed by the trainer's own code (the policy's
  `head_product`, logits rounded to `logits_dtype`, `token_logprobs`), so in
  float32 it equals the trainer's recomputation `fused_logprobs_entropy(
  model(tokens)[:, :-1], lm_head, tokens[:, 1:])` to float32 rounding.
* `processed_logps`: `log q(y_t)` under the distribution actually sampled
  from, `q = softmax(trunc(z_t / T))`, where `trunc`
  (`entropo.models.truncation.truncate_logits`) sets the logits outside the
  kept support (top-k, then top-p of the renormalised top-k distribution)
  to `-inf`. With `T = 1`, `log q = log pi - log S` where `S` is the policy
  mass of the kept support, so `logps - processed_logps = log S <= 0`: the
  term that silently rescales an importance ratio when the two are mixed up
  (TRL #6789). Returning both lets the trainer use the behaviour density it
  wants (or renormalise its own logits over the same support with
  `truncate_logits`). Greedy decoding (`T = 0`) samples a point mass:
  `processed_logps` is 0.

Layout. Rows may be padded anywhere (left, right or both); the sampler moves
each row's prompt tokens, in order, to the right end of the `P` prompt
slots (left padding), so every row's first new token lands in slot `P` and
all rows decode in lock-step. Rotary positions count valid tokens, as
`default_positions` does in training, so the trainer gets the sampler's
positions back from `result.attention_mask`. Every returned array is
`[B, P + N]` and aligned with `result.tokens`: entry `t` of `logps` is the
log-prob of `tokens[:, t]` (0 outside the completion), so the trainer's
`[B, P + N - 1]` log-probs of `tokens[:, 1:]` compare with `logps[:, 1:]`.

Stopping. A row stops after it emits an EOS id (kept, with
`completion_mask` True) or after `max_new_tokens`; the slots after its stop
hold the pad id (the first EOS id, else 0) with masks False and log-probs 0.

Loop. The decode steps run in blocks of at most `steps_per_check` (16) steps:
a `lax.while_loop` over blocks, each a loop of known length, and the loop
ends at the first block boundary at which every row has stopped (or after
`max_new_tokens`). A block of known length is what lets XLA:GPU run it
without a device-to-host copy and host synchronisation per step: it copies
a `while_loop`'s condition to the host at every trip of a loop whose trip
count it cannot infer (`WhileThunk`), so the host could not enqueue step
`j + 1` before step `j` had finished. Without EOS ids nothing stops early
and all steps run as one loop of known length. The blocks cost at most
`steps_per_check - 1` extra steps per call (past the last row's EOS, or
past `max_new_tokens` when the blocks do not divide it; their writes are
discarded), and the tokens are the same whatever the block length.

Cost. Prompts are prefilled in one call; each new token then costs one
single-token forward pass against the KV cache (`use_cache=False` instead
reruns the model over the whole `[B, P + N]` buffer every step: the
recompute baseline of benchmarks/sampler.py, same sampling code).

Randomness. Every sample draws from its own key: the completion token `j`
of the row whose identity is `i` (`sample_ids[i]`, by default the row's
index) is drawn from `fold_in(fold_in(key, i), j)` (`step_keys`). The same
key, inputs and settings give the same tokens, and a sample's tokens depend
on its identity, not on the batch or the slot it runs in: the in-flight
sampler (`entropo.models.inflight`), which runs the rows in another order
and other company, gives the same tokens. Rollouts pass the row index
`prompt * group_size + sample` of the global batch.

Precision. The body runs in the model's `compute_dtype`; the KV cache is
stored in the policy's `sampler_dtype`; the head and log-probs follow the
policy exactly as in training. Under a bf16 preset the sampler's log-probs
therefore differ from float32 trainer log-probs; measure the gap with
`entropo.precision_mismatch(result.logps, trainer_logps, mask)`.

Validation. Bad arguments raise `ValueError` (or `TypeError` for dtypes)
naming the bad value before anything is traced or compiled: an empty prompt
row, a prompt longer than the context, `max_new_tokens` that would
overflow it, an EOS id or prompt token outside the vocabulary, a negative
temperature, `top_k < 1`, `top_p` outside `(0, 1]`. Compiled functions are
cached by jit per model structure, shapes and static settings (`greedy`,
`top_k`, whether top-p is on, the number of EOS ids, `max_new_tokens`);
temperature, `top_p` and the EOS ids themselves are traced.
"""

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entropo import logprobs as logprobs_lib
from entropo.models import decode_loop
from entropo.models import truncation
# Re-exported: multiturn.py, inflight.py and the tests validate with them.
from entropo.models.sampling_checks import _check_key  # pylint: disable=unused-import
from entropo.models.sampling_checks import _check_prompts
from entropo.models.sampling_checks import _device_input
from entropo.models.sampling_checks import _is_int
from entropo.models.sampling_checks import _is_real


class SampleResult(NamedTuple):
  """Prompts and completions, left-aligned prompts, all `[B, P + N]`.

  Attributes:
    tokens: `[B, P + N]` int32. Prompt slots `[0, P)` hold each row's prompt
      right-aligned (pad id on the left); slots `[P, P + N)` the completion,
      then the pad id after the row stopped.
    prompt_mask: `[B, P + N]` bool, the prompt tokens.
    completion_mask: `[B, P + N]` bool, the sampled tokens up to and
      including EOS.
    logps: `[B, P + N]` float32, `log pi(token)` under the untruncated
      temperature-1 policy at completion slots, else 0.
    processed_logps: `[B, P + N]` float32, the log-prob under the
      distribution sampled from (temperature, top-k, top-p) at completion
      slots, else 0 (and 0 for greedy decoding).
    entropy: `[B, P + N]` float32, the full-vocabulary entropy of the
      temperature-1 policy at the step that sampled each completion token,
      else 0.
    lengths: `[B]` int32, completion lengths (EOS included).
  """

  tokens: jax.Array
  prompt_mask: jax.Array
  completion_mask: jax.Array
  logps: jax.Array
  processed_logps: jax.Array
  entropy: jax.Array
  lengths: jax.Array

  @property
  def attention_mask(self) -> jax.Array:
    """`[B, P + N]` bool, prompt and completion: the trainer's mask."""
    return self.prompt_mask | self.completion_mask


def sample(
    model,
    prompt_tokens,
    prompt_mask,
    *,
    key,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    steps_per_check: int = 16,
    sample_ids=None,
    row_max_new_tokens=None,
) -> SampleResult:
  """Samples `max_new_tokens` continuations of a batch of prompts.

  See the module docstring for the layout, the two kinds of log-probs and
  the stopping rule.

  Args:
    model: an `entropo.models.Transformer`.
    prompt_tokens: `[B, P]` int token ids (concrete, not traced). A
      `jax.Array` placed with a `NamedSharding` (e.g. a batch sharding)
      stays there and the compiled sampler follows it; a global array of
      several processes (`jax.distributed`) is validated on this process's
      rows.
    prompt_mask: `[B, P]` bool (or 0/1 int) valid prompt tokens; every row
      needs at least one.
    key: a JAX PRNG key (`jax.random.key` or `jax.random.PRNGKey`).
    max_new_tokens: N >= 1; the longest prompt plus N must fit in the
      model's context (`config.max_position_embeddings`).
    temperature: T >= 0; 0 means greedy decoding (argmax, ties to the
      lowest id, top-k/top-p ignored).
    top_k: keep the k largest logits (None: all; values above the
      vocabulary size keep all). Ties with the k-th largest are kept.
    top_p: in (0, 1]: keep the smallest set of most likely tokens whose
      (top-k renormalised) mass reaches `top_p`; ties at the cut are kept.
      None or 1.0: no nucleus truncation.
    eos_id: an id or ids in `[0, V)` that end a row (None: run N tokens).
    use_cache: False reruns the model over the whole sequence buffer at
      every step instead of using the KV cache (a slow baseline).
    steps_per_check: decode steps run between two checks of whether every
      row has stopped (see "Loop" in the module docstring). 1 checks after
      every step. The tokens do not depend on it.
    sample_ids: `[B]` int identities of the rows' samples, which choose
      their random streams (see "Randomness"); None: `arange(B)`.
    row_max_new_tokens: optional `[B]` ints in `[1, max_new_tokens]`: row
      `b` ends by length after `row_max_new_tokens[b]` tokens (a budget per
      row; benchmarks/inflight.py sets completion lengths with it).

  Returns:
    A `SampleResult`.
  """
  fn, args, kwargs = _prepare(
      model, prompt_tokens, prompt_mask, key=key,
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      top_p=top_p, eos_id=eos_id, use_cache=use_cache,
      steps_per_check=steps_per_check, sample_ids=sample_ids,
      row_max_new_tokens=row_max_new_tokens)
  return fn(*args, **kwargs)


# Validation (sampling_checks.py) looks at concrete values, before tracing.

def _prepare(model, prompt_tokens, prompt_mask, *, key, max_new_tokens,
             temperature, top_k, top_p, eos_id, use_cache,
             steps_per_check=16, sample_ids=None, row_max_new_tokens=None):
  """Validates the arguments; returns the jitted function and its inputs."""
  cfg = model.config
  vocab, context = cfg.vocab_size, cfg.max_position_embeddings
  tokens, mask, longest = _check_prompts(prompt_tokens, prompt_mask, vocab,
                                         context)
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int; got "
                     f"{max_new_tokens!r}.")
  max_new_tokens = int(max_new_tokens)
  if longest + max_new_tokens > context:
    raise ValueError(
        f"max_new_tokens={max_new_tokens} would overflow the model's "
        f"context: the longest prompt has {longest} tokens and "
        f"{longest} + {max_new_tokens} > {context}; use max_new_tokens <= "
        f"{context - longest}."
    )
  if not _is_real(temperature) or not (
      math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0 (0 means "
                     f"greedy); got {temperature!r}.")
  greedy = temperature == 0
  if top_k is not None:
    if not _is_int(top_k) or top_k < 1:
      raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}.")
    top_k = None if top_k >= vocab else int(top_k)
  if top_p is not None:
    if not _is_real(top_p) or not 0 < top_p <= 1:
      raise ValueError(f"top_p must be None or in (0, 1]; got {top_p!r}.")
  use_top_p = top_p is not None and top_p < 1
  if greedy:  # argmax is always kept: truncation changes nothing
    top_k, use_top_p = None, False
  if eos_id is None:
    eos_ids = ()
  elif _is_int(eos_id):
    eos_ids = (int(eos_id),)
  elif isinstance(eos_id, Sequence) and all(_is_int(e) for e in eos_id):
    eos_ids = tuple(int(e) for e in eos_id)
  else:
    raise ValueError(f"eos_id must be None, an int or a sequence of ints; "
                     f"got {eos_id!r}.")
  for e in eos_ids:
    if not 0 <= e < vocab:
      raise ValueError(f"eos_id {e} is outside the vocabulary [0, {vocab}).")
  if not isinstance(use_cache, bool):
    raise ValueError(f"use_cache must be a bool; got {use_cache!r}.")
  if not _is_int(steps_per_check) or steps_per_check < 1:
    raise ValueError(f"steps_per_check must be a positive int; got "
                     f"{steps_per_check!r}.")
  key = _check_key(key)

  graphdef, state = nnx.split(model)
  device_tokens = _device_input(prompt_tokens, tokens, jnp.int32)
  batch = device_tokens.shape[0]  # global: `tokens` may be this process's
  args = (
      graphdef,
      state,
      device_tokens,
      _device_input(prompt_mask, mask, jnp.bool_),
      key,
      jnp.float32(1.0 if greedy else temperature),
      jnp.float32(1.0 if top_p is None else top_p),
      jnp.asarray(eos_ids, jnp.int32).reshape(len(eos_ids)),
      check_sample_ids(sample_ids, batch),
      check_row_limits(row_max_new_tokens, batch, max_new_tokens),
  )
  kwargs = dict(
      max_new_tokens=max_new_tokens,
      greedy=greedy,
      top_k=top_k,
      use_top_p=use_top_p,
      use_cache=use_cache,
      block=(_block_length(max_new_tokens - 1, int(steps_per_check))
             if eos_ids or row_max_new_tokens is not None else 1),
  )
  return _generate_jit, args, kwargs


def _block_length(steps: int, most: int) -> int:
  """Steps per block: at most `most`, as even as the blocks can be.

  `steps` decode steps follow the first token; `ceil(steps / k)` blocks of
  `k` steps overshoot by less than one step per block.
  """
  if steps <= 0:
    return 1
  blocks = -(-steps // most)
  return -(-steps // blocks)


# The compiled part.


def check_sample_ids(sample_ids, batch: int) -> jax.Array | None:
  """`[B]` int32 sample identities, validated; None (the compiled
  sampler's default, `arange(B)`) stays None."""
  if sample_ids is None:
    return None
  ids = np.asarray(sample_ids)
  if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"sample_ids must be [B] = [{batch}] ints; got "
                     f"{ids.dtype} {ids.shape}.")
  if (ids < 0).any() or (ids >= 2**31).any():
    raise ValueError("sample_ids must be in [0, 2**31).")
  return jnp.asarray(ids, jnp.int32)


def check_row_limits(limits, batch: int, most: int) -> jax.Array | None:
  """`[B]` int32 per-row token budgets in `[1, most]`, or None."""
  if limits is None:
    return None
  arr = np.asarray(limits)
  if arr.shape != (batch,) or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"row_max_new_tokens must be [B] = [{batch}] ints; got "
                     f"{arr.dtype} {arr.shape}.")
  if (arr < 1).any() or (arr > most).any():
    raise ValueError(f"row_max_new_tokens must be in [1, max_new_tokens="
                     f"{most}]; got values in [{arr.min()}, {arr.max()}].")
  return jnp.asarray(arr, jnp.int32)


def row_keys(key, sample_ids):
  """`[B]` keys: each sample's own stream, `fold_in(key, sample_ids[b])`."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, sample_ids)


def step_keys(rows, steps):
  """`[B]` keys of completion token `steps` (int or `[B]`) of each row."""
  steps = jnp.broadcast_to(jnp.asarray(steps, jnp.uint32), rows.shape)
  return jax.vmap(jax.random.fold_in)(rows, steps)


def _choose(z, keys, temperature, top_p, *, precision, greedy, top_k,
            use_top_p):
  """Samples one token per row from logits `z: [B, V]` (float32, rounded),
  row `b` with its own key `keys[b]` (`[B]` keys, `step_keys`).

  Returns `(token [B] int32, logp [B], processed_logp [B], entropy [B])`.
  """
  if greedy:
    token = jnp.argmax(z, axis=-1).astype(jnp.int32)
    processed = jnp.zeros(z.shape[:1], jnp.float32)
  else:
    s = precision.round_logits(z / temperature)
    s = truncation.truncate_logits(s, top_k=top_k,
                                   top_p=top_p if use_top_p else None)
    draw = lambda k, x: jax.random.categorical(k, x, axis=-1)  # noqa
    token = jax.vmap(draw)(keys, s).astype(jnp.int32)
    processed = logprobs_lib.token_logprobs(s, token, precision=precision)
  logp = logprobs_lib.token_logprobs(z, token, precision=precision)
  entropy = logprobs_lib.token_entropy(z, precision=precision)
  return token, logp, processed, entropy


def _left_align(tokens, mask, pad_id):
  """Pads first, tokens in order (a stable sort of the mask); pads get
  `pad_id`."""
  order = jnp.argsort(mask, axis=1, stable=True)  # [B, P]
  mask = jnp.take_along_axis(mask, order, axis=1)
  tokens = jnp.take_along_axis(tokens, order, axis=1)
  return jnp.where(mask, tokens, pad_id), mask


def _generate(graphdef, state, tokens, mask, key, temperature, top_p,
              eos_ids, sample_ids=None, row_limits=None, *, max_new_tokens,
              greedy, top_k, use_top_p, use_cache, block=1):
  model = nnx.merge(graphdef, state)
  pad_id = eos_ids[0] if eos_ids.shape[0] else jnp.int32(0)
  precision = model.precision
  batch, width = tokens.shape
  n = max_new_tokens
  total = width + n
  # The last block may run past step n - 1: its extra steps write to
  # `block - 1` spare slots, cut off at the end, and into the cache's last
  # slot, which no real step reads any more.
  spare = block - 1

  tokens, mask = _left_align(tokens, mask, pad_id)
  prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
  lm_head = model.lm_head_matrix()

  buf = jnp.concatenate(
      [tokens, jnp.full((batch, n + spare), pad_id, jnp.int32)], axis=1)
  prompt_mask = jnp.concatenate([mask, jnp.zeros((batch, n), bool)], axis=1)
  if sample_ids is None:
    sample_ids = jnp.arange(batch, dtype=jnp.int32)
  keys = row_keys(key, sample_ids)  # [B]
  choose = lambda h, j: _choose(
      precision.round_logits(precision.head_product(h, lm_head)),
      step_keys(keys, j), temperature, top_p, precision=precision,
      greedy=greedy, top_k=top_k, use_top_p=use_top_p)
  record = functools.partial(decode_loop.record, choose=choose, width=width,
                             pad_id=pad_id, eos_ids=eos_ids,
                             row_limits=row_limits)

  h, cache = decode_loop.prefill(model, tokens, mask, buf, prompt_mask,
                                 total=total, use_cache=use_cache)
  zeros = jnp.zeros((batch, total + spare), jnp.float32)
  carry = (buf, jnp.zeros((batch, total + spare), bool), zeros, zeros, zeros,
           jnp.zeros((batch,), bool))
  carry = record(carry, 0, h)

  def step(state):
    j, cache, carry = state
    h, cache = decode_loop.next_hidden(
        model, carry[0], carry[1], cache, j, width=width,
        prompt_len=prompt_len, prompt_mask=prompt_mask, use_cache=use_cache)
    return j + 1, cache, record(carry, j, h)

  state = decode_loop.decode(
      step, (jnp.int32(1), cache, carry), n=n, block=block,
      can_stop=bool(eos_ids.shape[0]) or row_limits is not None)
  carry = state[-1]
  buf, comp, lps, plps, ents = (x[:, :total] for x in carry[:-1])
  return SampleResult(
      tokens=buf,
      prompt_mask=prompt_mask,
      completion_mask=comp,
      logps=lps,
      processed_logps=plps,
      entropy=ents,
      lengths=jnp.sum(comp, axis=1, dtype=jnp.int32),
  )


_generate_jit = jax.jit(
    _generate,
    static_argnums=(0,),
    static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p",
                     "use_cache", "block"),
)
