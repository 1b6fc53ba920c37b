"""The TiM backbones by name: the paper's models and the tiny shapes models.

Each entry gives the kind (``c2i`` or ``t2i``) and the network in the
official YAML ``network.params`` names (the paper's Table of models; the
official ``configs/c2i/*.yaml`` and ``configs/t2i/*.yaml``):

==========  =====  ==========================================================
name        kind   what
==========  =====  ==========================================================
B/4         c2i    TiM-B/4, ImageNet 256 on SD-VAE latents (32x32x4)
XL/2        c2i    TiM-XL/2, ImageNet 256 on SD-VAE latents (32x32x4)
XL/1        c2i    TiM-XL/1, ImageNet 512 on DC-AE f32c32 latents (16x16x32)
T2I-XL      t2i    the 865M text-to-image model on DC-AE f32c32 latents
tiny-c2i    c2i    D 128, depth 4, patch 4 on the 32x32 RGB shapes world
tiny-t2i    t2i    the same with caption features of width 64
==========  =====  ==========================================================

Configs (``configs/*.py``) and tests take their networks from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tim_jax.core.errors import UserError

_OPTIONS = dict(
  qk_norm=True, new_condition="t-r", use_new_embed=True, distance_aware=True
)
_XL = dict(
  depth=28,
  hidden_size=1152,
  num_heads=16,
  encoder_depth=8,
  lora_hidden_size=384,
  z_dim=768,
  projector_dim=2048,
)
_B = dict(
  depth=12,
  hidden_size=768,
  num_heads=12,
  encoder_depth=4,
  lora_hidden_size=256,
  z_dim=768,
  projector_dim=2048,
)
_IMAGENET = dict(class_dropout_prob=0.1, num_classes=1000)
_TINY = dict(
  input_size=32,
  patch_size=4,
  in_channels=3,
  depth=4,
  hidden_size=128,
  num_heads=4,
  encoder_depth=2,
  z_dim=32,
  projector_dim=128,
  lora_hidden_size=32,
)
# The shapes world's classes: 6 colours x 3 shapes (tim_jax.shapes.world).
_SHAPES_CLASSES = 18


@dataclasses.dataclass(frozen=True)
class Architecture:
  kind: str  # "c2i" or "t2i".
  network: dict[str, Any]  # Official network.params names.


TABLE = {
  "B/4": Architecture(
    "c2i",
    dict(
      _OPTIONS, **_B, **_IMAGENET, input_size=32, patch_size=4, in_channels=4
    ),
  ),
  "XL/2": Architecture(
    "c2i",
    dict(
      _OPTIONS, **_XL, **_IMAGENET, input_size=32, patch_size=2, in_channels=4
    ),
  ),
  "XL/1": Architecture(
    "c2i",
    dict(
      _OPTIONS, **_XL, **_IMAGENET, input_size=16, patch_size=1, in_channels=32
    ),
  ),
  "T2I-XL": Architecture(
    "t2i",
    dict(
      _OPTIONS,
      **_XL,
      input_size=16,
      patch_size=1,
      in_channels=32,
      cap_feat_dim=1152,
    ),
  ),
  "tiny-c2i": Architecture(
    "c2i",
    dict(
      _OPTIONS, **_TINY, class_dropout_prob=0.1, num_classes=_SHAPES_CLASSES
    ),
  ),
  "tiny-t2i": Architecture("t2i", dict(_OPTIONS, **_TINY, cap_feat_dim=64)),
}
NAMES = tuple(TABLE)


def get(name: str) -> Architecture:
  """The named architecture; ValueError for an unknown name."""
  if name not in TABLE:
    raise UserError(f"unknown architecture {name!r}; known: {NAMES}")
  return TABLE[name]


def kind(name: str) -> str:
  """``c2i`` or ``t2i`` for the named architecture."""
  return get(name).kind


def network(name: str, **overrides) -> dict[str, Any]:
  """A copy of the named network, with ``overrides`` applied."""
  return dict(get(name).network, **overrides)
