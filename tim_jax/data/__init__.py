"""Data: the built-in captioned-shapes world, its text, latent datasets, and
the grain pipeline that batches any of them.

``latents`` (TensorFlow Datasets) is imported on first use, so the shapes
data and the pipeline do not pay for it.
"""

from tim_jax.data import pipeline
from tim_jax.data import shapes
from tim_jax.data import text
from tim_jax.data.pipeline import make_iterator
from tim_jax.data.shapes import ShapesSource
from tim_jax.data.text import CaptionEncoder
from tim_jax.data.text import Tokenizer

_LAZY = ("latents", "LatentSource", "write_latents")


def __getattr__(name):
  # Importing latents eagerly would also register its TFDS builder twice
  # under `python -m tim_jax.data.latents` (once as __main__).
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    latents = importlib.import_module("tim_jax.data.latents")
    return latents if name == "latents" else getattr(latents, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["pipeline", "shapes", "text", "make_iterator", "ShapesSource",
           "CaptionEncoder", "Tokenizer", *_LAZY]
