"""Encode and decode speed of an autoencoder, beside diffusers' PyTorch.

    python -m tim_jax.autoencoders.bench --config=DIR_OR_CONFIG_JSON \\
        --resolution=256 --batch=8 [--torch] [--out=ae_bench.json]

Random weights of the given ``config.json`` architecture (the real
sd-vae-ft-ema or DC-AE configs need no weight file). With ``--torch`` the
same weights run in diffusers' ``AutoencoderKL``/``AutoencoderDC`` in the
same process, and the outputs are compared. Each row is the median of
``--repeats`` timed calls after a warm-up (compile) call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from tim_jax import timing


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tim_jax.autoencoders.bench")
  p.add_argument("--config", required=True,
                 help="a diffusers config.json, or a directory holding one")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch", action="store_true",
                 help="also time diffusers' PyTorch model (same weights)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from tim_jax import autoencoders  # pylint: disable=g-import-not-at-top
  path, cfg = timing.read_config_json(args.config)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (args.batch, args.resolution, args.resolution,
                               3)).astype(np.float32)
  rows = {}
  with tempfile.TemporaryDirectory() as d:
    if args.torch:
      import diffusers  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
      torch.manual_seed(0)
      model = getattr(diffusers, cfg["_class_name"]).from_config(cfg).eval()
      model.save_pretrained(d, safe_serialization=True)
    else:  # Random weights written by tim_jax itself.
      from flax import nnx  # pylint: disable=g-import-not-at-top
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      from tim_jax import torch_weights  # pylint: disable=g-import-not-at-top
      module = autoencoders.build(cfg, rngs=nnx.Rngs(0))
      save_file(torch_weights.module_state_dict(module),
                os.path.join(d, "diffusion_pytorch_model.safetensors"))
      with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    ae = autoencoders.from_diffusers(d)
  latents = np.asarray(ae.encode(images))
  enc = timing.median_seconds(lambda: jax.block_until_ready(ae.encode(images)),
                        args.repeats)
  dec = timing.median_seconds(lambda: jax.block_until_ready(ae.decode(latents)),
                        args.repeats)
  rows["tim_jax"] = dict(encode_images_per_s=args.batch / enc,
                         decode_images_per_s=args.batch / dec)
  if args.torch:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    z = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) / (
        ae.scaling_factor)
    with torch.inference_mode():
      def t_enc():
        out = model.encode(x)
        return out.latent_dist.mean if hasattr(out, "latent_dist") else (
            out.latent)
      t_dec = lambda: model.decode(z).sample
      enc_t = timing.median_seconds(t_enc, args.repeats)
      dec_t = timing.median_seconds(t_dec, args.repeats)
      ref = t_dec().numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(ae.decode(latents))
    rows["diffusers"] = dict(encode_images_per_s=args.batch / enc_t,
                             decode_images_per_s=args.batch / dec_t,
                             torch_threads=torch.get_num_threads())
    rows["max_rel_diff_decode"] = float(
        np.abs(ours - ref).max() / np.abs(ref).max())
  result = dict(config=cfg["_class_name"], resolution=args.resolution,
                batch=args.batch, device=str(jax.devices()[0].device_kind),
                **rows)
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
