"""Images for people: [-1, 1] floats to uint8, grids, PNG files."""

from __future__ import annotations

import os

import numpy as np


def to_uint8(images) -> np.ndarray:
  """[-1, 1] -> uint8 as the official C2I conversion:
  ``clip(255 (x + 1) / 2)``, truncated."""
  return np.clip(255.0 * (np.asarray(images, np.float32) + 1.0) / 2.0, 0,
                 255).astype(np.uint8)


def grid(images, cols: int) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image with 1px gaps."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    out[1 + r * (h + 1):1 + r * (h + 1) + h,
        1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
  return out


def save_png(path: str, image: np.ndarray) -> None:
  """Writes ``image`` (H, W, C) uint8, creating the directory."""
  from PIL import Image
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  Image.fromarray(image).save(path)
