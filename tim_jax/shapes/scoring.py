"""Scoring a model's samples of the built-in shapes world.

A ``ShapesScorer`` fixes held-out scenes (captions for t2i, labels for c2i),
what the oracle should read in them, and real reference images; ``score``
then gives the oracle's attribute accuracy against what was asked and the
Fréchet distance, in the oracle's features, to the reference. The NFE study
and the trainer's ``shapes_oracle`` evaluator both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tim_jax.eval import fid
from tim_jax.shapes import oracle, world

if TYPE_CHECKING:
  from jax.typing import ArrayLike

SCENE_SEED = 4_000_037  # Scenes requested from the models.
REFERENCE_SEED = 5_000_011  # Real images the distance is measured to.
SCORES = (
  "overall",
  "position",
  "colour",
  "shape",
  "size",
  "count",
  "shape_one",
  "overall_two",
  "fd",
)


def object_counts(kind: str) -> tuple[int, ...]:
  """How many objects a scene of this kind holds (t2i: one or two)."""
  return (1, 2) if kind == "t2i" else (1,)


def scenes(kind: str, num: int, seed: int = SCENE_SEED) -> list[world.Scene]:
  """The held-out scenes of a model kind."""
  return [world.scene(i, seed, object_counts(kind)) for i in range(num)]


def real_images(kind: str, num: int, size: int, seed: int) -> np.ndarray:
  """Rendered images of the held-out scenes."""
  return np.stack([world.render(s, size) for s in scenes(kind, num, seed)])


def targets(kind: str, requested: Sequence[world.Scene]) -> oracle.Targets:
  """What the oracle should read in images of the ``requested`` scenes."""
  if kind == "t2i":
    return oracle.targets_from_scenes(requested)
  return oracle.targets_from_labels(
    [world.label_of(s.objects[0]) for s in requested]
  )


def requests(kind: str, requested: Sequence[world.Scene]) -> dict:
  """The scenes as a pipeline's ``conditions`` arguments."""
  if kind == "t2i":
    return dict(prompts=[world.caption(s) for s in requested])
  return dict(labels=[world.label_of(s.objects[0]) for s in requested])


class ShapesScorer:
  """Held-out scenes, their targets and real reference features."""

  def __init__(
    self,
    kind: str,
    size: int,
    num: int,
    reference_num: int = 5000,
    judge: oracle.Oracle | None = None,
  ):
    self.kind, self.size, self.num = kind, int(size), int(num)
    self.judge = judge or oracle.default_oracle()
    self.scenes = scenes(kind, num)
    self.targets = targets(kind, self.scenes)
    # A large real set: the distance's finite-sample bias then comes mostly
    # from the (smaller, costlier) generated set.
    self.reference = self.judge.features(
      real_images(kind, max(num, reference_num), size, REFERENCE_SEED)
    )

  def requests(self) -> dict:
    """The held-out scenes as ``Pipeline.conditions`` arguments (prompts or labels)."""
    return requests(self.kind, self.scenes)

  def score(self, pixels: ArrayLike) -> dict[str, float]:
    """Scores of ``num`` images in [-1, 1] of the requested scenes."""
    pixels = np.asarray(pixels, np.float32)
    scores = self.judge.score(pixels, self.targets)
    scores["fd"] = fid.fid_from_features(
      self.judge.features(pixels), self.reference
    )
    return scores

  def real_scores(self) -> dict[str, float]:
    """The rendered requested scenes' own scores: the accuracy's ceiling
    and the distance's floor at this sample size."""
    return self.score(real_images(self.kind, self.num, self.size, SCENE_SEED))
