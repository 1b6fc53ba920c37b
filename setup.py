"""tim_jax: Transition Models (TiM) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "tensorflow-datasets>=4.9",
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
    # tim_jax.compile the TPU compiler on CPU-only hosts.
    "test": ["pytest>=8", "pytest-xdist>=3", "nbformat", "nbclient",
             "ipykernel", "torch==2.13.0", "diffusers==0.33.1",
             "transformers==4.57.6", "jax[tpu]"],
    # Reading torch-pickled official checkpoints (.bin / .pt) needs torch;
    # .safetensors files do not.
    "torch": ["torch"],
    "gpu": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
}

setuptools.setup(
    name="tim_jax",
    version="0.1.0",
    description="Transition Models (TiM) in JAX/Flax: any-step generative "
    "models, TPU-first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["tim_jax", "tim_jax.*"]),
    # The shapes oracle's weights ship with the package.
    package_data={"tim_jax.eval": ["oracle.safetensors"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
