"""Times the forward pass, the train steps and the sampler.

    python -m tim_jax.commands.bench --config=configs/c2i.py --batch_size=64 \
        [--out=bench.json]

Every function is compiled and warmed up first, then timed as the median of
``--repeats`` runs, each ending in ``block_until_ready``. Reported per row:
seconds, images/s, tokens/s, model FLOPs (``tim_jax.models.flops``), achieved FLOP/s
and, where the device's peak is known and the compute dtype is bfloat16, the
model FLOPs utilisation (MFU), and the share of the ``matmul`` row's rate.

``matmul`` (first, unless ``--matmul_size=0`` or ``--rows`` leaves it
out) times one square matmul of ``--matmul_size`` (2048 suits CPUs; give
accelerators 8192 or more, or dispatch dominates) in the compute dtype:
the device's practical FLOP/s ceiling, which a step built of smaller
matmuls, attention and elementwise work approaches but does not reach;
every other row prints its achieved FLOP/s as a share of it.

Rows: ``forward``, ``forward_2x`` (doubled batch, what a CFG step costs),
``tim_dde_step`` and ``tim_jvp_step`` (the full train step: loss, gradient,
AdamW, EMA, and the REPA teacher when the config has one),
``repa_teacher`` (the teacher alone, when the config has one: its file's
weights, or RADIO v2.5-B's architecture with random weights), ``fm_step`` (the same step as flow matching: every row a
diffusion row, no derivative), ``sample_nfe{N}`` and ``sample_nfe{N}_cfg``
(guidance on every step).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp

from tim_jax.commands import cli
from tim_jax.core import host_memory
from tim_jax.core.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_config(fv, "A config file with an optional ':variant'.")
  flags.DEFINE_integer(
    "batch_size", 64, "Global batch size.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "repeats",
    10,
    "Timed runs per row (median reported).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_list(
    "num_steps", ["1", "4", "16"], "Sampler step counts.", flag_values=fv
  )
  flags.DEFINE_list(
    "rows", [], "Only these rows (default: all).", flag_values=fv
  )
  flags.DEFINE_string(
    "out", "", "Also write the results as JSON here.", flag_values=fv
  )
  flags.DEFINE_integer(
    "matmul_size",
    2048,
    "Side of the square matmul "
    "whose rate is the reference row 'matmul' (0: no "
    "such row).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.mark_flags_as_required(["config"], flag_values=fv)


def time_fn(fn, *args, repeats=10):
  """Median seconds of ``fn(*args)`` after one compile + warm-up call."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_time(size: int, dtype, repeats: int = 10) -> float:
  """Median seconds of one (size x size) @ (size x size) matmul in
  ``dtype`` on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  return time_fn(jax.jit(jnp.matmul), a, b, repeats=repeats)


def row_names(nfes: Sequence[int]) -> list[str]:
  """Every row this command can time, for the sampler step counts ``nfes``."""
  names = [
    "matmul",
    "forward",
    "forward_2x",
    "tim_dde_step",
    "tim_jvp_step",
    "fm_step",
    "repa_teacher",
  ]
  for n in nfes:
    names += [f"sample_nfe{n}", f"sample_nfe{n}_cfg"]
  return names


def run(config, batch, repeats, nfes, rows=(), matmul_size: int = 2048):
  from tim_jax import training
  from tim_jax.config import builders
  from tim_jax.core import sharding
  from tim_jax.data import kinds
  from tim_jax.models import flops as flops_lib

  want = lambda name: not rows or name in rows

  # The REPA teacher, when the config has one: the file's, or RADIO
  # v2.5-B's architecture with random weights (same cost) when no file is
  # given; the projector's width follows the teacher's.
  teacher = None
  if config.loss_extras.get("repa_encoder", "none") != "none":
    from tim_jax.encoders import radio  # pylint: disable=g-import-not-at-top

    dtype = builders.compute_dtype(config)
    teacher = (
      radio.load(config.loss_extras.repa_encoder_path, dtype=dtype)
      if config.loss_extras.repa_encoder_path
      else radio.random_encoder(dtype=dtype)
    )

  def variant(**loss):
    c = config.copy_and_resolve_references()
    c.unlock()
    c.batch_size = batch
    c.loss_extras.repa_feature_key = ""
    if teacher is not None:
      c.model.network.z_dim = teacher.dim
    for k, v in loss.items():
      c.loss[k] = v
    return c

  trainer = training.Trainer(variant(), repa_encoder=teacher)
  pipe = trainer.pipeline
  mc = trainer.model_config
  size = config.data.image_size
  tokens = (size // mc.patch_size) ** 2
  cap_len = kinds.caption_length(config)
  host = kinds.synthetic_batch(config, batch, caption_len=cap_len or 32)
  data = sharding.global_batch(host, trainer.mesh)
  state = trainer.init_state()
  y = trainer.conditioner(data)
  x = data["image"]
  t = jnp.full((batch,), 0.7)
  r = jnp.full((batch,), 0.3)
  share = trainer.loss_config.counts(batch)[0] / (
    batch // trainer.loss_config.groups
  )
  results = []
  ceiling = {}

  def record(name, seconds, images, model_flops):
    row = {
      "name": name,
      "seconds": seconds,
      "images_per_s": images / seconds,
      "tokens_per_s": images * tokens / seconds,
      "model_flops": model_flops,
      "flops_per_s": model_flops / seconds if model_flops else None,
    }
    peak = flops_lib.peak_flops(jax.devices()[0])
    if peak and row["flops_per_s"] and config.model.dtype == "bfloat16":
      row["mfu"] = row["flops_per_s"] / (peak * jax.device_count())
    if ceiling and row["flops_per_s"]:
      row["of_matmul"] = row["flops_per_s"] / (
        ceiling["flops_per_s"] * jax.device_count()
      )
    results.append(row)
    print(
      f"{name:22s} {seconds * 1e3:10.2f} ms  {row['images_per_s']:9.1f} "
      f"img/s  {(row['flops_per_s'] or 0) / 1e12:8.3f} TFLOP/s"
      + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else "")
      + (f"  {row['of_matmul']:.0%} of matmul" if "of_matmul" in row else ""),
      flush=True,
    )

  if matmul_size and want("matmul"):
    seconds = matmul_time(matmul_size, builders.compute_dtype(config), repeats)
    flops = 2.0 * matmul_size**3
    # One device's rate; the steps run on all of them.
    ceiling.update(
      name="matmul",
      size=matmul_size,
      seconds=seconds,
      model_flops=flops,
      flops_per_s=flops / seconds,
    )
    results.append(dict(ceiling))
    print(
      f"{'matmul':22s} {seconds * 1e3:10.2f} ms  {matmul_size}^2 "
      f"{flops / seconds / 1e12:8.3f} TFLOP/s (the reference rate)",
      flush=True,
    )

  count = lambda step, **kw: flops_lib.step_flops(
    mc, batch, size, size, cap_len, step=step, diffusion_share=share, **kw
  )

  fwd = jax.jit(lambda p, x, t, r, y: pipe.network(p)(x, t, r, y))
  if want("forward"):
    record(
      "forward",
      time_fn(fwd, state.params, x, t, r, y, repeats=repeats),
      batch,
      count("forward"),
    )
  if want("forward_2x"):
    x2, t2, r2 = (jnp.concatenate([a, a]) for a in (x, t, r))
    y2 = jnp.concatenate([y, y])
    record(
      "forward_2x",
      time_fn(fwd, state.params, x2, t2, r2, y2, repeats=repeats),
      2 * batch,
      2 * count("forward"),
    )

  teacher_flops = 0.0
  if teacher is not None:
    c = teacher.config
    pixels_hw = data.get("pixels", x).shape[1:3]
    teacher_flops = flops_lib.repa_teacher_flops(
      embed_dim=c.embed_dim,
      depth=c.depth,
      mlp_hidden=c.mlp_hidden,
      patch_size=c.patch_size,
      num_skip=c.num_skip,
      table=c.table,
      batch=batch,
      grid=(size // mc.patch_size, size // mc.patch_size),
      image_hw=pixels_hw,
    )

  steps = {
    "tim_dde_step": dict(derivative="dde"),
    "tim_jvp_step": dict(derivative="jvp"),
    "fm_step": dict(diffusion_ratio=1.0, consistency_ratio=0.0),
  }
  for name, loss in steps.items():
    if not want(name):
      continue
    tr = training.Trainer(variant(**loss), trainer.mesh, repa_encoder=teacher)
    st = tr.init_state()
    # Not donated: the same state is timed again and again.
    step = tr.jit_step(data, donate=False)
    record(
      name,
      time_fn(step, st, data, repeats=repeats),
      batch,
      count(name) + teacher_flops,
    )

  if teacher is not None and want("repa_teacher"):
    pixels = data.get("pixels", x)
    run_teacher = jax.jit(
      lambda s, px: trainer.repa_target({"image": x, "pixels": px}, s)
    )
    record(
      "repa_teacher",
      time_fn(run_teacher, trainer.frozen, pixels, repeats=repeats),
      batch,
      teacher_flops,
    )

  noise = jax.random.normal(jax.random.key(0), x.shape)
  for n in nfes:
    for cfg in (False, True):
      name = f"sample_nfe{n}" + ("_cfg" if cfg else "")
      if not want(name):
        continue
      sampler = lambda p, z: pipe.sample(
        z,
        y,
        num_steps=n,
        cfg_scale=2.0 if cfg else 1.0,
        guidance_interval=(0.0, 2.0),
        params=p,
      )
      record(
        name,
        time_fn(sampler, state.params, noise, repeats=repeats),
        batch,
        count("sample", num_steps=n, guided_steps=n if cfg else 0),
      )
  return {
    "device": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
    "batch": batch,
    "image_size": size,
    "tokens": tokens,
    "dtype": config.model.dtype,
    "network": dict(config.model.network),
    "date": time.strftime("%Y-%m-%d"),
    "rows": results,
  }


def main(fv: flags.FlagValues, args) -> None:
  if args:
    raise UserError(f"unexpected arguments: {args}")
  from tim_jax.config import config_base  # pylint: disable=g-import-not-at-top

  config = config_base.flag_config(fv)
  try:
    nfes = [int(n) for n in fv.num_steps]
  except ValueError:
    raise UserError(
      f"--num_steps must be integers, got {fv.num_steps}"
    ) from None
  known = row_names(nfes)
  unknown = [r for r in fv.rows if r not in known]
  if unknown:
    raise UserError(
      f"--rows: no row(s) {unknown}; the rows are {', '.join(known)}"
    )
  if fv.out:
    cli.check_writable(fv.out, "--out")
  print(
    f"JAX {jax.__version__}, {jax.device_count()} x "
    f"{jax.devices()[0].device_kind}, batch {fv.batch_size}, "
    f"dtype {config.model.dtype}",
    flush=True,
  )
  result = run(
    config, fv.batch_size, fv.repeats, nfes, fv.rows, matmul_size=fv.matmul_size
  )
  result["command"] = " ".join(
    ["python -m tim_jax.commands.bench"] + sys.argv[1:]
  )
  if fv.out:
    with open(fv.out, "w") as f:
      json.dump(result, f, indent=1)
  rows = {r["name"]: r["seconds"] for r in result["rows"]}
  if "forward" in rows:
    print("relative to one forward pass:")
    for name, sec in rows.items():
      if name == "matmul":
        continue
      print(f"  {name:22s} {sec / rows['forward']:6.2f}x")


def entry() -> None:
  """The console script ``tim-bench``."""
  # Timed as the training command runs: XLA:CPU's per-call buffers on huge
  # pages (tim_jax.core.host_memory).
  host_memory.exec_with_huge_pages()
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
