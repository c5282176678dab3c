"""A memory planner for sharded RL runs (a tool beside the library's layers).

Parameter counts and per-device memory estimates for Qwen3 models on a
`(data, fsdp, tensor)` mesh, by precision preset; imported by no library
module. `python -m entropo.planning` prints the tables of docs/scaling.md.

| module | holds |
|---|---|
| `catalog` | published Qwen3 configs (`qwen3_config`), accelerators (`HARDWARE`) |
| `params` | parameter shapes and counts (with LoRA), `MeshShape`, per-device shares |
| `memory` | the memory model: `memory_estimate`, `block_token_bytes` |
| `mesh_search` | `max_sequences`, `recommend_mesh` |
| `report` | the markdown tables (`markdown_tables`) and the command line |

This file only re-exports.
"""

from entropo.planning.catalog import GIB
from entropo.planning.catalog import HARDWARE
from entropo.planning.catalog import QWEN3
from entropo.planning.catalog import Hardware
from entropo.planning.catalog import qwen3_config
from entropo.planning.memory import MemoryEstimate
from entropo.planning.memory import block_token_bytes
from entropo.planning.memory import memory_estimate
from entropo.planning.params import MeshShape
from entropo.planning.params import ParamShape
from entropo.planning.params import lora_shapes
from entropo.planning.params import param_count
from entropo.planning.params import param_shapes
from entropo.planning.params import params_per_device
from entropo.planning.mesh_search import max_sequences
from entropo.planning.mesh_search import recommend_mesh
from entropo.planning.report import markdown_tables
