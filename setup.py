"""entropo: entropy-preserving reinforcement learning for language models."""

import setuptools

# Version ranges, not pins, so that entropo installs beside the jax build of
# an accelerator (`pip install -e ".[cuda12]"`, `[cuda13]`, `[tpu]`, or after
# a jax installed by hand). Lower bounds are what the Python 3.11 leg of
# `make test` runs; upper bounds stop below the first minor release no leg
# has tested (jax 0.11 runs on the Python 3.12 leg). The exact versions of
# each leg are in constraints/py311.txt and constraints/py312.txt.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "jaxlib>=0.10.2,<0.12",
    "numpy>=1.26",
    "chex>=0.1.92,<0.2",
    "flax>=0.12.8,<0.13",
    "ml_dtypes>=0.5",
    "safetensors>=0.8",
    "tokenizers>=0.20",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    # Data: TFDS builders read back without TensorFlow, grain pipelines.
    "tensorflow-datasets>=4.9.10,<4.10",
    "array_record>=0.8.6,<0.9",
    "grain>=0.2.18,<0.3",
    "importlib_resources>=6",
    # Experiments: absl flags, configs, logging and plots.
    "absl-py>=2",
    "ml-collections>=1.1.0,<1.2",
    "tensorboardX>=2.6.5,<2.7",
    "matplotlib>=3.8",
    "tqdm>=4.66",
]

EXTRAS_REQUIRE = {
    # The accelerator builds of jax (and of jaxlib's plugins), within the
    # range above.
    "cuda12": ["jax[cuda12]"],
    "cuda13": ["jax[cuda13]"],
    "tpu": ["jax[tpu]"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        # Executing the notebooks headlessly (tests/test_notebooks.py).
        "nbclient>=0.11.0,<0.12",
        "nbformat>=5.11.1,<6",
        "ipykernel>=7.4.0,<8",
    ],
    # The Hugging Face peer of the parity tests (tests/hf_models.py); the
    # tests that need it skip without it. On PyPI an unconstrained torch is
    # a CUDA build of several GB: constraints/py311.txt pins the CPU one.
    # peft: the LoRA hand-off test (entropo.models.save_lora -> PEFT).
    "hf": [
        "torch>=2.13.0,<2.14",
        "transformers>=5.23.0,<5.24",
        "peft>=0.21.2,<0.22",
    ],
    "bench": [
        "psutil>=5.9",
    ],
}

setuptools.setup(
    name="entropo",
    version="0.1.0",
    description=(
        "Entropy-preserving reinforcement learning for language models "
        "(REPO, ADAPO) in JAX."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["entropo", "entropo.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
