"""The Colab sampling notebook runs headless, top to bottom, on CPU: its
first cell from a released model's name to a labelled grid, the files
coming from a Hugging Face Hub on 127.0.0.1 (tests/hub_server.py serving
tests/hub_repos.py's small random-weight repositories under the real
names), and from a tiny tim_jax run."""

import json
import os
import re
import types

import hub_repos
import nbclient
import nbformat
from PIL import Image
import pytest

from tim_jax import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "sample_colab.ipynb")
# What the first cell's form and optional lines set, in order.
PARAMETERS = (
  "MODEL",
  "LABELS",
  "PROMPTS",
  "STEPS",
  "SEED",
  "HEIGHT",
  "WIDTH",
  "NUM_PER_PROMPT",
  "TIM_JAX",
  "CHECKPOINT",
  "CONFIG",
  "AUTOENCODER_PATH",
  "TEXT_ENCODER_PATH",
  "DTYPE",
  "COMPARE_STEPS",
  "OUT_DIR",
)


def first_code_cell(nb):
  return next(c for c in nb.cells if c.cell_type == "code")


def set_parameters(nb, **values):
  """Sets the first cell's ``NAME = value`` lines (its Colab form fields
  keep their annotations), as a user editing the form would."""
  cell = first_code_cell(nb)
  for name, value in values.items():
    line = re.compile(rf"^{name} = .*?(  # @param.*)?$", re.M)
    assert len(line.findall(cell.source)) == 1, name
    cell.source = line.sub(
      lambda m, v=value: f"{name} = {v!r}{m.group(1) or ''}", cell.source
    )


def run(tmp_path, env=None, **values):
  """Runs the notebook with the first cell's ``values`` (OUT_DIR under
  ``tmp_path``); returns (output folder, printed text, PNGs shown)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  out_dir = str(tmp_path / "samples")
  set_parameters(nb, OUT_DIR=out_dir, **values)
  client = nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute(**({"env": env} if env else {}))  # Raises on a failure.
  outputs = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  ]
  text = "".join(o.get("text", "") for o in outputs)
  shown = sum("image/png" in o.get("data", {}) for o in outputs)
  return out_dir, text, shown


def test_first_cell_holds_the_parameters_and_the_presets():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
  source = first_code_cell(nb).source
  # Every parameter once, at the top, before anything runs.
  names = re.findall(r"^([A-Z_]+) = ", source, re.M)
  assert tuple(names) == PARAMETERS
  assert source.index("OUT_DIR = ") < source.index("import ")
  # The form's menu offers exactly the presets; the default is one.
  menu = re.search(r'^MODEL = "(.*?)"  # @param (\[.*\])$', source, re.M)
  assert menu and json.loads(menu.group(2)) == list(inference.PRESETS)
  assert menu.group(1) in inference.PRESETS


def test_device_dtype_follows_the_accelerator():
  device = lambda platform, cc=None: types.SimpleNamespace(
    platform=platform, compute_capability=cc
  )
  assert inference.device_dtype(device("tpu")) == "bfloat16"
  assert inference.device_dtype(device("gpu", "8.0")) == "bfloat16"  # A100
  assert inference.device_dtype(device("gpu", "8.9")) == "bfloat16"  # L4
  assert inference.device_dtype(device("gpu", "7.5")) == "float32"  # T4
  assert inference.device_dtype(device("gpu", "7.0")) == "float32"  # V100
  assert inference.device_dtype(device("gpu", "10.0")) == "bfloat16"
  assert inference.device_dtype(device("gpu", "gfx90a")) == "float32"
  assert inference.device_dtype(device("cpu")) == "float32"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_first_cell_draws_imagenet_classes_from_the_hub(model_hub, tmp_path):
  """tim-c2i-256 by name: the official-format weights and SD-VAE come
  from the Hub, the grid names the classes, bigger than the samples."""
  env = hub_repos.environment(model_hub.url, tmp_path / "home")
  out_dir, text, shown = run(
    tmp_path,
    env,
    MODEL="tim-c2i-256",
    CONFIG=hub_repos.SMOKE["tim-c2i-256"],
    LABELS=[207, 360],
    STEPS=2,
    NUM_PER_PROMPT=2,
    COMPARE_STEPS=[1],
  )
  assert shown == 2  # The first cell's grid and the comparison's.
  assert "row 0: class 207: golden retriever" in text
  assert "row 1: class 360: otter" in text
  # CPU: float32 (the config says bfloat16, which a CPU only emulates).
  assert "computing in float32" in text
  grid = Image.open(os.path.join(out_dir, "grid.png"))
  # 256 px samples (32 latents x SD-VAE's 8), labels in a 260 px column.
  assert grid.size[0] == 260 + 2 * (256 + 4) + 4
  assert grid.size[1] > 2 * (256 + 4)
  assert model_hub.count("/GoodEnough/TiM-C2I/resolve/main/c2i_model_256") >= 1
  assert model_hub.count("/stabilityai/sd-vae-ft-ema/resolve/") >= 1
  assert model_hub.count("c2i_model_512") == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_first_cell_draws_prompts_from_the_hub(model_hub, tmp_path):
  """tim-t2i by name with a token: the torch-pickled official weights,
  the gated Gemma-3 and DC-AE from the Hub, drawn at the asked size."""
  env = hub_repos.environment(
    model_hub.url, tmp_path / "home", HF_TOKEN=hub_repos.TOKEN
  )
  prompts = ["a red bus at night", "a bowl of soup"]
  out_dir, text, shown = run(
    tmp_path,
    env,
    MODEL="tim-t2i",
    CONFIG=hub_repos.SMOKE["tim-t2i"],
    PROMPTS=prompts,
    HEIGHT=64,
    WIDTH=96,
    STEPS=2,
    NUM_PER_PROMPT=2,
    COMPARE_STEPS=[],
  )
  assert shown == 1
  assert f"row 0: {prompts[0]}" in text and f"row 1: {prompts[1]}" in text
  assert "4 images of 64x96 px" in text
  grid = Image.open(os.path.join(out_dir, "grid.png"))
  # 64x96 images enlarged 4x to 256x384, the prompts on the left.
  assert grid.size[0] == 260 + 2 * (384 + 4) + 4
  for repo in (
    "GoodEnough/TiM-T2I",
    "google/gemma-3-1b-it",
    "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
  ):
    assert model_hub.count(f"/{repo}/resolve/") >= 1, repo


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_tiny_run_at_1_4_16_steps_with_the_oracle(tiny_t2i_workdir, tmp_path):
  """MODEL = "" and a tim_jax workdir: the run's own config, the same
  noise at 1, 4 and 16 steps, the shapes oracle's scores."""
  prompts = ["a red circle at the top left", "a blue square in the center"]
  out_dir, text, shown = run(
    tmp_path,
    MODEL="",
    CHECKPOINT=tiny_t2i_workdir,
    PROMPTS=prompts,
    STEPS=4,
    NUM_PER_PROMPT=2,
  )
  assert shown == 4  # The first cell's grid, then 1, 4 and 16 steps.
  for steps in (1, 4, 16):
    grid = Image.open(os.path.join(out_dir, f"grid_{steps}_steps.png"))
    # 32 px enlarged to 256, prompts in a 260 px column, a title on top.
    assert grid.size[0] == 260 + 2 * 260 + 4 and grid.size[1] > 2 * 260
    assert f"{steps:3d} steps: overall" in text  # The oracle's scores.
  assert f"row 0: {prompts[0]}" in text


def test_large_pictures_decode_a_megapixel_at_a_time():
  """One 1024x1024 image's float32 temporaries in the DC-AE decoder take
  ~5 GiB: a 16 GiB chip decodes such images one at a time."""
  config = inference.PRESETS["tim-t2i"].load_config()
  assert config.autoencoder.batch_size == 16
  assert inference.decode_batch(config, 8, 1024, 1024) == 1
  assert inference.decode_batch(config, 8, 1024, 768) == 1
  assert inference.decode_batch(config, 8, 512, 512) == 4
  assert inference.decode_batch(config, 32, 256, 256) == 16  # The config's.
  assert inference.decode_batch(config, 3, 256, 256) == 3
  assert inference.decode_batch(config, 2, 2048, 2048) == 1
