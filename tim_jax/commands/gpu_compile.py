"""GPU nodes for ``tim_jax.commands.compile``: XLA:GPU without a GPU.

    python -m tim_jax.commands.compile --config=configs/c2i.py:xl2_256 \\
        --topology=h100x8 --config.mesh.fsdp=8 --config.mesh.data=1

With JAX's CUDA plugin installed (``jax-cuda12-plugin`` and
``jax-cuda12-pjrt`` at the version of jax; no CUDA libraries needed),
``jax.experimental.topologies`` describes a node of NVIDIA cards from an
XLA target config (``gpu_targets/*.txtpb``: XLA's own card specs) and
XLA:GPU compiles for it on any host, as JAX's deviceless AOT tests do.
The compiled program's memory analysis gives the memory per card; XLA:GPU
gives no cost analysis, so the roofline here comes from tim_jax's own
FLOP count (``tim_jax.models.flops``, plus the forward that
``remat=full`` recomputes) against the card's dense bf16 peak, the bytes
the step must move at least once (its arguments read, its outputs
written, each temporary byte written and read) against the HBM
bandwidth, and the collectives in the optimized HLO against NVLink: a
lower bound on the step time, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re

import numpy as np

from tim_jax.core.errors import UserError

GIB = 2**30
TARGETS = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "gpu_targets"
)
# JAX preallocates this share of a card's memory; launch/slurm_gpu.sh sets
# XLA_PYTHON_CLIENT_MEM_FRACTION to it (JAX's default is 0.75).
MEM_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Card:
  spec: str  # the target config in gpu_targets/
  kind: str  # device_kind, as the target config names the card
  # NVLink bytes/s per direction per card (NVIDIA's data sheets: H100 and
  # H200 SXM 900 GB/s both ways, A100 SXM 600 GB/s).
  nvlink: float


CARDS = {
  "h100": Card("h100_sxm.txtpb", "NVIDIA H100 80GB HBM3", 450e9),
  "h200": Card("h200.txtpb", "NVIDIA H200 141GB HBM3e", 450e9),
  "a100": Card("a100_sxm_80.txtpb", "NVIDIA A100-SXM4-80GB", 300e9),
}
# One node of 8 cards; the name is CARD x COUNT.
TOPOLOGIES = {f"{name}x8": (name, 8) for name in CARDS}


def is_gpu_topology(name: str | None) -> bool:
  return (name or "").lower() in TOPOLOGIES


def is_gpu_kind(kind: str) -> bool:
  return any(card.kind == kind for card in CARDS.values())


@functools.cache
def _spec_text(card: str) -> str:
  with open(os.path.join(TARGETS, CARDS[card].spec), encoding="utf-8") as f:
    return f.read()


def _spec_number(card: str, field: str) -> float:
  m = re.search(rf"^\s*{field}:\s*([0-9.e+]+)\s*$", _spec_text(card), re.M)
  return float(m.group(1))


def card_memory(kind: str) -> tuple[float, float] | None:
  """(usable bytes, HBM bytes/s) of the card of ``device_kind`` ``kind``,
  from its target config; None for a kind that is not one of ours. Usable
  is ``MEM_FRACTION`` of the card: what JAX's allocator gets."""
  for name, card in CARDS.items():
    if card.kind == kind:
      return (
        MEM_FRACTION * _spec_number(name, "device_memory_size"),
        _spec_number(name, "memory_bandwidth"),
      )
  return None


def topology_devices(name: str) -> list:
  """The devices of GPU node ``name`` (``h100x8``, ``h200x8``, ``a100x8``),
  described from the card's target config, on any host."""
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    import jax  # pylint: disable=g-import-not-at-top

    raise UserError(
      "JAX's CUDA plugin is not installed, so XLA:GPU is not available: "
      f"pip install --no-deps jax-cuda12-plugin=={jax.__version__} "
      f"jax-cuda12-pjrt=={jax.__version__} (no CUDA libraries needed)"
    )
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if not jax.config.jax_platforms:
    # Only the compiler is needed: without this the plugin checks for CUDA
    # libraries (absent on a CPU host) and is not registered.
    jax.config.update("jax_platforms", "cpu")
  card, count = TOPOLOGIES[name.lower()]
  try:
    topology = topologies.get_topology_desc(
      platform="cuda",
      target_config=_spec_text(card),
      topology=f"1x1x{count}",
    )
  except NotImplementedError:
    raise UserError(
      "the CUDA plugin could not start without CUDA libraries: run with "
      "JAX_PLATFORMS=cpu (the compile needs no GPU)"
    ) from None
  return list(topology.devices)


_COLLECTIVE = re.compile(
  r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
  r"(-start)?\("
)
_SHAPE = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
_GROUPS_IOTA = re.compile(r"replica_groups=\[[0-9,]*?([0-9]+)\]<=")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")


def _nbytes(dtype: str, dims: str) -> int:
  size = _BYTES.get(dtype) or int(dtype[1:]) // 8
  return size * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))


def link_bytes(hlo_text: str, devices: int) -> float:
  """Bytes each card sends over NVLink for the collectives of optimized
  HLO ``hlo_text``, as ring algorithms move them over a group of n cards
  (n read from replica_groups): all-gather (n-1)/n of its result,
  reduce-scatter (n-1) times its result (a shard), all-reduce 2(n-1)/n,
  all-to-all (n-1)/n, a permute all of it."""
  total = 0.0
  for line in hlo_text.splitlines():
    _, eq, rest = line.partition(" = ")
    m = _COLLECTIVE.search(rest) if eq else None
    if m is None:
      continue
    sizes = [_nbytes(t, d) for t, d in _SHAPE.findall(rest[: m.start()])]
    if not sizes:
      continue
    # An async -start returns (operands, results): its largest buffer.
    size = max(sizes) if m.group(2) else sum(sizes)
    g = _GROUPS_IOTA.search(rest) or _GROUPS_LIST.search(rest)
    if g is None:
      n = devices
    elif g.re is _GROUPS_IOTA:
      n = int(g.group(1))
    else:
      n = len([x for x in g.group(1).split(",") if x])
    if n <= 1:
      continue
    total += (
      size
      * {
        "all-gather": (n - 1) / n,
        "reduce-scatter": n - 1,
        "all-reduce": 2 * (n - 1) / n,
        "all-to-all": (n - 1) / n,
        "collective-permute": 1.0,
      }[m.group(1)]
    )
  return total


def extra_train_flops(
  mc, batch: int, size: int, caption_len: int, text=None
) -> float:
  """FLOPs a train step executes beyond its model FLOPs: the gradient
  pass's forward once more under ``remat=full`` (``dots_saveable`` keeps
  the matmuls' outputs, so it recomputes none of them), and the caption
  encoder ``text`` (a ``GemmaEncoder``, or None) run in the step on
  ``caption_len`` tokens per row (an input to the model, not its FLOPs)."""
  from tim_jax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top

  out = 0.0
  if mc.remat_policy == "full":
    out += flops_lib.forward_flops(
      mc, batch, size, size, caption_len, projection=True
    )["total"]
  if text is not None:
    out += gemma_flops(text.config, batch, caption_len)
  return out


def gemma_flops(c, rows: int, tokens: int) -> float:
  """Matmul FLOPs of a Gemma-3 text model's forward (``c``: its
  ``GemmaConfig``) over ``rows`` captions of ``tokens`` tokens: q, k, v and
  output projections, QK^T and AV over every key (``tim_jax.encoders.
  gemma`` masks the causal and sliding-window ones after computing them),
  the gated MLP; the embedding is a lookup."""
  n, d = rows * tokens, c.hidden_size
  q = c.num_attention_heads * c.head_dim
  kv = c.num_key_value_heads * c.head_dim
  layer = (
    2.0 * n * d * (2 * q + 2 * kv)  # q, o; k, v
    + 2 * 2.0 * n * tokens * q  # QK^T and AV
    + 3 * 2.0 * n * d * c.intermediate_size  # gate, up, down
  )
  return len(c.layer_types) * layer


def add_roofline(rows: list[dict], chip, extra_train_flops: float) -> None:
  """Sets each row's roofline from tim_jax's FLOP count (XLA:GPU gives no
  cost analysis): ``roofline_seconds`` the largest of compute (model FLOPs,
  plus ``extra_train_flops`` for the train step, at the bf16 peak), HBM
  (arguments read, outputs written, temporaries written and read, once
  each) and NVLink (``link_bytes``)
  time, assuming they overlap perfectly; ``gpu_roofline`` the three
  parts. The HLO's collectives inside a loop (scanned blocks) count once:
  compile unrolled blocks for the NVLink part."""
  card = next(c for c in CARDS.values() if c.kind == chip.kind)
  for row in rows:
    executed = row["model_flops"] + (
      extra_train_flops if row["name"] == "train_step" else 0.0
    )
    m = row["memory"]
    parts = dict(
      compute=executed / (chip.devices * chip.peak_per_device),
      hbm=(m["argument"] + m["output"] + 2 * m["temp"])
      / chip.bandwidth_per_device,
      nvlink=row.pop("link_bytes") / card.nvlink,
    )
    seconds = max(parts.values())
    row["gpu_roofline"] = dict(
      parts,
      bound=max(parts, key=parts.get),
      executed_flops=executed,
    )
    row["roofline_seconds"] = seconds
    row["roofline_source"] = "tim_jax_flops"
    row["xla_flops_per_device"] = None  # No cost analysis on XLA:GPU.
    row["roofline_mfu_upper_bound"] = row["model_flops"] / (
      seconds * chip.devices * chip.peak_per_device
    )


def print_report(rep: dict) -> None:
  """The GPU compile's report: memory per card against its usable share,
  the roofline from tim_jax's FLOP count and the collectives."""
  print(
    f"{rep['devices']} x {rep['topology_kind']}, mesh {rep['mesh']}, "
    f"batch {rep['batch']} ({rep['batch_per_device']:g} per card), "
    f"{rep['dtype']}"
  )
  for row in rep["rows"]:
    m, r = row["memory"], row["gpu_roofline"]
    print(
      f"\n{row['name']}: lowered in {row['lower_seconds']:.1f} s, "
      f"compiled in {row['compile_seconds']:.1f} s"
    )
    print(
      f"  memory per card: argument {m['argument'] / GIB:.2f} GiB, output "
      f"{m['output'] / GIB:.2f}, temp {m['temp'] / GIB:.2f}, total "
      f"{m['total'] / GIB:.2f} of {m['capacity'] / GIB:.2f} GiB usable "
      f"({MEM_FRACTION:.0%} of the card): "
      + ("fits" if m["fits"] else "DOES NOT FIT")
    )
    print(
      f"  roofline from tim_jax's FLOP count (not a measurement): "
      f"{row['roofline_seconds'] * 1e3:.2f} ms, {r['bound']}-bound "
      f"(compute {r['compute'] * 1e3:.2f} ms for "
      f"{r['executed_flops']:.3e} FLOPs at the bf16 peak, HBM "
      f"{r['hbm'] * 1e3:.2f} ms, "
      f"NVLink {r['nvlink'] * 1e3:.2f} ms); model FLOPs "
      f"{row['model_flops']:.3e}, MFU at most "
      f"{row['roofline_mfu_upper_bound']:.1%}"
    )
    parts = [
      f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
      for k, v in row["collectives"].items()
      if v["count"]
    ]
    print(
      "  collectives: "
      + (", ".join(parts) or "none")
      + (
        " (those inside loops, e.g. scanned blocks, counted once)"
        if row["while_loops"]
        else ""
      )
    )
