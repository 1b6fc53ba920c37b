"""Small configs for trainer tests."""

from tim_jax.config import config_base


def tiny_c2i(num_steps=4, batch=8, every=2):
  from tim_jax.shapes import world

  c = config_base.base_config()
  c.model.kind = "c2i"
  c.model.network = dict(
    patch_size=4,
    in_channels=3,
    depth=2,
    hidden_size=32,
    num_heads=2,
    encoder_depth=1,
    z_dim=16,
    projector_dim=32,
    lora_hidden_size=8,
    num_classes=world.num_classes(),
  )
  c.model.use_projector = False
  c.data.image_size = 16
  c.batch_size = batch
  c.num_steps = num_steps
  c.optimizer.base_lr = 1e-3
  c.optimizer.base_batch = batch
  c.ema_decay = 0.9
  c.log_every = 1
  c.checkpoint_every = every
  c.sample.every = 0
  c.sample.image_size = 16
  return c


def tiny_t2i(num_steps=2, batch=4, image_size=32):
  """A t2i model of a few thousand parameters on the shapes captions."""
  c = config_base.base_config()
  c.model.kind = "t2i"
  c.model.network = dict(
    input_size=image_size,
    patch_size=8,
    in_channels=3,
    depth=1,
    hidden_size=32,
    cap_feat_dim=16,
    num_heads=2,
    encoder_depth=1,
    qk_norm=True,
    z_dim=16,
    projector_dim=32,
    new_condition="t-r",
    use_new_embed=True,
    distance_aware=True,
    lora_hidden_size=8,
  )
  c.model.use_projector = False
  c.model.rope_positions = "xy"
  c.data.image_size = image_size
  c.data.caption_context = 0.7  # As configs/t2i.py's tiny model.
  c.batch_size = batch
  c.num_steps = num_steps
  c.optimizer.base_batch = batch
  c.log_every = 1
  c.checkpoint_every = num_steps
  c.sample.every = 0
  c.sample.image_size = image_size
  c.sample.cfg_scale = 2.0
  c.sample.prompts = (
    "a red circle at the top left",
    "a blue square in the center",
  )
  return c
