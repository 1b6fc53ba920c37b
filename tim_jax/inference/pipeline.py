"""Sampling from TiM: weights, conditioning, compiled samplers, decoding.

Everything sampling needs and nothing of training (no optimizer, no train
state)::

    from tim_jax import inference
    pipe = inference.load("RUN_DIR")              # a tim_jax run: EMA + config
    pipe = inference.load("TiM-XL-2-256.pt",       # an official file
                          config_base.load_file("configs/c2i.py:xl2_256"))
    cond, names = pipe.conditions(prompts=["a red circle at the top left"])
    x = pipe.generate(cond, num_steps=4, num=2)    # network space, numpy
    images = pipe.decode(x)                        # [-1, 1] pixels

A ``Pipeline`` holds the model graph and weights, the conditioner, the
transport, the decoder and a cache of compiled samplers keyed by their
settings. The trainer builds one without weights and passes its EMA
parameters per call (``params=``), so periodic sample grids and evaluators
compile once and use the same code as the sampling command.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import itertools
import os
import threading
from typing import TYPE_CHECKING, Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tim_jax import autoencoders
from tim_jax.config import builders, config_base, official
from tim_jax.core import hub, images, paths, sharding
from tim_jax.core.errors import UserError
from tim_jax.data import kinds
from tim_jax.method import sampling
from tim_jax.models import layers
from tim_jax.weights import checkpoint, convert

if TYPE_CHECKING:
  from jax.typing import ArrayLike

OFFICIAL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FORMATS = ("tim_jax", "official")


class NonFiniteSamplesError(UserError):
  """The sampler produced NaN or infinite values: the checkpoint's weights
  are diverged or damaged (a UserError, so one line from the commands)."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """Where weights are: a tim_jax checkpoint step or an official file."""

  format: str  # One of FORMATS.
  path: str  # The checkpoints directory, or the official file.
  step: int | None = None


def resolve(path: str) -> CheckpointRef:
  """A workdir, a ``checkpoints`` dir, one step's dir or an official file;
  any of them may be a hub id (``tim_jax.core.hub``), resolved to its
  local copy."""
  path = hub.resolve(path)
  if not path:
    raise UserError("a checkpoint path (--checkpoint) is required")
  path = paths.absolute(path)  # Local or gs://.
  p = paths.as_path(path)
  if p.is_file():
    if not path.endswith(OFFICIAL_SUFFIXES):
      raise UserError(
        f"{path} is a file but not an official checkpoint "
        f"({', '.join(OFFICIAL_SUFFIXES)})"
      )
    return CheckpointRef("official", path)
  if not p.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if (p / "state").is_dir() and p.name.isdigit():
    return CheckpointRef("tim_jax", os.fspath(p.parent), int(p.name))
  steps = sorted(
    int(d.name)
    for d in p.iterdir()
    if d.name.isdigit() and (d / "state").is_dir()
  )
  path = os.fspath(p)
  if not steps:
    raise FileNotFoundError(
      f"{path} holds no tim_jax checkpoint (no <step>/state directory); "
      "pass a run's workdir, its checkpoints directory, one step's "
      f"directory, or an official {'/'.join(OFFICIAL_SUFFIXES)} file"
    )
  return CheckpointRef("tim_jax", path, steps[-1])


def _reader(ref: CheckpointRef) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(ref.path, asynchronous=False)


def saved_config(ref: CheckpointRef) -> dict:
  """The config saved with a tim_jax checkpoint, as a JSON dict."""
  reader = _reader(ref)
  try:
    saved = reader.saved_config(ref.step)
  finally:
    reader.close()
  if saved is None:
    raise FileNotFoundError(
      f"the checkpoint {ref.path} step {ref.step} has "
      "no saved config; pass a config"
    )
  return saved


def config_from_checkpoint(ref: CheckpointRef) -> ml_collections.ConfigDict:
  """The run's config as saved with the checkpoint (locked)."""
  config = config_base.base_config()
  config.unlock()
  config_base.merge(config, saved_config(ref))
  return config_base.lock(config)


def _single_device(abstract):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
  )


# Pixels per decoder call at most: one 1024x1024 image, whose float32
# temporaries in the DC-AE decoder take ~5 GiB (compiled for one v5e chip,
# docs/results/colab.md): a 16 GiB accelerator decodes such images singly.
DECODE_PIXELS = 2**20


def decode_batch(
  config: ml_collections.ConfigDict, num: int, height: int, width: int
) -> int:
  """Images of ``height`` x ``width`` pixels per decoder call, for ``num``
  of them: ``autoencoder.batch_size``, at most ``num`` and at most
  ``DECODE_PIXELS`` pixels, at least one."""
  most = max(1, DECODE_PIXELS // max(1, height * width))
  return max(1, min(int(config.autoencoder.batch_size), num, most))


def read_config(spec: str) -> ml_collections.ConfigDict:
  """A config file (``"configs/c2i.py:xl2_256"``) or an official training
  YAML, read as ``load`` reads its ``config``."""
  if official.is_official_yaml(spec):
    return official.config_from_yaml(spec)
  return config_base.load_file(spec)


def load(
  checkpoint_path: str,
  config: ml_collections.ConfigDict | str | None = None,
  autoencoder_path: str | None = None,
  text_encoder_path: str | None = None,
  weights: str = "ema",
) -> Pipeline:
  """A pipeline with a checkpoint's weights.

  A tim_jax checkpoint gives its EMA weights (``weights="params"``: the
  trained weights the EMA follows) and, when ``config`` is None, its saved
  config; an official file (``.safetensors``, ``.pt``, ``.pth``,
  ``.bin``) needs ``config`` for the architecture: a config, a config file
  (``"configs/c2i.py:xl2_256"``) or the official YAML the model was trained
  with (``configs/c2i/tim_xl_p2_256.yaml`` of the official repository, read
  as it is). ``autoencoder_path``
  replaces the config's ``autoencoder.path`` (where the decoder's diffusers
  directory is on this machine), ``text_encoder_path`` its
  ``text_encoder.path`` (the Gemma-3 directory of models trained on
  captions). Raises ValueError when the weights do not fit the config.
  """
  if isinstance(config, (str, os.PathLike)):
    config = read_config(os.fspath(config))
  ref = resolve(checkpoint_path)
  if ref.format == "official" and weights != "ema":
    raise UserError(
      f"{ref.path} is an official file, which holds one set "
      f"of weights; weights={weights!r} reads tim_jax "
      "checkpoints only"
    )
  if config is None:
    if ref.format == "official":
      raise UserError(
        "an official checkpoint needs a config (the "
        "architecture is not stored in the file); pass "
        "--config"
      )
    config = config_from_checkpoint(ref)
  if autoencoder_path or text_encoder_path:
    config = ml_collections.ConfigDict(config.to_dict())
    if autoencoder_path:
      config.autoencoder.path = os.fspath(autoencoder_path)
    if text_encoder_path:
      config.text_encoder.path = os.fspath(text_encoder_path)
    config = config_base.lock(config)
  pipe = Pipeline(config)
  if ref.format == "official":
    model = builders.new_model(config)
    state_dict = convert.read_state_dict(ref.path)
    convert.check_kind(state_dict, config.model.kind, ref.path)
    try:
      report = convert.load_state_dict(model, state_dict)
    except UserError as e:  # Another architecture: name the file.
      raise UserError(f"{ref.path}: {e}") from None
    if report.unexpected:
      raise UserError(
        f"{ref.path} holds {len(report.unexpected)} parameters this config"
        f"'s model does not have, e.g. {report.unexpected[:5]}: the "
        "checkpoint is of another architecture"
      )
    pipe.params = nnx.state(model, nnx.Param)
    return pipe
  problems = checkpoint.architecture_differences(
    saved_config(ref), config_base.to_json(config)
  )
  if problems:
    raise UserError(
      f"the checkpoint {ref.path} (step {ref.step}) does not"
      f" fit this config: {'; '.join(problems)}"
    )
  reader = _reader(ref)
  try:
    pipe.params = reader.restore_weights(
      ref.step, _single_device(pipe.abstract_params), weights
    )
  finally:
    reader.close()
  return pipe


# The progress hooks of the sampler calls in flight, by call id: a compiled
# sampler receives its caller's id as data and reports to that caller, so
# callers sharing a sampler (threads, the trainer and an evaluator) never see
# each other's steps and nothing is recompiled per hook.
_HOOKS: dict = {}
_HOOKS_LOCK = threading.Lock()
_CALL_IDS = itertools.count()


def _report(step, call_id):
  hook = _HOOKS.get(int(call_id))
  if hook is not None:
    hook(int(step))


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """What a compiled sampler is specialised on (its cache key)."""

  num_steps: int
  cfg_scale: float = 1.0
  guidance_interval: tuple = (0.0, 1.0)
  stochasticity: float = 0.0
  mode: str = "transition"
  with_progress: bool = False
  T_max: float | None = None  # None: the transport's.
  T_min: float | None = None
  # False: the diffusion mode's last step (to T_min) is deterministic.
  last_step_noise: bool = True


class Pipeline:
  """A TiM model ready to sample: graph, weights, conditioning, decoder.

  ``params`` may be None (the trainer passes its EMA per call).
  ``text_encoder`` stands in for ``config.text_encoder.path`` (models on
  captions). ``describe_label(label) -> str``, when set, names the rows of
  class-conditional samples (the presets: ImageNet class names).
  """

  def __init__(self, config, params: Any = None, *, text_encoder=None):
    self.config = config
    self.model_config = builders.model_config(config)
    self.graphdef = builders.graphdef(config)
    self.transport = builders.transport(config)
    self.conditioner = kinds.conditioner(config, text_encoder)
    self.params = params
    self._samplers = {}
    self._samplers_lock = threading.Lock()
    self._autoencoder = None
    self.describe_label: Callable[[int], str] | None = None

  @property
  def kind(self) -> str:
    """ "c2i" or "t2i"."""
    return self.model_config.kind

  @property
  def abstract_params(self) -> nnx.State:
    """The parameters' shapes and dtypes (no memory)."""
    return nnx.state(
      nnx.eval_shape(lambda: builders.new_model(self.config)), nnx.Param
    )

  def _params(self, params):
    params = self.params if params is None else params
    if params is None:
      raise ValueError(
        "this pipeline has no weights: pass params= or use inference.load"
      )
    return params

  def model(self, params: nnx.State | None = None) -> nnx.Module:
    """The backbone as an NNX module holding ``params``."""
    return nnx.merge(self.graphdef, self._params(params))

  def network(self, params: nnx.State | None = None) -> Callable:
    """``fn(x, t, r, y)``: the backbone's forward pass."""
    model = self.model(params)
    return lambda x, t, r, y: model(x, t, r, y)

  # --- conditioning -----------------------------------------------------------

  def null_like(
    self, cond: ArrayLike | Mapping[str, ArrayLike]
  ) -> jax.Array | dict[str, jax.Array]:
    """The null conditioning (for guidance) matching ``cond``."""
    return self.conditioner.null_like(cond)

  def conditions(
    self, prompts: Sequence[str] = (), labels: Sequence[int] = ()
  ) -> tuple[jax.Array | dict[str, jax.Array], list[str]]:
    """(conditioning with a batch axis, the names of its rows); with
    neither, the config's ``sample.prompts`` or ``sample.labels``."""
    s = self.config.sample
    if self.kind == "c2i":
      if prompts:
        raise UserError(
          "--prompt is for text-to-image models; this is a "
          "class-conditional model: use --labels"
        )
      labels = (
        list(labels)
        or list(s.labels)
        or list(range(min(s.num, self.model_config.num_classes)))
      )
      from tim_jax.data import kinds  # pylint: disable=g-import-not-at-top

      names = (
        [self.describe_label(l) for l in labels]
        if self.describe_label is not None
        else kinds.label_names(self.config, labels)
      )
      return self.conditioner.from_labels(labels), names
    if labels:
      raise UserError(
        "--labels is for class-conditional models; this is a "
        "text-to-image model: use --prompt"
      )
    prompts = list(prompts) or list(s.prompts)
    if not prompts:
      raise UserError("no prompt given and the config has no sample.prompts")
    return self.conditioner.from_prompts(prompts), prompts

  # --- sampling -----------------------------------------------------------------

  def settings(
    self,
    num_steps: int,
    cfg_scale: float | None = None,
    guidance_interval: Sequence[float] | None = None,
    stochasticity: float = 0.0,
    mode: str | None = None,
    with_progress: bool = False,
    T_max: float | None = None,
    T_min: float | None = None,
    last_step_noise: bool = True,
  ) -> SamplerSettings:
    """Validated settings; None means the config's ``sample.*`` value
    (``T_max``/``T_min``: the transport's; ``last_step_noise``: see
    ``sampling.sample``)."""
    s = self.config.sample
    mode = mode or s.mode
    interval = (
      s.guidance_interval if guidance_interval is None else (guidance_interval)
    )
    num_steps, interval = sampling.check_settings(
      num_steps, interval, stochasticity, mode
    )
    cfg_scale = float(s.cfg_scale if cfg_scale is None else cfg_scale)
    if not cfg_scale >= 1.0:
      # The sampler guides only above 1 (as the official one does): a scale
      # below would be silently ignored.
      raise UserError(
        f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}"
      )
    if T_max is not None or T_min is not None:
      T_max, T_min = sampling.time_bounds(self.transport, T_max, T_min)
    return SamplerSettings(
      num_steps=num_steps,
      cfg_scale=cfg_scale,
      guidance_interval=interval,
      stochasticity=float(stochasticity),
      mode=mode,
      with_progress=with_progress,
      T_max=T_max,
      T_min=T_min,
      last_step_noise=bool(last_step_noise),
    )

  def compiled_sampler(
    self, settings: SamplerSettings, platform: str | None = None
  ) -> Callable:
    """``fn(params, noise, cond, null, rng, call_id, step_noise=None) ->
    samples``, jitted once per settings and platform (thread-safe cache).
    ``platform`` (that of the devices it will run on) traces the layers in
    that platform's form only (``layers.forms_for``); None traces them for
    any platform."""
    key = (settings, platform)
    with self._samplers_lock:
      if key not in self._samplers:
        graphdef, transport = self.graphdef, self.transport

        def run(params, noise, cond, null, rng, call_id, step_noise=None):
          model = nnx.merge(graphdef, params)
          with layers.forms_for(platform):
            return sampling.sample(
              lambda x, t, r, y: model(x, t, r, y),
              noise,
              cond,
              null,
              transport=transport,
              num_steps=settings.num_steps,
              cfg_scale=settings.cfg_scale,
              guidance_interval=settings.guidance_interval,
              stochasticity=settings.stochasticity,
              rng=rng,
              mode=settings.mode,
              progress=_report if settings.with_progress else None,
              progress_tag=call_id if settings.with_progress else None,
              T_max=settings.T_max,
              T_min=settings.T_min,
              step_noise=step_noise,
              last_step_noise=settings.last_step_noise,
            )

        self._samplers[key] = jax.jit(run)
      return self._samplers[key]

  def sample(
    self,
    noise: jax.Array,
    cond: ArrayLike | Mapping[str, ArrayLike],
    null: ArrayLike | Mapping[str, ArrayLike] | None = None,
    *,
    num_steps: int,
    cfg_scale: float | None = None,
    guidance_interval: Sequence[float] | None = None,
    stochasticity: float = 0.0,
    rng: jax.Array | None = None,
    mode: str | None = None,
    progress: Callable[[int], None] | None = None,
    params: nnx.State | None = None,
    T_max: float | None = None,
    T_min: float | None = None,
    step_noise: ArrayLike | None = None,
    last_step_noise: bool = True,
  ) -> jax.Array:
    """One sampler call on a batch of noise (a jax.Array, network space).

    ``progress(step)`` is called on the host after every step of this call
    (and only this call's). None settings take the config's ``sample.*``;
    ``T_max``/``T_min`` bound the time grid (default: the transport's).
    ``step_noise`` (``(num_steps,) + noise.shape``) gives the stochastic
    steps' standard-normal draws instead of drawing them from ``rng``.
    ``last_step_noise=False`` keeps the diffusion mode's last step
    deterministic (``sampling.sample``).
    """
    settings = self.settings(
      num_steps,
      cfg_scale,
      guidance_interval,
      stochasticity,
      mode,
      progress is not None,
      T_max,
      T_min,
      last_step_noise,
    )
    params = self._params(params)
    fn = self.compiled_sampler(settings, sharding.platform_of(params))
    null = self.null_like(cond) if null is None else null
    rng = jax.random.key(0) if rng is None else rng
    call_id = next(_CALL_IDS)
    if progress is not None:
      with _HOOKS_LOCK:
        _HOOKS[call_id] = progress
    try:
      out = fn(
        params,
        noise,
        cond,
        null,
        rng,
        np.int32(call_id % 2**31),
        step_noise,
      )
      if progress is not None:
        out = jax.block_until_ready(out)
        jax.effects_barrier()  # Every step reported before the hook goes.
      return out
    finally:
      if progress is not None:
        with _HOOKS_LOCK:
          _HOOKS.pop(call_id, None)

  def generate(
    self,
    cond: ArrayLike | Mapping[str, ArrayLike],
    *,
    num_steps: int,
    num: int = 1,
    cfg_scale: float | None = None,
    guidance_interval: Sequence[float] | None = None,
    stochasticity: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    mode: str | None = None,
    image_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
    desc: str = "sampling",
    params: nnx.State | None = None,
    check_finite: bool = True,
    T_max: float | None = None,
    T_min: float | None = None,
    noise: ArrayLike | None = None,
    step_noise: ArrayLike | None = None,
    last_step_noise: bool = True,
  ) -> np.ndarray:
    """``num`` samples per row of ``cond`` (row-major: all of row 0 first),
    in network space (pixels in [-1, 1] for pixel models), as numpy.

    Every image's noise comes from ``seed`` and its index, whatever the
    batch size; it is drawn batch by batch. Batches have a fixed size (the
    last one is padded), so the sampler compiles once. With
    ``check_finite`` a batch holding a non-finite value raises
    ``NonFiniteSamplesError`` at once (diverged or damaged weights).

    To replay another sampler's run exactly (e.g. the official scripts'):
    ``noise`` gives every image's initial state, (rows * num, H, W, C) in
    network space (it fixes the size), ``step_noise`` the stochastic steps'
    standard-normal draws, (num_steps, rows * num, H, W, C), and
    ``T_max``/``T_min`` the time grid's bounds (default: the transport's).
    ``last_step_noise=False`` keeps the diffusion mode's last step
    deterministic (``sampling.sample``).
    """
    settings = self.settings(
      num_steps,
      cfg_scale,
      guidance_interval,
      stochasticity,
      mode,
      T_max=T_max,
      T_min=T_min,
      last_step_noise=last_step_noise,
    )
    if num < 1:
      raise UserError(f"num must be >= 1, got {num}")
    if batch_size < 1:
      raise UserError(f"batch_size must be >= 1, got {batch_size}")
    rows = jax.tree.leaves(cond)[0].shape[0]
    total = rows * num
    size = int(image_size or self.config.sample.image_size)
    height, width = int(height or size), int(width or size)
    channels = self.model_config.in_channels
    if noise is not None:
      noise = np.asarray(noise)
      if (
        noise.ndim != 4
        or noise.shape[0] != total
        or noise.shape[3] != (channels)
      ):
        raise UserError(
          f"noise has shape {noise.shape}; expected ({total}, H, W, "
          f"{channels}): one initial state per image ({rows} rows x {num})"
        )
      height, width = (int(v) for v in noise.shape[1:3])
    if step_noise is not None:
      step_noise = np.asarray(step_noise)
      want = (settings.num_steps, total, height, width, channels)
      if step_noise.shape != want:
        raise UserError(
          f"step_noise has shape {step_noise.shape}; expected {want} "
          "(steps, images, H, W, C)"
        )
    patch = self.model_config.patch_size
    if height % patch or width % patch or min(height, width) < patch:
      raise UserError(
        f"the network-space size {height}x{width} must be a "
        f"positive multiple of the patch size {patch}"
      )
    index = np.repeat(np.arange(rows), num)
    all_cond = jax.tree.map(lambda c: np.asarray(c)[index], cond)
    shape = (height, width, channels)
    base = jax.random.key(seed)
    draw = jax.jit(
      jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))
    )
    bs = min(int(batch_size), total)

    bar = None
    if progress:
      from tqdm.auto import tqdm

      batches = -(-total // bs)
      bar = tqdm(
        total=batches * settings.num_steps, desc=desc, unit="step", leave=False
      )
    update = (lambda _: bar.update(1)) if bar is not None else None
    out = []
    try:
      for start in range(0, total, bs):
        stop = min(start + bs, total)
        pad = bs - (stop - start)
        take = np.concatenate(
          [np.arange(start, stop), np.full(pad, stop - 1, np.int64)]
        )
        batch_cond = jax.tree.map(lambda c: c[take], all_cond)
        rng = jax.random.fold_in(jax.random.key(seed + 1), start)
        images = self.sample(
          draw(take) if noise is None else jnp.asarray(noise[take]),
          batch_cond,
          num_steps=settings.num_steps,
          cfg_scale=settings.cfg_scale,
          guidance_interval=settings.guidance_interval,
          stochasticity=settings.stochasticity,
          rng=rng,
          mode=settings.mode,
          progress=update,
          params=params,
          T_max=settings.T_max,
          T_min=settings.T_min,
          step_noise=None if step_noise is None else step_noise[:, take],
          last_step_noise=settings.last_step_noise,
        )
        out.append(np.asarray(jax.device_get(images))[: bs - pad])
        if check_finite and not np.isfinite(out[-1]).all():
          bad = int(
            (~np.isfinite(out[-1])).reshape(len(out[-1]), -1).any(axis=1).sum()
          )
          raise NonFiniteSamplesError(
            f"{bad} of the {len(out[-1])} samples of images {start}-"
            f"{stop - 1} hold non-finite values: the weights are diverged "
            "or damaged"
          )
    finally:
      if bar is not None:
        bar.close()
    return np.concatenate(out)

  def __call__(
    self,
    prompts: Sequence[str] = (),
    labels: Sequence[int] = (),
    *,
    num_steps: int,
    num_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    **sampler,
  ) -> np.ndarray:
    """Prompts or labels to pictures in one call: uint8 (N, H, W, 3),
    ``num_per_prompt`` per prompt or label (all of the first one first).

    ``height`` and ``width`` are in pixels (default: the config's sample
    size); ``sampler`` takes ``generate``'s settings (``cfg_scale``,
    ``guidance_interval``, ``stochasticity``, ``seed``, ``batch_size``,
    ``mode``, ``progress``). Latent models decode with their autoencoder.
    """
    if not self.can_decode:
      raise UserError(
        f"decoding {self.config.autoencoder.name!r} latents needs the "
        "autoencoder: load with autoencoder_path=DIR, or use generate() "
        "for the latents"
      )
    cond, _ = self.conditions(prompts, labels)
    if height or width:
      side = int(self.config.sample.image_size) * self.downsample
      sampler["height"], sampler["width"] = self.network_size(
        height or side, width or side
      )
    x = self.generate(cond, num_steps=num_steps, num=num_per_prompt, **sampler)
    return images.to_uint8(self.decode(x), self.kind)

  # --- decoding -------------------------------------------------------------------

  @property
  def can_decode(self) -> bool:
    """Pixel-space models, and latent ones whose ``autoencoder.path`` is
    set."""
    a = self.config.autoencoder
    return a.name == "identity" or bool(a.get("path"))

  @property
  def downsample(self) -> int:
    """Pixels per network-space position (1 in pixel space)."""
    a = self.config.autoencoder
    if a.name != "identity" and self.can_decode:
      return self.autoencoder.downsample
    return autoencoders.DOWNSAMPLE[a.name]

  def network_size(self, height: int, width: int) -> tuple:
    """The network-space (latent) height and width of a ``height`` x
    ``width``-pixel image; ValueError when the autoencoder's downsampling
    times the patch size does not divide it."""
    a = self.config.autoencoder
    factor = self.downsample
    step = factor * self.model_config.patch_size
    if height % step or width % step or min(height, width) < step:
      raise UserError(
        f"{height}x{width} pixels: with autoencoder {a.name!r} "
        f"(downsampling {factor}) and patch size "
        f"{self.model_config.patch_size}, height and width must be "
        f"positive multiples of {step}"
      )
    return height // factor, width // factor

  @property
  def autoencoder(self) -> autoencoders.Autoencoder:
    """The config's autoencoder (read on first use, then kept)."""
    if self._autoencoder is None:
      self._autoencoder = autoencoders.from_config(self.config)
    return self._autoencoder

  def decode(self, x: ArrayLike, check_finite: bool = True) -> np.ndarray:
    """Network space -> images in [-1, 1] (float32 numpy). Pixel-space
    models: the input. Latent models: the autoencoder's decoder, in batches
    of ``decode_batch`` images (the last one padded). With
    ``check_finite``, non-finite pixels raise ``NonFiniteSamplesError``
    (a damaged decoder would otherwise write black pictures)."""
    if self.config.autoencoder.name == "identity":
      return np.asarray(x, np.float32)
    ae = self.autoencoder
    x = np.asarray(x, np.float32)
    f = ae.downsample
    bs = decode_batch(self.config, len(x), x.shape[1] * f, x.shape[2] * f)
    out = []
    for start in range(0, len(x), bs):
      chunk = x[start : start + bs]
      n = len(chunk)
      if n < bs:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, 0)])
      out.append(np.asarray(jax.device_get(ae.decode(chunk)), np.float32)[:n])
    pixels = np.concatenate(out)
    if check_finite and not np.isfinite(pixels).all():
      bad = int((~np.isfinite(pixels)).reshape(len(pixels), -1).any(1).sum())
      raise NonFiniteSamplesError(
        f"the decoder ({self.config.autoencoder.name}, "
        f"{self.config.autoencoder.path}) gave non-finite pixels for {bad} "
        f"of {len(pixels)} images: its weights are damaged or do not fit"
      )
    return pixels
