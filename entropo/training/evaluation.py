"""Held-out evaluation: pass@k, reward and entropy of the current policy."""

import jax
import numpy as np

from entropo import diagnostics
from entropo.tasks import pipeline


def evaluate(model, records, rollouts, key, *, samples: int,
             pass_k, max_prompt_len: int, temperature: float
             ) -> dict[str, float]:
  """pass@k, mean entropy and length of `samples` completions per record.

  Every process builds the same evaluation batches; each scores the rows
  its devices hold, and the counts, entropies and lengths are gathered
  (`rollouts.placement`), so every process returns the same numbers. For
  an agent task a sample is a whole episode: correct means solved, its
  length and entropy are those of the policy's tokens, and the fraction of
  episodes ending with each reason is `eval/end/<reason>` (`evaluate_rows`
  returns the rows' end reasons as a fourth element).

  Args:
    model: the policy.
    records: the held-out problem records.
    rollouts: the run's `Rollouts` (sampler settings, scoring, placement).
    key: PRNG key of this evaluation.
    samples: completions per record (n of pass@k).
    pass_k: the k of each `eval/pass@k`.
    max_prompt_len: prompt length in tokens.
    temperature: sampling temperature.

  Returns:
    `eval/pass@k` for each k, `eval/entropy` (nats per token),
    `eval/length` (tokens per completion) and, for an agent task,
    `eval/end/<reason>` (fraction of episodes).
  """
  placement, n = rollouts.placement, samples
  correct = np.zeros(len(records), np.int64)
  entropies, lengths, reasons = [], [], {}
  chunk = max(1, rollouts.eval_rows // n)  # prompts per sampler call
  for start in range(0, len(records), chunk):
    part = records[start:start + chunk]
    rows = np.repeat(np.arange(start, start + len(part)), n)
    batch = pipeline.prompt_batch(part, rollouts.tokenizer, group_size=n,
                                  max_prompt_len=max_prompt_len)
    # Pad with copies of the last row so the batch splits over devices.
    size = -(-len(rows) // placement.shards) * placement.shards
    batch = {k: np.concatenate([v, np.repeat(v[-1:], size - len(v), 0)])
             for k, v in batch.items()}
    correct_rows, entropy, cmask, *ends = (x[:len(rows)] for x in (
        rollouts.evaluate_rows(model, batch, jax.random.fold_in(key, start),
                               temperature)))
    for reason in ends[0] if ends else ():
      reasons[reason] = reasons.get(reason, 0) + 1
    np.add.at(correct, rows, correct_rows.astype(np.int64))
    entropies.append(entropy[cmask])
    lengths.append(cmask.sum(1))
  out = {f"eval/pass@{k}": float(np.mean(diagnostics.pass_at_k(
      correct, n, int(k)))) for k in pass_k}
  out["eval/entropy"] = float(np.concatenate(entropies).mean())
  out["eval/length"] = float(np.concatenate(lengths).mean())
  out.update({f"eval/end/{r}": c / (len(records) * n)
              for r, c in sorted(reasons.items())})
  return out
