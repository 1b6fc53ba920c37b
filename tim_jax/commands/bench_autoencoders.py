"""Encode and decode speed of an autoencoder, beside diffusers' PyTorch.

    python -m tim_jax.commands.bench_autoencoders --config_json=DIR_OR_CONFIG_JSON \\
        --resolution=256 --batch_size=8 [--torch] [--out=ae_bench.json]

Random weights of the given ``config.json`` architecture (the real
sd-vae-ft-ema or DC-AE configs need no weight file). With ``--torch`` the
same weights run in diffusers' ``AutoencoderKL``/``AutoencoderDC`` in the
same process, and the outputs are compared. Each row is the median of
``--repeats`` timed calls after a warm-up (compile) call.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import flags
import numpy as np

from tim_jax.commands import cli
from tim_jax.core import timing
from tim_jax.core.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "config_json",
    None,
    "A diffusers config.json, or a directory holding one.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "resolution", 256, "Image side in pixels.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "batch_size", 8, "Images per call.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "repeats",
    3,
    "Timed calls (median reported).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "torch",
    False,
    "Also time diffusers' PyTorch model "
    "(same weights) and compare the outputs.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out", "", "Also write the results as JSON.", flag_values=fv
  )
  flags.mark_flag_as_required("config_json", flag_values=fv)


def main(fv: flags.FlagValues, args) -> None:
  if args:
    raise UserError(f"unexpected arguments: {args}")
  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top

  path, cfg = timing.read_config_json(fv.config_json)
  rng = np.random.default_rng(0)
  images = rng.uniform(
    -1, 1, (fv.batch_size, fv.resolution, fv.resolution, 3)
  ).astype(np.float32)
  rows = {}
  with tempfile.TemporaryDirectory() as d:
    if fv.torch:
      import diffusers  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top

      torch.manual_seed(0)
      model = getattr(diffusers, cfg["_class_name"]).from_config(cfg).eval()
      model.save_pretrained(d, safe_serialization=True)
    else:  # Random weights written by tim_jax itself.
      from flax import nnx  # pylint: disable=g-import-not-at-top
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

      from tim_jax.weights import torch_weights  # pylint: disable=g-import-not-at-top

      module = autoencoders.build(cfg, rngs=nnx.Rngs(0))
      save_file(
        torch_weights.module_state_dict(module),
        os.path.join(d, "diffusion_pytorch_model.safetensors"),
      )
      with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    ae = autoencoders.from_diffusers(d)
  latents = np.asarray(ae.encode(images))
  enc = timing.median_seconds(
    lambda: jax.block_until_ready(ae.encode(images)), fv.repeats
  )
  dec = timing.median_seconds(
    lambda: jax.block_until_ready(ae.decode(latents)), fv.repeats
  )
  rows["tim_jax"] = dict(
    encode_images_per_s=fv.batch_size / enc,
    decode_images_per_s=fv.batch_size / dec,
  )
  if fv.torch:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    z = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) / (
      ae.scaling_factor
    )
    with torch.inference_mode():

      def t_enc():
        out = model.encode(x)
        return (
          out.latent_dist.mean if hasattr(out, "latent_dist") else (out.latent)
        )

      t_dec = lambda: model.decode(z).sample
      enc_t = timing.median_seconds(t_enc, fv.repeats)
      dec_t = timing.median_seconds(t_dec, fv.repeats)
      ref = t_dec().numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(ae.decode(latents))
    rows["diffusers"] = dict(
      encode_images_per_s=fv.batch_size / enc_t,
      decode_images_per_s=fv.batch_size / dec_t,
      torch_threads=torch.get_num_threads(),
    )
    rows["max_rel_diff_decode"] = float(
      np.abs(ours - ref).max() / np.abs(ref).max()
    )
  result = dict(
    config=cfg["_class_name"],
    resolution=fv.resolution,
    batch=fv.batch_size,
    device=str(jax.devices()[0].device_kind),
    **rows,
  )
  print(json.dumps(result, indent=1))
  if fv.out:
    with open(fv.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


def entry() -> None:
  """The console script ``tim-bench-autoencoders``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
