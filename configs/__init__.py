"""The run configs; installed with the package as ``tim_jax.configs``."""
