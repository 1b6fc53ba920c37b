"""The shapes oracle: its shipped weights are validated here, on scenes it
never saw (a seed of their own)."""

import numpy as np
import pytest

from tim_jax.shapes import oracle, train_oracle, world

SEED = 6_000_001  # Neither the oracle's training nor its own validation.
N = 400


@pytest.fixture(scope="module")
def judge():
  return oracle.Oracle()


@pytest.fixture(scope="module")
def real():
  scenes = [world.scene(i, SEED) for i in range(N)]
  images = np.stack([world.render(s, 32) for s in scenes])
  targets = oracle.targets_from_scenes(scenes)
  # Check sizes on every object, not only where a caption names them.
  targets.size_mentioned[:] = targets.attributes[..., 0] == 1
  return images, targets


def test_real_images_score_at_least_98_percent(judge, real):
  images, targets = real
  scores = judge.score(images, targets)
  for name, value in scores.items():
    assert value >= 0.98, (name, scores)


def test_real_class_conditional_images_score_at_least_98_percent(judge):
  scenes = [world.scene(i, SEED, (1,)) for i in range(200)]
  images = np.stack([world.render(s, 32) for s in scenes])
  labels = [world.label_of(s.objects[0]) for s in scenes]
  scores = judge.score(images, oracle.targets_from_labels(labels))
  for name in ("overall", "colour", "shape", "count"):
    assert scores[name] >= 0.98, (name, scores)


def test_larger_real_images_are_read_after_resizing(judge, real):
  _, targets = real
  scenes = [world.scene(i, SEED) for i in range(100)]
  images = np.stack([world.render(s, 64) for s in scenes])
  scores = judge.score(images, targets[:100])
  assert scores["overall"] >= 0.95, scores


def test_noise_scores_chance(judge, real):
  images, targets = real
  noise = np.random.default_rng(0).standard_normal(images.shape)
  scores = judge.score(noise.astype(np.float32), targets)
  for name, chance in oracle.CHANCE.items():
    assert abs(scores[name] - chance) < 0.08, (name, scores)
  assert scores["overall"] < 0.02, scores


def test_wrong_captions_score_low(judge, real):
  """Images of other scenes than requested: near chance, not near 1."""
  images, targets = real
  shuffled = targets[np.roll(np.arange(len(targets)), 7)]
  scores = judge.score(images, shuffled)
  assert scores["overall"] < 0.05, scores
  assert scores["colour"] < 0.3, scores


def test_frechet_distance_near_zero_for_real_and_grows(judge):
  """Disjoint real sets are close (what is left is the finite-sample bias,
  ~1 % of the features' total variance at these sizes); blurring or
  washing out the colours moves a set away, the more the further."""
  from tim_jax.eval import fid

  def render(seed, n):
    return np.stack([world.render(world.scene(i, seed), 32) for i in range(n)])

  images, reference = render(SEED + 2, 2000), render(SEED + 3, 4000)
  ref = judge.features(reference)
  fd = lambda x: fid.fid_from_features(judge.features(np.asarray(x)), ref)
  same = fd(images)
  blurred = [fd(train_oracle.blur(images, s)) for s in (0.7, 1.2, 2.0)]
  grey = images.mean(axis=-1, keepdims=True)
  washed = [fd((1 - a) * images + a * grey) for a in (0.3, 0.5)]
  scale = float(np.trace(np.cov(ref, rowvar=False)))
  print(
    f"FD real {same:.1f} (total variance {scale:.0f}), blurred "
    f"{blurred}, washed out {washed}"
  )
  assert same < 0.02 * scale
  assert same < 0.2 * blurred[0]
  assert blurred[0] < blurred[1] < blurred[2]
  assert 2 * same < washed[0] < washed[1]


def test_shipped_weights_record_how_they_were_made(judge):
  meta = judge.metadata
  assert meta["training"]["train_seed"] == train_oracle.TRAIN_SEED
  assert meta["training"]["steps"] >= 1000
  assert meta["validation"]["real"]["overall"] >= 0.98


def test_training_is_deterministic():
  a = train_oracle.train(steps=3, batch=8, progress=False)
  b = train_oracle.train(steps=3, batch=8, progress=False)
  pa, pb = oracle.flat_params(a), oracle.flat_params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k])
  c = train_oracle.train(steps=3, batch=8, seed=1, progress=False)
  assert not np.array_equal(
    oracle.flat_params(c)["head.kernel"], pa["head.kernel"]
  )


def test_cell_targets():
  s = world.Scene(
    (
      world.SceneObject(2, 1, 0, 0, 2, True),
      world.SceneObject(4, 2, 1, 2, 1, False),
    )
  )
  occ, shp, sz = oracle.cell_targets(world.attributes(s)[None])
  assert occ[0].tolist() == [0, 0, 3, 0, 0, 0, 0, 5, 0]
  assert shp[0, 2] == 1 and shp[0, 7] == 2 and shp[0, 0] == -1
  assert sz[0, 2] == 0 and sz[0, 7] == 1


def test_parse_caption_inverts_caption():
  for i in range(300):
    s = world.scene(i, 11)
    parsed = oracle.parse_caption(world.caption(s))
    assert len(parsed.objects) == len(s.objects)
    for a, b in zip(parsed.objects, s.objects):
      assert (a.colour, a.shape, a.row, a.col, a.mention_size) == (
        b.colour,
        b.shape,
        b.row,
        b.col,
        b.mention_size,
      )
      if b.mention_size:
        assert a.size == b.size
  for bad in (
    "a red dog at the top",
    "a red circle at the middle",
    "red circle at the top",
    "a red circle at the top and a red circle at the left and a "
    "red circle at the right",
  ):
    with pytest.raises(ValueError):
      oracle.parse_caption(bad)


def test_accuracy_rules_on_constructed_predictions():
  targets = oracle.targets_from_scenes(
    [world.Scene((world.SceneObject(1, 0, 1, 1, 1, True),))]
  )

  def pred(colour, shape, size, occupied):
    p = np.zeros((1, 9))
    p[0, occupied] = 0.9
    mk = lambda v: np.full((1, 9), v)
    return oracle.Predictions(
      p, mk(colour), mk(shape), mk(size), np.zeros((1, 4))
    )

  right = oracle.attribute_accuracy(pred(1, 0, 1, [4]), targets)
  nan = right.pop("overall_two")
  assert np.isnan(nan)  # No two-object request.
  assert right == dict(
    overall=1.0,
    position=1.0,
    colour=1.0,
    shape=1.0,
    size=1.0,
    count=1.0,
    shape_one=1.0,
  )
  extra = oracle.attribute_accuracy(pred(1, 0, 1, [4, 0]), targets)
  assert extra["count"] == 0.0 and extra["overall"] == 0.0
  assert extra["colour"] == 1.0
  wrong = oracle.attribute_accuracy(pred(2, 0, 0, [4]), targets)
  assert wrong["colour"] == 0.0 and wrong["size"] == 0.0
  assert wrong["overall"] == 0.0 and wrong["position"] == 1.0
  moved = oracle.attribute_accuracy(pred(1, 0, 1, [3]), targets)
  assert moved["position"] == 0.0 and moved["overall"] == 0.0


def test_split_scores_by_the_number_of_requested_objects():
  # Image 0 asks one object (shape right, colour wrong), image 1 two (both
  # right), image 2 two (the second's shape wrong).
  one = world.Scene((world.SceneObject(1, 0, 1, 0, 0, False),))
  two = world.Scene(
    (
      world.SceneObject(1, 0, 1, 0, 0, False),
      world.SceneObject(2, 1, 1, 2, 2, False),
    )
  )
  targets = oracle.targets_from_scenes([one, two, two])
  occ = np.zeros((3, 9))
  occ[:, 0] = 0.9
  occ[1:, 8] = 0.9
  colour = np.ones((3, 9)) * 1
  colour[:, 8] = 2
  colour[0, 0] = 3
  shape = np.zeros((3, 9))
  shape[1, 8] = 1
  shape[2, 8] = 2
  p = oracle.Predictions(occ, colour, shape, np.ones((3, 9)), np.zeros((3, 4)))
  got = oracle.attribute_accuracy(p, targets)
  assert got["shape_one"] == 1.0  # Shape alone, not all-correct.
  assert got["overall_two"] == 0.5
  assert got["overall"] == pytest.approx(1 / 3)


def test_load_refuses_other_files(tmp_path):
  from safetensors.numpy import save_file

  path = str(tmp_path / "x.safetensors")
  save_file({"w": np.zeros(3, np.float32)}, path)
  with pytest.raises(ValueError, match="does not hold oracle weights"):
    oracle.load(path)
  with pytest.raises(FileNotFoundError, match="train_oracle"):
    oracle.load(str(tmp_path / "missing.safetensors"))
