"""entropo: entropy-preserving reinforcement learning for language models.

The core is a flat namespace of pure functions over arrays (see
docs/api.md); this file only re-exports.
"""

from entropo.advantages import GRPO_SCALES
from entropo.advantages import degenerate_groups
from entropo.advantages import grpo_advantages
from entropo.advantages import rloo_advantages
from entropo.controllers import ClipHighController
from entropo.controllers import ClipHighState
from entropo.controllers import EntropyCoefController
from entropo.controllers import EntropyCoefState
from entropo.controllers import ZetaController
from entropo.controllers import ZetaState
from entropo.corrections import CORRECTION_LEVELS
from entropo.corrections import CORRECTION_MODES
from entropo.corrections import mismatch_correction
from entropo.covariance import token_covariance
from entropo.diagnostics import entropy_dynamics
from entropo.diagnostics import pass_at_k
from entropo.diagnostics import precision_mismatch
from entropo.diagnostics import sampler_mismatch
from entropo.fused import fused_logprobs_entropy
from entropo.logprobs import token_entropy
from entropo.logprobs import token_logprobs
from entropo.masking import AGGREGATION_MODES
from entropo.masking import aggregate
from entropo.masking import aggregate_terms
from entropo.masking import masked_mean
from entropo.masking import masked_quantiles
from entropo.objectives import BANDS
from entropo.objectives import OBJECTIVES
from entropo.objectives import clip_band
from entropo.objectives import policy_loss
from entropo.precision import PRESETS
from entropo.precision import Precision
from entropo.precision import clamp_log_ratio
from entropo.precision import get_precision
from entropo.regularizers import KL_ESTIMATORS
from entropo.regularizers import entropy_bonus
from entropo.regularizers import kl_divergence
from entropo.regularizers import kl_penalty
from entropo.repo import repo_advantages
from entropo.repo import repo_d_advantages
from entropo.repo import repo_d_coefficient
from entropo.repo import repo_r_advantages

__version__ = "0.1.0"
