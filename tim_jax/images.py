"""Images for people: [-1, 1] floats to uint8, grids, PNG files."""

from __future__ import annotations

import os

import numpy as np


def to_uint8(images, kind: str = "c2i") -> np.ndarray:
  """[-1, 1] -> uint8 as the official samplers convert: ``clip(255 (x + 1)
  / 2)`` for class-conditional models, ``clamp(127.5 x + 128)`` for
  text-to-image ones (the T2I sampling scripts); both truncate."""
  x = np.asarray(images, np.float32)
  if kind == "t2i":
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
  if kind != "c2i":
    raise ValueError(f"kind must be 'c2i' or 't2i', got {kind!r}")
  return np.clip(255.0 * (x + 1.0) / 2.0, 0, 255).astype(np.uint8)


def grid(images, cols: int, gap: int = 1) -> np.ndarray:
  """(N, H, W, C) uint8 -> one image of ``cols`` columns, ``gap`` white
  pixels between and around the images (0: none, as the official 2x2
  benchmark grids)."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255,
                np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    top, left = gap + r * (h + gap), gap + q * (w + gap)
    out[top:top + h, left:left + w] = images[i]
  return out


def save_png(path: str, image: np.ndarray) -> None:
  """Writes ``image`` (H, W, C) uint8 as PNG, creating the directory; the
  file appears whole or not at all (written, then renamed)."""
  from PIL import Image
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)
