"""Every knob of a run, with defaults; ``configs/*.py`` start from this.

The returned ConfigDict is locked: an override of a key that does not exist
(``--config.modle.depth=2``) stops with an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from tim_jax.core import sharding
from tim_jax.core.errors import UserError

if TYPE_CHECKING:
  from absl import flags


def base_config() -> ml_collections.ConfigDict:
  """Every knob of a run with its default, each commented; unlocked."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # Global batch, over all processes.
  # Gradient accumulation: each data shard's rows run as this many
  # microbatches (one lax.scan) before one optimizer update.
  c.microbatches = 1
  c.num_steps = 1000

  # The backbone; `network` holds the official YAML network.params names.
  c.model = ml_collections.ConfigDict(
    dict(
      kind="t2i",
      network=ml_collections.ConfigDict(),
      dtype="float32",  # Compute dtype: float32 | bfloat16 | float16.
      rope_positions="official",  # "official" index rule or "xy".
      attention_impl="",  # jax.nn.dot_product_attention: "", xla, cudnn.
      # Rematerialisation per block: "none", "full" (keep only the block's
      # inputs) or "dots_saveable" (keep matmul outputs).
      remat="none",
      # The depth as one nnx.scan over stacked blocks (checkpoints record
      # the layout; official files convert to either).
      scan_blocks=False,
      use_projector=True,
    )
  )
  c.transport = ml_collections.ConfigDict(
    dict(
      name="ot_fm",
      params=ml_collections.ConfigDict(dict(P_mean=0.0, P_std=1.6)),
    )
  )
  # transition.LossConfig; groups 0 = one per data shard.
  c.loss = ml_collections.ConfigDict(
    dict(
      diffusion_ratio=0.5,
      consistency_ratio=0.1,
      derivative="dde",
      epsilon=0.005,
      weight_time_type="sqrt",
      weight_time_tangent=True,
      weight_time_sigmoid=False,
      weight_t_and_r=True,
      adaptive_eps=1e-5,
      directional_loss=True,
      proj_coeff=1.0,
      enhance_target=False,
      w_gt=1.0,
      w_cond=0.0,
      w_start=0.0,
      w_end=1.0,
      groups=0,
    )
  )
  c.loss_extras = ml_collections.ConfigDict(
    dict(
      # REPA from precomputed features: the batch key holding a frozen
      # encoder's token features (B, N, z_dim); "" = none.
      repa_feature_key="",
      # REPA with the teacher inside the train step: "none" or
      # "radio_v2_5_b" (the official teacher), read from repa_encoder_path
      # (RADIO's checkpoint, a path or a hub id such as
      # hf://nvidia/RADIO/radio-v2.5-b_half.pth.tar).
      repa_encoder="none",
      repa_encoder_path="",
    )
  )
  # Initialise the network from a checkpoint before training (the official
  # configs' `ckpt` + init_from_ckpt): an official .safetensors/.pt/.bin or
  # a tim_jax run, a path or a hub id (hf://owner/repo/file); parameters whose official name contains any of
  # `init_ignore_keys` (e.g. "delta_embedder") keep their initialisation.
  c.init_from = ""
  c.init_ignore_keys = ()
  c.conditioning = ml_collections.ConfigDict(dict(drop_prob=0.1))

  c.data = ml_collections.ConfigDict(
    dict(
      # "shapes" (built in), "latents" (array_record latents with labels or
      # stored caption features) or "captions" (latents in aspect buckets
      # with caption text, from `python -m tim_jax.commands.prepare
      # --captioned/--manifest`; encoded by `text_encoder` in the step).
      name="shapes",
      # Side of the (latent) images; for "captions", the nominal square
      # bucket whose batch is `batch_size` (see bucket_batch).
      image_size=32,
      max_caption_len=20,
      caption_seed=0,
      # The shapes captions' frozen encoder: > 0 adds each word's causal,
      # decaying context (tim_jax.shapes.text.CaptionEncoder); 0 = word +
      # position only.
      caption_context=0.0,
      seed=0,
      data_dir="",
      null_caption_features="",  # .npy of the empty caption, latent t2i.
      worker_count=0,
      # "captions": each bucket's batch is batch_size x image_size^2 / its
      # area (the tokens per step stay about the same), rounded down to a
      # multiple of the data shards ("area"), or batch_size ("fixed").
      bucket_batch="area",
      # "captions": captions pass through encode('unicode-escape') as the
      # official T2I loader does.
      escape_unicode=True,
    )
  )
  # The frozen caption encoder of data.name="captions" (run inside the train
  # step, never stored): "none" or "gemma3" (the official
  # google/gemma-3-1b-it: a Hugging Face directory at `path`).
  c.text_encoder = ml_collections.ConfigDict(
    dict(
      name="none",
      path="",
      dtype="bfloat16",  # Weights and compute (the official: bfloat16).
      max_length=256,  # Tokens, BOS included (the official max_seq_length).
      # Caption batches are cut to the smallest of these that holds their
      # longest caption (few compiled shapes; see TextConditioner).
      length_buckets=(32, 64, 128, 256),
    )
  )
  c.autoencoder = ml_collections.ConfigDict(
    dict(
      # "identity" (pixel space), "sd_vae_ft_ema" or "dc_ae_f32c32_sana_1.1".
      name="identity",
      # A diffusers save_pretrained directory of that autoencoder (config.json
      # + diffusion_pytorch_model.safetensors); needed to decode samples.
      path="",
      # Compute dtype of encoding and decoding (the official code: float32).
      dtype="float32",
      # Images per decoder call (fixed, so the decoder compiles once).
      batch_size=16,
    )
  )

  # AdamW (the official optimizer); lr = base_lr * batch_size / base_batch
  # when scale_lr.
  c.optimizer = ml_collections.ConfigDict(
    dict(
      base_lr=1e-4,
      base_batch=256,
      scale_lr=True,
      schedule="constant",
      warmup_steps=0,
      b1=0.9,
      b2=0.95,
      eps=1e-6,
      weight_decay=0.01,
      grad_clip=1.0,
    )
  )
  c.ema_decay = 0.9999
  c.ema_warmup = False  # decay_t = min(decay, (1 + t) / (10 + t)).

  # Mesh axis sizes (-1 fills with the remaining devices) and the logical
  # axis rules (see tim_jax.core.sharding).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = sharding.DEFAULT_RULES

  # Trace `profile.num_steps` steps from step `profile.first_step` with
  # jax.profiler into the workdir (TensorBoard's profile tab reads it);
  # num_steps=0 traces nothing.
  c.profile = ml_collections.ConfigDict(dict(first_step=10, num_steps=0))
  # JAX's persistent compilation cache, so a resumed or relaunched job does
  # not compile again: "" = <workdir>/compilation_cache (or the directory in
  # $JAX_COMPILATION_CACHE_DIR when that is set), "none" = off, else a
  # directory (gs:// too).
  c.compilation_cache_dir = ""
  c.log_every = 50  # Steps between metric reports (>= 1).
  # Steps between checkpoints; the final step is always saved (0: only it).
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3  # The newest checkpoints kept (>= 1).
  c.async_checkpoints = True  # Save in the background while training.
  # The guard: a step whose loss or gradient norm is not finite, or whose
  # regression MSE (metric mse_loss) exceeds guard_max_mse, leaves the state
  # unchanged and is counted; this many bad steps in a row stop the run.
  c.max_nonfinite_steps = 20
  # A diverged model's MSE is orders of magnitude above a healthy one's (a
  # few units for unit-variance targets: the TiM targets of every transport
  # are scaled so); 0 turns the check off.
  c.guard_max_mse = 1e4

  c.sample = ml_collections.ConfigDict(
    dict(
      every=1000,
      nfe=(1, 2, 4, 8),
      cfg_scale=1.0,
      guidance_interval=(0.0, 1.0),
      image_size=32,
      seed=0,
      num=8,
      cols=0,
      # Grids for people: images enlarged (nearest) to at least this many
      # pixels a side, with their prompts or class names beside them.
      min_side=128,
      prompts=(),
      labels=(),
      # "transition" (r = t_next, the TiM sampler) or "diffusion" (r = t_cur:
      # Euler steps of the flow, for models trained with diffusion_ratio=1).
      mode="transition",
    )
  )
  # Evaluators (tim_jax.training.evaluators), each on its own schedule: it runs
  # every `every` steps and at the last step; every=0 turns it off.
  c.evals = ml_collections.ConfigDict(
    dict(
      # The loss of the EMA parameters on one fixed held-out batch.
      holdout_loss=ml_collections.ConfigDict(dict(every=0)),
      # Built-in shapes data only: the shapes oracle's attribute accuracy
      # and Frechet distance (in its features, to `reference_num` real
      # images) of the EMA model's samples for `num` held-out scenes, at
      # each NFE of `nfe`, with the sample.* guidance settings.
      shapes_oracle=ml_collections.ConfigDict(
        dict(every=0, nfe=(1, 4), num=64, batch_size=64, reference_num=1000)
      ),
      # FID of `num` EMA samples at each NFE of `nfe` (labels or prompts
      # from sample.*, cycled) against `reference`, an .npz of mu/sigma
      # (tim_jax.eval.fid.Statistics); `inception_weights` is the FID
      # InceptionV3 (.pth or .safetensors). Runs when both are given.
      fid=ml_collections.ConfigDict(
        dict(
          every=0,
          nfe=(4,),
          num=5000,
          batch_size=64,
          reference="",
          inception_weights="",
        )
      ),
    )
  )
  return c


def tiny_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The schedule of the tiny built-in-data variants, sized so that the
  default run finishes in about ten minutes on a 2-core CPU."""
  c.model.use_projector = False  # No REPA encoder for the shapes world.
  c.model.rope_positions = "xy"
  c.data.name = "shapes"
  c.data.image_size = 32
  c.batch_size = 48
  c.num_steps = 1500
  c.optimizer.base_lr = 1e-3
  c.optimizer.base_batch = 48
  c.optimizer.warmup_steps = 100
  c.ema_decay = 0.998
  c.ema_warmup = True
  c.log_every = 100
  c.checkpoint_every = 500
  c.sample.every = 500
  c.sample.image_size = 32
  c.sample.cfg_scale = 2.0
  c.evals.holdout_loss.every = 500
  c.evals.shapes_oracle.every = 500
  return c


def parse_variant(
  arg: str | None,
  variants: Sequence[str],
  options: Sequence[str] = (),
  default: str = "tiny",
) -> tuple[str, set[str]]:
  """``"xl2_256,mg,smoke"`` -> ("xl2_256", {"mg", "smoke"}): the variant
  and its options, as ``--config=file.py:ARG`` gives them. Unknown names
  stop with an error that lists the valid ones."""
  parts = [p.strip() for p in (arg or default).split(",") if p.strip()]
  variant, chosen = (parts[0] if parts else default), set(parts[1:])
  if variant not in variants:
    raise UserError(
      f"unknown variant {variant!r}; use one of "
      f"{', '.join(variants)} (then options: "
      f"{', '.join(options) or 'none'})"
    )
  unknown = chosen - set(options)
  if unknown:
    raise UserError(
      f"unknown option(s) {sorted(unknown)} in {arg!r}; the "
      f"options are {', '.join(options)}"
    )
  return variant, chosen


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any variant to a width, depth and batch that run a few steps
  on a CPU in seconds, with the same code path: the same data kind, latent
  shape, REPA, guidance, loss options and dtype logic."""
  net = c.model.network
  net.hidden_size, net.depth, net.num_heads = 32, 1, 2
  net.encoder_depth, net.lora_hidden_size = 1, 8
  net.z_dim, net.projector_dim = 16, 32
  if c.model.kind == "t2i":
    net.cap_feat_dim = 16
  c.batch_size = 8
  c.num_steps = 2
  c.optimizer.base_batch = 8
  c.optimizer.warmup_steps = 0  # Else the first steps would not move.
  c.log_every = 1
  c.checkpoint_every = 2
  c.async_checkpoints = False
  c.sample.num = min(c.sample.num, 4)
  c.sample.nfe = (1, 2)
  c.evals.shapes_oracle.num = 8
  c.evals.shapes_oracle.batch_size = 8
  c.evals.shapes_oracle.reference_num = 64
  c.evals.fid.num = 8
  return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks ``c`` (overrides of unknown keys then fail) and returns it."""
  c.lock()
  return c


def with_overrides(
  config: ml_collections.ConfigDict, changes: dict
) -> ml_collections.ConfigDict:
  """A locked copy of ``config`` with ``{"dotted.field": value}`` set, as
  ``--config.dotted.field=value`` would set it."""
  c = config.copy_and_resolve_references()
  c.unlock()
  for dotted, value in changes.items():
    *path, leaf = dotted.split(".")
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  c.lock()
  return c


def packaged_configs() -> str | None:
  """The folder of the configs installed with the package
  (``tim_jax.configs``), or None in a checkout that is not installed."""
  import importlib.util

  try:
    spec = importlib.util.find_spec("tim_jax.configs")
  except ModuleNotFoundError:
    return None
  locations = spec and spec.submodule_search_locations
  return list(locations)[0] if locations else None


def resolve_path(spec: str) -> str:
  """``"configs/t2i.py[:variant]"`` as given when that file exists, else
  the same file from the installed package, so that the documented
  commands work after a non-editable install, from any folder."""
  import os

  path, sep, variant = spec.partition(":")
  if (
    os.path.isfile(path) or os.path.normpath(os.path.dirname(path)) != "configs"
  ):
    return spec
  folder = packaged_configs()
  packaged = folder and os.path.join(folder, os.path.basename(path))
  return (
    packaged + sep + variant if packaged and os.path.isfile(packaged) else spec
  )


def load_file(spec: str) -> ml_collections.ConfigDict:
  """The config of ``"path/to/config.py[:variant]"``, as ``--config=`` reads
  it (for notebooks and scripts, where there are no flags)."""
  import importlib.util
  import os

  path, _, variant = resolve_path(spec).partition(":")
  if not os.path.isfile(path):
    raise UserError(f"no config file {path!r}")
  module_spec = importlib.util.spec_from_file_location("_tim_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def flag_config(
  flag_values: flags.FlagValues, name: str = "config"
) -> ml_collections.ConfigDict | None:
  """The config of a ``config_flags`` flag (None when the flag is unset),
  with a plain error for a missing file: ml_collections reports it as
  "Failed loading config file config_config"."""
  import os

  from ml_collections import config_flags

  holder = flag_values[name]
  if not holder.present:
    return holder.value
  path = config_flags.get_config_filename(holder)
  if path and not os.path.isfile(path.partition(":")[0]):
    raise UserError(
      f"--{name}: no config file {path.partition(':')[0]!r} (looked in "
      f"{os.getcwd()}); the configs are configs/c2i.py and configs/t2i.py, "
      "given as --config=configs/t2i.py[:variant]"
    )
  return flag_values[name].value


def to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as a JSON-safe dict (what checkpoints store)."""
  return _json_safe(config.to_dict())


def _json_safe(tree):
  if isinstance(tree, dict):
    return {str(k): _json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_json_safe(v) for v in tree]
  if isinstance(tree, np.generic):
    return tree.item()
  return tree


def merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  """Writes a JSON dict (``to_json``'s form) into an unlocked config;
  JSON lists become tuples, as the configs write them."""
  for key, value in saved.items():
    if (
      isinstance(value, dict)
      and key in config
      and isinstance(config[key], ml_collections.ConfigDict)
    ):
      merge(config[key], value)
    else:
      config[key] = _tuples(value)


def _tuples(v):
  return tuple(map(_tuples, v)) if isinstance(v, list) else v


# --- range checks --------------------------------------------------------------

# (field, lowest, highest, what): each numeric knob's valid range, checked
# before any work (an inclusive bound; None: unbounded on that side).
RANGES = (
  ("seed", 0, None, "a non-negative integer"),
  ("batch_size", 1, None, "the global batch"),
  ("microbatches", 1, None, "1 = no gradient accumulation"),
  ("num_steps", 1, None, "steps to train"),
  ("log_every", 1, None, "steps between metric reports"),
  ("checkpoint_every", 0, None, "0 = only the final step"),
  ("keep_checkpoints", 1, None, "the newest checkpoints kept"),
  ("max_nonfinite_steps", 1, None, "bad steps in a row that stop the run"),
  ("guard_max_mse", 0.0, None, "0 = off"),
  ("ema_decay", 0.0, 1.0, "the EMA's decay"),
  ("conditioning.drop_prob", 0.0, 1.0, "label / caption dropout"),
  ("optimizer.base_lr", 0.0, None, "the learning rate"),
  ("optimizer.base_batch", 1, None, "the batch base_lr is for"),
  ("optimizer.warmup_steps", 0, None, "0 = no warmup"),
  ("optimizer.b1", 0.0, 1.0, "Adam's first-moment decay"),
  ("optimizer.b2", 0.0, 1.0, "Adam's second-moment decay"),
  ("optimizer.eps", 0.0, None, "Adam's epsilon"),
  ("optimizer.weight_decay", 0.0, None, "0 = none"),
  ("optimizer.grad_clip", 0.0, None, "0 = no clipping"),
  ("loss.diffusion_ratio", 0.0, 1.0, "the share of diffusion rows"),
  ("loss.consistency_ratio", 0.0, 1.0, "the share of consistency rows"),
  ("loss.epsilon", 0.0, None, "the finite-difference step"),
  ("loss.groups", 0, None, "0 = one per data shard"),
  ("data.worker_count", 0, None, "0 = read in this process"),
  ("data.image_size", 1, None, "pixels or latent positions a side"),
  ("sample.every", 0, None, "0 = no sample grids"),
  ("sample.cfg_scale", 1.0, None, "1 = no guidance"),
  ("sample.num", 1, None, "images per grid row"),
  ("sample.min_side", 1, None, "pixels a side in grids"),
  ("autoencoder.batch_size", 1, None, "images per decoder call"),
  ("profile.first_step", 1, None, "the first traced step"),
  ("profile.num_steps", 0, None, "0 = no trace"),
)


def _get(config: ml_collections.ConfigDict, dotted: str) -> object:
  value = config
  for key in dotted.split("."):
    value = value[key]
  return value


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a config with a knob out of its range (UserError naming the
  field), before any model is built or data read."""
  import math  # pylint: disable=g-import-not-at-top

  for field, low, high, what in RANGES:
    try:
      value = _get(config, field)
    except (KeyError, AttributeError):
      continue  # A config without this knob (an older checkpoint's).
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad:
      bad = (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
        or (isinstance(low, int) and not isinstance(value, int))
      )
    if bad:
      bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
      raise UserError(
        f"config field {field}={value!r} must be {bounds} ({what})"
      )
  loss = config.loss
  if loss.diffusion_ratio + loss.consistency_ratio > 1.0:
    raise UserError(
      "loss.diffusion_ratio + loss.consistency_ratio must be <= 1, got "
      f"{loss.diffusion_ratio} + {loss.consistency_ratio}"
    )
  for name, evaluator in config.evals.items():
    every = evaluator.get("every", 0)
    if not isinstance(every, int) or every < 0:
      raise UserError(
        f"config field evals.{name}.every={every!r} must be >= 0 (0 = off)"
      )
