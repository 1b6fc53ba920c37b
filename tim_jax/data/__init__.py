"""Data: what a config trains on and how it becomes the network's input.

``kinds`` answers, per ``config.data.name``, where examples come from and
how they become conditioning (``conditioning``); ``pipeline`` batches any
random-access source with grain; ``latents`` and ``captioned`` read the
latent datasets that ``prepare`` writes from images. The built-in shapes
world lives in ``tim_jax.shapes``.
"""
