"""The clu-style train loop around ``Trainer``: resume, step, report, save.

``train_and_evaluate``:

* builds the mesh and the sharded train state (``eval_shape`` then ``jit``
  with ``out_shardings``), or restores the latest checkpoint in the workdir;
* runs the trainer's jitted, buffer-donating step per batch;
* reports progress (steps/s, ETA) and metrics through clu writers
  (TensorBoard and console), writes sample grids at several NFE as PNG and to
  TensorBoard, runs the evaluators of ``config.evals`` on their own
  schedules, and checkpoints every N steps and at the end;
* traces ``config.profile`` steps for TensorBoard's profile tab and keeps
  compiled programs in a persistent cache (``config.compilation_cache_dir``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np

from tim_jax.config import config_base
from tim_jax.core import images, paths, sharding, workdir_lock
from tim_jax.core.errors import UserError
from tim_jax.data import kinds
from tim_jax.training import evaluators
from tim_jax.training.trainer import NonFiniteError, Trainer, TrainState
from tim_jax.weights import checkpoint

if TYPE_CHECKING:
  from clu import metric_writers


def is_due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action runs after ``step``: every ``every`` steps
  and at the last step; never when ``every`` is 0."""
  return bool(every) and (step % every == 0 or step == total)


def write_sample_grids(
  trainer: Trainer,
  state: TrainState,
  step: int,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> list:
  """The EMA model's samples of the config's prompts or labels, one row per
  prompt or label (its text beside it) and one column per ``sample.nfe``,
  enlarged to at least ``sample.min_side`` pixels, as
  ``samples/step_<step>.png`` and a TensorBoard image; returns the paths."""
  s = trainer.config.sample
  pipe = trainer.pipeline
  if not pipe.can_decode:
    return []
  cond, names = pipe.conditions()
  n = len(names)
  shape = (n, s.image_size, s.image_size, trainer.model_config.in_channels)
  noise = jax.random.normal(jax.random.key(s.seed), shape)
  columns = []
  for nfe in s.nfe:
    out = pipe.sample(noise, cond, num_steps=int(nfe), params=state.ema)
    columns.append(images.to_uint8(pipe.decode(out), pipe.kind))
  # (nfe, n, ...) -> rows of prompts, columns of NFE.
  tiles = np.stack(columns, axis=1).reshape((-1,) + columns[0].shape[1:])
  cfg = pipe.settings(1).cfg_scale
  guidance = f", cfg {cfg:g}" if cfg > 1 else ""
  picture = images.annotated_grid(
    tiles,
    cols=len(s.nfe),
    row_labels=names,
    col_labels=[f"{nfe} NFE" for nfe in s.nfe],
    title=f"step {step}, EMA weights{guidance}",
    min_side=s.min_side,
  )
  path = paths.join(workdir, "samples", f"step_{step:07d}.png")
  if jax.process_index() == 0:
    images.save_png(path, picture)
  writer.write_images(step, {"samples": picture[None]})
  return [path]


def compilation_cache_dir(
  config: ml_collections.ConfigDict, workdir: str
) -> str | None:
  """Where ``config.compilation_cache_dir`` puts JAX's persistent cache, or
  None for none (see the field's comment)."""
  value = config.get("compilation_cache_dir", "")
  if value == "none":
    return None
  if value:
    return value
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  # Joined as text: a gs:// workdir stays a URL.
  return env or f"{os.fspath(workdir).rstrip('/')}/compilation_cache"


def use_compilation_cache(directory: str | None) -> None:
  """Points JAX's persistent compilation cache at ``directory`` (None: off)
  for the programs compiled from now on in this process."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", directory)
  # The cache is set up at the first compile; later ones would keep the old
  # directory without this.
  compilation_cache.reset_cache()
  if directory:
    logging.info("compilation cache: %s", directory)


class StepTracer:
  """Traces steps ``[first, first + num)`` with ``jax.profiler`` into
  ``logdir`` (what TensorBoard's profile tab reads).

  Written here rather than with clu's ``periodic_actions.Profile``, which
  stops the trace without waiting for the traced steps' device work and
  leaves it open when a run ends inside the window.
  """

  def __init__(self, logdir: str, first: int, num: int):
    self.logdir, self.first, self.last = logdir, first, first + num - 1
    self.enabled, self.running = num > 0, False

  def before(self, step: int) -> None:
    """Called before running ``step`` (1-based)."""
    if self.enabled and step == self.first and not self.running:
      jax.profiler.start_trace(self.logdir)
      self.running = True
      logging.info("profiling steps %d-%d", self.first, self.last)

  def after(self, step: int, state: TrainState) -> None:
    """Called after dispatching ``step``: stops after the last traced one,
    once its computation is done."""
    if self.running and step >= self.last:
      self.stop(state)

  def stop(self, state: TrainState | None = None) -> None:
    """Ends a running trace once ``state`` is computed (no-op otherwise)."""
    if self.running:
      try:
        jax.block_until_ready(state)
      finally:  # Even a failed step's trace is closed and written.
        jax.profiler.stop_trace()
      self.running = False
      logging.info("wrote the profile under %s", self.logdir)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains per ``config``, writing everything under ``workdir``.

  Returns the final TrainState.
  """
  config_base.check(config)  # A knob out of range stops before any work.
  workdir = paths.absolute(workdir)  # A local folder or gs://bucket/...
  if paths.as_path(workdir).is_file():
    raise UserError(f"--workdir={workdir} is a file, not a directory")
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  use_compilation_cache(compilation_cache_dir(config, workdir))
  # One trainer per workdir: a second one stops here, naming the first.
  lock = workdir_lock.acquire(
    workdir,
    "trainer",
    jax.process_index(),
    agree=agree_across_processes if jax.process_count() > 1 else None,
  )
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def agree_across_processes(ok: bool) -> bool:
  """Process 0's ``ok`` on every process of a multi-process job."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """``train_and_evaluate`` once the workdir is this process's."""
  from clu import metric_writers, periodic_actions

  # Before any work: an unwritable checkpoint folder would otherwise show
  # only at the first save.
  checkpoint.check_writable(paths.join(workdir, "checkpoints"))
  config_dict = config_base.to_json(config)
  ckpt = checkpoint.Checkpointer(
    paths.join(workdir, "checkpoints"),
    keep=config.keep_checkpoints,
    asynchronous=config.async_checkpoints,
  )
  ckpt.check_compatible(config_dict)  # Before anything is written.
  source = kinds.source(config)  # Missing data stops here, early.
  kinds.check_source(config, source)  # So does data of another shape.
  trainer = Trainer(config)
  if config.sample.every and not trainer.pipeline.can_decode:
    raise ValueError(
      f"sample.every={config.sample.every} decodes the samples with "
      f"{config.autoencoder.name!r}: set --config.autoencoder.path (its "
      "hub id, e.g. hf://stabilityai/sd-vae-ft-ema, or a diffusers "
      "directory of it) or --config.sample.every=0"
    )
  if config.sample.every and config.autoencoder.name != "identity":
    _ = trainer.pipeline.autoencoder  # Read now: a bad directory stops here.
  data_iter = kinds.iterator(
    config, source, trainer.conditioner, sharding.data_shards(trainer.mesh)
  )

  start, state = ckpt.restore_latest(
    trainer.abstract_with_shardings(), data_iter
  )
  if start is None:
    state = trainer.init_state()
    if config.init_from:
      state = trainer.initialise_from(
        state, config.init_from, tuple(config.init_ignore_keys)
      )
    start = 0
    logging.info(
      "initialised a new model (%d parameters)",
      sum(
        int(np.prod(a.shape))
        for a in jax.tree.leaves(trainer.abstract_state.params)
      ),
    )
  else:
    logging.info("resumed from step %d in %s", start, ckpt.directory)
    if start >= config.num_steps:
      logging.info(
        "nothing to train: the checkpoint is at step %d and "
        "num_steps is %d (raise --config.num_steps to go on)",
        start,
        config.num_steps,
      )
      ckpt.close()
      return state

  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0
  )
  if start == 0:
    writer.write_hparams(
      {
        k: v
        for k, v in _flat(config_dict).items()
        if isinstance(v, (int, float, str, bool))
      }
    )
  total = config.num_steps
  # Progress (steps/s, ETA) and where the loop's time went: the share of
  # each timed part below, cumulative, in every progress line of the log.
  progress = periodic_actions.ReportProgress(
    num_train_steps=total, writer=writer, every_steps=config.log_every
  )
  hooks = [progress]
  # Python's wall time in each part (no extra device syncs): with async
  # dispatch the device's step shows in "step" (waiting on the previous
  # step's metrics) and "dispatch" (when the queue is full).
  timed = lambda name: progress.timed(name, wait_jax_async_dispatch=False)
  evals = evaluators.build(config, trainer)
  tracer = StepTracer(
    workdir, int(config.profile.first_step), int(config.profile.num_steps)
  )

  pending = None  # The previous step's metrics (the guard lags a step).
  accumulated = []
  step = start
  t0 = time.time()
  try:
    while step < total:
      with timed("data"):
        batch = sharding.global_batch(
          kinds.host_batch(config, trainer.conditioner, next(data_iter)),
          trainer.mesh,
        )
      tracer.before(step + 1)
      with timed("dispatch"):
        state, metrics = trainer.train_step(state, batch)
      step += 1
      tracer.after(step, state)
      if pending is not None:
        with timed("step"):
          streak = int(pending["nonfinite_streak"])
        if streak >= config.max_nonfinite_steps:
          raise NonFiniteError(
            _guard_stop_message(
              streak, step - 1, jax.device_get(pending), ckpt, config
            )
          )
      pending = metrics
      accumulated.append(metrics)
      if is_due(step, config.log_every, total):
        with timed("metrics"):
          summary = jax.device_get(accumulated)
          accumulated = []
          means = {
            k: float(np.mean([m[k] for m in summary])) for k in summary[0]
          }
          means["nonfinite_total"] = float(summary[-1]["nonfinite_total"])
          writer.write_scalars(step, means)
      if is_due(step, config.sample.every, total):
        with timed("grids"):
          write_sample_grids(trainer, state, step, workdir, writer)
      for name, evaluator in evals.items():
        if is_due(step, evaluator.every, total):
          t_eval = time.time()
          with timed(name):
            writer.write_scalars(step, evaluator(trainer, state))
          logging.info("evaluator %s took %.1f s", name, time.time() - t_eval)
      # The final step is always saved (checkpoint_every=0: only it).
      if step == total or is_due(step, config.checkpoint_every, total):
        streak_now = int(metrics["nonfinite_streak"])
        if streak_now and (
          step < total or streak_now >= config.max_nonfinite_steps
        ):
          # The state is the last good one, but the run is in a bad streak:
          # keep the checkpoints from before it (the last step still saves
          # unless the run is about to stop on the streak).
          logging.warning(
            "not saving step %d: the guard rejected the last %d step(s)",
            step,
            streak_now,
          )
        else:
          with timed("checkpoint"):
            ckpt.save(step, state, data_iter, config_dict, force=True)
      # Last, so that a progress line counts this step's grids, evaluators
      # and checkpoint.
      for hook in hooks:
        hook(step)
    streak = int(jax.device_get(state.nonfinite_streak))
    if streak >= config.max_nonfinite_steps:
      raise NonFiniteError(
        _guard_stop_message(streak, step, jax.device_get(pending), ckpt, config)
      )
  finally:
    tracer.stop(state)
    ckpt.close()
    writer.flush()
  logging.info("finished %d steps in %.1f s", total - start, time.time() - t0)
  return state


def _guard_stop_message(
  streak: int, last: int, metrics: dict, ckpt, config
) -> str:
  """Why the run stops and what is on disk to resume from (true at the time
  of writing: in-flight saves are waited for)."""
  first = last - streak + 1
  cause = (
    "not finite"
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))
    else f"MSE {float(metrics['mse_loss']):.3g} above guard_max_mse="
    f"{config.guard_max_mse:g}"
  )
  text = (
    f"{streak} bad steps in a row (steps {first}-{last}; the last: "
    f"loss {float(metrics['loss']):.4g}, gradient norm "
    f"{float(metrics['grad_norm']):.4g}, {cause}); stopping."
  )
  ckpt.wait()
  steps = sorted(ckpt.manager.all_steps())
  if not steps:
    return text + (
      " No checkpoint was written: there is nothing to resume "
      "from. Lower the learning rate or check the data, and "
      "start again."
    )
  text += f" Checkpoints on disk: steps {steps}."
  if steps[-1] == first - 1:
    earlier = [s for s in steps if s < first - 1]
    text += (
      f" Step {steps[-1]} holds the weights that the first bad step "
      "started from: if the loss exploded rather than the data "
      "turning non-finite, they may be diverged already"
      + (f" (the earlier steps {earlier} are not)." if earlier else ".")
    )
  else:
    text += f" The latest, step {steps[-1]}, predates the bad streak."
  return text + (
    " Lower the learning rate or check the data, then re-run "
    "with the same --workdir to resume from the latest "
    "checkpoint (delete newer step directories to resume from "
    "an earlier one)."
  )


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}.{k}" if prefix else k
    if isinstance(v, dict):
      out.update(_flat(v, key))
    else:
      out[key] = v
  return out
