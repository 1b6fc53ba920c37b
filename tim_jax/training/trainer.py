"""The trainer: the sharded train state and one jitted, donating step.

The trainer knows the method only through ``transition.loss``, and samples
only through ``tim_jax.inference`` (the same pipeline the sampling command
uses); the method knows nothing of the trainer. ``Trainer.step`` is a pure
function of (state, batch): loss, AdamW update, EMA, and a guard that skips
a non-finite or diverging update and counts it. The loop that drives it is
``tim_jax.training.loop``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
import logging
from typing import Any

from flax import nnx
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tim_jax import inference
from tim_jax.config import builders
from tim_jax.core import sharding
from tim_jax.core.errors import UserError
from tim_jax.data import conditioning
from tim_jax.method import transition
from tim_jax.models import layers
from tim_jax.training import optim
from tim_jax.weights import convert


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


# --- state and step ----------------------------------------------------------


class Trainer:
  """The static pieces and the compiled step of one run.

  ``pipeline`` (a ``tim_jax.inference.Pipeline`` without weights) holds the
  model graph, the conditioner and the transport; the trainer adds the
  optimizer, the mesh and the shardings of the train state.
  """

  def __init__(
    self,
    config,
    mesh=None,
    repa_encoder=None,
    *,
    text_encoder=None,
    abstract: bool = False,
  ):
    self.config = config
    self.mesh = mesh or sharding.make_mesh(dict(config.mesh))
    if config.batch_size % sharding.data_shards(self.mesh):
      raise UserError(
        f"batch_size {config.batch_size} is not divisible by "
        f"the {sharding.data_shards(self.mesh)} data shards of"
        f" mesh {dict(self.mesh.shape)}"
      )
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    self.pipeline = inference.Pipeline(config, text_encoder=text_encoder)
    self.model_config = self.pipeline.model_config
    self.conditioner = self.pipeline.conditioner
    self.transport = self.pipeline.transport
    self.loss_config = builders.loss_config(
      config, sharding.data_shards(self.mesh)
    )
    self.tx = optim.make(config.optimizer, config.batch_size, config.num_steps)
    # Frozen networks the step reads (not trained, not checkpointed): the
    # REPA teacher. Passed to the compiled step as an argument, replicated.
    self.repa_encoder = builders.repa_encoder(config, repa_encoder)
    frozen = {}
    if self.repa_encoder is not None:
      frozen["repa"] = self.repa_encoder.state
    if isinstance(self.conditioner, conditioning.TextConditioner):
      frozen["text"] = self.conditioner.encoder.params
    self.frozen = None
    if frozen:
      placement = sharding.frozen_shardings(frozen, self.mesh)
      # abstract: shapes and shardings only (compiling for devices this
      # host does not have; see tim_jax.commands.compile).
      self.frozen = (
        jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          frozen,
          placement,
        )
        if abstract
        else jax.device_put(frozen, placement)
      )
    # Batch shapes the step has been compiled for (one per caption or
    # aspect bucket with captioned data); see train_step.
    self.compiled_shapes = []
    self.abstract_state = jax.eval_shape(self._init)
    self.state_shardings = sharding.state_shardings(
      self.abstract_state, self.mesh, self.rules
    )
    self._compiled_step = None

  def _init(self) -> TrainState:
    params = nnx.state(builders.new_model(self.config), nnx.Param)
    key = jax.random.key_data(jax.random.key(self.config.seed))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
      step=zero,
      params=params,
      ema=params,
      opt_state=self.tx.init(params),
      rng=key,
      nonfinite_streak=zero,
      nonfinite_total=zero,
    )

  def init_state(self) -> TrainState:
    """A new train state, initialised directly in its shardings."""
    return jax.jit(self._init, out_shardings=self.state_shardings)()

  def initialise_from(
    self, state: TrainState, path: str, ignore_keys: Sequence[str] = ()
  ) -> TrainState:
    """``state`` with its parameters (and EMA) taken from a checkpoint, as
    the official ``init_from_ckpt`` does: an official file or a tim_jax run;
    parameters whose official name contains one of ``ignore_keys``, or that
    the checkpoint lacks, keep their initialisation (logged)."""
    ref = inference.resolve(path)
    if ref.format == "official":
      weights = convert.read_state_dict(ref.path)
      convert.check_kind(weights, self.config.model.kind, ref.path)
    else:
      source = inference.load(path, self.config)
      weights = convert.to_official(source.model())
    dropped = sorted(k for k in weights if any(i in k for i in ignore_keys))
    weights = {k: v for k, v in weights.items() if k not in dropped}
    model = nnx.merge(self.pipeline.graphdef, jax.device_get(state.params))
    try:
      report = convert.load_state_dict(model, weights, strict=False)
    except UserError as e:  # Another architecture: name the file.
      raise UserError(f"{path}: {e}") from None
    logging.info(
      "initialised from %s: %s; ignored by init_ignore_keys: %d (%s)",
      path,
      report,
      len(dropped),
      dropped[:5],
    )
    # Host arrays put twice: separate buffers, as the step donates both.
    # The optimizer state stays the fresh one (AdamW's moments start at 0
    # whatever the parameters).
    host = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    return state.replace(
      params=jax.device_put(host, self.state_shardings.params),
      ema=jax.device_put(host, self.state_shardings.ema),
    )

  def abstract_with_shardings(self) -> TrainState:
    """The train state's shapes, dtypes and shardings (for restoring)."""
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.abstract_state,
      self.state_shardings,
    )

  def repa_target(
    self,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any] | None = None,
  ) -> jax.Array | None:
    """REPA targets (B, N, z_dim) for ``batch``: its precomputed features
    (``loss_extras.repa_feature_key``), the frozen teacher's features of
    its pixels (``loss_extras.repa_encoder``; ``pixels`` uint8 for latent
    data, the images themselves in pixel space), or None."""
    key = self.config.loss_extras.repa_feature_key
    if key:
      return batch[key]
    if self.repa_encoder is None:
      return None
    if frozen is None:
      raise ValueError(
        "this config's REPA teacher needs the frozen state: pass trainer.frozen"
      )
    x = batch["image"]
    pixels = batch.get("pixels", x)
    if pixels.dtype == jnp.uint8:
      pixels = pixels.astype(jnp.float32) / 127.5 - 1.0
    p = self.model_config.patch_size
    grid = (x.shape[1] // p, x.shape[2] // p)
    return jax.lax.stop_gradient(
      self.repa_encoder.apply(frozen["repa"], pixels, grid)
    )

  def loss(
    self,
    params: nnx.State,
    ema: nnx.State,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    frozen: Mapping[str, Any] | None = None,
    *,
    drop: bool = True,
    row_ids: jax.Array | None = None,
    microbatch: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The TiM loss of ``params`` on ``batch`` and its metrics, as the step
    computes it: conditions dropped for guidance (unless ``drop=False``),
    the EMA as the model-guidance teacher, REPA targets.

    The teacher sees what the official trainers give it: the undropped
    labels for class-conditional models (``trainer_c2i.py``), the dropped
    caption features for text-to-image ones (``trainer_t2i.py``)."""
    k_loss, k_drop = jax.random.split(key)
    if microbatch is not None:  # Each microbatch drops its own rows.
      k_drop = jax.random.fold_in(k_drop, microbatch)
    x = batch["image"]
    y, y_true, null = self.conditioner.training_conditions(
      batch, k_drop, frozen, drop
    )
    teacher = None
    if self.loss_config.enhance_target:
      ema_model = self.pipeline.network(ema)
      teacher = lambda *a: (jax.lax.stop_gradient(ema_model(*a)), None)
    teacher_cond = y if self.model_config.kind == "t2i" else y_true
    model = self.pipeline.model(params)
    return transition.loss(
      lambda *a: model(*a, return_projection=True),
      x,
      y,
      k_loss,
      transport=self.transport,
      config=self.loss_config,
      teacher_fn=teacher,
      teacher_cond=teacher_cond,
      null_cond=null,
      repa_target=self.repa_target(batch, frozen),
      row_ids=row_ids,
    )

  def step(
    self,
    state: TrainState,
    batch: Mapping[str, jax.Array],
    frozen: Mapping[str, Any] | None = None,
  ) -> tuple[TrainState, dict]:
    """One training step, as a pure function (not compiled; see
    ``train_step``): the TiM loss, AdamW, the EMA, and the non-finite guard
    (a step whose loss or gradient norm is not finite, or whose MSE is
    above ``config.guard_max_mse``, leaves parameters, EMA and optimizer
    state unchanged and is counted). ``frozen`` is
    ``trainer.frozen`` (the REPA teacher's weights) when the config has
    one.

    Returns the new state and the step's metrics (device arrays).
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, metrics, grads = self.gradients(
      state.params, state.ema, batch, key, frozen
    )
    return self.apply_gradients(state, loss, metrics, grads)

  def apply_gradients(
    self,
    state: TrainState,
    loss: jax.Array,
    metrics: dict[str, jax.Array],
    grads: nnx.State,
  ) -> tuple[TrainState, dict]:
    """The step after the gradients: AdamW, the EMA and the non-finite
    guard (see ``step``); returns the new state and the metrics."""
    config = self.config
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.asarray(config.ema_decay, jnp.float32)
    if config.ema_warmup:
      # Short runs: an EMA that starts at the initial (zero-output) network
      # would stay near it for ~1/(1-decay) steps.
      step = state.step.astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if config.guard_max_mse:
      # Diverged but finite: the adaptive weighting keeps `loss` near one
      # whatever the error, so the raw MSE is the one that explodes.
      finite &= metrics["mse_loss"] <= config.guard_max_mse
    keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old
    )
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      ema=keep(ema, state.ema),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(
      metrics,
      grad_norm=grad_norm,
      nonfinite_streak=new_state.nonfinite_streak,
      nonfinite_total=new_state.nonfinite_total,
    )
    return new_state, metrics

  def gradients(
    self,
    params: nnx.State,
    ema: nnx.State,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    frozen: Mapping[str, Any] | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
    """(loss, metrics, gradients) of ``params`` on ``batch``. With
    ``config.microbatches = k > 1`` each data shard's rows are cut into k
    contiguous microbatches, run one after another (``lax.scan``: activation
    memory of one microbatch) and their gradients averaged. Every row then
    draws its times and noise from its own id, and the diffusion /
    consistency rows are split per microbatch of each partition group, so
    the result equals one pass over the whole batch with ``loss.groups`` =
    data shards x k (``tests/test_train.py``); guidance dropout draws per
    microbatch."""
    k = int(self.config.microbatches)
    value_and_grad = jax.value_and_grad(self.loss, has_aux=True)
    if k == 1:
      (loss, metrics), grads = value_and_grad(params, ema, batch, key, frozen)
      return loss, metrics, grads
    shards = sharding.data_shards(self.mesh)
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % (shards * k):
      raise UserError(
        f"batch {rows} does not split into {k} microbatches (the config's "
        f"microbatches) on each of {shards} data shards"
      )
    m = rows // (shards * k)

    def split(a):  # (B, ...) -> (k, B / k, ...), rows staying on device.
      a = a.reshape((shards, k, m) + a.shape[1:])
      return jnp.swapaxes(a, 0, 1).reshape((k, shards * m) + a.shape[3:])

    def body(total, xs):
      micro, ids, j = xs
      (loss, metrics), grads = value_and_grad(
        params, ema, micro, key, frozen, row_ids=ids, microbatch=j
      )
      total = jax.tree.map(lambda t, g: t + g / k, total, grads)
      return total, (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, metrics) = jax.lax.scan(
      body,
      zeros,
      (
        jax.tree.map(split, batch),
        split(jnp.arange(rows, dtype=jnp.int32)),
        jnp.arange(k),
      ),
    )
    return (
      jnp.mean(losses),
      jax.tree.map(lambda v: jnp.mean(v, 0), metrics),
      grads,
    )

  def batch_shardings(
    self, batch: Mapping[str, jax.Array | jax.ShapeDtypeStruct]
  ) -> dict[str, jax.sharding.NamedSharding]:
    """The batch's shardings: rows over the mesh's data axes."""
    return jax.tree.map(
      lambda a: sharding.batch_sharding(self.mesh, a.ndim), batch
    )

  def layer_forms(self) -> contextlib.AbstractContextManager[None]:
    """A context in which the model's layers trace only the form for the
    platform of this trainer's mesh (``layers.forms_for``)."""
    return layers.forms_for(self.mesh.devices.flat[0].platform)

  def jit_step(
    self,
    batch: Mapping[str, jax.Array | jax.ShapeDtypeStruct],
    donate: bool = True,
  ) -> Callable[..., tuple[TrainState, dict]]:
    """``fn(state, batch)``: ``step`` compiled for batches shaped like
    ``batch``, with the state's and the batch's shardings (the frozen
    teacher, if any, goes in as a replicated argument); ``donate`` reuses
    the input state's buffers (then the state passed in must not be used
    again)."""
    compiled = self.jitted_step(batch, donate)
    return lambda state, batch: compiled(state, batch, self.frozen)

  def jitted_step(
    self,
    batch: Mapping[str, jax.Array | jax.ShapeDtypeStruct],
    donate: bool = True,
  ) -> jax.stages.Wrapped:
    """The ``jax.jit`` of ``step(state, batch, frozen)`` with its shardings
    (for ``.lower(...)``: ``jit_step`` wraps it)."""
    frozen_sharding = (
      None
      if self.frozen is None
      else jax.tree.map(lambda a: a.sharding, self.frozen)
    )

    def step(state, batch, frozen):
      # Traced with the activations pinned to the mesh (batch rows over the
      # data axes, heads and MLP units over `tensor`), and the layers in
      # the form for the mesh's platform.
      with sharding.activation_sharding(self.mesh, self.rules):
        with self.layer_forms():
          return self.step(state, batch, frozen)

    return jax.jit(
      step,
      donate_argnums=0 if donate else (),
      in_shardings=(
        self.state_shardings,
        self.batch_shardings(batch),
        frozen_sharding,
      ),
      out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
    )

  def train_step(
    self, state: TrainState, batch: Mapping[str, jax.Array]
  ) -> tuple[TrainState, dict]:
    """One compiled, state-donating step. One jitted function serves every
    batch shape (jit keeps one executable per shape); each new shape is
    logged with the count so far (``compiled_shapes``)."""
    if self._compiled_step is None:
      self._compiled_step = self.jit_step(batch)
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if shapes not in self.compiled_shapes:
      self.compiled_shapes.append(shapes)
      logging.info(
        "compiling the train step for batch shapes %s (%d distinct so far)",
        dict(shapes),
        len(self.compiled_shapes),
      )
    return self._compiled_step(state, batch)
