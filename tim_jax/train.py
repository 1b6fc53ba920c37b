"""The generic trainer: sharded state, one jitted step, a clu-style loop.

The trainer knows the method only through ``transition.loss`` and
``sampling.sample``; the method knows nothing of the trainer.

Everything comes from the config (see ``configs/``). The loop:

* builds the mesh and the sharded train state (``eval_shape`` then ``jit``
  with ``out_shardings``), or restores the latest checkpoint in the workdir;
* runs one jitted, buffer-donating step per batch: loss, AdamW update, EMA,
  and a non-finite guard that skips the update and counts it;
* reports progress (steps/s, ETA) and metrics through clu writers
  (TensorBoard and console), writes sample grids at several NFE as PNG and to
  TensorBoard, runs evaluation hooks, and checkpoints every N steps and at
  the end.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Dict

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tim_jax import (checkpoint, conditioning, models, optim, sampling,
                     sharding, transition, transports)
from tim_jax.models import TiMConfig


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema: Any
  opt_state: Any
  rng: jax.Array  # Raw key data (uint32), so it checkpoints as an array.
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


# --- building the pieces from the config ------------------------------------


def model_config(config) -> TiMConfig:
  m = config.model
  return TiMConfig.from_official(
      m.kind, dict(m.network), rope_positions=m.rope_positions,
      attention_impl=m.attention_impl or None, remat=m.remat,
      use_projector=m.use_projector)


def compute_dtype(config):
  names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}
  if config.model.dtype not in names:
    raise ValueError(f"model.dtype must be one of {sorted(names)}, got "
                     f"{config.model.dtype!r}")
  return names[config.model.dtype]


def transport(config):
  return transports.get(config.transport.name, **dict(config.transport.params))


def loss_config(config, data_shards: int) -> transition.LossConfig:
  fields = dict(config.loss)
  groups = fields.pop("groups", 0) or data_shards
  return transition.LossConfig(groups=groups, **fields)


def make_conditioner(config):
  kind = config.model.kind
  drop = float(config.conditioning.drop_prob)
  if kind == "c2i":
    return conditioning.LabelConditioner(
        int(config.model.network.num_classes), drop)
  d = config.data
  if d.name == "shapes":
    from tim_jax.data import text
    tokenizer = text.Tokenizer()
    encoder = text.CaptionEncoder(tokenizer.vocab_size, d.max_caption_len,
                                  int(config.model.network.cap_feat_dim),
                                  seed=d.caption_seed)
    return conditioning.CaptionConditioner(encoder, tokenizer, drop,
                                           max_len=d.max_caption_len)
  null_path = d.get("null_caption_features")
  if not null_path or not os.path.exists(null_path):
    raise ValueError("data.null_caption_features must point at a .npy file of"
                     " the empty caption's features (M, D) for a latent t2i "
                     f"dataset; got {null_path!r}")
  return conditioning.CaptionConditioner(
      drop_prob=drop, null_features=np.load(null_path))


def make_source(config, split="train"):
  d = config.data
  if d.name == "shapes":
    from tim_jax.data import shapes
    seed = d.seed if split == "train" else d.seed + 1_000_003
    return shapes.ShapesSource(size=d.image_size, seed=seed,
                               mode=config.model.kind,
                               max_caption_len=d.max_caption_len)
  if d.name == "latents":
    if not d.data_dir or not os.path.isdir(d.data_dir):
      raise FileNotFoundError(
          f"data.data_dir={d.data_dir!r} does not exist: this config trains "
          "on a latent dataset. Write one with `python -m "
          "tim_jax.data.latents` and pass --config.data.data_dir=DIR")
    from tim_jax.data import latents
    return latents.LatentSource(d.data_dir, split=split)
  raise ValueError(f"data.name must be 'shapes' or 'latents', got {d.name!r}")


def make_data_iterator(config, source):
  from tim_jax.data import pipeline
  return pipeline.make_iterator(
      source, global_batch_size=config.batch_size, seed=config.data.seed,
      worker_count=config.data.worker_count)


def decode(config, x):
  """Network space -> images in [-1, 1]. Pixel-space models: identity."""
  name = config.autoencoder.name
  if name == "identity":
    return x
  raise NotImplementedError(
      f"autoencoder {name!r} has no decoder in tim_jax yet; latent models "
      "train, but sample grids need a decoder (set sample.every=0)")


# --- state and step ----------------------------------------------------------


class Trainer:
  """Holds the static pieces and the compiled functions of one run."""

  def __init__(self, config, mesh=None):
    self.config = config
    self.mesh = mesh or sharding.make_mesh(dict(config.mesh))
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    self.model_config = model_config(config)
    self.dtype = compute_dtype(config)
    self.transport = transport(config)
    self.loss_config = loss_config(config, sharding.data_shards(self.mesh))
    self.conditioner = make_conditioner(config)
    self.tx = optim.make(config.optimizer, config.batch_size,
                         config.num_steps)
    if config.batch_size % sharding.data_shards(self.mesh):
      raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                       f"the {sharding.data_shards(self.mesh)} data shards of"
                       f" mesh {dict(self.mesh.shape)}")
    abstract_model = nnx.eval_shape(self.new_model)
    self.graphdef, _ = nnx.split(abstract_model, nnx.Param)
    self.abstract_state = jax.eval_shape(self._init)
    self.state_shardings = sharding.state_shardings(
        self.abstract_state, self.mesh, self.rules)
    self._step = None
    self._samplers = {}
    self._on_step = None  # The progress hook of the sampler call running.

  def new_model(self):
    """A freshly initialised model (unsharded)."""
    return models.TiM(self.model_config, rngs=nnx.Rngs(self.config.seed),
                      dtype=self.dtype)

  def _init(self):
    model = self.new_model()
    params = nnx.state(model, nnx.Param)
    key = jax.random.key_data(jax.random.key(self.config.seed))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, ema=params,
                      opt_state=self.tx.init(params), rng=key,
                      nonfinite_streak=zero, nonfinite_total=zero)

  def init_state(self) -> TrainState:
    return jax.jit(self._init, out_shardings=self.state_shardings)()

  def abstract_with_shardings(self):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_shardings)

  def model(self, params):
    return nnx.merge(self.graphdef, params)

  def network(self, params, projection=False):
    model = self.model(params)
    if projection:
      return lambda x, t, r, y: model(x, t, r, y, return_projection=True)
    return lambda x, t, r, y: model(x, t, r, y)

  def _train_step(self, state: TrainState, batch):
    config = self.config
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_loss, k_drop = jax.random.split(key)
    x = batch["image"]
    y_true = self.conditioner(batch)
    y = self.conditioner.drop(k_drop, y_true)
    null = self.conditioner.null(x.shape[0])
    repa_key = config.loss_extras.repa_feature_key
    repa = batch[repa_key] if repa_key else None

    teacher = None
    if self.loss_config.enhance_target:
      ema_model = self.network(state.ema)
      teacher = lambda *a: (jax.lax.stop_gradient(ema_model(*a)), None)

    def loss_fn(params):
      return transition.loss(
          self.network(params, projection=True), x, y, k_loss,
          transport=self.transport, config=self.loss_config,
          teacher_fn=teacher, teacher_cond=y_true, null_cond=null,
          repa_target=repa)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.asarray(config.ema_decay, jnp.float32)
    if config.ema_warmup:
      # Short runs: an EMA that starts at the initial (zero-output) network
      # would stay near it for ~1/(1-decay) steps.
      step = state.step.astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema,
                       params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        ema=keep(ema, state.ema),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(metrics, grad_norm=grad_norm,
                   nonfinite_streak=new_state.nonfinite_streak,
                   nonfinite_total=new_state.nonfinite_total)
    return new_state, metrics

  def batch_shardings(self, batch):
    return jax.tree.map(lambda a: sharding.batch_sharding(self.mesh, a.ndim),
                        batch)

  def train_step(self, state, batch):
    """One compiled step; ``state`` is donated."""
    if self._step is None:
      self._step = jax.jit(
          self._train_step, donate_argnums=0,
          in_shardings=(self.state_shardings, self.batch_shardings(batch)),
          out_shardings=(self.state_shardings, sharding.replicated(self.mesh)))
    return self._step(state, batch)

  def sample(self, params, noise, cond, null, *, num_steps, cfg_scale=1.0,
             guidance_interval=(0.0, 1.0), stochasticity=0.0, rng=None,
             mode=None, progress=None):
    """Samples with ``params`` (compiled once per setting); ``mode``
    defaults to ``config.sample.mode``. ``progress(step)`` is called on the
    host after every step; the compiled sampler calls whichever hook the
    current call gave, so changing hooks does not recompile."""
    mode = mode or self.config.sample.mode
    key = (num_steps, cfg_scale, tuple(guidance_interval), stochasticity,
           mode, progress is not None)
    if key not in self._samplers:
      hook = (lambda i: self._on_step(i)) if progress is not None else None

      def run(params, noise, cond, null, rng):
        return sampling.sample(
            self.network(params), noise, cond, null,
            transport=self.transport, num_steps=num_steps,
            cfg_scale=cfg_scale, guidance_interval=guidance_interval,
            stochasticity=stochasticity, rng=rng, mode=mode, progress=hook)
      self._samplers[key] = jax.jit(run)
    self._on_step = progress
    try:
      out = self._samplers[key](params, noise, cond, null, rng)
      if progress is not None:
        out = jax.block_until_ready(out)
        jax.effects_barrier()  # Every step reported before the hook goes.
      return out
    finally:
      self._on_step = None


# --- sample grids ------------------------------------------------------------


def to_uint8(images):
  """[-1, 1] -> uint8, as the official C2I/MJHQ conversion."""
  return np.clip(255.0 * (np.asarray(images, np.float32) + 1.0) / 2.0, 0,
                 255).astype(np.uint8)


def grid(images, cols):
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image with 1px gaps."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    out[1 + r * (h + 1):1 + r * (h + 1) + h,
        1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
  return out


def save_png(path, image):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def sample_conditions(trainer: Trainer):
  """The fixed conditioning of the periodic sample grids."""
  s = trainer.config.sample
  if trainer.config.model.kind == "c2i":
    labels = list(s.labels) if s.labels else list(range(min(
        s.num, trainer.model_config.num_classes)))
    return trainer.conditioner.from_labels(labels), len(labels)
  return trainer.conditioner.from_prompts(list(s.prompts)), len(s.prompts)


def write_sample_grids(trainer: Trainer, state, step, workdir, writer):
  config = trainer.config
  s = config.sample
  cond, n = sample_conditions(trainer)
  shape = (n, s.image_size, s.image_size, trainer.model_config.in_channels)
  noise = jax.random.normal(jax.random.key(s.seed), shape)
  null = trainer.conditioner.null(n)
  images = {}
  paths = []
  for nfe in s.nfe:
    out = trainer.sample(state.ema, noise, cond, null, num_steps=int(nfe),
                         cfg_scale=float(s.cfg_scale),
                         guidance_interval=tuple(s.guidance_interval))
    picture = grid(to_uint8(decode(config, out)), cols=s.cols or n)
    path = os.path.join(workdir, "samples", f"step_{step:07d}_nfe_{nfe}.png")
    if jax.process_index() == 0:
      save_png(path, picture)
    images[f"samples/nfe_{nfe}"] = picture[None]
    paths.append(path)
  writer.write_images(step, images)
  return paths


# --- evaluation hooks -----------------------------------------------------------


def holdout_loss(trainer: Trainer, state, batch) -> Dict[str, float]:
  """The loss of the EMA parameters on a fixed held-out batch, fixed rng."""
  x = batch["image"]
  y = trainer.conditioner(batch)
  loss, metrics = transition.loss(
      trainer.network(state.ema, projection=True), x, y, jax.random.key(0),
      transport=trainer.transport, config=trainer.loss_config,
      null_cond=trainer.conditioner.null(x.shape[0]))
  return {"holdout/loss": loss, "holdout/mse_loss": metrics["mse_loss"]}


EVALUATORS: Dict[str, Callable] = {"holdout_loss": holdout_loss}


# --- the loop ------------------------------------------------------------------


def _config_dict(config):
  return json_safe(config.to_dict())


def json_safe(tree):
  if isinstance(tree, dict):
    return {str(k): json_safe(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [json_safe(v) for v in tree]
  if isinstance(tree, (np.generic,)):
    return tree.item()
  return tree


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains per ``config``, writing everything under ``workdir``.

  Returns the final TrainState.
  """
  from clu import metric_writers, periodic_actions

  os.makedirs(workdir, exist_ok=True)
  config_dict = _config_dict(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 every=config.checkpoint_every,
                                 keep=config.keep_checkpoints,
                                 asynchronous=config.async_checkpoints)
  ckpt.check_compatible(config_dict)  # Before anything is written.
  source = make_source(config)  # Missing data stops here, early.
  trainer = Trainer(config)
  data_iter = make_data_iterator(config, source)

  start = ckpt.latest_step()
  if start is None:
    state = trainer.init_state()
    start = 0
    logging.info("initialised a new model (%d parameters)", sum(
        int(np.prod(a.shape)) for a in jax.tree.leaves(
            trainer.abstract_state.params)))
  else:
    state = ckpt.restore(start, trainer.abstract_with_shardings(), data_iter)
    logging.info("resumed from step %d in %s", start, ckpt.directory)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config_dict).items()
                          if isinstance(v, (int, float, str, bool))})
  total = config.num_steps
  hooks = [periodic_actions.ReportProgress(
      num_train_steps=total, writer=writer,
      every_steps=config.log_every)]

  holdout = None
  if config.eval_every:
    eval_iter = make_data_iterator(config, make_source(config, "eval"))
    holdout = sharding.global_batch(next(eval_iter), trainer.mesh)
    eval_fns = {name: jax.jit(functools.partial(EVALUATORS[name], trainer))
                for name in config.evaluators}

  pending = None  # The previous step's guard counters (one-step lag).
  accumulated = []
  step = start
  t0 = time.time()
  try:
    while step < total:
      batch = sharding.global_batch(next(data_iter), trainer.mesh)
      state, metrics = trainer.train_step(state, batch)
      step += 1
      if pending is not None:
        streak = int(pending)
        if streak >= config.max_nonfinite_steps:
          raise NonFiniteError(
              f"{streak} non-finite steps in a row (up to step {step - 1}); "
              "stopping. The last checkpoint holds finite parameters; lower "
              "the learning rate or check the data.")
      pending = metrics["nonfinite_streak"]
      accumulated.append(metrics)
      for hook in hooks:
        hook(step)
      if step % config.log_every == 0 or step == total:
        summary = jax.device_get(accumulated)
        accumulated = []
        means = {k: float(np.mean([m[k] for m in summary]))
                 for k in summary[0]}
        means["nonfinite_total"] = float(summary[-1]["nonfinite_total"])
        writer.write_scalars(step, means)
      if config.sample.every and (step % config.sample.every == 0
                                  or step == total):
        write_sample_grids(trainer, state, step, workdir, writer)
      if holdout is not None and (step % config.eval_every == 0
                                  or step == total):
        for name, fn in eval_fns.items():
          writer.write_scalars(step, jax.device_get(fn(state, holdout)))
      if step % config.checkpoint_every == 0 or step == total:
        ckpt.save(step, state, data_iter, config_dict, force=True)
    streak = int(jax.device_get(state.nonfinite_streak))
    if streak >= config.max_nonfinite_steps:
      raise NonFiniteError(f"{streak} non-finite steps in a row at the end")
  finally:
    ckpt.close()
    writer.flush()
  logging.info("finished %d steps in %.1f s", total - start, time.time() - t0)
  return state


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      out.update(_flat(v, key))
    else:
      out[key] = v
  return out
