"""Test setup: 8 virtual CPU devices for the sharding tests.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same programs (the trainer's steps and sampler for
# the tiny model); a persistent cache shared by the xdist workers compiles
# each once per machine.
jax.config.update(
    "jax_compilation_cache_dir",
    str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

NUM_DEVICES = 8


@pytest.fixture
def rng():
  """A seeded NumPy generator; each test gets the same stream."""
  return np.random.default_rng(0)


assert jax.device_count() == NUM_DEVICES, jax.devices()
