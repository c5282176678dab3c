"""The tiny run of tests/test_multiprocess.py, as an experiments.main config.

    python -m experiments.main --config=tests/multiprocess_config.py \\
        --workdir=/tmp/entropo/multi

A task easy enough that the 100-step warm start solves some problems, so
groups have mixed rewards and dynamic sampling really picks groups; a mesh
over 8 devices (data 2 x fsdp 2 x tensor 2), which two processes of 4
devices each share with data across the processes. Small enough for a
test: the cost is mostly compiling the sampler and the steps.
"""

from tests.training_setup import tiny_config

# Two numbers up to 9, "+" only, targets that may be one of the numbers.
EASY_TASK = dict(num_count=2, max_value=9, ops="+", max_target=18,
                 min_used=1)


def get_config(algorithm: str = "dapo+repo_r"):
  c = tiny_config(algorithm or "dapo+repo_r",
                  train=dict(iterations=3, eval_every=2, checkpoint_every=3,
                             tensorboard=False),
                  mesh=dict(data=2, fsdp=2, tensor=2))
  c.task.settings.update(EASY_TASK)
  # 2 held-out prompts x 4 samples: the training batch's shape, so the
  # sampler compiles once for both.
  c.data.eval_size = 2
  c.warm_start.steps = 100
  c.algo.minibatches = 2
  return c
