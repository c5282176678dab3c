"""Policy-gradient objectives, one family per module, behind `policy_loss`.

| module | objectives |
|---|---|
| `ratio` | the importance ratio, its band (`clip_band`) and PPO's clip |
| `ppo` | `ppo`: PPO, DAPO's clip-higher, LOOP's band, the dual clip |
| `gspo` | `gspo`, `gspo_token` |
| `covariance` | `clip_cov`, `kl_cov` |
| `reinforce` | `reinforce` (RLOO) |
| `registry` | `register`, `Settings`, `setting`: where objectives declare themselves |
| `loss` | `policy_loss`: lookup in `OBJECTIVE_TERMS`, weights, aggregation |

Any other module of this package is an objective too: it registers itself
(see registry.py) and is imported with the package. The table of every
registered objective and its settings is `registry.table()`, printed by
`python -m entropo.objectives`.

This file only re-exports.
"""

from entropo.objectives.loss import OBJECTIVE_TERMS
from entropo.objectives.loss import OBJECTIVES
from entropo.objectives.loss import advantage_metrics
from entropo.objectives.loss import policy_loss
from entropo.objectives.ratio import BANDS
from entropo.objectives.ratio import PolicyTerms
from entropo.objectives.ratio import TokenInputs
from entropo.objectives.ratio import clip_band
from entropo.objectives.registry import Settings
from entropo.objectives.registry import SettingError
from entropo.objectives.registry import register
from entropo.objectives.registry import setting
