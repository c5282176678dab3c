"""The RL trainer: configuration, the loop, checkpoints and metrics.

`entropo.training.algorithm` is the module of `Algorithm`; the `algo`
fields of a preset name are `preset(name)` (formerly re-exported here as
`algorithm`, which hid that module; `config.algorithm` remains an alias).
"""

from entropo.training.algorithm import Algorithm
from entropo.training.config import ALGORITHMS
from entropo.training.config import MODIFIERS
from entropo.training.config import default_config
from entropo.training.config import preset
from entropo.training.config import validate
from entropo.training.guards import NonFiniteError
from entropo.training.guards import check_resume
from entropo.training.loop import Trainer
from entropo.training.runs import load_policy
from entropo.training.runs import train
