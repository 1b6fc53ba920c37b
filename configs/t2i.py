r"""Text-to-image TiM: ``--config=configs/t2i.py:VARIANT[,OPTION...]``.

Variants (networks from ``tim_jax.models.architectures``; measured scores
and minutes: docs/results/quality_frontier.md, docs/results/nfe_study.md):

  tiny (default)  a small pixel-space model on the built-in captioned-shapes
                  data (32x32 RGB, nothing downloaded).
      python -m tim_jax.main --config=configs/t2i.py --workdir=workdir/t2i_tiny
      Runtime: 7-13 minutes on a 2-core CPU (quiet to busy host).
      Expected at step 4000 (4 steps, 500 held-out captions): shape right
      on about 96 % of the one-object captions, all correct on about 54 %
      of the two-object ones.
  tiny_fm         its flow-matching baseline: the same network, data and
                  budget, every row a diffusion row, sampled with Euler
                  steps.
      python -m tim_jax.main --config=configs/t2i.py:tiny_fm \
          --workdir=workdir/t2i_tiny_fm
  tiny_b48        the earlier recipe of the tiny model (frontier rows
                  "context 0.7"): batch 48, 1500 steps, training times
                  logit-normal std 1.6, lr 1e-3, EMA 0.998.
      python -m tim_jax.main --config=configs/t2i.py:tiny_b48 --workdir=W
      Runtime: about 10 minutes. Expected at step 1500: shape about 72 %,
      two-object all-correct about 27 %.
  tiny_b48_words  tiny_b48 with captions of word + position features only
                  (no context): the NFE study's TiM model and the frontier
                  rows "word + position".
      python -m tim_jax.main --config=configs/t2i.py:tiny_b48_words \
          --workdir=W
      Runtime: about 10 minutes. Expected at step 1500: shape about 58 %,
      two-object all-correct about 3 %; NFE study rows in
      docs/results/nfe_study.md.
  tiny_b48_words_fm  its flow-matching twin: the NFE study's FM model.
  tiny_b24        the default's batch and schedule at lr 1e-3, EMA 0.998
                  (frontier rows "batch 24, std 1.0", the EMA study).
      python -m tim_jax.main --config=configs/t2i.py:tiny_b24 --workdir=W
      Runtime: about 13 minutes. Expected at step 4000: shape about 89 %,
      two-object all-correct about 74 %.
  xl              the paper's 865M model (the official
                  configs/t2i/tim_xl_p1_t2i.yaml): DC-AE f32c32 latents of
                  captioned images in aspect buckets (nominal 1024^2), patch
                  1, D 1152, depth 28, batch 2048 for the 32x32 bucket, lr
                  1e-4 per 512, 500k steps, bf16; captions encoded in the
                  step by Gemma-3 1B, REPA with RADIO v2.5-B. Needs a
                  captioned dataset (python -m tim_jax.commands.prepare
                  --captioned=DIR) and the encoders' files:
      python -m tim_jax.main --config=configs/t2i.py:xl --workdir=DIR \
          --config.data.data_dir=LATENTS \
          --config.text_encoder.path=gemma-3-1b-it \
          --config.autoencoder.path=dc-ae-f32c32-sana-1.1-diffusers \
          --config.loss_extras.repa_encoder_path=radio-v2.5-b_half.pth.tar

Options:

  smoke           any variant shrunk to run a few steps on a CPU in seconds
                  with the same code path (data kind, REPA, guidance, dtype)

Any field can be overridden on the command line, e.g.
``--config.batch_size=32 --config.mesh.fsdp=4 --config.model.dtype=bfloat16``.
"""

from tim_jax.config import config_base
from tim_jax.models import architectures

TINY_PROMPTS = (
  "a red circle at the top left",
  "a blue square in the center",
  "a green triangle at the bottom right",
  "a yellow circle at the top right",
  "a large purple square at the bottom left",
  "a small cyan triangle at the top",
  "a red square at the left and a blue circle at the right",
  "a green circle at the top and a yellow triangle at the bottom",
)
TINY = (
  "tiny",
  "tiny_fm",
  "tiny_b48",
  "tiny_b48_words",
  "tiny_b48_words_fm",
  "tiny_b24",
)
VARIANTS = TINY + ("xl",)
OPTIONS = ("smoke",)


def tiny(c, variant: str) -> None:
  """The small pixel-space models on the built-in shapes world."""
  c.model.network = architectures.network("tiny-t2i")
  config_base.tiny_training(c)
  # Training times concentrated on the middle of the path (logit-normal std
  # 1.0 rather than the T2I-XL recipe's 1.6), batches of 24 for 4000 steps
  # (what the default run's 15 minutes allow), an EMA over ~100 steps (the
  # weights still improve fast at the end) and lr 2e-3 (chosen over three
  # seeds): docs/results/quality_frontier.md.
  c.transport.params.P_std = 1.0
  c.batch_size = 24
  c.optimizer.base_batch = 24
  c.num_steps = 4000
  c.optimizer.warmup_steps = 200
  c.ema_decay = 0.99
  c.optimizer.base_lr = 2e-3
  c.checkpoint_every = 1000
  c.sample.every = 1000
  c.evals.holdout_loss.every = 1000
  c.evals.shapes_oracle.every = 1000
  c.data.max_caption_len = 20
  # Each word's features carry the words before it, as a real text
  # encoder's do (binds attributes to their objects).
  c.data.caption_context = 0.7
  c.sample.prompts = TINY_PROMPTS
  c.sample.cols = 8
  if variant.startswith("tiny_b48"):
    # The earlier recipe: larger batches, fewer steps, the T2I-XL time
    # distribution, a slower EMA and learning rate.
    c.transport.params.P_std = 1.6
    c.batch_size = 48
    c.optimizer.base_batch = 48
    c.num_steps = 1500
    c.optimizer.warmup_steps = 100
    c.ema_decay = 0.998
    c.optimizer.base_lr = 1e-3
    if variant.startswith("tiny_b48_words"):
      c.data.caption_context = 0.0  # Word + position features only.
  if variant == "tiny_b24":
    c.ema_decay = 0.998
    c.optimizer.base_lr = 1e-3
  if variant.endswith("_fm"):
    # Flow matching: every row a diffusion row (r = t), Euler sampling.
    c.loss.diffusion_ratio = 1.0
    c.loss.consistency_ratio = 0.0
    c.sample.mode = "diffusion"


def xl(c) -> None:
  """The paper's T2I-XL."""
  c.model.network = architectures.network("T2I-XL")
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.name = "captions"
  c.data.image_size = 32  # Latent grid of a 1024px image (f32).
  c.text_encoder.name = "gemma3"
  c.autoencoder.name = "dc_ae_f32c32_sana_1.1"
  c.batch_size = 2048
  c.num_steps = 500_000
  c.optimizer.base_lr = 1e-4
  c.optimizer.base_batch = 512
  c.ema_decay = 0.9999
  # REPA with the official teacher (RADIO v2.5-B) run inside the step:
  # --config.loss_extras.repa_encoder_path=radio-v2.5-b_half.pth.tar.
  c.loss_extras.repa_encoder = "radio_v2_5_b"
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  # Decoded with --config.autoencoder.path=DIR (the DC-AE directory).
  c.sample.every = 5_000
  c.sample.image_size = 32
  c.sample.cfg_scale = 2.5


def get_config(arg=None):
  variant, options = config_base.parse_variant(arg, VARIANTS, OPTIONS)
  c = config_base.base_config()
  c.model.kind = "t2i"
  c.transport.params = dict(P_mean=0.0, P_std=1.6)
  if variant in TINY:
    tiny(c, variant)
  else:
    xl(c)
  if "smoke" in options:
    config_base.smoke(c)
  return config_base.lock(c)
