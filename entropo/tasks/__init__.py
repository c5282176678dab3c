"""Verifiable-reward tasks, their data and tokenizers.

`get_task(name, **settings)` builds a task; `TASKS` (registry.py) lists the
names. This file only re-exports.
"""

from entropo.tasks.base import CORRECT
from entropo.tasks.base import REASONS
from entropo.tasks.base import Reward
from entropo.tasks.base import Task
from entropo.tasks.base import warm_start_examples
from entropo.tasks.countdown import Countdown
from entropo.tasks.countdown import CountdownAll
from entropo.tasks.gsm8k import Gsm8k
from entropo.tasks.registry import TASKS
from entropo.tasks.registry import get_task
from entropo.tasks.registry import task_class
from entropo.tasks.settings import SettingError
from entropo.tasks.tokenizer import char_tokenizer
from entropo.tasks.tokenizer import save_tokenizer
from entropo.tasks.environment import END_REASONS
from entropo.tasks.environment import AgentTask
from entropo.tasks.environment import Environment
from entropo.tasks.environment import Segment
from entropo.tasks.environment import TaskEnvironment
from entropo.tasks.environment import Turn
