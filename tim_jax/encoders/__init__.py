"""Frozen encoders whose features TiM learns to match or is conditioned on:
``radio`` (NVIDIA RADIO v2.5, the official REPA teacher) and ``gemma`` (the
Gemma-3 text decoder, the official T2I caption encoder)."""


def layer_kwargs(dtype, param_dtype, precision, rngs=None) -> dict:
  """Keyword arguments of an encoder's ``nnx.Linear`` layers (its weights
  are loaded afterwards, so the rngs only shape the initialisation)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
              rngs=rngs if rngs is not None else nnx.Rngs(0))
