"""tim_jax: Transition Models (TiM) in JAX/Flax."""

__version__ = "0.1.0"
