"""Test setup: 8 virtual CPU devices for the sharding tests.

XLA_FLAGS must be set before jax is imported anywhere, hence here.

With ENTROPO_TEST_ACCELERATOR=1 the platform is left to jax (a GPU or TPU
where there is one; JAX_PLATFORMS still chooses, if set) and no host devices
are forced, so the numeric and model tests run on the accelerator as they
are; the tests that need the 8 CPU devices or several processes carry the
`multidevice` marker and are skipped there. Mark such a test (or its whole
module, with `pytestmark`): run
`ENTROPO_TEST_ACCELERATOR=1 JAX_PLATFORMS=cpu pytest ...` (one CPU device)
to find the ones that were forgotten.
"""

import importlib.metadata
import os
import pathlib

NUM_DEVICES = 8
ACCELERATOR = os.environ.get("ENTROPO_TEST_ACCELERATOR", "0") not in ("", "0")

# The suite compiles a few thousand small programs and runs each briefly, so
# most of its time is XLA:CPU compiling, and three flags make that cheaper
# (docs/benchmarks.md, "The test suite"): LLVM's optimisation level 0 (about
# 1.5x), the legacy elemental loop emitters instead of the MLIR fusion
# emitters, and one LLVM module per program instead of parallel codegen
# splits (the last two, interleaved A/B on two test files: 1.8x; jaxlib 0.11
# has only the MLIR emitters, so its leg gets the other two). The HLO
# passes (fusion, layout, buffer assignment, memory analysis) do not depend
# on them; the machine code does, and results may differ from the defaults
# by float32 rounding (measured on the main job at level 0: the same
# samples and rewards, entropy equal to 1e-7 relative). Every comparison in
# the suite is against a float64 reference within a rounding-derived
# tolerance or between two programs of the same session, so none depends on
# the flags; the subprocesses the tests start inherit them.
# ENTROPO_TEST_XLA_OPT=1 tests with XLA's defaults instead.


def _fast_compile_flags() -> str:
  """The flags above that this jaxlib knows: XLA aborts the process on an
  unknown flag, and jaxlib 0.11 has no legacy loop emitters to choose."""
  if os.environ.get("ENTROPO_TEST_XLA_OPT", "0") not in ("", "0"):
    return ""
  flags = ["--xla_backend_optimization_level=0",
           "--xla_cpu_parallel_codegen_split_count=1"]
  jaxlib = importlib.metadata.version("jaxlib").split(".")
  if tuple(int(p) for p in jaxlib[:2]) < (0, 11):
    flags.append("--xla_cpu_use_fusion_emitters=false")
  return " ".join(flags)


FAST_COMPILE = _fast_compile_flags()

if not ACCELERATOR:
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={NUM_DEVICES} "
      + FAST_COMPILE
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same programs (the trainer's steps and sampler for
# the tiny model); a persistent cache shared by the xdist workers compiles
# each once per machine. Set in the environment, so that the subprocesses
# the tests start (the launcher, notebooks, benchmarks, several processes)
# share it too; jax reads both variables when it is imported. Every program
# is cached, however short its compile: the thousands of one-operation
# programs of eager jax calls (about 25 ms each on jaxlib 0.11) are then
# compiled once for both workers (-10 % CPU on nine test files with jaxlib
# 0.11, no change with 0.10: docs/benchmarks.md, "The test suite").
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A seeded NumPy generator; each test gets the same stream."""
  return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
  del config  # unused
  _slow_modules_first(items)
  if not ACCELERATOR:
    return
  skip = pytest.mark.skip(reason=(
      f"multidevice: needs the {NUM_DEVICES} virtual CPU devices or several "
      "processes of the default test setup; ENTROPO_TEST_ACCELERATOR=1 runs "
      f"on {jax.device_count()} {jax.default_backend()} device(s)"))
  for item in items:
    if item.get_closest_marker("multidevice") is not None:
      item.add_marker(skip)


def _slow_modules_first(items):
  """Puts the modules that hold a `slow` test first, each whole and in its
  own order (module fixtures are set up once): the xdist workers start on
  the long tests, and the last tests of a run, which one worker finishes
  while the other has nothing left, are short ones."""
  slow = {item.nodeid.split("::")[0] for item in items
          if item.get_closest_marker("slow") is not None}
  items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)


if not ACCELERATOR:
  assert jax.device_count() == NUM_DEVICES, jax.devices()
