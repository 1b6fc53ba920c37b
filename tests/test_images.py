"""Grids for people: enlarged images with their labels."""

import numpy as np
import pytest

from tim_jax.core import images


def _tiles(n, h=16, w=24, value=200):
  return np.full((n, h, w, 3), value, np.uint8)


def test_upscale_reaches_the_minimum_side_with_square_pixels():
  x = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
  up = images.upscale(x, 128)
  assert up.shape == (2, 129, 215, 3)  # Factor ceil(128 / 3) = 43.
  np.testing.assert_array_equal(up[:, ::43, ::43], x)
  big = _tiles(1, 256, 256)
  assert images.upscale(big, 128).shape == big.shape


def test_annotated_grid_writes_each_rows_label_beside_it():
  tiles = _tiles(6)  # Two rows of three 16x24 images -> 128x192.
  out = images.annotated_grid(
    tiles,
    3,
    row_labels=["a red circle", ""],
    col_labels=["1 NFE", "2 NFE", "4 NFE"],
    title="step 10",
    label_width=200,
    gap=4,
  )
  assert out.dtype == np.uint8 and out.shape[2] == 3
  assert out.shape[1] == 200 + 3 * (192 + 4) + 4
  body = out[-(2 * 132 + 4) :]
  first_row, second_row = body[4:132, :200], body[136:264, :200]
  assert (first_row < 100).any()  # The label's text.
  assert (second_row == 255).all()  # No label: blank.
  header = out[: -(2 * 132 + 4), 200:]
  assert (header < 100).any()  # Column labels and the title.
  np.testing.assert_array_equal(body[4:132, 204:396], 200)  # The image.


def test_long_labels_wrap_and_titles_grow_the_header():
  tiles = _tiles(2)
  short = images.annotated_grid(tiles, 2, title="x")
  long = images.annotated_grid(tiles, 2, title="word " * 80)
  assert long.shape[0] > short.shape[0]
  assert long.shape[1] == short.shape[1]
  label = "a red circle at the top left and a blue square at the bottom"
  out = images.annotated_grid(tiles[:1], 1, row_labels=[label], label_width=120)
  rows_with_ink = np.where((out[:, :120] < 100).any(axis=(1, 2)))[0]
  assert rows_with_ink.max() - rows_with_ink.min() > 30  # Several lines.


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="must be"):
    images.annotated_grid(np.zeros((4, 4, 3), np.uint8), 2)
