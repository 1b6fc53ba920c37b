"""Writes the RADIO golden cases from the official TiM code.

    python tests/make_radio_golden.py --official=PATH/TO/TiM \
        --out=tests/data/radio

PATH/TO/TiM is a checkout of the official repository (github.com/WZDTHU/TiM);
its vendored RADIO code (tim/models/nvidia_radio) is imported from there,
never copied here. Needs torch and timm. ``flash_attn`` (used only by the
packed-sequence path the trainer does not take) is stubbed, and so is
``torchvision`` when it is missing (timm imports a few names from it that a
ViT never uses).

For each case, a small ViT with random weights is saved in RADIO's checkpoint
format (pickled ``args`` + ``state_dict``, optionally ``state_dict_ema``),
loaded back with the official ``radio_model`` loader, and run as the official
trainer runs it (``projects/train/trainer_c2i.py``): images in [-1, 1] ->
(x + 1) / 2 -> bicubic resize to 16 x the TiM grid -> the model -> patch
tokens. Inputs, grids and features go to ``<case>.npz`` beside
``<case>.pth``. A case with a bfloat16 ``args.dtype`` also stores
``features_f32_<i>``: the official model with the weights and input as its
loader rounds them (to bfloat16), computed in float32. ``--cases`` writes
only the named cases (their seeds do not change).
"""

import argparse
import copy
import importlib.abc
import importlib.machinery
import os
import sys
import types

import numpy as np

# Small stand-ins for RADIO v2.5-B (ViT-B/16; its CPE table is 128 x 128
# patches, here 32 x 32; one class token per teacher, registers to a
# multiple of 8).
CASES = {
  # No LayerScale, no final norm, plain state_dict.
  "radio_plain": dict(
    layer_scale=None,
    model_norm=False,
    ema=False,
    teachers=("clip", "siglip", "dino"),
    grids=((4, 4), (3, 5)),
  ),
  # LayerScale, the final norm, an EMA state dict that must win, and a
  # feature normalizer.
  "radio_ls_ema": dict(
    layer_scale=0.1,
    model_norm=True,
    ema=True,
    teachers=("clip", "dino"),
    feature_normalizer=True,
    grids=((4, 4), (2, 3)),
  ),
  # timm's qk_norm, a patch norm (RADIO's patch_normalizer), a bfloat16
  # args.dtype (the loader casts the ViT and the input conditioner's output
  # to it), a feature normalizer, and keys the official model never uses:
  # a classifier head, the final norm without args.model_norm and timm's
  # own patch embedding's norm.
  "radio_qknorm_bf16": dict(
    layer_scale=None,
    model_norm=False,
    ema=False,
    qk_norm=True,
    patch_norm=True,
    dtype="bfloat16",
    teachers=("clip", "dino"),
    feature_normalizer=True,
    unused_keys=True,
    grids=((4, 4), (3, 5)),
  ),
}
EMBED, DEPTH, HEADS, CPE_MAX = 64, 2, 2, 512


def use_official(path):
  """Makes the official checkout at ``path`` importable here: the CUDA-only
  and missing modules stubbed (``flash_attn``'s functions, which the CPU
  paths never call, and ``torchvision`` when absent)."""
  _stub_modules()
  sys.modules["flash_attn"].flash_attn_func = None
  sys.path.insert(0, os.path.abspath(path))


def _stub_modules():
  fa = types.ModuleType("flash_attn")
  fa.flash_attn_varlen_func = None
  sys.modules.setdefault("flash_attn", fa)
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:

    class _Any(type):
      def __getattr__(cls, name):
        if name.startswith("__"):
          raise AttributeError(name)
        return _Any(name, (object,), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
      def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
          return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

      def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []

        def attr(name):
          if name.startswith("__"):
            raise AttributeError(name)
          return _Any(name, (object,), {})

        m.__getattr__ = attr
        return m

      def exec_module(self, module):
        pass

    sys.meta_path.insert(0, _Finder())


def make_checkpoint(case, path, torch, seed):
  import timm  # noqa: F401  (registers the ViT the checkpoint names)

  kwargs = dict(depth=DEPTH, embed_dim=EMBED, num_heads=HEADS)
  if case["layer_scale"]:
    kwargs["init_values"] = case["layer_scale"]
  if case.get("qk_norm"):
    kwargs["qk_norm"] = True
  if case.get("patch_norm"):
    kwargs["embed_norm_layer"] = "layernorm"
  args = argparse.Namespace(
    model="vit_base_patch16_224",
    model_kwargs=dict(kwargs),
    in_chans=None,
    input_size=None,
    pretrained=False,
    num_classes=0,
    drop=0.0,
    drop_path=0.0,
    drop_block=None,
    gp=None,
    bn_momentum=None,
    bn_eps=None,
    torchscript=False,
    initial_checkpoint=None,
    model_norm=case["model_norm"],
    cpe_max_size=CPE_MAX,
    teachers=[dict(name=t, type="generic") for t in case["teachers"]],
    cls_token_per_teacher=True,
    register_multiple=8,
    spectral_reparam=False,
    dtype=getattr(torch, case.get("dtype", "float32")),
  )
  gen = torch.Generator().manual_seed(seed)

  def random_state():
    from tim.models.nvidia_radio.radio.radio_model import create_model_from_args  # pylint: disable=import-outside-toplevel

    a = argparse.Namespace(**vars(args))
    a.model_kwargs = dict(kwargs)
    a.support_packing = False
    model = create_model_from_args(a)
    state = {}
    for k, v in model.state_dict().items():
      noise = torch.randn(v.shape, generator=gen)
      if k.endswith(
        ("norm1.weight", "norm2.weight", "_norm.weight", "normalizer.weight")
      ) or (k == "norm.weight"):
        v = 1.0 + 0.1 * noise
      elif k.endswith("gamma"):
        v = case["layer_scale"] * (1.0 + 0.5 * noise)
      else:
        v = 0.05 * noise if v.ndim == 1 else noise * v.shape[-1] ** -0.5
      state["base_model." + k] = v.float()
    state["input_conditioner.norm_mean"] = torch.tensor(
      [0.48145466, 0.4578275, 0.40821073]
    ).view(3, 1, 1)
    state["input_conditioner.norm_std"] = torch.tensor(
      [0.26862954, 0.26130258, 0.27577711]
    ).view(3, 1, 1)
    if case.get("unused_keys"):
      state["base_model.head.weight"] = torch.randn(10, EMBED, generator=gen)
      state["base_model.head.bias"] = torch.randn(10, generator=gen)
      state["base_model.norm.weight"] = torch.randn(EMBED, generator=gen)
      state["base_model.norm.bias"] = torch.randn(EMBED, generator=gen)
      state["base_model.patch_embed.norm.weight"] = torch.randn(
        EMBED, generator=gen
      )
    if case.get("feature_normalizer"):
      state["_feature_normalizer.mean"] = 0.1 * torch.randn(
        EMBED, generator=gen
      )
      state["_feature_normalizer.tx"] = torch.eye(EMBED) + 0.1 * torch.randn(
        EMBED, EMBED, generator=gen
      )
    return state

  chk = dict(args=args, state_dict=random_state())
  if case["ema"]:
    chk["state_dict_ema"] = random_state()
  torch.save(chk, path)


def main():
  p = argparse.ArgumentParser()
  p.add_argument(
    "--official", required=True, help="a checkout of github.com/WZDTHU/TiM"
  )
  p.add_argument(
    "--out",
    default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "data", "radio"
    ),
  )
  p.add_argument(
    "--cases", default="", help="comma-separated case names (default: all)"
  )
  a = p.parse_args()
  only = set(filter(None, a.cases.split(",")))
  _stub_modules()
  sys.path.insert(0, os.path.abspath(a.official))
  from tim.models.nvidia_radio.hubconf import radio_model  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  os.makedirs(a.out, exist_ok=True)
  for seed, (name, case) in enumerate(sorted(CASES.items())):
    if only and name not in only:
      continue
    ckpt = os.path.join(a.out, f"{name}.pth")
    make_checkpoint(case, ckpt, torch, seed)
    encoder = radio_model(
      version=ckpt, progress=False, support_packing=False
    ).eval()
    as_f32 = None
    if case.get("dtype", "float32") != "float32":
      # The loader's rounding of the weights and the input, then float32.
      as_f32 = copy.deepcopy(encoder).float()
      as_f32.input_conditioner.register_forward_hook(
        lambda m, i, out: out.float()
      )
    arrays = {}
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(case["grids"]):
      # The TiM latent grid (h, w) comes from 8x larger pixel images.
      images = rng.uniform(-1, 1, (2, 8 * h + 3, 8 * w + 1, 3)).astype(
        np.float32
      )
      x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
      with torch.no_grad():
        raw = (x + 1.0) / 2.0
        raw = F.interpolate(raw, (16 * h, 16 * w), mode="bicubic")
        _, features = encoder(raw)
        if as_f32 is not None:
          arrays[f"features_f32_{i}"] = as_f32(raw)[1].numpy()
      arrays[f"images_{i}"] = images
      arrays[f"grid_{i}"] = np.asarray([h, w])
      arrays[f"features_{i}"] = features.float().numpy()
    np.savez(os.path.join(a.out, f"{name}.npz"), **arrays)
    print(f"wrote {name}: {sorted(arrays)}")


if __name__ == "__main__":
  main()
