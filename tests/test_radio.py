"""RADIO against the official vendored code (tests/make_radio_golden.py):
the REPA targets of small random-weight checkpoints, float32 within 1e-4
relative; a bfloat16 args.dtype with timm's qk_norm; which checkpoint keys
may be left out; PyTorch's resizes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tim_jax.core.errors import UserError
from tim_jax.encoders import radio, resize

pytestmark = [pytest.mark.parity]

DATA = os.path.join(os.path.dirname(__file__), "data", "radio")


@pytest.mark.parametrize("case", ["radio_plain", "radio_ls_ema"])
def test_features_match_the_official_encoder(case):
  enc = radio.load(os.path.join(DATA, f"{case}.pth"))
  with np.load(os.path.join(DATA, f"{case}.npz")) as z:
    n = len([k for k in z.files if k.startswith("grid_")])
    for i in range(n):
      grid = tuple(int(g) for g in z[f"grid_{i}"])
      got = np.asarray(enc(z[f"images_{i}"], grid=grid))
      want = z[f"features_{i}"]
      assert got.shape == want.shape == (2, grid[0] * grid[1], enc.dim)
      rel = np.abs(got - want).max() / np.abs(want).max()
      assert rel < 1e-4, (case, grid, rel)


def test_the_ema_weights_are_the_ones_used():
  enc = radio.load(os.path.join(DATA, "radio_ls_ema.pth"))
  chk = torch.load(os.path.join(DATA, "radio_ls_ema.pth"), weights_only=False)
  ema = chk["state_dict_ema"]["base_model.blocks.0.ls1.gamma"].numpy()
  got = np.asarray(enc.state["params"]["blocks"][0]["ls1"]["gamma"][...])
  np.testing.assert_array_equal(got, ema)
  assert enc.config.layer_scale and enc.config.final_norm
  assert enc.config.cpe_mode and enc.config.num_skip == 8


def _max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() / np.abs(want).max()


def test_bfloat16_args_dtype_and_qk_norm_follow_the_official_loader():
  """The official loader casts the ViT (and the feature normalizer) to
  args.dtype and rounds the conditioned input to it. In float32 compute the
  same rounding matches the official model at float32 precision (without
  the input's rounding: 1.8e-3, ignoring args.dtype: 4.2e-3, dropping the
  qk_norm weights: 8.7e-2); in bfloat16, the official bfloat16 run to
  bfloat16 precision."""
  path = os.path.join(DATA, "radio_qknorm_bf16.pth")
  enc32 = radio.load(path, dtype=jnp.float32)
  enc16 = radio.load(path)
  assert enc16.config.qk_norm and enc16.config.patch_norm
  q_norm = enc16.state["params"]["blocks"][0]["attn"]["q_norm"]["scale"]
  assert q_norm[...].dtype == jnp.bfloat16
  w = enc32.state["params"]["blocks"][0]["attn"]["qkv"]["kernel"][...]
  assert w.dtype == jnp.bfloat16
  with np.load(os.path.join(DATA, "radio_qknorm_bf16.npz")) as z:
    for i in range(2):
      grid = tuple(int(g) for g in z[f"grid_{i}"])
      got32 = enc32(z[f"images_{i}"], grid=grid)
      assert got32.dtype == jnp.float32
      assert _max_rel(got32, z[f"features_f32_{i}"]) < 5e-4, i
      got16 = enc16(z[f"images_{i}"], grid=grid)
      assert got16.dtype == jnp.bfloat16
      assert _max_rel(got16, z[f"features_{i}"]) < 2e-2, i


def _resaved(tmp_path, case, edit):
  chk = torch.load(os.path.join(DATA, f"{case}.pth"), weights_only=False)
  edit(chk)
  path = tmp_path / f"{case}_edited.pth"
  torch.save(chk, path)
  return str(path)


def test_keys_the_official_model_never_uses_are_left_out():
  # The golden checkpoint carries a head, the final norm without
  # args.model_norm and timm's patch-embedding norm: the official run
  # ignored them, and so does ours (test above).
  chk = torch.load(
    os.path.join(DATA, "radio_qknorm_bf16.pth"), weights_only=False
  )
  base = {
    k[len("base_model.") :]: v
    for k, v in chk["state_dict"].items()
    if k.startswith("base_model.")
  }
  assert radio.ignored_keys(base, chk["args"]) == [
    "head.bias",
    "head.weight",
    "norm.bias",
    "norm.weight",
    "patch_embed.norm.weight",
  ]
  chk["args"].model_norm = True
  assert "norm.weight" not in radio.ignored_keys(base, chk["args"])


@pytest.mark.parametrize(
  "key",
  [
    "blocks.0.attn.norm.weight",  # timm's scale_attn_norm
    "blocks.1.mlp.norm.weight",  # timm's scale_mlp_norm
    "some_new_module.weight",
  ],
)
def test_unknown_keys_are_refused_by_name(tmp_path, key):
  def add(chk):
    chk["state_dict"][f"base_model.{key}"] = torch.ones(64)

  with pytest.raises(UserError, match=key.replace(".", r"\.")):
    radio.load(_resaved(tmp_path, "radio_plain", add))


def test_the_final_norm_is_used_when_args_say_so(tmp_path):
  # With args.model_norm the final norm is part of the model: its keys are
  # required, not ignorable.
  def norm_on(chk):
    chk["args"].model_norm = True

  with pytest.raises(UserError, match="norm.bias"):
    radio.load(_resaved(tmp_path, "radio_plain", norm_on))


def test_an_unknown_args_dtype_is_refused(tmp_path):
  def int8(chk):
    chk["args"].dtype = torch.int8

  with pytest.raises(UserError, match="args.dtype torch.int8"):
    radio.load(_resaved(tmp_path, "radio_plain", int8))


@pytest.mark.parametrize("n_in,n_out", [(13, 32), (37, 16), (16, 16), (5, 7)])
def test_bicubic_is_pytorchs(n_in, n_out):
  x = (
    np.random.default_rng(0)
    .normal(size=(2, n_in, n_in + 3, 3))
    .astype(np.float32)
  )
  want = (
    torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      (n_out, n_out + 1),
      mode="bicubic",
    )
    .numpy()
    .transpose(0, 2, 3, 1)
  )
  got = np.asarray(resize.bicubic(x, (n_out, n_out + 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resizing_to_the_same_size_is_no_work():
  # The trainers resize 256 px images to RADIO's 16 x 16 grid of 16 px:
  # the same size, which must cost no matmul in the step.
  x = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  for fn in (resize.bicubic, resize.bilinear_align_corners):
    np.testing.assert_array_equal(np.asarray(fn(x, (16, 16))), x)
    same = jax.make_jaxpr(lambda a, f=fn: f(a, (16, 16)))(x)
    assert "dot_general" not in str(same)
    other = jax.make_jaxpr(lambda a, f=fn: f(a, (16, 17)))(x)
    assert "dot_general" in str(other)


@pytest.mark.parametrize("n_in,n_out", [(32, 16), (8, 21), (4, 4)])
def test_align_corners_bilinear_is_pytorchs(n_in, n_out):
  x = np.random.default_rng(1).normal(size=(n_in, n_in, 5)).astype(np.float32)
  want = (
    torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(2, 0, 1)[None].copy()),
      (n_out, 3),
      mode="bilinear",
      align_corners=True,
    )[0]
    .numpy()
    .transpose(1, 2, 0)
  )
  got = np.asarray(resize.bilinear_align_corners(x, (n_out, 3)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_named(tmp_path):
  path = tmp_path / "not_radio.pth"
  torch.save({"weights": torch.zeros(3)}, path)
  with pytest.raises(ValueError, match="not a RADIO checkpoint"):
    radio.load(path)
  chk = torch.load(os.path.join(DATA, "radio_plain.pth"), weights_only=False)
  del chk["state_dict"]["base_model.blocks.1.mlp.fc2.bias"]
  torch.save(chk, tmp_path / "broken.pth")
  with pytest.raises(ValueError, match="blocks.1.mlp.fc2.bias"):
    radio.load(tmp_path / "broken.pth")


def test_scanned_blocks_equal_the_loop():
  import dataclasses

  from flax import nnx
  import jax
  import jax.numpy as jnp

  c = dataclasses.replace(
    radio.V2_5_B,
    embed_dim=32,
    depth=3,
    num_heads=2,
    mlp_hidden=64,
    table=(8, 8),
    num_skip=2,
    layer_scale=True,
  )
  model = radio.VisionTransformer(c, rngs=nnx.Rngs(3))
  # Distinct blocks (random LayerScale), so a scan reusing one block's
  # weights would differ.
  for i, block in enumerate(model.blocks):
    block.ls1.gamma[...] = jnp.full_like(block.ls1.gamma[...], 0.5 + i)
  x = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
  looped = np.asarray(model(x, scan=False))
  scanned = np.asarray(model(x, scan=True))
  # Float32 rounding of differently fused ops only.
  np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)
  single = np.asarray(
    radio.VisionTransformer(dataclasses.replace(c, depth=1), rngs=nnx.Rngs(3))(
      x
    )
  )
  assert not np.allclose(single, looped, atol=1e-3)


class _Payload:
  """A pickled object whose loading runs a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
  chk = torch.load(os.path.join(DATA, "radio_plain.pth"), weights_only=False)
  marker = tmp_path / "code_ran"
  chk["note"] = _Payload(marker)
  path = tmp_path / "radio-v2.5-b_half.pth.tar"
  torch.save(chk, path)
  # A plain unpickler runs it: the file really carries code.
  torch.load(path, weights_only=False)
  assert marker.exists()
  marker.unlink()
  with pytest.raises(
    ValueError,
    match="refused to unpickle.*posix.system|refused to unpickle.*system",
  ):
    radio.load(str(path))
  assert not marker.exists()
