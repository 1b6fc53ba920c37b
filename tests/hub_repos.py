"""The released models' Hub repositories, small: random weights in the real
repositories' layouts and file names, for tests/hub_server.py.

The TiM checkpoints are the presets' architectures shrunk by the configs'
``smoke`` option (``SMOKE``: pass it as ``--config`` next to
``--model``), written in the official layout through
``tim_jax.weights.convert``; the autoencoders keep their real
configurations' block structure (so their downsampling: 8 and 32) with few
channels; Gemma-3 is ``gemma_utils``' model as wide as the smoke T2I
model's caption features; RADIO is the golden test checkpoint.
"""

import json
import os

import autoencoder_utils
import gemma_utils
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
TOKEN = "hf_test_token_with_access"  # The token the gated Gemma accepts.
# The smoke-sized config of each preset (what the tiny weights fit).
SMOKE = {
  "tim-c2i-256": "configs/c2i.py:xl2_256,smoke",
  "tim-c2i-512": "configs/c2i.py:xl1_512,smoke",
  "tim-t2i": "configs/t2i.py:xl,smoke",
}
MODEL_CARD = b"---\nlicense: other\n---\nA small random-weight stand-in.\n"


def _real_config(name):
  with open(os.path.join(DATA, "autoencoders", name, "config.json")) as f:
    return json.load(f)


def sd_vae_config():
  """sd-vae-ft-ema's configuration (4 blocks: downsampling 8), narrow."""
  c = _real_config("sd_vae_ft_ema")
  c.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1)
  c["norm_num_groups"] = 4
  return c


def dc_ae_config():
  """dc-ae-f32c32-sana-1.1's configuration (6 stages: downsampling 32,
  32 latent channels), narrow and one layer a stage."""
  c = _real_config("dc_ae_f32c32_sana_1.1")
  channels = [8, 8, 8, 16, 32, 32]  # The last as wide as the latents.
  c.update(
    encoder_block_out_channels=channels,
    decoder_block_out_channels=channels,
    encoder_layers_per_block=[1] * 6,
    decoder_layers_per_block=[1] * 6,
    attention_head_dim=8,
  )
  return c


def tim_weights(spec, seed):
  """The official state dict of a random TiM of config ``spec``."""
  from tim_jax.config import builders, config_base
  from tim_jax.weights import convert

  config = config_base.load_file(spec)
  weights = convert.to_official(builders.new_model(config))
  rng = np.random.default_rng(seed)
  # Perturbed, so the zero-initialised output layers do not hide the rest.
  return {
    k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32)
    for k, v in weights.items()
  }


def build(root):
  """Writes the repositories under ``root`` (``owner/name/...``); returns
  {repo_id: folder}."""
  from safetensors.numpy import save_file
  import torch

  repos = {}

  def folder(repo_id):
    path = os.path.join(root, *repo_id.split("/"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "README.md"), "wb") as f:
      f.write(MODEL_CARD)
    repos[repo_id] = path
    return path

  c2i = folder("GoodEnough/TiM-C2I")
  save_file(
    tim_weights(SMOKE["tim-c2i-256"], 0),
    os.path.join(c2i, "c2i_model_256.safetensors"),
  )
  save_file(
    tim_weights(SMOKE["tim-c2i-512"], 1),
    os.path.join(c2i, "c2i_model_512.safetensors"),
  )
  t2i = folder("GoodEnough/TiM-T2I")
  torch.save(
    {
      k: torch.from_numpy(v)
      for k, v in tim_weights(SMOKE["tim-t2i"], 2).items()
    },
    os.path.join(t2i, "t2i_model.bin"),
  )
  # sd-vae-ft-ema holds its weights twice (.bin and .safetensors).
  vae = folder("stabilityai/sd-vae-ft-ema")
  model = autoencoder_utils.write(sd_vae_config(), vae, seed=3)
  torch.save(
    model.state_dict(), os.path.join(vae, "diffusion_pytorch_model.bin")
  )
  autoencoder_utils.write(
    dc_ae_config(), folder("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"), 4
  )
  gemma = folder("google/gemma-3-1b-it")
  gemma_utils.write(gemma, seed=5, hidden_size=16)
  with open(os.path.join(gemma, "tokenizer.model"), "wb") as f:
    f.write(b"\0" * 64)  # The sentencepiece file, which is not read.
  radio = folder("nvidia/RADIO")
  with open(os.path.join(DATA, "radio", "radio_plain.pth"), "rb") as src:
    with open(os.path.join(radio, "radio-v2.5-b_half.pth.tar"), "wb") as f:
      f.write(src.read())
  return repos


GATED = ("google/gemma-3-1b-it",)


def environment(url, home, **extra):
  """A client process's environment: the hub at ``url``, a fresh cache
  under ``home``, no token (unless given in ``extra``), progress bars even
  without a terminal, this checkout importable. huggingface_hub reads
  these when it is imported, hence a new process (as a user's shell)."""
  root = os.path.dirname(HERE)
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("HF_", "HUGGING_FACE_"))
    and k != "TRANSFORMERS_OFFLINE"
  }
  env.update(
    HF_ENDPOINT=url,
    HF_HOME=str(home),
    HF_HUB_DISABLE_TELEMETRY="1",
    TQDM_POSITION="-1",  # huggingface_hub's switch: bars without a tty.
    PYTHONPATH=root,
  )
  env.update(extra)
  return env


def make_hub(root):
  """A hub_server.Hub serving ``build(root)``; Gemma is gated (``TOKEN``
  has access)."""
  import hub_server

  hub = hub_server.Hub(tokens=[TOKEN])
  for repo_id, path in build(root).items():
    hub.add_folder(repo_id, path, gated=repo_id in GATED)
  return hub
