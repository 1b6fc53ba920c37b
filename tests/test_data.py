"""tim_jax.data: shapes world, text, grain pipeline, array_record latents."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.data import pipeline
from tim_jax.shapes import text, world

NC = len(world.COLOURS)
# The grammar as a reader knows it, written out rather than taken from
# world.POSITIONS, so a wrong name-to-cell table in shapes is caught.
POSITION_CELL = {
  "top left": (0, 0),
  "top": (0, 1),
  "top right": (0, 2),
  "left": (1, 0),
  "center": (1, 1),
  "right": (1, 2),
  "bottom left": (2, 0),
  "bottom": (2, 1),
  "bottom right": (2, 2),
}


def _cell_slice(row, col, size):
  """Pixels whose centres lie inside grid cell (row, col)."""
  lo = lambda k: int(np.ceil(k * size / 3 - 0.5))
  return slice(lo(row), lo(row + 1)), slice(lo(col), lo(col + 1))


# --- shapes ------------------------------------------------------------------


def test_scene_is_a_function_of_seed_and_index():
  src = world.ShapesSource(seed=3)
  a, b = src[17], src[17]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"]
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  # A fresh source (e.g. in another process) agrees.
  np.testing.assert_array_equal(
    world.ShapesSource(seed=3)[17]["image"], a["image"]
  )
  captions = [src[i]["caption"] for i in range(60)]
  assert len(set(captions)) > 50
  assert not np.array_equal(src[18]["image"], a["image"])
  other = world.ShapesSource(seed=4)
  assert sum(other[i]["caption"] == captions[i] for i in range(60)) < 5


def test_render_colour_at_cell_centre_and_background_elsewhere():
  size = 32
  for i in range(300):
    s = world.scene(i, seed=1)
    image = world.render(s, size)
    assert image.shape == (size, size, 3) and image.dtype == np.float32
    assert image.min() >= -1 and image.max() <= 1
    used = set()
    for o in s.objects:
      used.add((o.row, o.col))
      cy, cx = int((o.row + 0.5) * size / 3), int((o.col + 0.5) * size / 3)
      np.testing.assert_array_equal(image[cy, cx], world.COLOUR_RGB[o.colour])
      # Shapes stay inside their cell: its corner pixels are background.
      rows, cols = _cell_slice(o.row, o.col, size)
      for y in (rows.start, rows.stop - 1):
        for x in (cols.start, cols.stop - 1):
          np.testing.assert_array_equal(image[y, x], world.BACKGROUND_RGB)
    for cell in range(9):
      if divmod(cell, 3) not in used:
        patch = image[_cell_slice(*divmod(cell, 3), size)]
        np.testing.assert_array_equal(
          patch, np.broadcast_to(world.BACKGROUND_RGB, patch.shape)
        )


@pytest.mark.parametrize("shape", world.SHAPES)
def test_render_draws_the_named_shape(shape):
  size, row, col = 96, 1, 1
  obj = world.SceneObject(
    colour=2,
    shape=world.SHAPES.index(shape),
    size=1,
    row=row,
    col=col,
    mention_size=False,
  )
  image = world.render(world.Scene((obj,)), size)
  patch = image[_cell_slice(row, col, size)]
  bg = world.BACKGROUND_RGB
  fg = world.COLOUR_RGB[2]
  # Per-pixel coverage, read back from the colour blend.
  cover = ((patch - bg) / (fg - bg)).mean(-1)
  r = world.SIZE_RADIUS[1] * size / 3
  area = {
    "circle": np.pi * r**2,
    "square": (2 * 0.9 * r) ** 2,
    "triangle": 2 * r * (2 * r / np.sqrt(3)),
  }[shape]
  np.testing.assert_allclose(cover.sum(), area, rtol=0.03)
  top, bottom = np.split(cover, 2)
  if shape == "triangle":  # Apex up.
    assert bottom.sum() > 2 * top.sum()
  else:
    np.testing.assert_allclose(top.sum(), bottom.sum(), rtol=0.1)
  # Square and triangle fill their bottom corners, the circle does not.
  c = patch.shape[0] // 2
  corner = cover[c + int(0.8 * r), c + int(0.8 * r)]
  assert corner == (0.0 if shape == "circle" else 1.0)


def test_two_objects_never_share_a_cell():
  counts = set()
  for i in range(2000):
    s = world.scene(i, seed=0)
    counts.add(len(s.objects))
    cells = [(o.row, o.col) for o in s.objects]
    assert len(set(cells)) == len(cells)
  assert counts == {1, 2}
  assert all(
    len(world.scene(i, 0, num_objects=(1,)).objects) == 1 for i in range(200)
  )
  with pytest.raises(ValueError, match="num_objects"):
    world.scene(0, 0, num_objects=(3,))


_OBJECT = re.compile(r"^a (?:(small|large) )?(\w+) (\w+) (?:at|in) the (.+)$")


def _parse(caption):
  """The grammar, read backwards: [(colour, shape, size|None, row, col)]."""
  out = []
  for phrase in caption.split(" and "):
    m = _OBJECT.match(phrase)
    assert m, f"caption {caption!r} is outside the grammar"
    size, colour, shape, position = m.groups()
    out.append(
      (
        world.COLOURS.index(colour),
        world.SHAPES.index(shape),
        None if size is None else world.SIZES.index(size),
        *POSITION_CELL[position],
      )
    )
  return out


def test_captions_parse_back_to_the_attributes():
  src = world.ShapesSource(seed=5)
  mentioned = 0
  for i in range(400):
    ex = src[i]
    attrs = ex["attributes"]
    parsed = _parse(ex["caption"])
    assert len(parsed) == int((attrs[:, 0] == 1).sum())
    for (colour, shape, size, row, col), a in zip(parsed, attrs):
      assert a[0] == 1
      assert (colour, shape, row, col) == tuple(a[[1, 2, 4, 5]])
      if size is not None:
        mentioned += 1
        assert size == a[3]
    for a in attrs[len(parsed) :]:
      assert (a == -1).all()
  assert 100 < mentioned < 500  # The size word is sometimes said.
  assert max(len(src[i]["caption"].split()) for i in range(400)) <= (
    world.MAX_CAPTION_WORDS
  )


def test_attributes_match_the_image():
  src = world.ShapesSource(seed=2)
  for i in range(100):
    ex = src[i]
    for present, colour, _, size, row, col in ex["attributes"]:
      if present == 1:
        cy, cx = int((row + 0.5) * 32 / 3), int((col + 0.5) * 32 / 3)
        np.testing.assert_array_equal(
          ex["image"][cy, cx], world.COLOUR_RGB[colour]
        )
        patch = ex["image"][_cell_slice(row, col, 32)]
        fg, bg = world.COLOUR_RGB[colour], world.BACKGROUND_RGB
        ch = np.argmax(np.abs(fg - bg))  # Coverage from the clearest channel.
        area = ((patch[..., ch] - bg[ch]) / (fg[ch] - bg[ch])).sum()
        # Small shapes cover 13-18 pixels at 32x32, large ones 34-48.
        assert (area > 25) == (world.SIZES[size] == "large"), area


def test_colour_names_match_their_rgb():
  rgb = dict(zip(world.COLOURS, world.COLOUR_RGB))
  r, g, b = rgb["red"]
  assert r > max(g, b) + 1
  r, g, b = rgb["green"]
  assert g > max(r, b) + 1
  r, g, b = rgb["blue"]
  assert b > max(r, g) + 1
  r, g, b = rgb["yellow"]
  assert min(r, g) > b + 1
  r, g, b = rgb["purple"]
  assert min(r, b) > g + 0.5
  r, g, b = rgb["cyan"]
  assert min(g, b) > r + 1
  # Well separated from each other and from the background.
  table = np.concatenate([world.COLOUR_RGB, world.BACKGROUND_RGB[None]])
  dist = np.linalg.norm(table[:, None] - table[None], axis=-1)
  assert dist[~np.eye(len(table), dtype=bool)].min() > 0.8


def test_c2i_labels():
  src = world.ShapesSource(kind="c2i", seed=0)
  assert world.num_classes() == len(world.SHAPES) * NC
  seen = set()
  for i in range(500):
    ex = src[i]
    assert "caption" not in ex and "tokens" not in ex
    label = int(ex["label"])
    assert 0 <= label < world.num_classes()
    a = ex["attributes"]
    assert a[0, 0] == 1 and (a[1] == -1).all()
    assert label == a[0, 2] * NC + a[0, 1]
    assert world.label_name(label) == (
      f"{world.COLOURS[a[0, 1]]} {world.SHAPES[a[0, 2]]}"
    )
    seen.add(label)
  assert seen == set(range(world.num_classes()))
  with pytest.raises(ValueError, match="label"):
    world.label_name(world.num_classes())


def test_source_rejects_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    world.ShapesSource(kind="t2v")
  # Too short a caption length would cut "bottom right" to "bottom".
  with pytest.raises(ValueError, match="max_caption_len"):
    world.ShapesSource(max_caption_len=world.MAX_CAPTION_WORDS - 1)
  with pytest.raises(IndexError):
    world.ShapesSource(length=10)[10]


# --- text --------------------------------------------------------------------


def test_tokenizer_round_trip_unknown_words_and_truncation():
  tok = world.tokenizer()
  assert tok.vocab_size == len(world.VOCABULARY) + 2
  src = world.ShapesSource(seed=7)
  captions = [src[i]["caption"] for i in range(200)]
  ids = tok.encode(captions, world.MAX_CAPTION_WORDS)
  assert ids.dtype == np.int32
  assert ids.shape == (200, world.MAX_CAPTION_WORDS)
  assert (ids != text.UNK_ID).all()  # The vocabulary covers the grammar.
  assert tok.decode(ids) == captions
  np.testing.assert_array_equal(src[3]["tokens"], ids[3])

  a = tok.encode(["A Red circle, at the TOP-left!"], 10)
  b = tok.encode(["a red circle at the top left"], 10)
  np.testing.assert_array_equal(a, b)
  assert (a[0, 7:] == text.PAD_ID).all() and (a[0, :7] > 1).all()

  c = tok.encode(["a zebra circle"], 4)
  assert c[0].tolist() == [b[0, 0], text.UNK_ID, b[0, 2], text.PAD_ID]
  d = tok.encode(["a red circle at the top left"], 3)
  np.testing.assert_array_equal(d, b[:, :3])
  assert tok.encode([""], 5).tolist() == [[0] * 5]
  with pytest.raises(TypeError, match="list"):
    tok.encode("a red circle", 5)


def test_caption_encoder_context_carries_the_words_before():
  tok = world.tokenizer()
  L, D = world.MAX_CAPTION_WORDS, 32
  plain = text.CaptionEncoder(tok.vocab_size, L, D, seed=0)
  enc = text.CaptionEncoder(tok.vocab_size, L, D, seed=0, context=0.7)
  captions = [
    "a red square at the left and a blue circle at the right",
    "a blue square at the left and a blue circle at the right",
  ]
  ids = tok.encode(captions, L)
  f, p = np.asarray(enc(ids)), np.asarray(plain(ids))
  n = len(captions[0].split())
  # The first word has nothing before it; pads get no context.
  np.testing.assert_allclose(f[:, 0], p[:, 0], atol=1e-6)
  np.testing.assert_allclose(f[:, n:], p[:, n:], atol=1e-6)
  # Every later word carries a unit-weight average of the words before it:
  # "a" then "red" before "square" (weights 0.7 and 1, normalised).
  t = np.asarray(enc.context_table)
  want = p[0, 2] + (0.7 * t[ids[0, 0]] + t[ids[0, 1]]) / 1.7
  np.testing.assert_allclose(f[0, 2], want, atol=1e-5)
  # "red" -> "blue" changes the words after it (binding), not those before,
  # and the change fades with distance.
  diff = np.abs(f[0] - f[1]).max(-1)
  assert (diff[:1] < 1e-6).all() and (diff[1:n] > 1e-3).all()
  assert diff[5] > diff[12] > 0  # "left" (its clause) vs "right"
  assert (diff[n:] < 1e-6).all()
  with pytest.raises(ValueError, match="decay in"):
    text.CaptionEncoder(tok.vocab_size, L, D, context=1.0)


def test_caption_encoder():
  tok = world.tokenizer()
  L, D = world.MAX_CAPTION_WORDS, 32
  enc = text.CaptionEncoder(tok.vocab_size, L, D, seed=0)
  captions = [
    "a red circle at the top left",
    "a blue circle at the top left",
    "a small green square at the bottom right and a red triangle in the center",
  ]
  ids = tok.encode(captions, L)
  f = enc(ids)
  assert f.shape == (3, L, D) and f.dtype == jnp.float32
  np.testing.assert_array_equal(jax.jit(enc.__call__)(ids), f)
  # Same seed, same features (a fresh encoder, e.g. at sampling time).
  np.testing.assert_array_equal(
    text.CaptionEncoder(tok.vocab_size, L, D, seed=0)(ids), f
  )
  assert not np.allclose(text.CaptionEncoder(tok.vocab_size, L, D, 1)(ids), f)
  # Only the changed word differs ("red" -> "blue" at position 1) ...
  diff = np.abs(np.asarray(f[0] - f[1])).max(-1)
  assert diff[1] > 0.1 and (np.delete(diff, 1) == 0).all()
  assert not np.allclose(f[0], f[2])
  # ... and pads are the same whatever the caption, but vary by position.
  n2 = len(captions[2].split())
  np.testing.assert_array_equal(f[0, n2:], f[2, n2:])
  assert not np.allclose(f[0, 7], f[0, 8])
  null = enc.null_features()
  assert null.shape == (1, L, D)
  np.testing.assert_array_equal(null, enc(tok.encode([""], L)))
  np.testing.assert_array_equal(null[0, 7:], f[0, 7:])
  with pytest.raises(ValueError, match="tokens must be"):
    enc(ids[:, :5])


# --- pipeline ----------------------------------------------------------------


class _Indexed:
  """Example i is {"index": i, "name": "i"}: shows which rows were read."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"index": np.int32(i), "name": str(i)}


def _indices(it):
  return [b["index"].tolist() for b in it]


@pytest.mark.parametrize("kind", ["t2i", "c2i"])
def test_pipeline_batches(kind):
  src = world.ShapesSource(kind=kind, seed=0)
  it = pipeline.make_iterator(
    src, global_batch_size=8, seed=0, process_index=0, process_count=1
  )
  batch = next(it)
  want = {
    "image": ((8, 32, 32, 3), np.float32),
    "attributes": ((8, world.MAX_OBJECTS, 6), np.int32),
  }
  if kind == "t2i":
    want["tokens"] = ((8, world.MAX_CAPTION_WORDS), np.int32)
  else:
    want["label"] = ((8,), np.int32)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
  again = next(
    pipeline.make_iterator(
      src, global_batch_size=8, seed=0, process_index=0, process_count=1
    )
  )
  np.testing.assert_array_equal(again["image"], batch["image"])
  other = next(
    pipeline.make_iterator(
      src, global_batch_size=8, seed=1, process_index=0, process_count=1
    )
  )
  assert not np.array_equal(other["image"], batch["image"])


@pytest.mark.parametrize("n", [24, 27])
def test_pipeline_process_shards_are_disjoint_and_cover(n):
  kw = dict(global_batch_size=4, seed=0, num_epochs=1)
  p0 = _indices(
    pipeline.make_iterator(_Indexed(n), process_index=0, process_count=2, **kw)
  )
  p1 = _indices(
    pipeline.make_iterator(_Indexed(n), process_index=1, process_count=2, **kw)
  )
  single = _indices(
    pipeline.make_iterator(_Indexed(n), process_index=0, process_count=1, **kw)
  )
  # Same number of steps on every process; 2 examples per process per step.
  assert len(p0) == len(p1) == len(single) == n // 4
  assert all(len(b) == 2 for b in p0 + p1)
  seen0, seen1 = sum(p0, []), sum(p1, [])
  assert not set(seen0) & set(seen1)
  assert len(set(seen0 + seen1)) == n // 4 * 4
  # Step k's global batch does not depend on the process count.
  for a, b, s in zip(p0, p1, single):
    assert sorted(a + b) == sorted(s)
  assert sum(single, []) != sorted(sum(single, []))  # It was shuffled.
  # A second epoch is a new order of the same examples.
  two = _indices(
    pipeline.make_iterator(
      _Indexed(24),
      global_batch_size=4,
      seed=0,
      num_epochs=2,
      process_index=0,
      process_count=1,
    )
  )
  first, second = sum(two[:6], []), sum(two[6:], [])
  assert sorted(first) == sorted(second) == list(range(24))
  assert first != second


def test_pipeline_state_resumes_exactly():
  src = world.ShapesSource(seed=0)
  kw = dict(global_batch_size=4, seed=9, process_index=0, process_count=1)
  it = pipeline.make_iterator(src, **kw)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = pipeline.make_iterator(src, **kw)
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])


def test_pipeline_worker_processes_give_the_same_batches():
  # Also shows the source pickles into grain's worker processes.
  src = world.ShapesSource(seed=0)
  kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
  inline = pipeline.make_iterator(src, **kw)
  want = [next(inline)["tokens"] for _ in range(4)]
  workers = pipeline.make_iterator(src, worker_count=1, **kw)
  got = [next(workers)["tokens"] for _ in range(2)]
  state = workers.get_state()
  resumed = pipeline.make_iterator(src, worker_count=1, **kw)
  resumed.set_state(state)
  got += [next(resumed)["tokens"] for _ in range(2)]
  workers.close(), resumed.close()
  np.testing.assert_array_equal(np.stack(got), np.stack(want))


def test_pipeline_state_through_orbax(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  kw = dict(global_batch_size=4, seed=1)
  it = pipeline.make_iterator(_Indexed(100), **kw)
  next(it), next(it)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))
    )
    mngr.wait_until_finished()
  want = _indices([next(it) for _ in range(2)])
  fresh = pipeline.make_iterator(_Indexed(100), **kw)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.restore(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
    )
  assert _indices([next(fresh) for _ in range(2)]) == want


def test_pipeline_rejects_bad_batch_sizes():
  with pytest.raises(ValueError, match="global_batch_size=6"):
    pipeline.make_iterator(
      _Indexed(100),
      global_batch_size=6,
      seed=0,
      process_index=0,
      process_count=4,
    )
  with pytest.raises(ValueError, match="global_batch_size=0"):
    pipeline.make_iterator(
      _Indexed(100),
      global_batch_size=0,
      seed=0,
      process_index=0,
      process_count=1,
    )
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_iterator(
      _Indexed(100),
      global_batch_size=4,
      seed=0,
      process_index=2,
      process_count=2,
    )
  with pytest.raises(ValueError, match="one global batch"):
    pipeline.make_iterator(
      _Indexed(3),
      global_batch_size=4,
      seed=0,
      num_epochs=1,
      process_index=0,
      process_count=1,
    )


# --- latents -----------------------------------------------------------------


def _write_shards(directory, rng, sizes, cap_shape=None):
  directory.mkdir()
  out = []
  for k, n in enumerate(sizes):
    latent = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
    arrays = {"latent": latent}
    if cap_shape is None:
      arrays["label"] = np.arange(n) + 100 * k
    else:
      arrays["caption"] = rng.normal(size=(n, *cap_shape)).astype(np.float32)
    np.savez(directory / f"shard{k:02d}.npz", **arrays)
    out.append(arrays)
  return out


def test_latents_array_record_round_trip(tmp_path):
  import tim_jax.data.latents as latents

  rng = np.random.default_rng(0)
  shards = _write_shards(tmp_path / "in", rng, [6, 4])
  path = latents.write_latents(
    tmp_path / "in", tmp_path / "out", latent_shape=(4, 4, 3), cond="label"
  )
  assert any(
    f.startswith("tim_latents-train.array_record")
    for f in __import__("os").listdir(path)
  )
  src = latents.LatentSource(tmp_path / "out")
  assert len(src) == 10
  rows = [
    (s["latent"][i], s["label"][i])
    for s in shards
    for i in range(len(s["label"]))
  ]
  for i, (latent, label) in enumerate(rows):  # Rows keep the shards' order.
    ex = src[i]
    np.testing.assert_array_equal(ex["image"], latent)
    assert ex["image"].dtype == np.float32
    assert ex["label"] == label and ex["label"].dtype == np.int32

  it = pipeline.make_iterator(
    src,
    global_batch_size=5,
    seed=0,
    num_epochs=1,
    process_index=0,
    process_count=1,
  )
  batches = list(it)
  assert len(batches) == 2
  assert batches[0]["image"].shape == (5, 4, 4, 3)
  by_label = {
    int(l): x
    for l, x in zip(
      np.concatenate([b["label"] for b in batches]),
      np.concatenate([b["image"] for b in batches]),
    )
  }
  assert sorted(by_label) == sorted(int(l) for _, l in rows)
  for latent, label in rows:
    np.testing.assert_array_equal(by_label[int(label)], latent)

  # Never overwrite or silently reuse what is there.
  with pytest.raises(FileExistsError, match="already exists"):
    latents.write_latents(
      tmp_path / "in", tmp_path / "out", latent_shape=(4, 4, 3)
    )


def test_latents_captions_and_errors(tmp_path, capsys):
  import tim_jax.data.latents as latents

  rng = np.random.default_rng(1)
  shards = _write_shards(tmp_path / "in", rng, [3], cap_shape=(5, 8))
  from tim_jax.commands import cli
  from tim_jax.commands import latents as command

  rc = cli.call(
    command,
    [
      f"--input_dir={tmp_path / 'in'}",
      f"--data_dir={tmp_path / 'out'}",
      "--latent_shape=4,4,3",
      "--cond=caption",
      "--cap_shape=5,8",
    ],
  )
  assert rc == 0 and "wrote 3 examples" in capsys.readouterr().out
  src = latents.LatentSource(tmp_path / "out")
  assert sorted(src[2]) == ["caption_features", "image"]
  np.testing.assert_array_equal(
    src[2]["caption_features"], shards[0]["caption"][2]
  )
  np.testing.assert_array_equal(src[2]["image"], shards[0]["latent"][2])

  with pytest.raises(ValueError, match=r"shard00\.npz.*'latent'"):
    latents.write_latents(
      tmp_path / "in",
      tmp_path / "bad",
      latent_shape=(4, 4, 2),
      cond="caption",
      cap_shape=(5, 8),
    )
  with pytest.raises(KeyError, match="'label'"):
    latents.write_latents(
      tmp_path / "in", tmp_path / "bad", latent_shape=(4, 4, 3)
    )
  with pytest.raises(ValueError, match="cap_shape"):
    latents.write_latents(
      tmp_path / "in", tmp_path / "bad", latent_shape=(4, 4, 3), cond="caption"
    )
  assert not (tmp_path / "bad").exists()  # Nothing written on failure.


def test_latents_with_repa_features(tmp_path, capsys):
  import tim_jax.data.latents as latents

  rng = np.random.default_rng(2)
  shards = _write_shards(tmp_path / "in", rng, [4])
  repa = rng.normal(size=(4, 6, 5)).astype(np.float32)
  np.savez(tmp_path / "in" / "shard00.npz", repa_features=repa, **shards[0])
  from tim_jax.commands import cli
  from tim_jax.commands import latents as command

  rc = cli.call(
    command,
    [
      f"--input_dir={tmp_path / 'in'}",
      f"--data_dir={tmp_path / 'out'}",
      "--latent_shape=4,4,3",
      "--repa_shape=6,5",
    ],
  )
  assert rc == 0, capsys.readouterr().err
  path = latents.find_dataset(tmp_path / "out")
  assert "label_4x4x3_repa6x5" in path
  src = latents.LatentSource(tmp_path / "out")
  assert src.repa_shape == (6, 5)
  assert sorted(src[3]) == ["image", "label", "repa_features"]
  np.testing.assert_array_equal(src[3]["repa_features"], repa[3])
  # A shard without the features, or with the wrong shape, is refused.
  with pytest.raises(ValueError, match="'repa_features' must be"):
    latents.write_latents(
      tmp_path / "in",
      tmp_path / "bad",
      latent_shape=(4, 4, 3),
      repa_shape=(6, 4),
    )
  np.savez(tmp_path / "in" / "shard00.npz", **shards[0])
  with pytest.raises(KeyError, match="'repa_features'"):
    latents.write_latents(
      tmp_path / "in",
      tmp_path / "bad",
      latent_shape=(4, 4, 3),
      repa_shape=(6, 5),
    )


@pytest.mark.parametrize("shape", [(32, 32, 4), (16, 16, 32)])
def test_the_documented_latent_shapes_can_be_written(tmp_path, shape):
  # The shapes the builder registers used to clash with tfds ("Cannot name
  # a custom BuilderConfig the same as an available BuilderConfig").
  from tim_jax.commands import cli
  from tim_jax.commands import latents as command
  from tim_jax.data import latents

  (tmp_path / "in").mkdir()
  np.savez(
    tmp_path / "in" / "s.npz",
    latent=np.ones((3, *shape), np.float32),
    label=np.arange(3),
  )
  shape_flag = ",".join(map(str, shape))
  assert (
    cli.call(
      command,
      [
        f"--input_dir={tmp_path / 'in'}",
        f"--data_dir={tmp_path / 'out'}",
        f"--latent_shape={shape_flag}",
        "--cond=label",
      ],
    )
    == 0
  )
  assert latents.LatentSource(str(tmp_path / "out")).latent_shape == shape
