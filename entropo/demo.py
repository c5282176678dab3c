"""A two-second tour of the loss library on a toy batch: `python -m entropo.demo`.

A random "policy" (hidden states and an output projection) scores G
completions for each of P prompts; the demo computes, as the trainer will:
token log-probs and entropy with the fused head (float32 and bf16), RLOO and
GRPO advantages, REPO-R advantages with the controller's zeta, a DAPO loss
and its gradient, the entropy-dynamics and precision diagnostics, and one
controller step. It prints every metric.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import entropo


def toy_batch(key, *, prompts, group, length, width, vocab):
  """Random hidden states, output projection, tokens, mask and rewards."""
  k = jax.random.split(key, 5)
  b = prompts * group
  hidden = jax.random.normal(k[0], (b, length, width))
  lm_head = 1.5 * jax.random.normal(k[1], (width, vocab)) / np.sqrt(width)
  tokens = jax.random.randint(k[2], (b, length), 0, vocab)
  lengths = jax.random.randint(k[3], (b,), length // 2, length + 1)
  mask = jnp.arange(length)[None, :] < lengths[:, None]
  rewards = jax.random.bernoulli(k[4], 0.5, (prompts, group)).astype(
      jnp.float32
  )
  return hidden, lm_head, tokens, mask, rewards


def run(seed: int = 0, prompts: int = 4, group: int = 4, length: int = 16,
        width: int = 32, vocab: int = 64) -> dict[str, float]:
  """Computes the demo's metrics; returns them as a flat dict of floats."""
  key = jax.random.key(seed)
  hidden, lm_head, tokens, mask, rewards = toy_batch(
      key, prompts=prompts, group=group, length=length, width=width,
      vocab=vocab,
  )
  metrics = {}

  # Log-probs and entropy straight from hidden states, never holding [B,T,V].
  logps, entropy = entropo.fused_logprobs_entropy(hidden, lm_head, tokens,
                                                  chunk_size=16)
  logps_bf16, _ = entropo.fused_logprobs_entropy(
      hidden.astype(jnp.bfloat16), lm_head.astype(jnp.bfloat16), tokens,
      chunk_size=16, precision="bf16",
  )

  # Group-relative advantages, then REPO-R on top.
  adv = entropo.rloo_advantages(rewards).reshape(-1)  # [B]
  metrics["adv/grpo_abs_mean"] = jnp.mean(
      jnp.abs(entropo.grpo_advantages(rewards))
  )
  metrics["adv/degenerate_groups"] = jnp.sum(
      entropo.degenerate_groups(rewards)
  )
  controller = entropo.ZetaController()
  zeta_state = controller.init()
  adv_r = entropo.repo_r_advantages(adv, logps, zeta=zeta_state.zeta)

  # The policy moved a little since sampling: a DAPO update.
  old_logps = logps + 0.05 * jax.random.normal(jax.random.key(seed + 1),
                                               logps.shape)

  def dapo(h):
    new_logps, _ = entropo.fused_logprobs_entropy(h, lm_head, tokens,
                                                  chunk_size=16)
    return entropo.policy_loss(
        new_logps, old_logps, adv_r, mask, objective="ppo", clip_low=0.2,
        clip_high=0.28, agg="token_mean",
    )

  (loss, pg_metrics), grad = jax.value_and_grad(dapo, has_aux=True)(hidden)
  metrics.update(pg_metrics)
  metrics["pg/grad_norm"] = jnp.linalg.norm(grad)
  metrics.update(entropo.entropy_dynamics(logps, adv_r, mask,
                                          entropy=entropy))
  metrics.update(entropo.precision_mismatch(logps_bf16, logps, mask,
                                            clip_low=0.2, clip_high=0.28))
  target = metrics["entropy/mean"] * 1.05  # pretend entropy fell 5 %
  zeta_state = controller.update(zeta_state, metrics["entropy/mean"],
                                 target=target)
  metrics["repo/zeta_next"] = zeta_state.zeta
  metrics["pg/loss"] = loss
  return {k: float(v) for k, v in sorted(metrics.items())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  metrics = run(seed=args.seed)
  width = max(len(k) for k in metrics)
  print("entropo demo: DAPO + REPO-R on a toy batch (4 prompts x 4 samples)")
  for name, value in metrics.items():
    print(f"  {name:<{width}}  {value: .6g}")


if __name__ == "__main__":
  main()
