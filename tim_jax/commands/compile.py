"""Compiles the real steps for a TPU slice without one.

    python -m tim_jax.commands.compile --config=configs/c2i.py:xl2_256 \\
        --topology=v5p:4x4x2 [--config.mesh.fsdp=8] [--batch_size=512] \\
        [--sweep] [--out=report.json]

With ``libtpu`` installed (the ``tpu`` extra: the version ``jax[tpu]``
pins), ``jax.experimental.topologies`` describes a slice's devices on any
host and the TPU compiler compiles for them. This command builds the
config's train step (the trainer's own ``jax.jit``, its shardings and its
frozen teacher and text encoder, all as shapes) and one sampler step with
and without guidance, compiles them for the topology and reports, per
device:

* HBM: argument, output, temporary and total bytes against the device's
  capacity ("fits" or "DOES NOT FIT"; where the compiler itself refuses
  the program for want of HBM, the command stops with "DOES NOT FIT", the
  compiler's figures and the knobs that save memory, and a sweep goes on
  to the next mesh and ranks the refused one last, with its reason);
* FLOPs: XLA's count beside ``tim_jax.models.flops``' model FLOPs, the
  roofline time of libtpu's cost model (``optimal_seconds``; where XLA gives
  none, max(FLOPs / peak, bytes / HBM bandwidth)) and the cost-model MFU
  estimate it implies (model FLOPs over that time at the chips' peak: an
  estimate from a cost model, neither a measurement nor a bound). XLA's
  cost analysis counts a loop body once (scanned blocks, the sampler's
  loop, the microbatch loop), so for a program with a loop the time
  undercounts and no MFU is given: use ``--extrapolate``;
* collectives in the optimized HLO: count and bytes per kind (all-reduce,
  all-gather, reduce-scatter, all-to-all, collective-permute);
* lowering and compile seconds on this host.

``--sweep`` compiles every mesh (data x fsdp x tensor, tensor dividing the
heads) and each ``--sweep_batches`` choice and ranks those that fit by
roofline time per example.

``--extrapolate`` adds the train step's roofline at full depth from two
small unrolled compiles (depth 1 and 2; their difference is one block;
with microbatches, one microbatch's rows counted k times): XLA counts a
loop body once (scanned blocks, microbatches), and compiling the unrolled
depth takes minutes. With ``--sweep`` the ranking uses it.
``--sweep_meshes=4x4x1,1x16x1`` limits the sweep to those meshes (data x
fsdp x tensor).

``--unroll_teacher`` loops the REPA teacher's blocks (the trainer scans
them), so that with ``model.scan_blocks=False`` XLA's cost covers the whole
step.

``--topology=h100x8`` (or ``h200x8``, ``a100x8``) compiles for a node of
eight NVIDIA cards with XLA:GPU instead (``tim_jax.commands.gpu_compile``:
memory per card, a roofline from tim_jax's FLOP count).

``--sample`` compiles sampling instead, on one device, as the notebook runs
it (``compile_sampling``): the caption encoder, the sampler and the
decoder (``--autoencoder_config``), their HBM with every part's weights
resident, and the cost model's time per image::

    python -m tim_jax.commands.compile --config=configs/t2i.py:xl \\
        --topology=v5e:1x1 --sample --sample_steps=8 --height=1024 \\
        --width=1024 --autoencoder_config=hf://mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sys
import time

# Compiling needs libtpu's compiler, not the chips: let it load beside other
# processes that hold libtpu's host lock file (set before JAX starts).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np

from tim_jax.commands import cli, gpu_compile
from tim_jax.config import config_base
from tim_jax.core.errors import UserError

GIB = 2**30
# Per chip, by device_kind: HBM bytes and bytes/s (the peak FLOP/s come
# from tim_jax.models.flops.peak_flops, as the benchmark's).
CHIPS = {
  "TPU v4": (32 * GIB, 1.2e12),
  "TPU v5 lite": (16 * GIB, 0.819e12),
  "TPU v5": (95 * GIB, 2.765e12),  # v5p
  "TPU v6 lite": (32 * GIB, 1.64e12),
}
# Per chip, bidirectional inter-chip interconnect bytes/s, from Cloud TPU's
# system architecture pages (docs.cloud.google.com/tpu/docs/v5e, v5p, v6e);
# v4's page gives no figure in bytes/s, so none here.
ICI = {
  "TPU v5 lite": 400e9,
  "TPU v5": 1200e9,
  "TPU v6 lite": 800e9,
}
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_OP = re.compile(
  r"\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


class NoCompiler(RuntimeError):
  """libtpu, the TPU compiler, is not installed."""


def topology_devices(name: str) -> list:
  """The devices of TPU topology ``name`` (e.g. ``v5p:4x4x2``), or of a GPU
  node (``h100x8``: ``gpu_compile``), on any host."""
  if gpu_compile.is_gpu_topology(name):
    return gpu_compile.topology_devices(name)
  if importlib.util.find_spec("libtpu") is None:
    raise NoCompiler(
      "libtpu is not installed, so the TPU compiler is not available: pip "
      f"install 'jax[tpu]=={jax.__version__}' (it works on CPU-only hosts)"
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    try:
      desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # pylint: disable=broad-except
      # A slice smaller than one host's default chips (a single v5e chip,
      # Colab's TPU): the slice is the host.
      if "chips_per_host_bounds" not in str(e):
        raise
      shape = [int(v) for v in name.partition(":")[2].split("x")]
      desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=name,
        chips_per_host_bounds=(shape + [1, 1])[:3],
      )
    return list(desc.devices)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
      f"unknown TPU topology {name!r} ({str(e).splitlines()[0][:200]}); "
      "use GENERATION:SHAPE, e.g. v4:2x2x4, v5e:8x8, v5p:4x4x2, "
      "v6e:4x8, or a GPU node: " + ", ".join(gpu_compile.TOPOLOGIES)
    ) from None


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str
  devices: int
  chips: int
  hbm_per_device: float
  peak_per_device: float
  bandwidth_per_device: float
  ici_per_device: float = float("nan")


def chip_info(devices) -> Chip:
  kind = devices[0].device_kind
  chips = len({tuple(getattr(d, "coords", (d.id,))) for d in devices})
  per_chip = len(devices) // max(chips, 1)
  from tim_jax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top

  hbm, bandwidth = (
    CHIPS.get(kind) or gpu_compile.card_memory(kind) or (float("nan"),) * 2
  )
  peak = flops_lib.peak_flops(devices[0]) or float("nan")
  return Chip(
    kind,
    len(devices),
    chips,
    hbm / per_chip,
    peak / per_chip,
    bandwidth / per_chip,
    ICI.get(kind, float("nan")) / per_chip,
  )


def collectives(hlo_text: str) -> dict[str, dict]:
  """Count and result bytes of each collective kind in optimized HLO (an
  async ``-start`` counts once, by its largest buffer)."""
  out = {k: dict(count=0, bytes=0) for k in COLLECTIVES}
  for line in hlo_text.splitlines():
    head, eq, rest = line.partition(" = ")
    m = _OP.search(rest) if eq else None
    if m is None:
      continue
    # The result type: everything between "=" and the op's name.
    sizes = [
      _DTYPE_BYTES.get(t, 4)
      * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      for t, dims in _SHAPE.findall(rest[: m.start()])
    ]
    out[m.group("op")]["count"] += 1
    if sizes:
      out[m.group("op")]["bytes"] += (
        max(sizes) if m.group("start") else sum(sizes)
      )
  return out


_COPY = re.compile(r"\s(?P<op>copy|transpose|copy-start|fusion)\(")
# A fusion that only moves data (its name starts with what it fuses).
_COPY_FUSION = re.compile(r"%(copy|transpose)[\w\-]*fusion")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


def layout_copies(hlo_text: str) -> dict:
  """Count and result bytes of the ``copy`` and ``transpose`` instructions
  of optimized HLO outside fusions (a fused transpose does not pass through
  HBM on its own), leaving out copies into another memory space (``S(n)``
  in the result's layout: the compiler's prefetches into on-chip memory):
  the layout changes the step pays in HBM traffic."""
  count, nbytes, fused = 0, 0, False
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith(" "):
      fused = "fused" in head.group("name") or "fusion" in head.group("name")
      continue
    head, eq, rest = line.partition(" = ")
    m = _COPY.search(rest) if eq and not fused else None
    if m is None or "S(" in rest[: m.start()]:
      continue
    if m.group("op") == "fusion" and not _COPY_FUSION.search(head):
      continue
    sizes = [
      _DTYPE_BYTES.get(t, 4)
      * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      for t, dims in _SHAPE.findall(rest[: m.start()])
    ]
    count += 1
    nbytes += max(sizes, default=0)
  return dict(count=count, bytes=nbytes)


class DoesNotFit(RuntimeError):
  """The TPU compiler refused a program: it needs more HBM than a device
  has."""


# JAX's persistent compilation cache writes compile-only (topology)
# executables but cannot read them back ("PjRtCompiler must be constructed
# with a Client"), so a process keeps the last few itself: a program
# compiled again (a variant that equals another, the same step in another
# report) costs its lowering only.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEEP = 8


def _compile(lowered, what: str, chip: Chip):
  """``(lowered.compile(), seconds the compile took)``, the same program
  compiled once per process; the compiler's out-of-memory refusal becomes
  a ``DoesNotFit`` that says so plainly and names the knobs that help."""
  key = (
    chip.kind,
    chip.devices,
    hashlib.sha256(lowered.as_text().encode()).hexdigest(),
  )
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message or "hbm" not in message.lower():
      raise
    detail = message.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    raise DoesNotFit(
      f"the {what} DOES NOT FIT on {chip.kind} "
      f"({chip.hbm_per_device / GIB:.1f} GiB per device); the compiler: "
      f"{(detail.splitlines() or [''])[0]} Less memory: model.remat=full "
      f"(or dots_saveable), model.scan_blocks=False (a scan keeps every "
      f"block's residuals), a larger mesh.fsdp, microbatches, or a "
      f"smaller batch."
    ) from None
  _COMPILED[key] = (compiled, time.perf_counter() - t0)
  while len(_COMPILED) > _COMPILED_KEEP:
    _COMPILED.popitem(last=False)
  return _COMPILED[key]


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _memory(compiled, chip: Chip) -> dict:
  m = compiled.memory_analysis()
  arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  total = arg + out + temp - alias
  return dict(
    argument=arg,
    output=out,
    temp=temp,
    alias=alias,
    total=total,
    capacity=chip.hbm_per_device,
    fits=bool(total <= chip.hbm_per_device),
  )


def _report(
  name,
  compiled,
  lower_s,
  compile_s,
  chip: Chip,
  model_flops: float | None,
) -> dict:
  cost = _cost(compiled)
  seconds = float(cost.get("optimal_seconds", -1.0))
  flops = float(cost.get("flops", float("nan")))
  source = "xla"
  if not seconds > 0:
    # XLA gives no estimate for some programs (-1): the plain roofline of
    # its FLOP and byte counts instead.
    seconds = max(
      flops / chip.peak_per_device,
      float(cost.get("bytes accessed", 0.0)) / chip.bandwidth_per_device,
    )
    source = "flops_and_bytes"
  text = compiled.as_text()
  loops = len(re.findall(r"\swhile\(", text))
  row = dict(
    name=name,
    lower_seconds=lower_s,
    compile_seconds=compile_s,
    memory=_memory(compiled, chip),
    xla_flops_per_device=flops,
    xla_bytes_per_device=float(cost.get("bytes accessed", float("nan"))),
    model_flops=model_flops,
    roofline_seconds=seconds,
    roofline_source=source,
    collectives=collectives(text),
    copies=layout_copies(text),
    hlo_chars=len(text),
    while_loops=loops,
  )
  if gpu_compile.is_gpu_kind(chip.kind):
    row["link_bytes"] = gpu_compile.link_bytes(text, chip.devices)
  # XLA's cost analysis counts a loop body once (scanned blocks, the
  # sampler's loop, collective-matmul loops): no MFU from an undercount.
  if model_flops and seconds > 0 and not loops:
    row["cost_model_mfu_estimate"] = mfu(model_flops, seconds, chip)
  return row


def mfu(model_flops: float, seconds: float, chip: Chip) -> float:
  """Model FLOPs over ``seconds`` at the devices' peak: with the cost
  model's roofline time, the cost-model MFU estimate."""
  return model_flops / (seconds * chip.devices * chip.peak_per_device)


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
    tree,
    shardings,
  )


def compile_steps(
  config,
  devices,
  *,
  batch: int | None = None,
  caption_len: int = 128,
  sampler: bool = True,
  unroll_teacher: bool = False,
) -> dict:
  """Compiles the train step (and sampler steps) of ``config`` for
  ``devices``; returns the report (see the module docstring).
  ``unroll_teacher`` loops over the REPA teacher's blocks instead of
  scanning them, so that XLA counts all of them."""
  from tim_jax import training  # pylint: disable=g-import-not-at-top
  from tim_jax.config import builders  # pylint: disable=g-import-not-at-top
  from tim_jax.core import sharding
  from tim_jax.data import kinds  # pylint: disable=g-import-not-at-top
  from tim_jax.models import flops as flops_lib

  c = config.copy_and_resolve_references()
  c.unlock()
  if batch:
    c.batch_size = int(batch)
  chip = chip_info(devices)
  mesh = sharding.make_mesh(dict(c.mesh), devices=devices)
  teacher = text = None
  dtype = builders.compute_dtype(c)
  if c.loss_extras.get("repa_encoder", "none") != "none":
    from tim_jax.encoders import radio  # pylint: disable=g-import-not-at-top

    teacher = radio.random_encoder(
      dtype=dtype, abstract=True, scan_blocks=not unroll_teacher
    )
    c.model.network.z_dim = teacher.dim
  if c.data.name == "captions":
    from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top

    text = gemma.abstract_encoder(
      dtype=builders.DTYPES[c.text_encoder.dtype],
      max_length=int(c.text_encoder.max_length),
    )
  c.lock()
  trainer = training.Trainer(
    c, mesh, repa_encoder=teacher, text_encoder=text, abstract=True
  )
  mc = trainer.model_config
  b = c.batch_size
  host = kinds.synthetic_batch(c, 1, caption_len=caption_len)
  key = c.loss_extras.repa_feature_key
  if key and key not in host:
    # Precomputed REPA targets (roofline_breakdown: the step without its
    # teacher), one per token of the model's patch grid.
    side = c.data.image_size // mc.patch_size
    host[key] = np.zeros(
      (1, side * side, int(c.model.network.z_dim)), np.float32
    )
  batch_sds = {
    k: jax.ShapeDtypeStruct(
      (b,) + v.shape[1:],
      v.dtype,
      sharding=sharding.batch_sharding(mesh, v.ndim),
    )
    for k, v in host.items()
  }
  size = c.data.image_size
  share = trainer.loss_config.counts(b)[0] / (b // trainer.loss_config.groups)
  loss = c.loss
  step = (
    "fm_step"
    if loss.diffusion_ratio >= 1.0 and loss.consistency_ratio == 0
    else "tim_jvp_step"
    if loss.derivative == "jvp"
    else "tim_dde_step"
  )
  cap = kinds.caption_length(c, caption_len)
  model_flops = flops_lib.step_flops(
    mc, b, size, size, cap, step=step, diffusion_share=share
  )
  if teacher is not None:
    t = teacher.config
    px = host.get("pixels", host["image"]).shape[1:3]
    model_flops += flops_lib.repa_teacher_flops(
      embed_dim=t.embed_dim,
      depth=t.depth,
      mlp_hidden=t.mlp_hidden,
      patch_size=t.patch_size,
      num_skip=t.num_skip,
      table=t.table,
      batch=b,
      grid=(size // mc.patch_size, size // mc.patch_size),
      image_hw=px,
    )
  rows = []
  t0 = time.perf_counter()
  lowered = trainer.jitted_step(batch_sds).lower(
    trainer.abstract_with_shardings(), batch_sds, trainer.frozen
  )
  t1 = time.perf_counter()
  compiled, compile_s = _compile(lowered, "train step", chip)
  rows.append(
    _report(
      "train_step",
      compiled,
      t1 - t0,
      compile_s,
      chip,
      model_flops,
    )
  )
  if sampler:
    pipe = trainer.pipeline
    params = trainer.abstract_with_shardings().ema
    noise = jax.ShapeDtypeStruct(
      (b, size, size, mc.in_channels),
      jnp.float32,
      sharding=sharding.batch_sharding(mesh, 4),
    )
    cond = _abstract_cond(c, trainer, b, caption_len, mesh)
    key = jax.ShapeDtypeStruct(
      (), jax.random.key(0).dtype, sharding=sharding.replicated(mesh)
    )
    call = jax.ShapeDtypeStruct(
      (), jnp.int32, sharding=sharding.replicated(mesh)
    )
    for guided in (False, True):
      settings = pipe.settings(
        1, 2.0 if guided else 1.0, (0.0, 2.0) if guided else None
      )
      fn = pipe.compiled_sampler(settings)
      t0 = time.perf_counter()
      with sharding.activation_sharding(mesh, trainer.rules):
        lowered = fn.lower(params, noise, cond, cond, key, call)
      t1 = time.perf_counter()
      compiled, compile_s = _compile(lowered, "sampler step", chip)
      flops = flops_lib.step_flops(
        mc,
        b,
        size,
        size,
        cap,
        step="sample",
        num_steps=1,
        guided_steps=int(guided),
      )
      rows.append(
        _report(
          "sampler_step_cfg" if guided else "sampler_step",
          compiled,
          t1 - t0,
          compile_s,
          chip,
          flops,
        )
      )
  if gpu_compile.is_gpu_kind(chip.kind):
    # XLA:GPU has no cost analysis: the roofline from tim_jax's FLOPs.
    gpu_compile.add_roofline(
      rows, chip, gpu_compile.extra_train_flops(mc, b, size, cap, text)
    )
  return dict(
    topology_kind=chip.kind,
    devices=chip.devices,
    chips=chip.chips,
    mesh=dict(mesh.shape),
    batch=b,
    batch_per_device=b / chip.devices,
    dtype=c.model.dtype,
    caption_len=cap,
    rows=rows,
  )


def _figures(row: dict) -> dict:
  """The figures of a compile that ``extrapolated_roofline`` grows."""
  return dict(
    model_flops=row["model_flops"],
    roofline_seconds=row["roofline_seconds"],
    xla_flops_per_device=row["xla_flops_per_device"],
    xla_bytes_per_device=row.get("xla_bytes_per_device", float("nan")),
    hbm_bytes=row["memory"]["total"],
    copy_bytes=row["copies"]["bytes"],
    **{kind: row["collectives"][kind]["bytes"] for kind in COLLECTIVES},
  )


def _variant(config, **changes):
  return config_base.with_overrides(config, changes)


def extrapolated_roofline(
  config,
  devices,
  *,
  batch: int | None = None,
  caption_len: int = 128,
  blocks_from: dict | None = None,
) -> dict:
  """The train step's XLA cost at the config's depth, from two small
  unrolled compiles (depth 1 and 2: the per-block cost is their
  difference): XLA's cost analysis counts a loop body once, so a scanned
  model's own compile undercounts, and compiling the unrolled full depth
  takes minutes. Checked against an unrolled XL/2 compile (the benchmarks
  page). Returns flops (per device), roofline seconds, the model FLOPs and
  the cost-model MFU estimate at full depth (none where the small compiles
  keep a loop, whose body XLA counts once), the per-device HBM the unrolled model
  would take (argument and temp bytes grown the same way: a guide for
  choosing meshes; the full compile is the measurement), and the two
  compiles' seconds. With ``microbatches`` = k the two compiles run one
  microbatch's rows in one pass and the time and FLOPs count k of them.

  ``blocks_from`` (another result of this function, for a step whose
  blocks are the same, e.g. with a frozen encoder more or less) takes the
  per-block figures from there and compiles depth 1 alone."""
  depth = int(config.model.network.depth)
  # XLA counts the microbatch loop's body once too: compile one
  # microbatch's rows in one pass (about the microbatched step's memory,
  # less its gradient accumulator) and count it k times (the optimizer
  # update then k times as well: a slight overestimate of the step).
  k = int(config.get("microbatches", 1))
  total = int(batch or config.batch_size)
  if k < 1 or total % k:
    raise UserError(
      f"the config's microbatches must be >= 1 and divide the batch "
      f"{total}, got {k}"
    )
  rows = total // k
  costs = []
  for d in (1,) if blocks_from else (1, 2):
    c = _variant(
      config,
      **{
        "model.network.depth": d,
        "model.network.encoder_depth": 1,
        "model.scan_blocks": False,
        "microbatches": 1,
      },
    )
    row = compile_steps(
      c,
      devices,
      batch=rows,
      caption_len=caption_len,
      sampler=False,
      unroll_teacher=True,
    )["rows"][0]
    costs.append(row)

  first = _figures(costs[0])
  block = (
    blocks_from["per_block"]
    if blocks_from
    else {n: v - first[n] for n, v in _figures(costs[1]).items()}
  )
  grown = {
    n: (1 if n == "hbm_bytes" else k) * (v + (depth - 1) * block[n])
    for n, v in first.items()
  }

  chip = chip_info(devices)
  model = grown["model_flops"]
  seconds = grown["roofline_seconds"]
  hbm = grown["hbm_bytes"]
  loops = max(r.get("while_loops", 0) for r in costs)
  out = dict(
    depth=depth,
    microbatches=k,
    xla_flops_per_device=grown["xla_flops_per_device"],
    xla_bytes_per_device=grown["xla_bytes_per_device"],
    hbm_bytes=hbm,
    hbm_fits=bool(hbm <= chip.hbm_per_device),
    roofline_seconds=seconds,
    model_flops=model,
    per_block_seconds=k * block["roofline_seconds"],
    # A block's XLA FLOPs at the chip's peak and its bytes accessed at HBM
    # bandwidth: which of the two its cost-model time follows.
    per_block_flops_seconds=k
    * block["xla_flops_per_device"]
    / chip.peak_per_device,
    per_block_bytes_seconds=k
    * block["xla_bytes_per_device"]
    / chip.bandwidth_per_device,
    per_block=block,
    while_loops=loops,
    # "xla" (libtpu's optimal_seconds) or "flops_and_bytes" (XLA gave
    # none) for depths 1 and 2: figures from different sources differ.
    roofline_sources=[r.get("roofline_source", "xla") for r in costs],
    compile_seconds=sum(r["compile_seconds"] for r in costs),
    # Bytes per device of each collective kind and of the layout copies
    # outside fusions, grown to full depth the same way.
    collective_bytes={kind: grown[kind] for kind in COLLECTIVES},
    copy_bytes=grown["copy_bytes"],
  )
  if not loops:
    out["cost_model_mfu_estimate"] = mfu(model, seconds, chip)
  return out


BREAKDOWN_PARTS = (
  "tim_forward_backward",
  "dde_target_forwards",
  "text_encoder",
  "repa_teacher",
  "optimizer_and_ema",
)


def optimizer_roofline(config, devices) -> dict:
  """The roofline (cost-model estimate) of the step's update alone:
  AdamW, the EMA and the non-finite guard (``Trainer.apply_gradients``)
  on parameter-shaped, parameter-sharded gradients, at the config's full
  depth (no loop: the update is elementwise over every parameter)."""
  from tim_jax import training  # pylint: disable=g-import-not-at-top
  from tim_jax.core import sharding  # pylint: disable=g-import-not-at-top

  # Frozen encoders do not enter the update: leave them out of the build.
  c = _variant(config, **{"loss_extras.repa_encoder": "none"})
  c.unlock()
  if c.data.name == "captions":
    c.data.name = "shapes"
  c.lock()
  chip = chip_info(devices)
  mesh = sharding.make_mesh(dict(c.mesh), devices=devices)
  trainer = training.Trainer(c, mesh, abstract=True)
  state = trainer.abstract_with_shardings()
  scalar = jax.ShapeDtypeStruct(
    (), jnp.float32, sharding=sharding.replicated(mesh)
  )
  fn = jax.jit(
    lambda state, grads, loss, mse: trainer.apply_gradients(
      state, loss, dict(mse_loss=mse), grads
    ),
    donate_argnums=0,
    out_shardings=(trainer.state_shardings, sharding.replicated(mesh)),
  )
  t0 = time.perf_counter()
  lowered = fn.lower(state, state.params, scalar, scalar)
  t1 = time.perf_counter()
  compiled, compile_s = _compile(lowered, "optimizer update", chip)
  return _report(
    "optimizer_and_ema",
    compiled,
    t1 - t0,
    compile_s,
    chip,
    None,
  )


def _unrolled_roofline(
  config, devices, *, batch: int | None = None, caption_len: int = 128
) -> dict:
  """``extrapolated_roofline``'s figures from one compile of the whole
  depth with every loop unrolled (exact, and minutes for deep models)."""
  c = _variant(config, **{"model.scan_blocks": False})
  row = compile_steps(
    c,
    devices,
    batch=batch,
    caption_len=caption_len,
    sampler=False,
    unroll_teacher=True,
  )["rows"][0]
  out = dict(
    depth=int(config.model.network.depth),
    roofline_seconds=row["roofline_seconds"],
    model_flops=row["model_flops"],
    while_loops=row["while_loops"],
    compile_seconds=row["compile_seconds"],
    collective_bytes={k: v["bytes"] for k, v in row["collectives"].items()},
    copy_bytes=row["copies"]["bytes"],
  )
  if "cost_model_mfu_estimate" in row:
    out["cost_model_mfu_estimate"] = row["cost_model_mfu_estimate"]
  return out


def roofline_breakdown(
  config,
  devices,
  *,
  batch: int | None = None,
  caption_len: int = 128,
  extrapolate: bool = True,
) -> dict:
  """Where the train step's roofline (cost-model estimate) goes, per part,
  from differences of extrapolated compiles (``extrapolated_roofline``:
  unrolled depths 1 and 2, so that no loop hides blocks) of variants of
  the same step:

  * ``full``: the config's step;
  * ``no_dde``: flow matching only (``loss.diffusion_ratio=1``,
    ``consistency_ratio=0``: no derivative target, so none of its extra
    forwards);
  * ``no_text`` (captions configs): the caption features given in the
    batch instead of Gemma-3 encoding them in the step;
  * ``no_teacher`` (configs with REPA's teacher in the step): the REPA
    targets given in the batch (``loss_extras.repa_feature_key``; the
    projector and its loss stay);
  * ``core``: all of those at once (TiM's forward and backward with flow
    matching, and the update);

  and the update alone (``optimizer_roofline``). The parts: DDE target's
  forwards = full - no_dde, text encoder = full - no_text, REPA teacher =
  full - no_teacher (differences), optimizer and EMA (its own compile),
  TiM forward + backward = core - optimizer (a difference); a part the
  config does not have is None. ``sum_of_parts`` beside ``full`` shows how
  far the parts interact (the cost model is not additive). Collectives:
  bytes per device of each kind in the full step's HLO over the chip's
  inter-chip bandwidth; layout copies: bytes of ``copy``/``transpose``
  outside fusions, read and written, over HBM bandwidth; both are parts
  of the full step's time, not additional to it.

  ``no_text`` and ``no_teacher`` compile depth 1 alone and take the full
  step's per-block figures (the encoders run outside TiM's blocks).
  ``extrapolate=False`` compiles each variant once at its whole depth,
  unrolled, instead (for small models: exact, no extrapolation).

  Every figure is libtpu's cost model, an estimate: neither a measured
  time nor a bound."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from tim_jax.encoders import radio  # pylint: disable=g-import-not-at-top

  loss = config.loss
  has_dde = not (loss.diffusion_ratio >= 1.0 and loss.consistency_ratio == 0)
  if has_dde and loss.derivative != "dde":
    raise UserError(
      f"--breakdown: loss.derivative={loss.derivative!r}; the breakdown's "
      "DDE row is for loss.derivative=dde"
    )
  has_text = config.data.name == "captions"
  has_teacher = config.loss_extras.get("repa_encoder", "none") != "none"
  fm = {"loss.diffusion_ratio": 1.0, "loss.consistency_ratio": 0.0}
  teacher_off = {}
  if has_teacher:
    teacher_off = {
      "loss_extras.repa_encoder": "none",
      "loss_extras.repa_feature_key": "repa_features",
      "model.network.z_dim": radio.random_encoder(abstract=True).dim,
    }
  chip = chip_info(devices)
  with tempfile.TemporaryDirectory() as tmp:
    text_off = {}
    if has_text:
      # A latent t2i dataset's null caption, as the data would give it.
      null = os.path.join(tmp, "null_caption.npy")
      np.save(
        null,
        np.zeros(
          (caption_len, int(config.model.network.cap_feat_dim)), np.float32
        ),
      )
      text_off = {"data.name": "latents", "data.null_caption_features": null}
    variants = {"full": {}}
    if has_dde:
      variants["no_dde"] = fm
    if has_text:
      variants["no_text"] = text_off
    if has_teacher:
      variants["no_teacher"] = teacher_off
    variants["core"] = {**fm, **text_off, **teacher_off}
    runs = {}
    for name, changes in variants.items():
      same = [k for k, v in variants.items() if k in runs and v == changes]
      if same:  # e.g. core is no_dde where there is no text or teacher.
        runs[name] = runs[same[0]]
        continue
      kw = dict(batch=batch, caption_len=caption_len)
      if extrapolate and name in ("no_text", "no_teacher"):
        # A frozen encoder runs outside TiM's blocks: their per-block cost
        # is the full step's, and depth 1 alone gives the difference.
        kw["blocks_from"] = runs["full"]
      measure = extrapolated_roofline if extrapolate else _unrolled_roofline
      runs[name] = measure(_variant(config, **changes), devices, **kw)
      print(
        f"  variant {name}: {runs[name]['roofline_seconds'] * 1e3:.1f} ms "
        f"(compiled in {runs[name]['compile_seconds']:.0f} s)",
        flush=True,
      )
  opt = optimizer_roofline(config, devices)
  seconds = {k: v["roofline_seconds"] for k, v in runs.items()}
  full = seconds["full"]
  parts = dict(
    tim_forward_backward=seconds["core"] - opt["roofline_seconds"],
    dde_target_forwards=full - seconds["no_dde"] if has_dde else None,
    text_encoder=full - seconds["no_text"] if has_text else None,
    repa_teacher=full - seconds["no_teacher"] if has_teacher else None,
    optimizer_and_ema=opt["roofline_seconds"],
  )
  total = sum(v for v in parts.values() if v is not None)
  ext = runs["full"]
  collective_seconds = {
    k: v / chip.ici_per_device for k, v in ext["collective_bytes"].items()
  }
  return dict(
    topology_kind=chip.kind,
    devices=chip.devices,
    extrapolated=extrapolate,
    mesh=dict(config.mesh),
    batch=int(batch or config.batch_size),
    depth=ext["depth"],
    full_seconds=full,
    sum_of_parts=total,
    parts=parts,
    variant_seconds=seconds,
    model_flops=ext["model_flops"],
    cost_model_mfu_estimate=ext.get("cost_model_mfu_estimate"),
    collective_bytes=ext["collective_bytes"],
    collective_seconds=collective_seconds,
    copy_bytes=ext["copy_bytes"],
    copy_seconds=2 * ext["copy_bytes"] / chip.bandwidth_per_device,
    ici_bytes_per_second=chip.ici_per_device,
    compile_seconds=sum(
      r["compile_seconds"] for r in {id(r): r for r in runs.values()}.values()
    )
    + opt["compile_seconds"],
  )


def print_breakdown(rep: dict) -> None:
  """The lines of a ``roofline_breakdown`` report."""
  full = rep["full_seconds"]
  mfu_text = (
    f", cost-model MFU estimate {rep['cost_model_mfu_estimate']:.1%}"
    if rep.get("cost_model_mfu_estimate")
    else ""
  )
  print(
    f"\nwhere the train step's time goes on {rep['devices']} x "
    f"{rep['topology_kind']}, mesh {rep['mesh']}, batch {rep['batch']}: "
    "libtpu's cost model (estimates, not measurements or bounds), each "
    + (
      f"variant extrapolated to depth {rep['depth']} from unrolled depths "
      "1 and 2"
      if rep["extrapolated"]
      else f"variant compiled unrolled at depth {rep['depth']}"
    )
    + f" ({rep['compile_seconds']:.0f} s of compiles)"
  )
  print(f"  {'full step':34s} {full * 1e3:10.1f} ms  100.0 %{mfu_text}")
  how = dict(
    tim_forward_backward="core - optimizer (difference)",
    dde_target_forwards="full - no_dde (difference)",
    text_encoder="full - no_text (difference)",
    repa_teacher="full - no_teacher (difference)",
    optimizer_and_ema="its own compile",
  )
  for name in BREAKDOWN_PARTS:
    v = rep["parts"][name]
    if v is None:
      print(f"  {name:34s} {'absent':>10s}")
      continue
    print(f"  {name:34s} {v * 1e3:10.1f} ms {v / full:6.1%}  ({how[name]})")
  print(
    f"  {'sum of the parts':34s} {rep['sum_of_parts'] * 1e3:10.1f} ms "
    f"{rep['sum_of_parts'] / full:6.1%}  (the rest: the parts interact)"
  )
  print("  inside the full step (not additional to the rows above):")
  for kind, b in rep["collective_bytes"].items():
    if b:
      print(
        f"    {kind:32s} {b / 2**20:10.1f} MiB per device = "
        f"{rep['collective_seconds'][kind] * 1e3:8.1f} ms at "
        f"{rep['ici_bytes_per_second'] / 1e9:.0f} GB/s inter-chip"
      )
  print(
    f"    {'layout copies (copy, transpose)':32s} "
    f"{rep['copy_bytes'] / 2**20:10.1f} MiB per device = "
    f"{rep['copy_seconds'] * 1e3:8.1f} ms read + written at HBM bandwidth"
  )


def _nbytes(tree) -> int:
  return int(
    sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))
  )


def compile_sampling(
  config,
  devices,
  *,
  num_steps: int,
  height: int | None = None,
  width: int | None = None,
  batch: int = 1,
  cfg_scale: float | None = None,
  caption_len: int = 32,
  autoencoder_config: dict | None = None,
  text_encoder=None,
) -> dict:
  """Compiles what sampling with ``config`` runs, as
  ``inference.Pipeline`` runs it, on one device (the first of
  ``devices``), for ``batch`` images of ``height`` x ``width`` pixels
  (default: the config's sample size): the caption encoder (Gemma-3 1B,
  for captions configs: ``batch`` captions cut to ``caption_len``
  tokens), the sampler for ``num_steps`` steps (its memory), one plain and
  one guided step (the time: XLA's cost analysis counts the sampler's loop
  body once) and the decoder of the autoencoder whose diffusers
  ``config.json`` dict is ``autoencoder_config`` (left out when None), in
  batches of ``inference.decode_batch`` as ``Pipeline.decode`` runs it.
  Weights in the dtypes the config loads them. ``text_encoder`` replaces
  the abstract Gemma-3 1B (a smaller ``GemmaEncoder`` of shapes, for
  tests).

  Returns the programs' reports (``rows``; a program the compiler refuses
  for want of memory has ``refused``) and, per device: ``weights`` (bytes
  of each part), ``peak_bytes`` (every part's weights resident, as in a
  notebook, plus the largest program's temporaries, outputs and inputs),
  ``seconds_per_image`` (the cost model's time of encoding, every step and
  decoding, divided by ``batch``: an estimate, not a measurement) and the
  step plan (``guided_steps``, ``forwards``)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from tim_jax import autoencoders, inference  # pylint: disable=g-import-not-at-top
  from tim_jax.config import builders  # pylint: disable=g-import-not-at-top
  from tim_jax.method import sampling  # pylint: disable=g-import-not-at-top
  from tim_jax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top

  device = devices[0]
  chip = chip_info([device])
  one = jax.sharding.SingleDeviceSharding(device)
  put = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
  on_device = lambda tree: jax.tree.map(lambda a: put(a.shape, a.dtype), tree)
  c = config
  text = None
  if c.data.name == "captions":
    from tim_jax.encoders import gemma  # pylint: disable=g-import-not-at-top

    text = text_encoder or gemma.abstract_encoder(
      dtype=builders.DTYPES[c.text_encoder.dtype],
      max_length=int(c.text_encoder.max_length),
    )
  pipe = inference.Pipeline(c, text_encoder=text)
  mc = pipe.model_config
  arch = None
  if autoencoder_config is not None:
    arch = autoencoders.architecture(autoencoder_config)
  down = (
    arch.downsample if arch else autoencoders.DOWNSAMPLE[c.autoencoder.name]
  )
  side = int(c.sample.image_size) * down
  height, width = int(height or side), int(width or side)
  step = down * mc.patch_size
  if height % step or width % step:
    raise UserError(
      f"{height}x{width} pixels: height and width must be multiples of "
      f"{step} (the autoencoder's {down} x the patch size {mc.patch_size})"
    )
  h, w = height // down, width // down
  rows, weights, others = [], {}, {}

  def build(name, fn, part, params, *inputs, model_flops=None):
    """Compiles ``fn(params, *inputs)``; returns its row (None when the
    compiler refuses it for want of memory)."""
    t0 = time.perf_counter()
    lowered = fn.lower(params, *inputs)
    t1 = time.perf_counter()
    try:
      compiled, compile_s = _compile(lowered, name, chip)
    except DoesNotFit as e:
      rows.append(dict(name=name, refused=str(e)))
      return None
    rows.append(_report(name, compiled, t1 - t0, compile_s, chip, model_flops))
    m = rows[-1]["memory"]
    # Beside the weights (jit drops the ones a program does not read, so
    # its argument bytes may be fewer): temporaries, outputs, inputs.
    others[name] = m["temp"] + m["output"] - m["alias"] + _nbytes(inputs)
    weights.setdefault(part, _nbytes(params))
    return rows[-1]

  seconds = 0.0
  if text is not None:
    row = build(
      "text_encoder",
      jax.jit(text.apply),
      "text_encoder",
      on_device(text.params),
      put((batch, caption_len), jnp.int32),
      put((batch, caption_len), jnp.bool_),
    )
    seconds += row["roofline_seconds"] if row else float("nan")
    cond = {
      "features": put((batch, caption_len, mc.cap_feat_dim), jnp.float32),
      "length": put((batch,), jnp.int32),
    }
  elif mc.kind == "c2i":
    cond = put((batch,), jnp.int32)
  else:
    cond = put((batch, caption_len, mc.cap_feat_dim), jnp.float32)
  params = on_device(pipe.abstract_params)
  inputs = (
    put((batch, h, w, mc.in_channels), jnp.float32),  # noise
    cond,
    cond,  # the null conditioning
    put((), jax.random.key(0).dtype),
    put((), jnp.int32),  # the call id
  )
  settings = pipe.settings(num_steps, cfg_scale)
  plan = sampling.step_schedule(
    pipe.transport,
    settings.num_steps,
    settings.cfg_scale,
    settings.guidance_interval,
    settings.stochasticity,
    settings.mode,
  )
  guided = int(plan["guided"].sum())
  build(
    f"sampler_{num_steps}_steps",
    pipe.compiled_sampler(settings),
    "model",
    params,
    *inputs,
  )
  cap = caption_len if mc.kind == "t2i" else 0
  for name, count, cfg in (
    ("sampler_step", num_steps - guided, 1.0),
    ("sampler_step_cfg", guided, max(settings.cfg_scale, 2.0)),
  ):
    if not count:
      continue
    row = build(
      name,
      pipe.compiled_sampler(
        pipe.settings(1, cfg, (0.0, 2.0) if cfg > 1 else None)
      ),
      "model",
      params,
      *inputs,
      model_flops=flops_lib.step_flops(
        mc,
        batch,
        h,
        w,
        cap,
        step="sample",
        num_steps=1,
        guided_steps=int(cfg > 1),
      ),
    )
    seconds += count * row["roofline_seconds"] if row else float("nan")
  if autoencoder_config is not None:
    module = nnx.eval_shape(
      lambda: autoencoders.build(
        autoencoder_config,
        c.autoencoder.get("dtype", "float32"),
        nnx.Rngs(0),
      )
    )
    ae = autoencoders.Autoencoder(
      c.autoencoder.name,
      module,
      arch.scaling_factor,
      arch.downsample,
      arch.latent_channels,
    )
    bs = inference.decode_batch(c, batch, height, width)
    state = ae._state  # pylint: disable=protected-access
    row = build(
      "decoder",
      ae._decode,  # pylint: disable=protected-access
      "autoencoder",
      on_device(state),
      put((bs, h, w, arch.latent_channels), jnp.float32),
    )
    calls = -(-batch // bs)
    seconds += calls * row["roofline_seconds"] if row else float("nan")
  refused = [r["name"] for r in rows if "refused" in r]
  peak = sum(weights.values()) + max(others.values(), default=0)
  return dict(
    topology_kind=chip.kind,
    hbm_per_device=chip.hbm_per_device,
    batch=batch,
    height=height,
    width=width,
    num_steps=num_steps,
    cfg_scale=settings.cfg_scale,
    guided_steps=guided,
    forwards=num_steps + guided,
    caption_len=caption_len if text is not None else 0,
    decoder_batch=bs if autoencoder_config is not None else 0,
    dtype=dict(
      model=c.model.dtype,
      text_encoder=c.text_encoder.dtype if text is not None else None,
      autoencoder=c.autoencoder.get("dtype", "float32")
      if autoencoder_config is not None
      else None,
    ),
    weights=weights,
    peak_bytes=peak,
    fits=not refused and peak <= chip.hbm_per_device,
    refused=refused,
    seconds_per_image=seconds / batch,
    rows=rows,
  )


def _abstract_cond(c, trainer, b, caption_len, mesh):
  from tim_jax.core import sharding  # pylint: disable=g-import-not-at-top

  put = lambda shape, dtype: jax.ShapeDtypeStruct(
    shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
  )
  mc = trainer.model_config
  if mc.kind == "c2i":
    return put((b,), jnp.int32)
  feats = put((b, caption_len, mc.cap_feat_dim), jnp.float32)
  if c.data.name == "captions":
    return {"features": feats, "length": put((b,), jnp.int32)}
  return feats


def meshes(n: int, num_heads: int, tensors=(1, 2, 4, 8)) -> list[dict]:
  """Every (data, fsdp, tensor) with data x fsdp x tensor = n, tensor
  dividing the heads, fsdp a power of two."""
  out = []
  for t in tensors:
    if n % t or num_heads % t:
      continue
    rest = n // t
    for f in (2**i for i in range(int(np.log2(rest)) + 1)):
      if rest % f == 0:
        out.append(dict(data=rest // f, fsdp=f, tensor=t))
  return out


def parse_meshes(items: Sequence[str], n: int) -> list[dict]:
  """["4x4x1", ...] -> [dict(data=4, fsdp=4, tensor=1), ...], each checked
  to multiply to the ``n`` devices."""
  out = []
  for item in items:
    parts = item.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise UserError(
        f"--sweep_meshes: {item!r} is not DATAxFSDPxTENSOR (e.g. 4x4x1)"
      )
    mesh = dict(zip(("data", "fsdp", "tensor"), map(int, parts)))
    size = int(np.prod(list(mesh.values())))
    if size != n:
      raise UserError(
        f"--sweep_meshes: {item} has {size} devices, the topology {n}"
      )
    out.append(mesh)
  return out


def sweep(
  config,
  devices,
  batches: Sequence[int],
  extrapolate: bool = False,
  mesh_choices: Sequence[dict] | None = None,
  unroll_teacher: bool = False,
  **kw,
) -> list[dict]:
  """``compile_steps`` for every mesh and batch; fitting ones first, by
  roofline seconds per example (with ``extrapolate``, the depth-extrapolated
  roofline: trustworthy for scanned blocks, two more small compiles
  each)."""
  results = []
  heads = int(config.model.network.num_heads)
  choices = mesh_choices or meshes(len(devices), heads)
  for mesh, b in itertools.product(choices, batches):
    c = config.copy_and_resolve_references()
    c.unlock()
    c.mesh.update(mesh)
    c.lock()
    try:
      rep = compile_steps(
        c, devices, batch=b, sampler=False, unroll_teacher=unroll_teacher, **kw
      )
      row = rep["rows"][0]
      if extrapolate:
        row = dict(
          row,
          **{
            k: v
            for k, v in extrapolated_roofline(c, devices, batch=b, **kw).items()
            if k != "compile_seconds"
          },
        )
    except DoesNotFit as e:
      # Kept in the ranking (last) and in --out, so a sweep's file shows
      # which meshes the compiler refused and why.
      results.append(
        dict(
          mesh=mesh,
          batch=b,
          fits=False,
          seconds_per_example=None,
          refused=str(e),
        )
      )
      print(_sweep_line(results[-1]), flush=True)
      continue
    except Exception as e:  # pylint: disable=broad-except
      print(f"mesh {mesh} batch {b}: failed: {str(e)[:200]}", flush=True)
      continue
    per_example = row["roofline_seconds"] / b
    results.append(
      dict(
        mesh=mesh,
        batch=b,
        fits=row["memory"]["fits"],
        hbm_gib=row["memory"]["total"] / GIB,
        roofline_seconds=row["roofline_seconds"],
        seconds_per_example=per_example,
        mfu=row.get("cost_model_mfu_estimate"),
        while_loops=row.get("while_loops", 0),
        compile_seconds=row["compile_seconds"],
      )
    )
    if extrapolate:
      results[-1]["hbm_unrolled_gib"] = row["hbm_bytes"] / GIB
    print(_sweep_line(results[-1]), flush=True)
  results.sort(
    key=lambda r: (
      not r["fits"],
      "refused" in r,
      r["seconds_per_example"] or 0.0,
    )
  )
  return results


def _sweep_line(r) -> str:
  m = r["mesh"]
  head = (
    f"data {m['data']:3d} fsdp {m['fsdp']:3d} tensor {m['tensor']} "
    f"batch {r['batch']:5d}: "
  )
  if "refused" in r:
    return head + r["refused"]
  return (
    head + f"{r['hbm_gib']:7.2f} GiB "
    f"{'fits' if r['fits'] else 'DOES NOT FIT':12s} roofline "
    f"{r['roofline_seconds'] * 1e3:9.1f} ms  "
    + (
      f"cost-model MFU estimate {r['mfu']:6.1%}"
      if r.get("mfu")
      else "(XLA counted a loop body once: no MFU; use --extrapolate)"
    )
    + f"  compile {r['compile_seconds']:.1f} s"
    + (
      f"  (unrolled ~{r['hbm_unrolled_gib']:.1f} GiB)"
      if "hbm_unrolled_gib" in r
      else ""
    )
  )


def print_report(rep: dict) -> None:
  print(
    f"{rep['devices']} x {rep['topology_kind']} ({rep['chips']} chips), "
    f"mesh {rep['mesh']}, batch {rep['batch']} "
    f"({rep['batch_per_device']:g} per device), {rep['dtype']}"
  )
  for row in rep["rows"]:
    m = row["memory"]
    print(
      f"\n{row['name']}: lowered in {row['lower_seconds']:.1f} s, "
      f"compiled in {row['compile_seconds']:.1f} s"
    )
    print(
      f"  HBM per device: argument {m['argument'] / GIB:.2f} GiB, output "
      f"{m['output'] / GIB:.2f}, temp {m['temp'] / GIB:.2f}, total "
      f"{m['total'] / GIB:.2f} of {m['capacity'] / GIB:.2f} GiB: "
      + ("fits" if m["fits"] else "DOES NOT FIT")
    )
    model = row["model_flops"]
    print(
      f"  FLOPs: XLA {row['xla_flops_per_device'] * rep['devices']:.3e}"
      f" (all devices), model {model:.3e}"
      if model
      else ""
    )
    estimate = row.get("cost_model_mfu_estimate")
    print(
      f"  roofline step {row['roofline_seconds'] * 1e3:.2f} ms"
      + (
        " (max(FLOPs / peak, bytes / bandwidth): XLA gave no time)"
        if row["roofline_source"] != "xla"
        else " (libtpu's cost model)"
      )
      + (
        f", cost-model MFU estimate {estimate:.1%} (an estimate, not a bound)"
        if estimate
        else f": XLA counted the body of each of {row['while_loops']} "
        "loops once, so the time undercounts and no MFU is given (for the "
        "train step: --extrapolate)"
        if row["while_loops"]
        else ""
      )
    )
    parts = [
      f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
      for k, v in row["collectives"].items()
      if v["count"]
    ]
    print("  collectives: " + (", ".join(parts) or "none"))


def print_sampling_report(rep: dict) -> None:
  """The lines of a ``compile_sampling`` report."""
  print(
    f"sampling on one {rep['topology_kind']} device "
    f"({rep['hbm_per_device'] / GIB:.1f} GiB): {rep['batch']} image(s) of "
    f"{rep['height']}x{rep['width']} px, {rep['num_steps']} steps "
    f"({rep['guided_steps']} guided at cfg {rep['cfg_scale']:g}: "
    f"{rep['forwards']} forwards), dtypes {rep['dtype']}"
  )
  for row in rep["rows"]:
    if "refused" in row:
      print(f"  {row['name']:18s} {row['refused']}")
      continue
    m = row["memory"]
    loop = " (loop body counted once)" if row["while_loops"] else ""
    print(
      f"  {row['name']:18s} HBM argument {m['argument'] / GIB:6.2f} GiB, "
      f"temp {m['temp'] / GIB:6.2f}, total {m['total'] / GIB:6.2f}; "
      f"cost model {row['roofline_seconds'] * 1e3:9.2f} ms{loop}; "
      f"compiled in {row['compile_seconds']:.0f} s"
    )
  parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in rep["weights"].items())
  print(
    f"weights (GiB): {parts}; with all of them resident the peak is "
    f"{rep['peak_bytes'] / GIB:.2f} GiB of "
    f"{rep['hbm_per_device'] / GIB:.1f}: "
    + ("fits" if rep["fits"] else "DOES NOT FIT")
  )
  print(
    "cost-model time per image (an estimate, not a measurement): "
    f"{rep['seconds_per_image'] * 1e3:.1f} ms"
  )


def main(fv, args) -> None:
  """The command; the compiler's refusals and a missing libtpu are one line."""
  try:
    _main(fv, args)
  except (DoesNotFit, NoCompiler) as e:
    raise UserError(str(e)) from None


def _main(f, args) -> None:
  if args:
    raise UserError(f"unexpected arguments: {args}")
  if (f.sweep_meshes or f.sweep_batches) and not f.sweep:
    raise UserError(
      "--sweep_meshes and --sweep_batches choose what --sweep "
      "compiles; add --sweep (one mesh: --config.mesh.*)"
    )
  if f.sample and (f.sweep or f.extrapolate):
    raise UserError(
      "--sample compiles sampling alone: drop --sweep/--extrapolate"
    )
  if not f.sample and (
    f.sample_steps or f.height or f.width or f.autoencoder_config
  ):
    raise UserError(
      "--sample_steps, --height, --width and --autoencoder_config are for "
      "--sample"
    )
  autoencoder_config = None
  if f.autoencoder_config:
    from tim_jax.core import hub, timing  # pylint: disable=g-import-not-at-top

    local = hub.resolve(f.autoencoder_config, allow_patterns=("config.json",))
    try:
      _, autoencoder_config = timing.read_config_json(local)
    except (OSError, ValueError) as e:
      raise UserError(
        f"--autoencoder_config={f.autoencoder_config}: {e}"
      ) from None
  if f.breakdown and (f.sample or f.sweep or f.extrapolate):
    raise UserError(
      "--breakdown compiles its own variants of the train step: drop "
      "--sample/--sweep/--extrapolate"
    )
  if f.breakdown and gpu_compile.is_gpu_topology(f.topology):
    raise UserError(
      "--breakdown is for TPU topologies (it reads libtpu's cost model)"
    )
  if f.extrapolate and gpu_compile.is_gpu_topology(f.topology):
    raise UserError(
      "--extrapolate is for TPU topologies: on a GPU node the roofline "
      "comes from tim_jax's FLOP count, which counts every block"
    )
  devices = topology_devices(f.topology)
  from tim_jax.config import config_base  # pylint: disable=g-import-not-at-top

  config = config_base.flag_config(f)
  if f.breakdown:
    result = roofline_breakdown(
      config, devices, batch=f.batch_size, caption_len=f.caption_len
    )
    result["topology"] = f.topology
    print_breakdown(result)
  elif f.sample:
    result = compile_sampling(
      config,
      devices,
      num_steps=f.sample_steps or int(max(config.sample.nfe)),
      height=f.height or None,
      width=f.width or None,
      batch=f.batch_size or 1,
      caption_len=f.caption_len,
      autoencoder_config=autoencoder_config,
    )
    result["topology"] = f.topology
    print_sampling_report(result)
  elif f.sweep:
    batches = [int(b) for b in f.sweep_batches] or [config.batch_size]
    ranked = sweep(
      config,
      devices,
      batches,
      extrapolate=f.extrapolate,
      mesh_choices=parse_meshes(f.sweep_meshes, len(devices)),
      unroll_teacher=f.unroll_teacher,
      caption_len=f.caption_len,
    )
    print(
      "\nranked (fitting first, by roofline time per example; meshes "
      "the compiler refused last):"
    )
    for r in ranked:
      print("  " + _sweep_line(r))
    result = dict(topology=f.topology, sweep=ranked)
  else:
    result = compile_steps(
      config,
      devices,
      batch=f.batch_size,
      caption_len=f.caption_len,
      unroll_teacher=f.unroll_teacher,
      sampler=f.sampler,
    )
    result["topology"] = f.topology
    if gpu_compile.is_gpu_topology(f.topology):
      gpu_compile.print_report(result)
    else:
      print_report(result)
    if f.extrapolate:
      ext = extrapolated_roofline(
        config, devices, batch=f.batch_size, caption_len=f.caption_len
      )
      result["extrapolated"] = ext
      micro = (
        f", one of {ext['microbatches']} microbatches counted "
        f"{ext['microbatches']} times"
        if ext["microbatches"] > 1
        else ""
      )
      print(
        f"\ntrain step at depth {ext['depth']}, extrapolated from "
        f"unrolled depths 1 and 2{micro} "
        f"({ext['compile_seconds']:.0f} s): "
        f"roofline {ext['roofline_seconds'] * 1e3:.1f} ms "
        f"({ext['per_block_seconds'] * 1e3:.2f} ms per block; its XLA "
        f"FLOPs take {ext['per_block_flops_seconds'] * 1e3:.2f} ms at peak, "
        f"its bytes {ext['per_block_bytes_seconds'] * 1e3:.2f} ms at HBM "
        "bandwidth), "
        + (
          f"cost-model MFU estimate {ext['cost_model_mfu_estimate']:.1%}"
          if "cost_model_mfu_estimate" in ext
          else f"no MFU (the small compiles kept {ext['while_loops']} "
          "loops, whose bodies XLA counts once)"
        )
        + "; HBM unrolled "
        f"about {ext['hbm_bytes'] / GIB:.1f} GiB per device ("
        + ("fits" if ext["hbm_fits"] else "DOES NOT FIT")
        + ")"
      )
  result["command"] = " ".join(
    ["python -m tim_jax.commands.compile"] + sys.argv[1:]
  )
  if f.out:
    with open(f.out, "w", encoding="utf-8") as fh:
      json.dump(result, fh, indent=1)


def define_flags(fv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  cli.define_config(fv, "Config file (+ ':variant').")
  flags.DEFINE_string(
    "topology",
    None,
    "TPU topology, e.g. v5p:4x4x2, or a GPU node: h100x8, h200x8, a100x8.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "batch_size",
    0,
    "Global batch (0: the config's).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "caption_len", 128, "Caption tokens (t2i).", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_bool(
    "sweep", False, "Compile every mesh and rank them.", flag_values=fv
  )
  flags.DEFINE_list(
    "sweep_batches",
    [],
    "Global batches for --sweep (default: the config's).",
    flag_values=fv,
  )
  flags.DEFINE_list(
    "sweep_meshes",
    [],
    "Meshes for --sweep as "
    "DATAxFSDPxTENSOR (default: every one that divides the "
    "devices).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "extrapolate",
    False,
    "Also (with --sweep: rank by) "
    "the train step's roofline at full depth from unrolled "
    "depth-1 and depth-2 compiles; trustworthy where XLA "
    "counts scanned blocks once.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "breakdown",
    False,
    "Instead: where the train step's roofline (cost-model estimate) goes, "
    "per part (TiM, DDE target, text encoder, REPA teacher, optimizer + "
    "EMA, collectives, layout copies), from differences of extrapolated "
    "compiles of variants of the step (minutes: up to nine compiles).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "unroll_teacher",
    False,
    "Loop the REPA teacher's "
    "blocks instead of scanning them, so that XLA's cost "
    "counts all of them (with model.scan_blocks=False: the "
    "whole step's roofline).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "sample",
    False,
    "Compile sampling instead, on one device, as the notebook runs it: "
    "caption encoder, sampler, decoder (--batch_size: images per call, "
    "default 1).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "sample_steps",
    0,
    "--sample: steps (0: the config's largest sample.nfe).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "height",
    0,
    "--sample: pixels (0: the config's).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "width",
    0,
    "--sample: pixels (0: the config's).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "autoencoder_config",
    "",
    "--sample: the autoencoder's diffusers config.json, a folder holding "
    "one or a hub id (hf://...); without it the decoder is left out.",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "sampler", True, "Also compile the sampler steps.", flag_values=fv
  )
  flags.DEFINE_string(
    "out", "", "Also write the report as JSON.", flag_values=fv
  )
  flags.mark_flags_as_required(["config", "topology"], flag_values=fv)


def entry() -> None:
  """The console script ``tim-compile``."""
  cli.run(sys.modules[__name__])


if __name__ == "__main__":
  entry()
