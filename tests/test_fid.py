"""Fréchet distances, FID statistics and the FID InceptionV3 (random weights).

Nothing is downloaded: the network is checked for structure, loading and
determinism on random state dicts, and, where PyTorch is installed, against a
functional PyTorch forward written here from torchvision's Inception3 layout
with pytorch-fid's FID patches.
"""

from __future__ import annotations

import builtins
import os

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from tim_jax.eval import fid
from tim_jax.eval import inception as inc

pytestmark = [pytest.mark.parity]

# --------------------------------------------------------------------------
# Fréchet distance.


def _closed_form_commuting(mu1, a, mu2, b):
  """FD for covariances sharing an eigenbasis, eigenvalues a and b."""
  d = np.asarray(mu1) - np.asarray(mu2)
  return float(d @ d + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def _random_rotation(rng, d):
  q, r = np.linalg.qr(rng.standard_normal((d, d)))
  return q * np.sign(np.diag(r))


def _random_cov(rng, d, n=None):
  x = rng.standard_normal((n or 3 * d, d))
  return x.T @ x / x.shape[0]


def test_diagonal_covariances_match_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(
    got, _closed_form_commuting(mu1, a, mu2, b), rtol=1e-12
  )


def test_commuting_covariances_match_closed_form():
  rng = np.random.default_rng(1)
  d = 32
  q = _random_rotation(rng, d)
  a, b = rng.uniform(0.01, 5.0, d), rng.uniform(0.01, 5.0, d)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(
    got, _closed_form_commuting(mu1, a, mu2, b), rtol=1e-10
  )


def test_singular_covariances():
  # Rank-deficient covariances (fewer samples than dimensions) are the norm
  # for 2048-d features of small sets; the distance must stay exact.
  rng = np.random.default_rng(2)
  d = 24
  q = _random_rotation(rng, d)
  a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  a[:10], b[5:12] = 0.0, 0.0
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  mu = np.zeros(d)
  got = fid.frechet_distance(mu, s1, mu, s2)
  # Zero eigenvalues come out as +-1e-16 and their square roots as ~1e-8:
  # the sqrt is not Lipschitz at 0, so the tolerance is looser than above.
  np.testing.assert_allclose(
    got, _closed_form_commuting(mu, a, mu, b), rtol=1e-6
  )


def test_identical_is_zero_and_distance_is_symmetric():
  rng = np.random.default_rng(3)
  d = 64
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
  ab = fid.frechet_distance(mu1, s1, mu2, s2)
  ba = fid.frechet_distance(mu2, s2, mu1, s1)
  np.testing.assert_allclose(ab, ba, rtol=1e-10)
  # A generic (non-commuting) pair against scipy's matrix square root.
  import scipy.linalg as scipy_linalg

  root = scipy_linalg.sqrtm(s1 @ s2)
  d_mu = mu1 - mu2
  reference = d_mu @ d_mu + np.trace(s1 + s2 - 2 * np.real(root))
  np.testing.assert_allclose(ab, reference, rtol=1e-8)


def test_sample_statistics_approach_closed_form():
  rng = np.random.default_rng(4)
  d, n = 4, 200_000
  q = _random_rotation(rng, d)
  a, b = np.array([0.5, 1.0, 2.0, 4.0]), np.array([1.0, 1.0, 0.25, 3.0])
  mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.25])
  x1 = mu1 + (rng.standard_normal((n, d)) * np.sqrt(a)) @ q.T
  x2 = mu2 + (rng.standard_normal((n, d)) * np.sqrt(b)) @ q.T
  exact = _closed_form_commuting(mu1, a, mu2, b)
  np.testing.assert_allclose(fid.fid_from_features(x1, x2), exact, rtol=0.02)
  m, s = fid.statistics(x1)
  np.testing.assert_allclose(m, mu1, atol=0.02)
  np.testing.assert_allclose(s, (q * a) @ q.T, atol=0.05)


@pytest.mark.parametrize(
  "args, match",
  [
    ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), "mu1 must be"),
    ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"sigma1 must be \(3"),
    ((np.zeros(2), np.eye(2), np.zeros(2), np.eye(3)), r"sigma2 must be \(2"),
    ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "different dimensions"),
    (
      (np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)),
      "not symmetric",
    ),
    ((np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2)), "NaN"),
  ],
)
def test_bad_gaussians_raise(args, match):
  with pytest.raises(ValueError, match=match):
    fid.frechet_distance(*args)


def test_statistics_and_bad_features():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((50, 7)).astype(np.float32)
  mu, sigma = fid.statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(
    sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12
  )
  with pytest.raises(ValueError, match="at least 2 samples"):
    fid.statistics(x[:1])
  with pytest.raises(ValueError, match=r"\(N, D\)"):
    fid.statistics(x[0])
  with pytest.raises(ValueError, match="NaN"):
    fid.statistics(np.full((3, 2), np.inf))


def test_statistics_file_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  feats_a, feats_b = rng.standard_normal((40, 5)), rng.standard_normal((30, 5))
  stats = fid.Statistics.from_features(feats_a)
  stats.save(tmp_path / "a.npz")
  again = fid.Statistics.load(tmp_path / "a.npz")
  np.testing.assert_array_equal(again.mu, stats.mu)
  np.testing.assert_array_equal(again.sigma, stats.sigma)
  # Reference batches carry images and spatial statistics next to mu/sigma.
  np.savez_compressed(
    tmp_path / "ref.npz",
    arr_0=np.zeros((2, 4, 4, 3), np.uint8),
    mu=stats.mu.astype(np.float32),
    sigma=stats.sigma.astype(np.float32),
    mu_s=np.zeros(3),
    sigma_s=np.eye(3),
  )
  ref = fid.Statistics.load(tmp_path / "ref.npz")
  assert ref.dim == 5 and ref.mu.dtype == np.float64
  np.savez(tmp_path / "bad.npz", mean=stats.mu)
  with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\].*'mean'"):
    fid.Statistics.load(tmp_path / "bad.npz")
  np.testing.assert_allclose(
    fid.fid_from_features(feats_a, feats_b),
    fid.frechet_distance(*fid.statistics(feats_a), *fid.statistics(feats_b)),
    rtol=1e-12,
  )


def test_running_statistics_equal_batch_statistics():
  rng = np.random.default_rng(7)
  # A large common offset: raw sums of x x^T would lose digits here.
  x = 1e3 + rng.standard_normal((103, 9)) * rng.uniform(0.1, 2.0, 9)
  running = fid.RunningStatistics()
  start = 0
  for size in (1, 40, 0, 2, 60):
    running.update(x[start : start + size])
    start += size
  assert running.count == 103
  got = running.finalize()
  mu, sigma = fid.statistics(x)
  np.testing.assert_allclose(got.mu, mu, rtol=1e-14)
  np.testing.assert_allclose(got.sigma, sigma, rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match="holds 9"):
    running.update(np.zeros((2, 8)))
  with pytest.raises(ValueError, match="at least 2"):
    fid.RunningStatistics().update(x[:1]).finalize()


# --------------------------------------------------------------------------
# InceptionV3 structure.

# Hand count of the FID InceptionV3 state dict (no num_batches_tracked).
# BasicConv2d(cin, cout, kh x kw) holds cout*cin*kh*kw conv weights and
# 4*cout BN numbers (weight, bias, running mean, running variance).
#   stem 1a..4a: 3*32*9 + 32*32*9 + 32*64*9 + 64*80 + 80*192*9 = 171,872
#                conv + 4*(32+32+64+80+192) = 1,600 BN
#   Mixed_5b/5c/5d (A): 254,976 / 276,480 / 284,160 conv
#   Mixed_6a (B):       1,152,000;   Mixed_6b..6e (C): 1,294,336 /
#                       1,687,552 / 1,687,552 / 2,138,112
#   Mixed_7a (D):       1,695,744;   Mixed_7b/7c (E): 5,038,080 / 6,070,272
#   conv total 21,751,136; BN total 4 * 17,216 channels = 68,864;
#   fc 2048*1008 + 1008 = 2,065,392.
#   Total 21,751,136 + 68,864 + 2,065,392 = 23,885,392.
# Cross-check with the widely quoted 27,161,264 trainable parameters of
# torchvision's inception_v3 (aux head, 1000 classes): minus the aux head
# (768*128 + 2*128 + 128*768*25 + 2*768 + 768*1000 + 1000 = 3,326,696), plus
# 8 classes (8 * 2049 = 16,392) gives 23,850,960 trainable; adding the
# 34,432 running means and variances gives 23,885,392 again.
FID_INCEPTION_NUMEL = 23_885_392
FID_INCEPTION_NUM_CONVS = 94  # 5 stem + 3*7 A + 4 B + 4*10 C + 6 D + 2*9 E


def _block_numel():
  """The same count from per-block formulas, independent of the module."""

  def conv(cin, cout, kh, kw=None):
    return cout * cin * kh * (kh if kw is None else kw) + 4 * cout

  def a(c, p):
    return (
      conv(c, 64, 1)
      + conv(c, 48, 1)
      + conv(48, 64, 5)
      + conv(c, 64, 1)
      + conv(64, 96, 3)
      + conv(96, 96, 3)
      + conv(c, p, 1)
    )

  def b(c):
    return conv(c, 384, 3) + conv(c, 64, 1) + conv(64, 96, 3) + conv(96, 96, 3)

  def c_(c, c7):
    return (
      conv(c, 192, 1)
      + 2 * conv(c, c7, 1)
      + conv(c7, 192, 7, 1)
      + conv(c7, 192, 1, 7)
      + 2 * conv(c7, c7, 1, 7)
      + 2 * conv(c7, c7, 7, 1)
      + conv(c, 192, 1)
    )

  def d(c):
    return (
      2 * conv(c, 192, 1)
      + conv(192, 320, 3)
      + conv(192, 192, 1, 7)
      + conv(192, 192, 7, 1)
      + conv(192, 192, 3)
    )

  def e(c):
    return (
      conv(c, 320, 1)
      + conv(c, 384, 1)
      + 2 * conv(384, 384, 1, 3)
      + 2 * conv(384, 384, 3, 1)
      + conv(c, 448, 1)
      + conv(448, 384, 3)
      + conv(c, 192, 1)
    )

  stem = (
    conv(3, 32, 3)
    + conv(32, 32, 3)
    + conv(32, 64, 3)
    + conv(64, 80, 1)
    + conv(80, 192, 3)
  )
  return (
    stem
    + a(192, 32)
    + a(256, 64)
    + a(288, 64)
    + b(288)
    + c_(768, 128)
    + 2 * c_(768, 160)
    + c_(768, 192)
    + d(768)
    + e(1280)
    + e(2048)
    + 2048 * 1008
    + 1008
  )


def test_expected_table_matches_hand_count():
  table = inc.FID_INCEPTION_SHAPES
  assert _block_numel() == FID_INCEPTION_NUMEL
  assert sum(int(np.prod(s)) for s in table.values()) == FID_INCEPTION_NUMEL
  assert len(table) == 5 * FID_INCEPTION_NUM_CONVS + 2
  spot = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.weight": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
  }
  for key, shape in spot.items():
    assert table[key] == shape, key
  assert not any("AuxLogits" in k or "num_batches" in k for k in table)


def _random_state_dict(seed=0, tmp=None):
  """Random weights that keep activations O(1) through the ReLU stack."""
  import tempfile

  from autoencoder_utils import random_inception_weights
  from safetensors.numpy import load_file

  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "w.safetensors")
    random_inception_weights(path, seed)
    return load_file(path)


@pytest.fixture(scope="module")
def random_sd():
  return _random_state_dict(0)


@pytest.fixture(scope="module")
def model(random_sd):
  # resize_to=None: small inputs go through unresized, which keeps the
  # forward cheap; the resize is tested on its own.
  return inc.InceptionV3.from_state_dict(random_sd, resize_to=None)


@pytest.fixture(scope="module")
def images():
  return (
    np.random.default_rng(1)
    .uniform(-1, 1, (5, inc.MIN_INPUT_SIZE, inc.MIN_INPUT_SIZE, 3))
    .astype(np.float32)
  )


def test_state_dict_round_trip_is_exact(model, random_sd):
  exported = inc.state_dict(model)
  assert list(exported) == list(inc.FID_INCEPTION_SHAPES)
  for key, shape in inc.FID_INCEPTION_SHAPES.items():
    assert exported[key].shape == shape, key
    np.testing.assert_array_equal(exported[key], random_sd[key], err_msg=key)
  # The NHWC side: (kh, kw, I, O) kernels, (in, out) dense weights.
  assert model.Mixed_6b.branch7x7_2.conv.kernel.get_value().shape == (
    1,
    7,
    128,
    128,
  )
  assert model.fc.kernel.get_value().shape == (2048, 1008)


def test_model_from_constructor_has_the_table_layout():
  # The plain constructor (random init) is slow on CPU; its abstract twin
  # has the same variables.
  abstract = nnx.eval_shape(inc.InceptionV3)
  flat = nnx.to_flat_state(
    nnx.state(abstract, nnx.Any(nnx.Param, nnx.BatchStat))
  )
  assert len(list(flat)) == len(inc.FID_INCEPTION_SHAPES)


@pytest.mark.parametrize(
  "edit, match",
  [
    ("missing", "lacks 1 key.*Mixed_6c.branch7x7_3.bn.running_mean"),
    ("extra", "does not: AuxLogits.fc.weight"),
    (
      "shape",
      r"'Mixed_7b.branch3x3_2a.conv.weight': the state dict has "
      r"\(384, 384, 3, 1\), the model expects \(384, 384, 1, 3\)",
    ),
  ],
)
def test_bad_state_dicts_raise_naming_the_key(model, random_sd, edit, match):
  bad = dict(random_sd)
  if edit == "missing":
    del bad["Mixed_6c.branch7x7_3.bn.running_mean"]
  elif edit == "extra":
    bad["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  else:
    key = "Mixed_7b.branch3x3_2a.conv.weight"
    bad[key] = np.zeros((384, 384, 3, 1), np.float32)
  before = np.asarray(model.Conv2d_1a_3x3.conv.kernel.get_value()).copy()
  bad["Conv2d_1a_3x3.conv.weight"] = np.ones((32, 3, 3, 3), np.float32)
  with pytest.raises(ValueError, match=match):
    inc.load_state_dict(model, bad)
  # Nothing is written unless everything checks out.
  np.testing.assert_array_equal(
    model.Conv2d_1a_3x3.conv.kernel.get_value(), before
  )


def test_weight_files_round_trip(tmp_path, random_sd):
  with_counters = dict(random_sd)
  with_counters["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  for name in ("w.safetensors", "w.npz"):
    inc.save_state_dict(with_counters, tmp_path / name)
    back = inc.read_state_dict(tmp_path / name)
    assert sorted(back) == sorted(random_sd)
    for key, value in random_sd.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The converter command, and loading the converted file into a model.
  from tim_jax.commands import cli
  from tim_jax.commands import fid as fid_command

  assert (
    cli.call(
      fid_command,
      [
        "convert",
        f"--inception_weights={tmp_path / 'w.npz'}",
        f"--out={tmp_path / 'c.safetensors'}",
      ],
    )
    == 0
  )
  loaded = inc.load_fid_weights(tmp_path / "c.safetensors", resize_to=None)
  np.testing.assert_array_equal(
    inc.state_dict(loaded)["Mixed_7c.branch_pool.bn.running_var"],
    random_sd["Mixed_7c.branch_pool.bn.running_var"],
  )
  with pytest.raises(ValueError, match="unknown weight file type '.ckpt'"):
    inc.read_state_dict(tmp_path / "w.ckpt")
  with pytest.raises(ValueError, match="use .safetensors or .npz"):
    inc.save_state_dict(random_sd, tmp_path / "w.pth")


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match="needs PyTorch.*convert"):
    inc.read_state_dict(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


# --------------------------------------------------------------------------
# Forward passes.


def test_features_at_299_are_finite_nonnegative_and_deterministic(model):
  x = (
    np.random.default_rng(2)
    .uniform(-1, 1, (2, inc.INPUT_SIZE, inc.INPUT_SIZE, 3))
    .astype(np.float32)
  )
  extract = inc.FeatureExtractor(model, batch_size=2)
  a, b = extract(x), extract(x)
  assert a.shape == (2, inc.FEATURE_DIM) and a.dtype == np.float32
  assert np.all(np.isfinite(a)) and np.all(a >= 0)  # ReLU then mean
  assert a.std() > 0 and not np.allclose(a[0], a[1])
  np.testing.assert_array_equal(a, b)


def test_batching_padding_and_input_forms(model, images):
  extract = inc.FeatureExtractor(model, batch_size=4)
  feats = extract(images)  # one full batch, one padded batch of 1
  assert feats.shape == (5, inc.FEATURE_DIM)
  assert np.all(np.isfinite(feats)) and np.all(feats >= 0)
  # Same images in other groupings: an iterable of uneven chunks, and a
  # shifted window that puts every image in another batch position.
  chunks = extract([images[:2], images[2:3], images[3:]])
  np.testing.assert_allclose(chunks, feats, rtol=1e-5, atol=1e-6)
  shifted = extract(images[1:])
  np.testing.assert_allclose(shifted, feats[1:], rtol=1e-5, atol=1e-6)
  # Streaming statistics equal the statistics of the features.
  stats = extract.statistics(images)
  mu, sigma = fid.statistics(feats)
  np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-7)
  # [0, 255] floats declared as [-1, 1] are caught before any compute.
  with pytest.raises(ValueError, match="outside value_range"):
    extract(images * 127.5 + 127.5)
  with pytest.raises(ValueError, match="3 channels"):
    model(jnp.zeros((1, 75, 75, 1)))
  with pytest.raises(ValueError, match="too small"):
    model(jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="high > low"):
    inc.FeatureExtractor(model, value_range=(1.0, 0.0))


def test_value_ranges_and_uint8_agree(model, images):
  uint8 = np.round((images + 1) * 127.5).astype(np.uint8)[:4]
  as_float = uint8.astype(np.float32) / 127.5 - 1.0
  reference = inc.FeatureExtractor(model, batch_size=4)(as_float)
  from_uint8 = inc.FeatureExtractor(model, batch_size=4)(uint8)
  unit = inc.FeatureExtractor(model, batch_size=4, value_range=(0.0, 1.0))(
    uint8.astype(np.float32) / 255.0
  )
  # Same images up to float rounding of the input scaling, which the random
  # network amplifies a little.
  tol = 1e-5 * np.abs(reference).max()
  np.testing.assert_allclose(from_uint8, reference, rtol=1e-4, atol=tol)
  np.testing.assert_allclose(unit, reference, rtol=1e-4, atol=tol)


def test_one_conv_weight_changes_the_features(model, random_sd, images):
  extract = inc.FeatureExtractor(model, batch_size=4)
  before = extract(images[:4])
  edited = dict(random_sd)
  key = "Mixed_6b.branch7x7_2.conv.weight"
  edited[key] = random_sd[key] * 1.5
  try:
    inc.load_state_dict(model, edited)
    after = extract(images[:4])  # the extractor reads the current weights
  finally:
    inc.load_state_dict(model, random_sd)
  assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()
  np.testing.assert_array_equal(extract(images[:4]), before)


def test_preprocess_resizes_and_scales():
  x = np.full((2, 32, 40, 3), 0.25, np.float32)
  y = inc.preprocess(jnp.asarray(x))
  assert y.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(y, 0.25, atol=1e-6)  # bilinear keeps constants
  u = inc.preprocess(jnp.full((1, 299, 299, 3), 255, jnp.uint8))
  np.testing.assert_array_equal(u, 1.0)
  with pytest.raises(ValueError, match="float .* or uint8"):
    inc.preprocess(jnp.zeros((1, 8, 8, 3), jnp.int32))


# --------------------------------------------------------------------------
# Against PyTorch, where installed.


def test_load_fid_weights_reads_a_torch_pth(tmp_path, random_sd):
  import torch

  sd = {k: torch.from_numpy(v.copy()) for k, v in random_sd.items()}
  # Like a real BatchNorm2d state dict: counters next to the statistics.
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(sd, path)
  loaded = inc.load_fid_weights(path, resize_to=None)
  exported = inc.state_dict(loaded)
  for key, value in random_sd.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def _torch_fid_inception(sd, x):
  """pytorch-fid's FID InceptionV3 forward, functional, NCHW -> (pool3, fc)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  w = {k: torch.from_numpy(v) for k, v in sd.items()}

  def bc(name, x, stride=1, padding=0):
    x = F.conv2d(x, w[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(
      x,
      w[f"{name}.bn.running_mean"],
      w[f"{name}.bn.running_var"],
      w[f"{name}.bn.weight"],
      w[f"{name}.bn.bias"],
      training=False,
      eps=1e-3,
    )
    return F.relu(x)

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  def block_a(p, x):
    return torch.cat(
      [
        bc(f"{p}.branch1x1", x),
        bc(f"{p}.branch5x5_2", bc(f"{p}.branch5x5_1", x), padding=2),
        bc(
          f"{p}.branch3x3dbl_3",
          bc(f"{p}.branch3x3dbl_2", bc(f"{p}.branch3x3dbl_1", x), padding=1),
          padding=1,
        ),
        bc(f"{p}.branch_pool", avg(x)),
      ],
      1,
    )

  def block_b(p, x):
    return torch.cat(
      [
        bc(f"{p}.branch3x3", x, stride=2),
        bc(
          f"{p}.branch3x3dbl_3",
          bc(f"{p}.branch3x3dbl_2", bc(f"{p}.branch3x3dbl_1", x), padding=1),
          stride=2,
        ),
        F.max_pool2d(x, 3, stride=2),
      ],
      1,
    )

  def block_c(p, x):
    b7 = bc(f"{p}.branch7x7_1", x)
    b7 = bc(f"{p}.branch7x7_2", b7, padding=(0, 3))
    b7 = bc(f"{p}.branch7x7_3", b7, padding=(3, 0))
    bd = bc(f"{p}.branch7x7dbl_1", x)
    for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)]):
      bd = bc(f"{p}.branch7x7dbl_{i}", bd, padding=pad)
    return torch.cat(
      [bc(f"{p}.branch1x1", x), b7, bd, bc(f"{p}.branch_pool", avg(x))], 1
    )

  def block_d(p, x):
    b3 = bc(f"{p}.branch3x3_2", bc(f"{p}.branch3x3_1", x), stride=2)
    b7 = bc(f"{p}.branch7x7x3_1", x)
    b7 = bc(f"{p}.branch7x7x3_2", b7, padding=(0, 3))
    b7 = bc(f"{p}.branch7x7x3_3", b7, padding=(3, 0))
    b7 = bc(f"{p}.branch7x7x3_4", b7, stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

  def block_e(p, x, pool):
    b3 = bc(f"{p}.branch3x3_1", x)
    bd = bc(f"{p}.branch3x3dbl_2", bc(f"{p}.branch3x3dbl_1", x), padding=1)
    pooled = pool(x)
    return torch.cat(
      [
        bc(f"{p}.branch1x1", x),
        bc(f"{p}.branch3x3_2a", b3, padding=(0, 1)),
        bc(f"{p}.branch3x3_2b", b3, padding=(1, 0)),
        bc(f"{p}.branch3x3dbl_3a", bd, padding=(0, 1)),
        bc(f"{p}.branch3x3dbl_3b", bd, padding=(1, 0)),
        bc(f"{p}.branch_pool", pooled),
      ],
      1,
    )

  with torch.no_grad():
    x = bc("Conv2d_1a_3x3", x, stride=2)
    x = bc("Conv2d_2a_3x3", x)
    x = bc("Conv2d_2b_3x3", x, padding=1)
    x = F.max_pool2d(x, 3, stride=2)
    x = bc("Conv2d_4a_3x3", bc("Conv2d_3b_1x1", x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
      x = block_a(name, x)
    x = block_b("Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
      x = block_c(name, x)
    x = block_d("Mixed_7a", x)
    x = block_e("Mixed_7b", x, avg)
    x = block_e("Mixed_7c", x, lambda t: F.max_pool2d(t, 3, 1, padding=1))
    pool3 = x.mean(dim=(2, 3))
    logits = F.linear(pool3, w["fc.weight"], w["fc.bias"])
  return pool3.numpy(), logits.numpy()


def test_matches_a_pytorch_forward(model, random_sd):
  import torch  # pylint: disable=g-import-not-at-top

  # 139x139 leaves 3x3 maps in the Mixed_7 blocks, so the padding, the
  # valid-only average and the max pool of Mixed_7c all matter there too.
  x = (
    np.random.default_rng(3).uniform(-1, 1, (2, 139, 139, 3)).astype(np.float32)
  )
  feats, logits = nnx.jit(lambda m, v: m(v, return_logits=True))(
    model, jnp.asarray(x)
  )
  ref_feats, ref_logits = _torch_fid_inception(
    random_sd, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  )
  assert logits.shape == (2, inc.NUM_CLASSES)
  np.testing.assert_allclose(
    feats, ref_feats, rtol=1e-4, atol=1e-4 * np.abs(ref_feats).max()
  )
  np.testing.assert_allclose(
    logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max()
  )


def test_resize_matches_pytorch_bilinear():
  import torch
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(4)
  for h, w in [(64, 48), (256, 256), (512, 400)]:  # up and down
    x = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
    ours = np.asarray(inc.preprocess(jnp.asarray(x)))
    theirs = (
      F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
    )
    # Agreement to float rounding, not bit for bit.
    np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=f"{h}x{w}")


def test_the_score_command_refuses_what_is_not_fid_data(tmp_path, capsys):
  # A 64-feature reference used to give "FID 6081" from a slice of the
  # features. Every case is refused before the network loads (the weights
  # path does not even exist).
  from tim_jax.commands import cli
  from tim_jax.commands import fid as fid_command

  rng = np.random.default_rng(0)
  samples = tmp_path / "samples.npz"
  np.savez(samples, arr_0=rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8))
  small = tmp_path / "ref64.npz"
  np.savez(small, mu=np.zeros(64), sigma=np.eye(64))
  keys = tmp_path / "keys.npz"
  np.savez(keys, means=np.zeros(3))
  empty = tmp_path / "empty.npz"
  np.savez(empty, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
  floats = tmp_path / "floats.npz"
  np.savez(floats, arr_0=np.zeros((4, 8, 8, 3), np.float32))
  text = tmp_path / "notes.npz"
  text.write_text("not a zip")
  cases = [
    (samples, small, "holds statistics of 64 features"),
    (samples, keys, "neither mu/sigma statistics nor arr_0"),
    (empty, small, "0 image(s)"),
    (floats, small, "arr_0 must be uint8"),
    (text, small, "is not an .npz file"),
    (samples, text, "is not an .npz file"),
  ]
  for sample_file, reference, message in cases:
    rc = cli.call(
      fid_command,
      [
        "score",
        f"--samples={sample_file}",
        f"--reference={reference}",
        "--inception_weights=/nowhere/pt_inception.pth",
      ],
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err, (message, err)
    assert len(err.strip().splitlines()) == 1
