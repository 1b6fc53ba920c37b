"""Class-conditional TiM.

Variants (`--config=configs/c2i.py:VARIANT`):

  tiny (default)  a small pixel-space model on the built-in shapes data,
                  one object per image, label = shape x colour:
      python -m tim_jax.main --config=configs/c2i.py --workdir=/tmp/tim_c2i
  b4              TiM-B/4 on ImageNet 256 SD-VAE latents (spec §6):
                  batch 1024, lr 1e-4 per 256, 100k steps
  xl2_256         TiM-XL/2 on ImageNet 256 SD-VAE latents: batch 512,
                  750k steps
  xl1_512         TiM-XL/1 on ImageNet 512 DC-AE latents (32 channels)
  xl2_256_mg, xl1_512_mg
                  the model-guidance variants: enhanced target with the EMA
                  teacher (w_gt 1, w_cond 0.75, window [0.3, 0.8])

The paper variants train on latents written with `python -m
tim_jax.data.latents`:
      python -m tim_jax.main --config=configs/c2i.py:xl2_256 --workdir=DIR \
          --config.data.data_dir=LATENTS
"""

from tim_jax import config_base

XL = dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8,
          lora_hidden_size=384)
B = dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4,
         lora_hidden_size=256)
COMMON = dict(class_dropout_prob=0.1, num_classes=1000, qk_norm=True,
              z_dim=768, projector_dim=2048, new_condition="t-r",
              use_new_embed=True, distance_aware=True)
PAPER = {
    # variant: (network, batch, steps, latent size, autoencoder)
    "b4": (dict(COMMON, **B, input_size=32, patch_size=4, in_channels=4),
           1024, 100_000, 32, "sd_vae_ft_ema"),
    "xl2_256": (dict(COMMON, **XL, input_size=32, patch_size=2,
                     in_channels=4), 512, 750_000, 32, "sd_vae_ft_ema"),
    "xl1_512": (dict(COMMON, **XL, input_size=16, patch_size=1,
                     in_channels=32), 512, 750_000, 16,
                "dc_ae_f32c32_sana_1.1"),
}


def get_config(arg=None):
  variant = arg or "tiny"
  c = config_base.base_config()
  c.model.kind = "c2i"
  c.transport.params = dict(P_mean=-0.4, P_std=1.0)
  base = variant[:-3] if variant.endswith("_mg") else variant
  if variant == "tiny":
    from tim_jax.data import shapes
    c.model.network = dict(
        input_size=32, patch_size=4, in_channels=3, depth=4, hidden_size=128,
        num_heads=4, encoder_depth=2, qk_norm=True, z_dim=32,
        projector_dim=128, new_condition="t-r", use_new_embed=True,
        distance_aware=True, lora_hidden_size=32, class_dropout_prob=0.1,
        num_classes=shapes.num_classes())
    config_base.tiny_training(c)
    c.sample.cols = 9
    c.sample.num = 18
  elif base in PAPER and (variant == base or base.startswith("xl")):
    network, batch, steps, latent, ae = PAPER[base]
    c.model.network = network
    c.model.dtype = "bfloat16"
    c.model.remat = base.startswith("xl")
    c.data.name = "latents"
    c.data.image_size = latent
    c.autoencoder.name = ae
    c.batch_size = batch
    c.num_steps = steps
    c.optimizer.base_lr = 1e-4
    c.optimizer.base_batch = 256
    c.ema_decay = 0.9999
    c.loss_extras.repa_feature_key = "repa_features"
    c.checkpoint_every = 5000
    c.sample.every = 0  # Needs the autoencoder's decoder.
    c.sample.image_size = latent
    c.sample.cfg_scale = 2.5
    c.sample.guidance_interval = (0.0, 0.6 if base == "xl2_256" else 0.7)
    if variant.endswith("_mg"):
      c.loss.enhance_target = True
      c.loss.w_gt = 1.0
      c.loss.w_cond = 0.75
      c.loss.w_start = 0.3
      c.loss.w_end = 0.8
  else:
    raise ValueError(f"unknown c2i variant {variant!r}; use tiny, b4, "
                     "xl2_256, xl1_512, xl2_256_mg or xl1_512_mg")
  return config_base.lock(c)
