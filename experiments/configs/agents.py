"""The tiny model as an agent: multi-turn environments with a calculator.

Launch (CPU; the environment is the part after the colon, then an optional
algorithm after a second colon):

    python -m experiments.main --config=experiments/configs/agents.py:countdown_calc \\
        --workdir=/tmp/entropo/calc
    python -m experiments.main --config=experiments/configs/agents.py:quiz:dapo \\
        --workdir=/tmp/entropo/quiz

Hardware: any CPU. What happens: the 3-layer character model is warm
started on scripted transcripts of the environment (entropo.tasks.
agent_tasks: actions, observations and all, the loss on the actions only),
then trains with LOOP (RLOO advantages, per-token PPO clip in the band
[1/1.1, 1.1], the paper's AppWorld baseline) on batches of 8 problems x 8
episodes. Each episode is one training sequence of `agent.max_context`
tokens whose observation tokens carry no loss. docs/agents.md explains the
metrics (turns, end reasons, entropy by turn) and lists measured results.

* `countdown_calc`: countdown with a calculator; a sparse reward (1 when
  the final `ans:` is right).
* `quiz`: three arithmetic questions in turn; a dense reward (the fraction
  answered right, checked at the end).
* `path/to/file.py:ClassName`: an environment of your own (an
  `entropo.tasks.AgentTask` in one file, docs/agents.md), e.g.
  `--config=experiments/configs/agents.py:my_env.py:MyEnv:dapo`.
"""

from entropo.training import config as config_lib

# Per environment: its task settings, the agent limits, the model context.
ENVIRONMENTS = {
    "countdown_calc": dict(
        settings=dict(num_count=3, max_value=12, max_target=50, max_turns=3),
        agent=dict(max_turns=3, max_action_tokens=16,
                   max_observation_tokens=8, max_context=96)),
    "quiz": dict(
        settings=dict(num_questions=3, max_value=20, max_turns=6),
        agent=dict(max_turns=6, max_action_tokens=12,
                   max_observation_tokens=8, max_context=128)),
}


def get_config(arg: str = "countdown_calc"):
  """`ENV[:ALGORITHM]`: ENV a key of `ENVIRONMENTS` or your own
  environment as `path/to/file.py:ClassName` (its default settings, the
  agent section's default limits)."""
  parts = (arg or "countdown_calc").split(":")
  count = 1 if parts[0] in ENVIRONMENTS else 2
  name, algorithm = ":".join(parts[:count]), ":".join(parts[count:])
  env = ENVIRONMENTS.get(name, dict(settings={}, agent={}))
  c = config_lib.default_config(algorithm or "loop")
  c.task.name = name
  c.task.settings = dict(env["settings"])
  c.agent.update(**env["agent"])
  c.model.max_position_embeddings = 128
  c.data.max_prompt_len = 16
  c.sampling.update(prompts_per_batch=8, group_size=8)
  c.train.update(iterations=40, eval_every=10, checkpoint_every=10)
  if c.algo.repo == "repo_r":
    c.algo.zeta.max = 1.0  # as in countdown.py: the tiny model's bound
  return c
