"""Entropy controllers: pure `state -> state` updates toward a target entropy.

Each controller is a frozen dataclass of settings with `init() -> state` and
`update(state, entropy, *, target) -> state`. The state is a NamedTuple (a
pytree: jit-able, and saved in checkpoints); its field named by the
controller's `VALUE` holds the controlled value (`zeta`, `clip_high` or
`coef`), read by name with `controller.value(state)`. `entropy` is the measured
mean token entropy of the iteration's batch and `target` the entropy to hold
(by default, the trainer measures it before RL starts). Both may be traced.

All three controllers push the same way: entropy below target raises the
controlled value (more REPO correction, a wider upper clip, a larger bonus),
entropy above target lowers it. Each has two laws:

* a step law: REPO's doubling/halving of zeta with sign flip
  (arXiv:2603.11682; method.md §3), multiplicative steps of ADAPO's
  epsilon_high, and +/- steps of the bonus coefficient (the Skywork-OR1 /
  TRL rule);
* a smooth law that tracks the target without the limit cycle of
  fixed-size steps: a bounded proportional-integral law on the relative
  error for zeta and epsilon_high (`law="pi"`), and projected dual ascent for
  the bonus coefficient (`law="dual"`, the Lagrange multiplier of the
  constraint `H >= target`).

`tolerance` is a deadband of the step laws; the smooth laws have none (they
act on the size of the error). Every law keeps its value within the stated
bounds, whatever the inputs; a
NaN entropy (a diverged batch) leaves the state unchanged.

| module | controller | config section |
|---|---|---|
| `zeta` | `ZetaController` (REPO) | `algo.zeta` |
| `clip_high` | `ClipHighController` (ADAPO) | `algo.clip_high_control` |
| `entropy_coef` | `EntropyCoefController` | `algo.entropy_coef_control` |
| `registry` | `register`, `Section`, `setting`: where they declare themselves | |
| `laws` | the laws' shared pieces (PI step, NaN hold) | |

Any other module of this package is a controller too: it registers itself
(see registry.py) and is imported with the package. The table of every
registered controller and its section is `registry.table()`, printed by
`python -m entropo.controllers`.

This file only re-exports.
"""

from entropo.controllers import registry

registry.load_all()  # the controllers register in registry._FIRST's order

# pylint: disable=g-import-not-at-top,wrong-import-position
from entropo.controllers.clip_high import ClipHighController
from entropo.controllers.clip_high import ClipHighState
from entropo.controllers.entropy_coef import EntropyCoefController
from entropo.controllers.entropy_coef import EntropyCoefState
from entropo.controllers.registry import CONTROLLERS
from entropo.controllers.registry import HYPERPARAMETERS
from entropo.controllers.zeta import ZetaController
from entropo.controllers.zeta import ZetaState
