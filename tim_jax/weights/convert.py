"""Official PyTorch TiM checkpoints <-> tim_jax models.

The official state_dict names (those of ``TiM`` in
``tim/models/c2i/tim_model.py`` and ``tim/models/t2i/tim_model.py`` of
github.com/WZDTHU/TiM) map one to one onto the NNX parameter tree, because
the modules here keep the official attribute names:

* ``Linear.weight (out, in)`` <-> ``kernel (in, out)``;
* ``Conv2d.weight (D, C, p, p)`` <-> ``kernel (p, p, C, D)`` (NHWC);
* ``LayerNorm.weight`` <-> ``scale``; ``Embedding.weight`` <-> ``embedding``;
* ``t_embedder.mlp.0`` <-> ``t_embedder.mlp_0`` and ``projector.0`` <->
  ``projector.linear_0`` (digits are not attribute names).

The released checkpoints were saved without the REPA projector
(``strict=False`` in the official loader), so missing ``projector.*`` keys are
tolerated: the projector keeps its initialisation and the report says so. Any
other missing key is an error unless ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import logging
import re
from typing import TYPE_CHECKING, Any

from flax import nnx
import jax.numpy as jnp
import numpy as np

from tim_jax import models
from tim_jax.core import paths
from tim_jax.core.errors import UserError
from tim_jax.weights import torch_weights

if TYPE_CHECKING:
  from jax.typing import DTypeLike

TOLERATED_MISSING = ("projector.",)


@dataclasses.dataclass
class LoadReport:
  """What a conversion did with the keys of a state_dict."""

  loaded: list[str]
  missing: list[str]
  unexpected: list[str]

  def __str__(self):
    lines = [f"loaded {len(self.loaded)} tensors"]
    if self.missing:
      lines.append(f"missing (kept at initialisation): {self.missing}")
    if self.unexpected:
      lines.append(f"unexpected (ignored): {self.unexpected}")
    return "; ".join(lines)


def _segment(parent: str | None, name: Any) -> str:
  name = str(name)
  if re.fullmatch(r"mlp_\d", name) and parent in (
    "t_embedder",
    "delta_embedder",
  ):
    return "mlp." + name[-1]
  if re.fullmatch(r"linear_\d", name) and parent == "projector":
    return name[-1]
  return name


_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "embedding": "weight",
  "bias": "bias",
}


def official_name(path: tuple) -> str:
  """The official state_dict key of an NNX parameter path."""
  *mods, leaf = [str(p) for p in path]
  parts, parent = [], None
  for m in mods:
    parts.append(_segment(parent, m))
    parent = m
  return ".".join(parts + [_LEAF[leaf]])


def _param_leaves(model: nnx.Module):
  """[(path tuple, array)] of the model's parameters."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return [(tuple(path), var.get_value()) for path, var in flat]


def _entries(model: nnx.Module):
  """(official name, parameter path, layer or None, value) of every
  parameter; a model with scanned blocks (``TiMConfig.scan_blocks``) holds
  each block parameter stacked on a leading layer axis, which becomes the
  official ``blocks.{i}.`` names."""
  stacked = bool(getattr(getattr(model, "config", None), "scan_blocks", False))
  for path, value in _param_leaves(model):
    if stacked and str(path[0]) == "blocks":
      for i in range(value.shape[0]):
        yield official_name(("blocks", i) + path[1:]), path, i, value[i]
    else:
      yield official_name(path), path, None, value


def to_official(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as an official state_dict of numpy arrays."""
  out = {}
  for name, path, _, value in _entries(model):
    array = np.asarray(value)
    if str(path[-1]) == "kernel":  # Embedding tables keep their layout.
      array = torch_weights.kernel_to_torch(array)
    out[name] = np.ascontiguousarray(array)
  return out


def load_state_dict(
  model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> LoadReport:
  """Copies an official state_dict into ``model`` in place.

  Raises ValueError naming the key and both shapes on a shape mismatch, and
  on missing keys (other than ``projector.*``) when ``strict``.
  """
  sd = dict(state_dict)
  new_values, loaded, missing, layers = {}, [], [], {}
  for name, path, layer, value in _entries(model):
    if name not in sd:
      missing.append(name)
      continue
    kernel = str(path[-1]) == "kernel"
    array = np.asarray(sd.pop(name))
    if kernel:
      array = torch_weights.kernel_from_torch(array)
    if array.shape != tuple(value.shape):
      expected = (
        torch_weights.torch_shape(value.shape) if kernel else tuple(value.shape)
      )
      raise UserError(
        f"shape mismatch for {name!r}: the checkpoint has "
        f"{np.asarray(state_dict[name]).shape} (official layout), the model "
        f"expects {expected} — does the network config match the "
        "checkpoint?"
      )
    if layer is None:
      new_values[path] = jnp.asarray(array, dtype=value.dtype)
    else:
      layers.setdefault(path, {})[layer] = array.astype(value.dtype)
    loaded.append(name)
  hard_missing = [m for m in missing if not m.startswith(TOLERATED_MISSING)]
  if strict and hard_missing:
    raise UserError(
      f"the checkpoint lacks {len(hard_missing)} parameters of "
      f"the model, e.g. {hard_missing[:5]}; pass strict=False "
      "to keep them at initialisation"
    )
  current = dict(_param_leaves(model))
  for path, per_layer in layers.items():
    # Stacked blocks: layers the file lacks keep their current values.
    now = np.asarray(current[path])
    new_values[path] = jnp.asarray(
      np.stack([per_layer.get(i, now[i]) for i in range(now.shape[0])])
    )
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    if tuple(path) in new_values:
      var.set_value(new_values[tuple(path)])
  nnx.update(model, state)
  return LoadReport(loaded=loaded, missing=missing, unexpected=sorted(sd))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads ``.safetensors`` or a torch-pickled state_dict (``.bin``,
  ``.pt``, ``.pth``) into float32 numpy arrays (training wrappers such as
  ``{"ema": ...}`` and ``module.`` prefixes removed)."""
  hint = "Or convert the file to .safetensors where PyTorch is installed."
  return {
    k: np.asarray(v, np.float32)
    for k, v in torch_weights.read(path, missing_torch_hint=hint).items()
  }


def checkpoint_kind(state_dict: Mapping[str, Any]) -> str | None:
  """``c2i`` (a label table), ``t2i`` (a caption MLP) or None (neither: not
  a TiM checkpoint, or a partial one), from an official state dict."""
  if "y_embedder.embedding_table.weight" in state_dict:
    return "c2i"
  if any(k.startswith("y_embedder.mlp.") for k in state_dict):
    return "t2i"
  return None


def check_kind(state_dict: Mapping[str, Any], kind: str, path: str) -> None:
  """Refuses a class-conditional file for a text-to-image model and the
  reverse, saying which config the file needs."""
  found = checkpoint_kind(state_dict)
  if found is not None and found != kind:
    names = {"c2i": "class-conditional", "t2i": "text-to-image"}
    raise UserError(
      f"{path} is a {names[found]} checkpoint, but the config builds a "
      f"{names[kind]} model: use configs/{found}.py (with the variant of "
      "its architecture)"
    )


def load_official(
  path: str,
  kind: str,
  network: Mapping[str, Any],
  *,
  dtype: DTypeLike = jnp.float32,
  param_dtype: DTypeLike = jnp.float32,
  strict: bool = True,
  return_report: bool = False,
  **overrides,
) -> models.TiM | tuple[models.TiM, LoadReport]:
  """Builds a TiM from official ``network.params`` and loads an official
  checkpoint into it.

  Args:
    path: ``.safetensors``, ``.bin``, ``.pt`` or ``.pth``.
    kind: ``"c2i"`` or ``"t2i"``.
    network: the official YAML ``network.params`` (input_size, patch_size,
      in_channels, hidden_size, depth, num_heads, encoder_depth, qk_norm,
      z_dim, projector_dim, new_condition, use_new_embed, distance_aware,
      lora_hidden_size, num_classes | cap_feat_dim, ...).
    dtype, param_dtype: compute and parameter dtypes.
    strict: raise on missing keys other than ``projector.*``.
    return_report: also return the ``LoadReport``.
    **overrides: non-official ``TiMConfig`` options (attention_impl, remat,
      ...).
  """
  state_dict = read_state_dict(path)
  check_kind(state_dict, kind, path)
  model = models.build(
    kind, network, dtype=dtype, param_dtype=param_dtype, **overrides
  )
  report = load_state_dict(model, state_dict, strict=strict)
  if report.missing or report.unexpected:
    logging.warning("loading %s: %s", path, report)
  return (model, report) if return_report else model


def save_official(model: nnx.Module, path: str) -> None:
  """Writes the model as an official ``.safetensors`` state_dict (local
  or gs://)."""
  from safetensors.numpy import save

  paths.write_bytes(path, save(to_official(model)))
