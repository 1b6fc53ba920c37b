"""A tim_jax config from an official TiM config YAML, read as it is.

The official repository (github.com/WZDTHU/TiM) describes each model by a
YAML (``configs/c2i/*.yaml``, ``configs/t2i/*.yaml``): ``model.network``
(the backbone's class and ``params``), ``model.transport`` (the transport's
class and constructor arguments, the target-enhancement weights among them),
``model.transition_loss``, ``model.vae_dir`` and, for text-to-image,
``model.text_encoder_dir``. This module maps those onto a tim_jax config so
an official checkpoint samples with nothing written by hand; the training
fields it does not map (data, optimizer) keep tim_jax's defaults.
"""

from __future__ import annotations

from typing import Any

from etils import epath
import ml_collections
import yaml

from tim_jax.config import config_base
from tim_jax.core import hub
from tim_jax.core.errors import UserError
from tim_jax.method import transports

# The official network classes, by the last two parts of their module path.
_KINDS = {"c2i.tim_model": "c2i", "t2i.tim_model": "t2i"}
# The official ``vae_dir`` (a Hub id or a local copy of it) -> our names.
_AUTOENCODERS = {
  "sd-vae-ft-ema": "sd_vae_ft_ema",
  "dc-ae-f32c32-sana-1.1-diffusers": "dc_ae_f32c32_sana_1.1",
}
# ``transition_loss`` keys -> ``config.loss`` fields.
_LOSS = {
  "diffusion_ratio": "diffusion_ratio",
  "consistency_ratio": "consistency_ratio",
  "derivative_type": "derivative",
  "differential_epsilon": "epsilon",
  "weight_time_type": "weight_time_type",
  "weight_time_tangent": "weight_time_tangent",
  "weight_time_sigmoid": "weight_time_sigmoid",
}


def _get(tree: dict, dotted: str, path: str) -> Any:
  node = tree
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      raise UserError(f"{path}: no {dotted!r}; is this an official TiM YAML?")
    node = node[part]
  return node


def _autoencoder(vae_dir: str, path: str) -> str:
  name = str(vae_dir).rstrip("/").rsplit("/", 1)[-1]
  if name not in _AUTOENCODERS:
    raise UserError(
      f"{path}: model.vae_dir {vae_dir!r} is none of the official "
      f"autoencoders {sorted(_AUTOENCODERS)}"
    )
  return _AUTOENCODERS[name]


def is_official_yaml(spec: str) -> bool:
  """Whether ``spec`` names a YAML file (rather than a Python config)."""
  return str(spec).split(":", 1)[0].endswith((".yaml", ".yml"))


def config_from_yaml(path: str) -> ml_collections.ConfigDict:
  """The locked tim_jax config of an official TiM YAML (sampling-ready).

  Maps the network, transport, loss, autoencoder and text encoder; the
  autoencoder's and text encoder's directories stay unset (pass them to
  ``inference.load``). ``path`` may be a hub id (``hf://...yaml``).
  UserError for a file that is not such a YAML.
  """
  p = epath.Path(hub.resolve(path))  # A hub id downloads the file.
  if not p.is_file():
    raise UserError(f"no official config YAML at {path}")
  try:
    tree = yaml.safe_load(p.read_text())
  except yaml.YAMLError as e:
    raise UserError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(tree, dict):
    raise UserError(f"{path}: not an official TiM YAML (no mapping)")
  network = _get(tree, "model.network", path)
  target = str(network.get("target", ""))
  kind = _KINDS.get(".".join(target.split(".")[-3:-1]))
  if kind is None:
    raise UserError(
      f"{path}: model.network.target {target!r} is not an official TiM "
      "network (tim.models.c2i.tim_model.TiM or tim.models.t2i...)"
    )
  c = config_base.base_config()
  c.model.kind = kind
  c.model.network = ml_collections.ConfigDict(dict(network.get("params", {})))

  transport = _get(tree, "model.transport", path)
  params = dict(transport.get("params") or {})
  for key in transports.LOSS_ONLY_PARAMS:  # The official keeps them here.
    if key in params:
      c.loss[key] = params.pop(key)
  c.transport.name = str(transport.get("target", "")).rsplit(".", 1)[-1]
  transports.get(c.transport.name, **params)  # Refuses unknown fields.
  c.transport.params = ml_collections.ConfigDict(params)

  for key, value in (
    _get(tree, "model", path).get("transition_loss") or {}
  ).items():
    if key not in _LOSS:
      raise UserError(f"{path}: unknown model.transition_loss.{key}")
    c.loss[_LOSS[key]] = value

  model = tree["model"]
  size = int(c.model.network.get("input_size", 32))
  c.data.image_size = size
  c.sample.image_size = size
  c.data.name = "latents" if kind == "c2i" else "captions"
  c.autoencoder.name = _autoencoder(_get(tree, "model.vae_dir", path), path)
  if kind == "t2i":
    if not model.get("use_last_hidden_state", True):
      raise UserError(
        f"{path}: use_last_hidden_state: False (features from an earlier "
        "Gemma layer) is not supported; the released model uses the last"
      )
    c.text_encoder.name = "gemma3"
    c.text_encoder.max_length = int(model.get("max_seq_length", 256))
  if model.get("proj_coeff") is not None:
    c.loss.proj_coeff = float(model["proj_coeff"])
  if model.get("ema_decay") is not None:
    c.ema_decay = float(model["ema_decay"])
  return config_base.lock(c)
