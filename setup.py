"""entropo: entropy-preserving reinforcement learning for language models."""

import setuptools

# Versions pinned to what is tested here (Python 3.11; jax 0.11+ needs 3.12).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "numpy>=1.26",
    "chex==0.1.92",
    "flax==0.12.8",
    "ml_dtypes>=0.5",
    "safetensors>=0.8",
    "tokenizers>=0.20",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    # Data: TFDS builders read back without TensorFlow, grain pipelines.
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "grain==0.2.18",
    "importlib_resources>=6",
    # Experiments: absl flags, configs, logging and plots.
    "absl-py>=2",
    "ml-collections==1.1.0",
    "tensorboardX==2.6.5",
    "matplotlib>=3.8",
    "tqdm>=4.66",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        # CPU wheel on the machine; an unpinned torch pulls CUDA packages.
        "torch==2.13.0",
        "transformers==5.23.0",
        # Executing the notebooks headlessly (tests/test_notebooks.py).
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
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
