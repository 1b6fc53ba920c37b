"""Captioned shapes: a procedural image dataset, deterministic by index.

Each scene holds one or two coloured shapes on a 3x3 grid over a fixed dark
background. Everything about scene ``i`` is a function of ``(seed, i)``, so the
dataset is unlimited, needs no files, and any example can be regenerated (or
checked by an evaluator) from its index alone.

* ``render(scene, size)``: the image, float32 (H, W, 3) in [-1, 1], NHWC.
* ``caption(scene)``: e.g. "a small blue square at the bottom right and a red
  circle in the center".
* ``ShapesSource``: a grain random-access source of examples, text-to-image
  (``caption`` + ``tokens``) or class-conditional (``label``).

The world is kept small on purpose (6 colours, 3 shapes, 2 sizes, 9 cells) so
that a tiny model learns it on a CPU in minutes, and each attribute is easy
to read back from a generated image.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import numpy as np

from tim_jax.core.errors import UserError
from tim_jax.shapes import text

# (name, RGB in [0, 1]). Hues far apart and all bright against the dark
# background, so a colour can be read back from a single pixel.
_COLOUR_TABLE = (
  ("red", (0.92, 0.16, 0.14)),
  ("green", (0.18, 0.80, 0.22)),
  ("blue", (0.16, 0.36, 0.98)),
  ("yellow", (0.96, 0.88, 0.14)),
  ("purple", (0.66, 0.22, 0.90)),
  ("cyan", (0.16, 0.86, 0.90)),
)
COLOURS: tuple[str, ...] = tuple(name for name, _ in _COLOUR_TABLE)
COLOUR_RGB = np.array([rgb for _, rgb in _COLOUR_TABLE], np.float32) * 2 - 1
BACKGROUND_RGB = np.array([0.12, 0.12, 0.14], np.float32) * 2 - 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Row-major over the 3x3 grid: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
  "top left",
  "top",
  "top right",
  "left",
  "center",
  "right",
  "bottom left",
  "bottom",
  "bottom right",
)
MAX_OBJECTS = 2

# Shape "radius" per size, as a fraction of the cell side. Even a large
# triangle (the widest shape, half-width 2/sqrt(3) x radius) with its
# anti-aliasing fringe leaves its cell's corner pixels empty, so objects are
# always separated by background (checked for images of 24 to 256 pixels; at
# 16 the half-pixel fringe can reach the next cell).
SIZE_RADIUS = (0.22, 0.36)
_SQUARE_HALF_SIDE = 0.9  # x radius: about the circle's area.

# attributes[slot] = (present, colour, shape, size, row, col); an empty slot
# is all -1.
ATTRIBUTE_FIELDS = ("present", "colour", "shape", "size", "row", "col")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  colour: int
  shape: int
  size: int
  row: int
  col: int
  mention_size: bool  # Whether the caption says "small"/"large".

  @property
  def position(self) -> int:
    """The grid cell, 0 to 8, row-major."""
    return 3 * self.row + self.col


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...]


def num_classes() -> int:
  """Class-conditional labels: shape x colour."""
  return len(SHAPES) * len(COLOURS)


def label_of(obj: SceneObject) -> int:
  """The class label of an object: shape x colours + colour."""
  return obj.shape * len(COLOURS) + obj.colour


def label_name(label: int) -> str:
  """e.g. ``label_name(0) == "red circle"``."""
  label = int(label)
  if not 0 <= label < num_classes():
    raise UserError(f"label must be in [0, {num_classes()}), got {label}")
  shape, colour = divmod(label, len(COLOURS))
  return f"{COLOURS[colour]} {SHAPES[shape]}"


def scene(
  index: int, seed: int = 0, num_objects: int | Sequence[int] = (1, 2)
) -> Scene:
  """Scene ``index`` of the stream ``seed``.

  ``num_objects`` is the allowed object counts (each in 1..MAX_OBJECTS), one
  drawn uniformly per scene; an int means exactly that many.
  """
  counts = (
    (num_objects,)
    if isinstance(num_objects, (int, np.integer))
    else tuple(num_objects)
  )
  if not counts or any(not 1 <= int(n) <= MAX_OBJECTS for n in counts):
    raise ValueError(
      f"num_objects must be counts in [1, {MAX_OBJECTS}], got {num_objects!r}"
    )
  index, seed = int(index), int(seed)
  if index < 0 or seed < 0:
    raise UserError(
      f"index and seed must be >= 0, got index={index}, seed={seed}"
    )
  # A fixed number of uniforms per scene, decoded by hand: the layout of the
  # random stream then does not depend on earlier choices, and uniform floats
  # are the simplest Generator output, the least likely to change between
  # numpy releases (which would silently change the dataset).
  u = np.random.default_rng([seed, index]).random(1 + 9 + 4 * MAX_OBJECTS)
  count = int(counts[min(int(u[0] * len(counts)), len(counts) - 1)])
  cells = np.argsort(u[1:10], kind="stable")  # Distinct cells, random order.

  def pick(x, n):
    return min(int(x * n), n - 1)

  objects = []
  for k in range(count):
    v = u[10 + 4 * k : 14 + 4 * k]
    row, col = divmod(int(cells[k]), 3)
    objects.append(
      SceneObject(
        colour=pick(v[0], len(COLOURS)),
        shape=pick(v[1], len(SHAPES)),
        size=pick(v[2], len(SIZES)),
        row=row,
        col=col,
        mention_size=bool(v[3] < 0.5),
      )
    )
  return Scene(tuple(objects))


# --- Captions ---------------------------------------------------------------


def position_phrase(position: int) -> str:
  """The words for a grid cell ("at the top left", "in the center")."""
  name = POSITIONS[position]
  return f"in the {name}" if name == "center" else f"at the {name}"


def object_phrase(obj: SceneObject) -> str:
  """An object's words: "a [size] colour shape at the position"."""
  size = f"{SIZES[obj.size]} " if obj.mention_size else ""
  return (
    f"a {size}{COLOURS[obj.colour]} {SHAPES[obj.shape]} "
    f"{position_phrase(obj.position)}"
  )


def caption(s: Scene) -> str:
  """The scene's caption, its objects' phrases joined with "and"."""
  return " and ".join(object_phrase(o) for o in s.objects)


def _vocabulary() -> tuple[str, ...]:
  words = ["a", "and", "at", "in", "the"]
  words += list(SIZES) + list(COLOURS) + list(SHAPES)
  words += [w for p in POSITIONS for w in p.split()]
  return tuple(dict.fromkeys(words))  # Unique, first-seen order.


# Every word a caption can contain, in a fixed order (token ids follow it, so
# appending is safe and reordering changes every t2i model's input).
VOCABULARY: tuple[str, ...] = _vocabulary()
# The longest caption: MAX_OBJECTS objects, all with a size word, at the
# longest position phrase, joined by "and".
MAX_CAPTION_WORDS: int = (
  MAX_OBJECTS
  * (4 + max(len(position_phrase(p).split()) for p in range(len(POSITIONS))))
  + MAX_OBJECTS
  - 1
)


# --- Rendering --------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int):
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[:, None], c[None, :]  # (H, 1), (1, W): broadcast, not stored.


def _signed_distance(obj: SceneObject, size: int) -> np.ndarray:
  """Distance in pixels to the shape's edge, negative inside, (H, W)."""
  cell = size / 3
  cy, cx = (obj.row + 0.5) * cell, (obj.col + 0.5) * cell
  r = SIZE_RADIUS[obj.size] * cell
  ys, xs = _pixel_centres(size)
  dy, dx = ys - cy, xs - cx
  if SHAPES[obj.shape] == "circle":
    return np.sqrt(dx * dx + dy * dy) - r
  if SHAPES[obj.shape] == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) - _SQUARE_HALF_SIDE * r
  # Equilateral triangle, apex up, spanning [cy - r, cy + r] so it sits in
  # its cell like the other shapes. Its sides' outward normals are (0, 1)
  # and (+-sqrt(3)/2, -1/2); the max of the half-plane distances is exact
  # inside and near the edges, which is all anti-aliasing needs.
  slant = (np.sqrt(3) / 2) * np.abs(dx) - 0.5 * (dy + r)
  return np.maximum(dy - r, slant)


def render(s: Scene, size: int = 32) -> np.ndarray:
  """The scene as float32 (size, size, 3) in [-1, 1].

  Anti-aliased by coverage = clip(0.5 - signed distance, 0, 1): exact for
  straight edges, and it keeps pixels well inside a shape at exactly its
  colour, so colours can be checked pixel-wise.
  """
  if size < 6:
    raise ValueError(f"size must be >= 6 pixels (2 per grid cell), got {size}")
  image = np.broadcast_to(BACKGROUND_RGB, (size, size, 3)).copy()
  for obj in s.objects:
    alpha = np.clip(0.5 - _signed_distance(obj, size), 0.0, 1.0)[..., None]
    image += alpha * (COLOUR_RGB[obj.colour] - image)
  return image


def attributes(s: Scene) -> np.ndarray:
  """int32 (MAX_OBJECTS, 6) rows of ATTRIBUTE_FIELDS; empty slots are -1."""
  out = np.full((MAX_OBJECTS, len(ATTRIBUTE_FIELDS)), -1, np.int32)
  for k, o in enumerate(s.objects):
    out[k] = (1, o.colour, o.shape, o.size, o.row, o.col)
  return out


# --- Grain source -----------------------------------------------------------

KINDS = ("t2i", "c2i")


def tokenizer() -> text.Tokenizer:
  """The word tokenizer of the shapes captions (its vocabulary is
  ``VOCABULARY``, in order)."""
  return text.Tokenizer(VOCABULARY)


class ShapesSource:
  """Random-access source of shapes examples (``grain.MapDataset.source``).

  Example ``i`` (a dict of numpy values):

  * ``image``: float32 (size, size, 3) in [-1, 1];
  * ``attributes``: int32 (MAX_OBJECTS, 6), see ``ATTRIBUTE_FIELDS``;
  * t2i: ``caption`` (str; one or two objects) and ``tokens`` int32
    (max_caption_len,);
  * c2i: ``label`` int32 = shape * len(COLOURS) + colour (one object).
  """

  def __init__(
    self,
    size: int = 32,
    seed: int = 0,
    kind: str = "t2i",
    length: int = 2**31 - 1,
    max_caption_len: int = MAX_CAPTION_WORDS,
  ):
    if kind not in KINDS:
      raise UserError(f"kind must be one of {KINDS}, got {kind!r}")
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}")
    if kind == "t2i" and max_caption_len < MAX_CAPTION_WORDS:
      # Truncating would cut the end of a position ("bottom right" ->
      # "bottom"): a wrong caption, not a shorter one.
      raise UserError(
        f"data.max_caption_len={max_caption_len} is shorter than the longest "
        f"shapes caption ({MAX_CAPTION_WORDS} words); use at least "
        f"{MAX_CAPTION_WORDS}"
      )
    if size < 6:
      raise UserError(f"size (data.image_size) must be >= 6 pixels, got {size}")
    self.size, self.seed, self.kind = int(size), int(seed), kind
    self.length = int(length)
    self.max_caption_len = int(max_caption_len)
    self.num_objects = (1, 2) if kind == "t2i" else (1,)
    self.tokenizer = tokenizer() if kind == "t2i" else None

  def __len__(self) -> int:
    return self.length

  def scene(self, index: int) -> Scene:
    """Scene ``index`` of this source's stream."""
    return scene(index, self.seed, self.num_objects)

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(
        f"index {index} out of range for a ShapesSource of length {self.length}"
      )
    s = self.scene(index)
    out = {"image": render(s, self.size), "attributes": attributes(s)}
    if self.kind == "t2i":
      words = caption(s)
      out["caption"] = words
      out["tokens"] = self.tokenizer.encode([words], self.max_caption_len)[0]
    else:
      out["label"] = np.int32(label_of(s.objects[0]))
    return out

  def __repr__(self):
    return (
      f"ShapesSource(size={self.size}, seed={self.seed}, "
      f"kind={self.kind!r}, length={self.length})"
    )
