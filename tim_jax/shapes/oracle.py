"""The shapes oracle: reads colour, shape, size, position and count back from
an image of the built-in captioned-shapes world.

The oracle is a small CNN trained on the procedural data's ground truth
(``python -m tim_jax.commands.train_oracle``; the weights ship with the package as
``oracle.safetensors``). For each of the 9 grid cells it predicts

* ``occupancy``: empty or one of the 6 colours (7 classes),
* ``shape``: circle, square or triangle,
* ``size``: small or large,

and its penultimate activations are a feature space for Fréchet distances
between sets of images.

Scoring generated images against what they were asked for (a GenEval-like
score for this world) is ``attribute_accuracy``; a Fréchet distance between
generated and real images is ``Oracle.frechet_distance``.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
from typing import TYPE_CHECKING, Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.core.errors import UserError
from tim_jax.shapes import world

if TYPE_CHECKING:
  from jax.typing import ArrayLike

CELLS = 9
NUM_COLOURS = len(world.COLOURS)
NUM_SHAPES = len(world.SHAPES)
NUM_SIZES = len(world.SIZES)
# Per cell: occupancy (empty + colours), shape, size.
HEAD_SIZES = (1 + NUM_COLOURS, NUM_SHAPES, NUM_SIZES)
IMAGE_SIZE = 32  # The oracle's input; other sizes are resized to it.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "oracle.safetensors")

# Expected accuracy of a guess that ignores the image (targets are uniform
# over colours, shapes and sizes in the shapes world).
CHANCE = {
  "colour": 1 / NUM_COLOURS,
  "shape": 1 / NUM_SHAPES,
  "size": 1 / NUM_SIZES,
}


@dataclasses.dataclass(frozen=True)
class OracleConfig:
  # Conv stages; each after the first halves the resolution (32 -> 4
  # pixels, so the flattened map is small). One full-resolution stage reads
  # colours and small shapes; the cost stays low for CPU training.
  widths: tuple = (16, 32, 64, 64)
  feature_dim: int = 128


class OracleNet(nnx.Module):
  """Conv stages -> flatten -> features -> per-cell logits.

  Flattening (rather than global pooling) keeps where things are, which is
  half of what the oracle must read.
  """

  def __init__(self, config: OracleConfig = OracleConfig(), *, rngs):
    self.config = config
    convs = []
    c_in = 3
    for i, width in enumerate(config.widths):
      convs.append(
        nnx.Conv(
          c_in,
          width,
          (3, 3),
          strides=1 if i == 0 else 2,
          padding="SAME",
          rngs=rngs,
        )
      )
      if i == 1:  # One more layer where shapes are a few pixels wide.
        convs.append(nnx.Conv(width, width, (3, 3), padding="SAME", rngs=rngs))
      c_in = width
    self.convs = nnx.List(convs)
    side = IMAGE_SIZE // 2 ** (len(config.widths) - 1)
    self.features = nnx.Linear(
      side * side * c_in, config.feature_dim, rngs=rngs
    )
    self.head = nnx.Linear(
      config.feature_dim, CELLS * sum(HEAD_SIZES), rngs=rngs
    )

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, 32, 32, 3) in [-1, 1] -> (features (B, F), logits
    (B, 9, 12))."""
    h = images
    for conv in self.convs:
      h = jax.nn.relu(conv(h))
    feats = jax.nn.relu(self.features(h.reshape(h.shape[0], -1)))
    logits = self.head(feats).reshape(h.shape[0], CELLS, sum(HEAD_SIZES))
    return feats, logits


def split_logits(
  logits: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(…, 12) -> occupancy (…, 7), shape (…, 3), size (…, 2) logits."""
  a, b, _ = HEAD_SIZES
  return logits[..., :a], logits[..., a : a + b], logits[..., a + b :]


# --- targets -----------------------------------------------------------------


def cell_targets(
  attributes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Ground truth per cell from ``world.attributes`` rows (B, 2, 6).

  Returns int32 arrays (B, 9): occupancy (0 empty, 1 + colour), shape and
  size (-1 where the cell is empty).
  """
  attributes = np.asarray(attributes)
  batch = attributes.shape[0]
  occupancy = np.zeros((batch, CELLS), np.int32)
  shape = np.full((batch, CELLS), -1, np.int32)
  size = np.full((batch, CELLS), -1, np.int32)
  for b, slot in zip(*np.nonzero(attributes[..., 0] == 1)):
    _, colour, shp, sz, row, col = attributes[b, slot]
    cell = 3 * row + col
    occupancy[b, cell] = 1 + colour
    shape[b, cell] = shp
    size[b, cell] = sz
  return occupancy, shape, size


@dataclasses.dataclass
class Targets:
  """What each image was asked to show.

  ``attributes`` are ``world.attributes`` rows (N, 2, 6); a row/col of -1
  means "anywhere" (class-conditional labels carry no position).
  ``size_mentioned`` (N, 2) says which sizes were asked for.
  """

  attributes: np.ndarray
  size_mentioned: np.ndarray

  def __len__(self):
    return len(self.attributes)

  def __getitem__(self, index):
    return Targets(self.attributes[index], self.size_mentioned[index])


def targets_from_scenes(scenes: Sequence[world.Scene]) -> Targets:
  """What each scene asks for: its attributes per cell and which sizes its caption names."""
  attributes = np.stack([world.attributes(s) for s in scenes])
  mentioned = np.zeros(attributes.shape[:2], bool)
  for i, s in enumerate(scenes):
    for k, o in enumerate(s.objects):
      mentioned[i, k] = o.mention_size
  return Targets(attributes, mentioned)


def targets_from_labels(labels: Sequence[int]) -> Targets:
  """Class-conditional labels (shape * 6 + colour): one object, anywhere."""
  labels = np.asarray(labels, np.int64)
  if (
    labels.ndim != 1
    or labels.min() < 0
    or labels.max() >= (world.num_classes())
  ):
    raise ValueError(
      f"labels must be in [0, {world.num_classes()}), got {labels.tolist()}"
    )
  attributes = np.full((len(labels), world.MAX_OBJECTS, 6), -1, np.int32)
  shape, colour = np.divmod(labels, NUM_COLOURS)
  attributes[:, 0, 0] = 1
  attributes[:, 0, 1] = colour
  attributes[:, 0, 2] = shape
  return Targets(attributes, np.zeros(attributes.shape[:2], bool))


def parse_caption(text: str) -> world.Scene:
  """The inverse of ``world.caption``: a prompt of the shapes grammar back
  to its scene (an unmentioned size is recorded as small, not mentioned).

  Raises ValueError for text outside the grammar.
  """
  objects = []
  for part in text.strip().lower().split(" and "):
    words = part.split()
    if len(words) < 4 or words[0] != "a":
      raise UserError(
        f"{part!r} is not 'a [size] colour shape at/in the position'"
      )
    words = words[1:]
    size, mention = 0, False
    if words[0] in world.SIZES:
      size, mention = world.SIZES.index(words[0]), True
      words = words[1:]
    if (
      len(words) < 4
      or words[0] not in world.COLOURS
      or (words[1] not in world.SHAPES)
      or words[2] not in ("at", "in")
      or (words[3] != "the")
    ):
      raise UserError(
        f"{part!r} is not 'a [size] colour shape at/in the position'"
      )
    where = " ".join(words[4:])
    if where not in world.POSITIONS:
      raise UserError(
        f"unknown position {where!r} in {part!r}; one of {world.POSITIONS}"
      )
    row, col = divmod(world.POSITIONS.index(where), 3)
    objects.append(
      world.SceneObject(
        colour=world.COLOURS.index(words[0]),
        shape=world.SHAPES.index(words[1]),
        size=size,
        row=row,
        col=col,
        mention_size=mention,
      )
    )
  if len(objects) > world.MAX_OBJECTS:
    raise UserError(
      f"at most {world.MAX_OBJECTS} objects, got {len(objects)} in {text!r}"
    )
  return world.Scene(tuple(objects))


# --- the oracle ----------------------------------------------------------------


@dataclasses.dataclass
class Predictions:
  """Per-cell readings of a set of images (numpy)."""

  occupied_prob: np.ndarray  # (N, 9) P(cell not empty)
  colour: np.ndarray  # (N, 9) argmax over the colours
  shape: np.ndarray  # (N, 9)
  size: np.ndarray  # (N, 9)
  features: np.ndarray  # (N, F)

  @property
  def occupied(self) -> np.ndarray:
    """Per cell: whether the oracle sees an object."""
    return self.occupied_prob > 0.5

  @property
  def count(self) -> np.ndarray:
    """Per image: the number of occupied cells."""
    return self.occupied.sum(axis=1)


def _prepare(images):
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 127.5 - 1.0
  images = images.astype(jnp.float32)
  if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    # Area-like downsampling for larger images keeps thin edges' colour.
    images = jax.image.resize(
      images,
      (images.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3),
      "linear",
      antialias=True,
    )
  return images


def _readings(model, images):
  feats, logits = model(_prepare(images))
  occ, shp, sz = split_logits(logits)
  p_occ = 1.0 - jax.nn.softmax(occ, axis=-1)[..., 0]
  return dict(
    occupied_prob=p_occ,
    colour=jnp.argmax(occ[..., 1:], axis=-1),
    shape=jnp.argmax(shp, axis=-1),
    size=jnp.argmax(sz, axis=-1),
    features=feats,
  )


class Oracle:
  """The trained oracle. ``Oracle()`` loads the shipped weights."""

  def __init__(
    self,
    path: str | None = None,
    batch_size: int = 256,
    model: OracleNet | None = None,
  ):
    """Loads ``path`` (default: the shipped weights), or wraps ``model``."""
    if model is not None:
      self.path, self.model, self.metadata = None, model, {}
    else:
      self.path = path or DEFAULT_WEIGHTS
      self.model, self.metadata = load(self.path)
    self.batch_size = int(batch_size)
    graphdef, state = nnx.split(self.model)
    self._state = state
    self._fn = jax.jit(
      lambda state, x: _readings(nnx.merge(graphdef, state), x)
    )

  def predict(self, images: ArrayLike, progress: bool = False) -> Predictions:
    """Reads ``images`` (N, H, W, 3), float in [-1, 1] or uint8, in batches
    of fixed size (the last one padded, so one compilation)."""
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
      raise ValueError("no images to read")
    bs = min(self.batch_size, n)
    chunks = []
    starts = range(0, n, bs)
    if progress:
      from tqdm.auto import tqdm

      starts = tqdm(starts, desc="oracle", unit="batch", leave=False)
    for start in starts:
      chunk = images[start : start + bs]
      pad = bs - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out = jax.device_get(self._fn(self._state, chunk))
      chunks.append({k: v[: bs - pad] for k, v in out.items()})
    return Predictions(
      **{k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    )

  def features(self, images: ArrayLike, progress: bool = False) -> np.ndarray:
    """The oracle's image features (for Fréchet distances)."""
    return self.predict(images, progress).features

  def frechet_distance(self, images_a: ArrayLike, images_b: ArrayLike) -> float:
    """Fréchet distance between two image sets in the oracle's features."""
    from tim_jax.eval import fid

    return fid.fid_from_features(
      self.features(images_a), self.features(images_b)
    )

  def score(self, images: ArrayLike, targets: Targets) -> dict[str, float]:
    """Attribute accuracy of ``images`` against what was asked (``targets``)."""
    return attribute_accuracy(self.predict(images), targets)


def attribute_accuracy(pred: Predictions, targets: Targets) -> dict[str, float]:
  """How often the images show what was asked (a GenEval-like score).

  For every requested object, at its cell (or, with no position, at the most
  surely occupied cell):

  * ``position``: the cell is occupied;
  * ``colour``, ``shape``: the oracle's colour / shape there is the requested
    one (read even if the cell looks empty, so that images unrelated to the
    request score chance: 1/6 and 1/3);
  * ``size``: likewise, over objects whose caption names a size (chance 1/2);

  per image, ``count``: the number of occupied cells equals the number of
  requested objects; and ``overall``: every object right in position, colour,
  shape and named size, and the count right. Two scores of one kind of
  request (NaN where there is none): ``shape_one``, the shape accuracy on
  one-object requests, and ``overall_two``, the all-correct rate on
  two-object requests.
  """
  attrs = np.asarray(targets.attributes)
  n = attrs.shape[0]
  if pred.colour.shape[0] != n:
    raise ValueError(f"{pred.colour.shape[0]} images but {n} targets")
  rows = np.arange(n)
  ok_all = np.ones(n, bool)
  shape_ok = np.ones(n, bool)
  sums = dict(position=0.0, colour=0.0, shape=0.0, size=0.0)
  counts = dict(objects=0, sized=0)
  for slot in range(attrs.shape[1]):
    present = attrs[:, slot, 0] == 1
    if not present.any():
      continue
    row, col = attrs[:, slot, 4], attrs[:, slot, 5]
    anywhere = row < 0
    cell = np.where(
      anywhere,
      np.argmax(pred.occupied_prob, axis=1),
      3 * np.maximum(row, 0) + np.maximum(col, 0),
    )
    position = pred.occupied[rows, cell]
    colour = pred.colour[rows, cell] == attrs[:, slot, 1]
    shape = pred.shape[rows, cell] == attrs[:, slot, 2]
    sized = present & targets.size_mentioned[:, slot]
    size = pred.size[rows, cell] == attrs[:, slot, 3]
    sums["position"] += float(np.sum(position[present]))
    sums["colour"] += float(np.sum(colour[present]))
    sums["shape"] += float(np.sum(shape[present]))
    sums["size"] += float(np.sum(size[sized]))
    counts["objects"] += int(present.sum())
    counts["sized"] += int(sized.sum())
    good = position & colour & shape & (size | ~sized)
    ok_all &= np.where(present, good, True)
    shape_ok &= np.where(present, shape, True)
  requested = (attrs[..., 0] == 1).sum(axis=1)
  count_ok = pred.count == requested
  objects = max(counts["objects"], 1)
  of = lambda ok, k: (
    float(np.mean(ok[requested == k]))
    if np.any(requested == k)
    else float("nan")
  )
  return {
    "overall": float(np.mean(ok_all & count_ok)),
    "position": sums["position"] / objects,
    "colour": sums["colour"] / objects,
    "shape": sums["shape"] / objects,
    "size": (sums["size"] / counts["sized"])
    if counts["sized"]
    else float("nan"),
    "count": float(np.mean(count_ok)),
    "shape_one": of(shape_ok, 1),
    "overall_two": of(ok_all & count_ok, 2),
  }


# --- weights -------------------------------------------------------------------


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters by dotted name, as numpy (what ``save``
  writes)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {
    ".".join(map(str, path)): np.asarray(var.get_value()) for path, var in flat
  }


def save(model: OracleNet, path: str, metadata: dict | None = None) -> None:
  """Writes the weights (and JSON metadata: config, how it was trained and
  its validation figures) as safetensors."""
  from safetensors.numpy import save_file

  meta = {"config": json.dumps(dataclasses.asdict(model.config))}
  for key, value in (metadata or {}).items():
    meta[key] = json.dumps(value)
  save_file(flat_params(model), path, metadata=meta)


def load(path: str = DEFAULT_WEIGHTS) -> tuple[OracleNet, dict[str, Any]]:
  """(OracleNet, metadata dict) from a safetensors file written by ``save``."""
  from safetensors import safe_open

  if not os.path.exists(path):
    raise FileNotFoundError(
      f"no oracle weights at {path}; train them with `python -m "
      "tim_jax.shapes.train_oracle --out PATH`"
    )
  with safe_open(path, "np") as f:
    raw_meta = f.metadata() or {}
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  meta = {k: json.loads(v) for k, v in raw_meta.items()}
  cfg = meta.get("config", {})
  config = OracleConfig(
    widths=tuple(cfg.get("widths", OracleConfig.widths)),
    feature_dim=int(cfg.get("feature_dim", OracleConfig.feature_dim)),
  )
  model = OracleNet(config, rngs=nnx.Rngs(0))
  expected = flat_params(model)
  if set(expected) != set(arrays):
    raise UserError(
      f"{path} does not hold oracle weights of this layout: missing "
      f"{sorted(set(expected) - set(arrays))}, unexpected "
      f"{sorted(set(arrays) - set(expected))}"
    )
  for name, value in arrays.items():
    if value.shape != expected[name].shape:
      raise UserError(
        f"{path}: {name} has shape {value.shape}, expected "
        f"{expected[name].shape}"
      )
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(arrays[".".join(map(str, path))]))
  nnx.update(model, state)
  return model, meta


@functools.lru_cache(maxsize=2)
def default_oracle() -> Oracle:
  """The shipped oracle, loaded once per process."""
  return Oracle()
