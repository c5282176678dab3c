"""The main job shrunk to seconds: the tests' run and the study's smoke mode.

Launch (CPU, well under a minute after compiling):

    python -m experiments.main --config=experiments/configs/tiny.py \\
        --workdir=/tmp/entropo/tiny

Hardware: any CPU. What happens: a 1-layer, 32-wide model is warm-started
for 40 steps on 200 countdown problems, then trains on batches of 2 prompts
x 4 completions of at most 8 tokens; the numbers only show that everything
runs (the tests check behaviour, not learning).
"""

from entropo.training import config as config_lib


def shrink(c, *, warm_start_steps: int = 40):
  """Makes `c`'s model, warm start, data and batches seconds-scale."""
  c.model.update(hidden_size=32, intermediate_size=64, num_layers=1,
                 num_heads=2, num_kv_heads=1)
  c.warm_start.update(steps=warm_start_steps, num_problems=200,
                      batch_size=16, learning_rate=1e-2)
  c.data.update(train_size=64, eval_size=4)
  c.sampling.update(prompts_per_batch=2, group_size=4, max_new_tokens=8)
  # Batches of 8 rows: packed batches keep all 8 rows, so the update
  # compiles once per program, not once per packed row count (seconds
  # each, where a step takes milliseconds).
  c.train.row_buckets = 1
  return c


def get_config(algorithm: str = "grpo"):
  return shrink(config_lib.default_config(algorithm or "grpo"))
