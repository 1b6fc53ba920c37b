"""Class-conditional TiM.

`--config=configs/c2i.py:VARIANT[,OPTION...]`

Variants (networks from `tim_jax.models.architectures`):

  tiny (default)  a small pixel-space model on the built-in shapes data,
                  one object per image, label = shape x colour:
      python -m tim_jax.main --config=configs/c2i.py --workdir=/tmp/tim_c2i
  b4              TiM-B/4 on ImageNet 256 SD-VAE latents (the official
                  configs/c2i/tim_b_p4.yaml): batch 1024, lr 1e-4 per 256,
                  100k steps
  xl2_256         TiM-XL/2 on ImageNet 256 SD-VAE latents: batch 512,
                  750k steps
  xl1_512         TiM-XL/1 on ImageNet 512 DC-AE latents (32 channels)

Options:

  mg              model guidance (xl2_256, xl1_512): enhanced target with the
                  EMA teacher (w_gt 1, w_cond 0.75, window [0.3, 0.8]); the
                  official *_mg.yaml configs. `xl2_256_mg` and `xl1_512_mg`
                  name the same.
  smoke           any variant shrunk to run a few steps on a CPU in seconds
                  with the same code path (data kind, REPA, guidance, dtype)

The paper variants train on latents of ImageNet written by
`python -m tim_jax.commands.prepare` (docs/paper_c2i.md):
      python -m tim_jax.main --config=configs/c2i.py:xl2_256,mg \
          --workdir=DIR --config.data.data_dir=LATENTS \
          --config.autoencoder.path=sd-vae-ft-ema \
          --config.loss_extras.repa_encoder_path=radio-v2.5-b_half.pth.tar
"""

from tim_jax.config import config_base
from tim_jax.models import architectures

# variant: the architecture, its latents and autoencoder, batch and steps.
PAPER = {
  "b4": dict(
    architecture="B/4",
    latent_size=32,
    autoencoder="sd_vae_ft_ema",
    batch_size=1024,
    num_steps=100_000,
    guidance_high=0.7,
  ),
  "xl2_256": dict(
    architecture="XL/2",
    latent_size=32,
    autoencoder="sd_vae_ft_ema",
    batch_size=512,
    num_steps=750_000,
    guidance_high=0.6,
  ),
  "xl1_512": dict(
    architecture="XL/1",
    latent_size=16,
    autoencoder="dc_ae_f32c32_sana_1.1",
    batch_size=512,
    num_steps=750_000,
    guidance_high=0.7,
  ),
}
VARIANTS = ("tiny",) + tuple(PAPER)
OPTIONS = ("mg", "smoke")


def get_config(arg=None):
  # The older names xl2_256_mg / xl1_512_mg are the mg option.
  arg = (arg or "").replace("_mg", ",mg")
  variant, options = config_base.parse_variant(arg, VARIANTS, OPTIONS)
  c = config_base.base_config()
  c.model.kind = "c2i"
  c.transport.params = dict(P_mean=-0.4, P_std=1.0)
  if variant == "tiny":
    c.model.network = architectures.network("tiny-c2i")
    config_base.tiny_training(c)
    c.sample.cols = 9
    c.sample.num = 18
  else:
    paper = PAPER[variant]
    latent = paper["latent_size"]
    c.model.network = architectures.network(paper["architecture"])
    c.model.dtype = "bfloat16"
    c.model.remat = "full" if variant.startswith("xl") else "none"
    c.data.name = "latents"
    c.data.image_size = latent
    c.autoencoder.name = paper["autoencoder"]
    c.batch_size = paper["batch_size"]
    c.num_steps = paper["num_steps"]
    c.optimizer.base_lr = 1e-4
    c.optimizer.base_batch = 256
    c.ema_decay = 0.9999
    # REPA with the official teacher (RADIO v2.5-B) run inside the step:
    # --config.loss_extras.repa_encoder_path=radio-v2.5-b_half.pth.tar.
    c.loss_extras.repa_encoder = "radio_v2_5_b"
    c.checkpoint_every = 5000
    # Decoded with --config.autoencoder.path=DIR (sd-vae-ft-ema or DC-AE).
    c.sample.every = 10_000
    c.sample.image_size = latent
    c.sample.cfg_scale = 2.5
    c.sample.guidance_interval = (0.0, paper["guidance_high"])
  if "mg" in options:
    if variant not in ("xl2_256", "xl1_512"):
      raise ValueError(f"option mg is for xl2_256 and xl1_512, not {variant!r}")
    c.loss.enhance_target = True
    c.loss.w_gt = 1.0
    c.loss.w_cond = 0.75
    c.loss.w_start = 0.3
    c.loss.w_end = 0.8
  if "smoke" in options:
    config_base.smoke(c)
  return config_base.lock(c)
