"""Verifiable-reward tasks, their data and tokenizers.

`get_task(name, **settings)` builds a task; `TASKS` lists the names.
"""

from entropo.tasks.base import CORRECT
from entropo.tasks.base import REASONS
from entropo.tasks.base import Reward
from entropo.tasks.base import Task
from entropo.tasks.base import warm_start_examples
from entropo.tasks.countdown import Countdown
from entropo.tasks.countdown import CountdownAll
from entropo.tasks.gsm8k import Gsm8k
from entropo.tasks.tokenizer import char_tokenizer
from entropo.tasks.tokenizer import save_tokenizer

TASKS = {
    "countdown": Countdown,
    "countdown_all": CountdownAll,
    "gsm8k": Gsm8k,
}


def get_task(name: str, **settings) -> Task:
  """The task called `name`, built with `settings` (its dataclass fields)."""
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
  try:
    return TASKS[name](**settings)
  except TypeError as e:
    raise ValueError(f"Bad settings for task {name!r}: {e}") from None
