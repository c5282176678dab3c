"""The tiny model as an agent that runs code: calc_code and apps_world.

Launch (CPU; the environment after the colon, then an optional algorithm):

    python -m experiments.main --config=experiments/configs/code_agents.py:calc_code \\
        --workdir=/tmp/entropo/calc_code
    python -m experiments.main --config=experiments/configs/code_agents.py:apps_world \\
        --workdir=/tmp/entropo/apps_world

As experiments/configs/agents.py, but the policy's actions are Python run in
a sandbox (entropo.tasks.sandbox, docs/sandbox.md), one fresh worker
process per episode:

* `calc_code`: `17*23+4=?`, the agent may `run: 17*23+4`, sees `395`, and
  answers `answer: 395`; a sparse reward.
* `apps_world`: `task: pay back bob`, the agent calls the apps' API
  (`run: owe("bob")`, `run: pay("bob",7)`) and says `done`; the reward
  pays progress (the checks still to do at the start that pass at the
  end, docs/tasks.md), solved when all checks pass.

The limits below fit every scripted transcript and every observation the
task can make (`max_observation_tokens` = `observation_chars` + 1), so
that a wrong program's error message does not end the episode as
`observation_too_long`; and `max_context` holds `max_turns` actions of
`max_action_tokens` slots after the prompt's `max_prompt_len`, with
observation chunks padded to `EpisodeLimits.observation_bucket` between
them (the rollout's slot accounting: rows share slots), so that no episode
ends `context_full` early. tests/test_tasks_code.py checks all three.
"""

from entropo.training import config as config_lib

# Per environment: its task settings, the agent limits, the prompt length.
ENVIRONMENTS = {
    "calc_code": dict(
        settings=dict(max_value=99, max_turns=3),
        agent=dict(max_turns=3, max_action_tokens=24,
                   max_observation_tokens=13, max_context=128),
        max_prompt_len=16),
    "apps_world": dict(
        settings=dict(num_people=3, max_amount=20, max_turns=3,
                      observation_chars=16),
        agent=dict(max_turns=3, max_action_tokens=40,
                   max_observation_tokens=17, max_context=192),
        max_prompt_len=32),
}


def get_config(arg: str = "calc_code"):
  name, _, algorithm = (arg or "calc_code").partition(":")
  if name not in ENVIRONMENTS:
    raise ValueError(f"Unknown environment {name!r}; choose one of "
                     f"{sorted(ENVIRONMENTS)}.")
  env = ENVIRONMENTS[name]
  c = config_lib.default_config(algorithm or "loop")
  c.task.name = name
  c.task.settings = dict(env["settings"])
  c.agent.update(**env["agent"])
  c.model.max_position_embeddings = 192
  c.data.max_prompt_len = env["max_prompt_len"]
  c.sampling.update(prompts_per_batch=8, group_size=8)
  c.train.update(iterations=40, eval_every=10, checkpoint_every=10)
  return c
