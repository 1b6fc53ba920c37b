"""The Colab sampling notebook runs headless, top to bottom, on CPU."""

import json
import os
import time

import nbclient
import nbformat
from PIL import Image
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "sample_colab.ipynb")


def run_with(tmp_path, parameters: str):
  """Executes the notebook with ``parameters`` (code) after its parameters
  cell; returns (output folder, all printed text)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(
    i
    for i, c in enumerate(nb.cells)
    if "parameters" in c.metadata.get("tags", [])
  )
  out_dir = str(tmp_path / "samples")
  nb.cells.insert(
    index + 1,
    nbformat.v4.new_code_cell(parameters + f"\nOUT_DIR = {out_dir!r}\n"),
  )
  nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  ).execute()
  text = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  return out_dir, text


def test_notebook_is_valid_with_one_parameters_cell():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebook_samples_at_1_4_16_steps(tiny_t2i_workdir, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(
    i
    for i, c in enumerate(nb.cells)
    if "parameters" in c.metadata.get("tags", [])
  )
  out_dir = str(tmp_path / "samples")
  prompts = ["a red circle at the top left", "a blue square in the center"]
  injected = nbformat.v4.new_code_cell(
    f"CHECKPOINT = {tiny_t2i_workdir!r}\nOUT_DIR = {out_dir!r}\n"
    f"PROMPTS = {json.dumps(prompts)}\nNUM_PER_PROMPT = 2\n"
  )
  nb.cells.insert(index + 1, injected)
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  t0 = time.time()
  client.execute()  # Raises CellExecutionError on any failing cell.
  print(f"notebook ran in {time.time() - t0:.1f} s")

  pngs = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(pngs) == 3  # One grid per step count.
  for steps in (1, 4, 16):
    grid = Image.open(os.path.join(out_dir, f"grid_{steps}_steps.png"))
    # 32 px enlarged to 128, prompts in a 220 px column, a title on top.
    assert grid.size[0] == 220 + 2 * 132 + 4 and grid.size[1] > 2 * 132 + 4
  text = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  for steps in (1, 4, 16):
    assert f"{steps:3d} steps: overall" in text  # The oracle's scores.


def test_notebook_decodes_an_official_c2i_checkpoint(tmp_path):
  """An official-format C2I file (here a smoke-sized XL/2 written by
  tim_jax.weights.convert) plus an SD-VAE directory (a small random one in
  diffusers' layout): the notebook shows decoded grids of the labels."""
  import autoencoder_utils as au

  from tim_jax.config import builders, config_base
  from tim_jax.weights import convert

  spec = os.path.join(ROOT, "configs", "c2i.py") + ":xl2_256,smoke"
  model = builders.new_model(config_base.load_file(spec))
  official = str(tmp_path / "c2i_model.safetensors")
  convert.save_official(model, official)
  vae = tmp_path / "sd-vae"
  au.write(au.KL_SMALL, vae)  # Downsamples by 2: 32x32 latents -> 64 px.
  out_dir, text = run_with(
    tmp_path,
    f"CHECKPOINT = {official!r}\nCONFIG = {spec!r}\n"
    f"AUTOENCODER_PATH = {str(vae)!r}\nLABELS = [207, 360]\n"
    f"NUM_PER_PROMPT = 2\nSTEPS = [1, 4]",
  )
  for steps in (1, 4):
    grid = Image.open(os.path.join(out_dir, f"grid_{steps}_steps.png"))
    # Decoded 64 px images, enlarged to 128 px, labels on the left.
    assert grid.size[0] == 220 + 2 * 132 + 4 and grid.size[1] > 2 * 132 + 4
  assert "row 0: class 207" in text and "row 1: class 360" in text


def test_notebook_draws_prompts_with_an_official_t2i_checkpoint(tmp_path):
  """An official-format T2I file (a torch-pickled state dict, as
  t2i_model.bin; here a smoke-sized T2I-XL), a Gemma-3 directory and a
  DC-AE directory (small random ones in the Hugging Face / diffusers
  layouts): the notebook draws the prompts at the asked size."""
  import autoencoder_utils as au
  import gemma_utils
  import torch

  from tim_jax.config import builders, config_base
  from tim_jax.weights import convert

  spec = os.path.join(ROOT, "configs", "t2i.py") + ":xl,smoke"
  model = builders.new_model(config_base.load_file(spec))
  official = str(tmp_path / "t2i_model.bin")
  torch.save(
    {
      k: torch.from_numpy(v.copy())
      for k, v in convert.to_official(model).items()
    },
    official,
  )
  gemma_dir = tmp_path / "gemma"
  gemma_utils.write(
    gemma_dir,
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    query_pre_attn_scalar=8,
  )
  dcae = tmp_path / "dcae"
  au.write(dict(au.DC_CONV, latent_channels=32), dcae)  # f8, 32 channels.
  prompts = ["a red bus at night", "a bowl of soup"]
  out_dir, text = run_with(
    tmp_path,
    f"CHECKPOINT = {official!r}\nCONFIG = {spec!r}\n"
    f"AUTOENCODER_PATH = {str(dcae)!r}\n"
    f"TEXT_ENCODER_PATH = {str(gemma_dir)!r}\n"
    f"PROMPTS = {json.dumps(prompts)}\nHEIGHT = 64\nWIDTH = 96\n"
    f"NUM_PER_PROMPT = 2\nSTEPS = [1, 4]",
  )
  for steps in (1, 4):
    grid = Image.open(os.path.join(out_dir, f"grid_{steps}_steps.png"))
    # 64x96 decoded images, enlarged 2x, the prompts on the left.
    assert grid.size[0] == 220 + 2 * 196 + 4 and grid.size[1] > 2 * 132 + 4
  assert f"row 0: {prompts[0]}" in text and f"row 1: {prompts[1]}" in text
