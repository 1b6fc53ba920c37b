"""The command-line programs (``python -m tim_jax.commands.NAME``)."""
