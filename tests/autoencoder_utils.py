"""Small diffusers autoencoders with random weights, written in diffusers'
save_pretrained layout, for the parity and end-to-end tests."""

import os

import numpy as np

# Small configs that cover every block type: KL with and without the mid
# attention; DC-AE with pixel (un)shuffle and with stride-2 convolution /
# interpolation, batch and RMS norms, ReLU and SiLU, a first stage with no
# layers, and maps large (linear attention) and small (quadratic) enough
# for both attention branches at a 32x32 input.
KL_SMALL = dict(
  _class_name="AutoencoderKL",
  block_out_channels=[16, 32],
  down_block_types=["DownEncoderBlock2D"] * 2,
  up_block_types=["UpDecoderBlock2D"] * 2,
  layers_per_block=1,
  norm_num_groups=8,
  latent_channels=4,
  sample_size=32,
)
KL_NO_ATTENTION = dict(
  KL_SMALL,
  mid_block_add_attention=False,
  layers_per_block=2,
  latent_channels=3,
  scaling_factor=0.5,
)
DC_PIXEL = dict(
  _class_name="AutoencoderDC",
  latent_channels=8,
  attention_head_dim=16,
  encoder_block_types=[
    "ResBlock",
    "ResBlock",
    "EfficientViTBlock",
    "EfficientViTBlock",
  ],
  decoder_block_types=[
    "ResBlock",
    "ResBlock",
    "EfficientViTBlock",
    "EfficientViTBlock",
  ],
  encoder_block_out_channels=[16, 32, 32, 32],
  decoder_block_out_channels=[16, 32, 32, 32],
  encoder_layers_per_block=[1, 1, 1, 1],
  decoder_layers_per_block=[1, 1, 2, 1],
  encoder_qkv_multiscales=[[], [], [5], [3, 5]],
  decoder_qkv_multiscales=[[], [], [5], [5]],
  upsample_block_type="pixel_shuffle",
  downsample_block_type="pixel_unshuffle",
  decoder_norm_types=["batch_norm", "rms_norm", "batch_norm", "rms_norm"],
  decoder_act_fns=["relu", "silu", "silu", "silu"],
  scaling_factor=0.7,
)
DC_CONV = dict(
  DC_PIXEL,
  upsample_block_type="interpolate",
  downsample_block_type="Conv",
  encoder_layers_per_block=[0, 1, 1, 2],
  decoder_layers_per_block=[0, 1, 1, 1],
  decoder_norm_types="rms_norm",
  decoder_act_fns="silu",
  scaling_factor=0.41407,
)
CONFIGS = {
  "kl": KL_SMALL,
  "kl_no_attention": KL_NO_ATTENTION,
  "dc_pixel": DC_PIXEL,
  "dc_conv": DC_CONV,
}


def torch_model(config: dict, seed: int = 0):
  """The diffusers model of ``config`` with every weight and statistic
  randomised (so norms' affine terms and BN statistics matter)."""
  import diffusers
  import torch

  cls = getattr(diffusers, config["_class_name"])
  kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
  torch.manual_seed(seed)
  model = cls(**kwargs)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=gen))
      elif (
        name.endswith(
          (
            "norm1.weight",
            "norm2.weight",
            "norm.weight",
            "norm_out.weight",
            "group_norm.weight",
            "conv_norm_out.weight",
          )
        )
        or t.ndim == 1
      ):
        t.add_(0.1 * torch.randn(t.shape, generator=gen))
      else:
        t.mul_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
  return model.eval()


def write(config: dict, directory, seed: int = 0):
  """Writes a random-weight model in diffusers' layout; returns it."""
  model = torch_model(config, seed)
  model.save_pretrained(os.fspath(directory), safe_serialization=True)
  return model


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """NHWC images in [-1, 1] with some structure (smooth plus noise)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  base = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy * 2 - 1], -1)
  return np.clip(
    base[None] + 0.3 * rng.normal(size=(n, size, size, 3)), -1, 1
  ).astype(np.float32)


def write_image_folder(
  root,
  classes=("n01", "n02", "n03"),
  per_class=8,
  min_side=70,
  max_side=120,
  seed=0,
):
  """JPEGs of random sizes in class subfolders (ImageNet's train/ layout)."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for c in classes:
    os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(per_class):
      h, w = rng.integers(min_side, max_side, 2)
      yy, xx = np.mgrid[0:h, 0:w]
      base = np.stack([xx / w, yy / h, np.full((h, w), rng.random())], -1)
      arr = np.clip(
        255 * (0.7 * base + 0.3 * rng.random((h, w, 3))), 0, 255
      ).astype(np.uint8)
      Image.fromarray(arr).save(
        os.path.join(root, c, f"img_{i}.JPEG"), quality=90
      )
  return root


def random_inception_weights(path, seed=0):
  """A random FID InceptionV3 (.safetensors) whose activations stay O(1)."""
  from safetensors.numpy import save_file

  from tim_jax.eval import inception

  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in inception.FID_INCEPTION_SHAPES.items():
    if key.endswith("conv.weight"):
      v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith(("bn.weight", "running_var")):
      v = rng.uniform(0.5, 1.5, shape)
    elif key == "fc.weight":
      v = rng.standard_normal(shape) / np.sqrt(shape[1])
    else:
      v = 0.1 * rng.standard_normal(shape)
    out[key] = v.astype(np.float32)
  save_file(out, os.fspath(path))
  return path
