"""Images for people: [-1, 1] floats to uint8, grids, PNG files."""

from __future__ import annotations

from collections.abc import Sequence
import io
import os
from typing import TYPE_CHECKING

import numpy as np

from tim_jax.core import paths

if TYPE_CHECKING:
  from jax.typing import ArrayLike


def to_uint8(images: ArrayLike, kind: str = "c2i") -> np.ndarray:
  """[-1, 1] -> uint8 as the official samplers convert: ``clip(255 (x + 1)
  / 2)`` for class-conditional models, ``clamp(127.5 x + 128)`` for
  text-to-image ones (the T2I sampling scripts); both truncate."""
  x = np.asarray(images, np.float32)
  if kind == "t2i":
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
  if kind != "c2i":
    raise ValueError(f"kind must be 'c2i' or 't2i', got {kind!r}")
  return np.clip(255.0 * (x + 1.0) / 2.0, 0, 255).astype(np.uint8)


def grid(images: np.ndarray, cols: int, gap: int = 1) -> np.ndarray:
  """(N, H, W, C) uint8 -> one image of ``cols`` columns, ``gap`` white
  pixels between and around the images (0: none, as the official 2x2
  benchmark grids)."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full(
    (rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255, np.uint8
  )
  for i in range(n):
    r, q = divmod(i, cols)
    top, left = gap + r * (h + gap), gap + q * (w + gap)
    out[top : top + h, left : left + w] = images[i]
  return out


def upscale(images: ArrayLike, min_side: int = 128) -> np.ndarray:
  """(N, H, W, C) enlarged by the smallest integer factor that makes the
  shorter side at least ``min_side`` (nearest neighbour: pixels stay
  crisp squares); unchanged when already that large."""
  images = np.asarray(images)
  factor = max(1, -(-int(min_side) // min(images.shape[1:3])))
  if factor == 1:
    return images
  return images.repeat(factor, axis=1).repeat(factor, axis=2)


def _font(size: int):
  from PIL import ImageFont

  try:
    return ImageFont.load_default(size=size)  # FreeType builds of Pillow.
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def _wrap(text: str, width_px: int, font, draw) -> list:
  """``text`` broken into lines no wider than ``width_px`` (a word longer
  than that stands alone)."""
  lines, line = [], ""
  for word in str(text).split():
    trial = f"{line} {word}".strip()
    if line and draw.textlength(trial, font=font) > width_px:
      lines.append(line)
      line = word
    else:
      line = trial
  return lines + ([line] if line else [])


def annotated_grid(
  images: ArrayLike,
  cols: int,
  *,
  row_labels: Sequence[str] = (),
  col_labels: Sequence[str] = (),
  title: str = "",
  min_side: int = 128,
  gap: int = 4,
  label_width: int = 220,
  font_size: int = 14,
) -> np.ndarray:
  """A grid for people: ``images`` (N, H, W, C) uint8 in rows of ``cols``,
  each enlarged to at least ``min_side`` pixels (``upscale``), with
  ``row_labels`` (one per row: the prompt or class name) in a column on
  the left, ``col_labels`` above the columns (e.g. the NFE) and ``title``
  on top; long labels wrap. Returns (H', W', 3) uint8."""
  from PIL import Image, ImageDraw

  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got {images.shape}")
  if images.shape[-1] == 1:
    images = images.repeat(3, axis=-1)
  body = grid(upscale(images, min_side), cols, gap=gap)
  n_rows = -(-len(images) // cols)
  cell_h = (body.shape[0] - gap) // n_rows
  cell_w = (body.shape[1] - gap) // cols
  font = _font(font_size)
  line_h = font_size + 4
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  left = label_width if len(row_labels) else 0
  col_lines = [_wrap(t, cell_w - gap, font, probe) for t in col_labels]
  top_cols = (
    max(map(len, col_lines), default=0) * line_h + gap if col_lines else 0
  )
  title_lines = _wrap(title, left + body.shape[1] - 2 * gap, font, probe)
  top = len(title_lines) * line_h + (gap if title_lines else 0) + top_cols
  canvas = Image.new(
    "RGB", (left + body.shape[1], top + body.shape[0]), "white"
  )
  canvas.paste(Image.fromarray(body), (left, top))
  draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(title_lines):
    draw.text((gap, gap + i * line_h), line, fill="black", font=font)
  for c, lines in enumerate(col_lines):
    x = left + gap + c * cell_w
    y = top - top_cols
    for i, line in enumerate(lines):
      draw.text((x, y + i * line_h), line, fill="black", font=font)
  max_lines = max(1, (cell_h - gap) // line_h)
  for r, label in enumerate(row_labels[:n_rows]):
    lines = _wrap(label, left - 2 * gap, font, probe)
    if len(lines) > max_lines:
      lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
    y = (
      top + gap + r * cell_h + max(0, (cell_h - gap - len(lines) * line_h) // 2)
    )
    for i, line in enumerate(lines):
      draw.text((gap, y + i * line_h), line, fill="black", font=font)
  return np.asarray(canvas)


# The picture formats by file suffix (PIL's names).
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str) -> str:
  """PIL's format for ``path``'s suffix; ValueError for another suffix."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in FORMATS:
    raise ValueError(
      f"{path}: a picture is written as {', '.join(FORMATS)}, by its "
      "suffix; give one of those"
    )
  return FORMATS[suffix]


def save_image(path: str, image: np.ndarray) -> None:
  """Writes ``image`` (H, W, C) uint8 in the format its suffix names
  (``FORMATS``; JPEG at quality 95), whole or not at all."""
  from PIL import Image

  fmt = image_format(path)
  extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **extra)
  paths.write_bytes(path, buf.getvalue())  # Local or gs://.


def save_png(path: str, image: np.ndarray) -> None:
  """Writes ``image`` (H, W, C) uint8 as PNG, creating the directory; the
  file appears whole or not at all (written, then renamed)."""
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())  # Local or gs://.
