"""Hugging Face Hub ids and the released models' presets, against a hub on
127.0.0.1 (tests/hub_server.py) and huggingface_hub's real client.

The client reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is
imported, so everything that downloads runs in a child process with them
set (as a user's shell would). The presets run end to end on random
weights in the real repositories' layouts (tests/hub_repos.py), shrunk by
the configs' ``smoke`` option.
"""

import json
import os
import socket
import subprocess
import sys

import hub_repos
import hub_server
import numpy as np
from PIL import Image
import pytest

from tim_jax.core import hub
from tim_jax.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # Seconds a child process may take (a preset end to end).


environment = hub_repos.environment


def run(args, env, timeout=TIMEOUT):
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# --- hub ids, with a small hub ------------------------------------------------

RESOLVE = r"""
import json, os, sys
from tim_jax.core import hub
for uri in sys.argv[1:]:
  patterns = ("*.json",) if uri.endswith("/sub") else None
  try:
    p = hub.resolve(uri, allow_patterns=patterns)
  except Exception as e:
    print(json.dumps({"uri": uri, "error": type(e).__name__ + ": " + str(e)}))
    continue
  if os.path.isfile(p):
    got = open(p, "rb").read().decode()
  else:
    got = sorted(
      os.path.relpath(os.path.join(d, f), p)
      for d, _, fs in os.walk(p) for f in fs
    )
  print(json.dumps({"uri": uri, "path": p, "got": got}))
"""


@pytest.fixture(scope="module")
def small_hub():
  h = hub_server.Hub(tokens=["good-token"])
  h.old = h.add("owner/repo", {"w.safetensors": b"old"}, revision="v1")
  h.add(
    "owner/repo",
    {
      "w.safetensors": b"new",
      "sub/config.json": b"{}",
      "sub/weights.bin": b"big",
      "sub/deeper/a.json": b"[]",
    },
  )
  h.add("owner/gated", {"config.json": b"{}"}, gated=True)
  h.add("owner/data", {"x.txt": b"rows"}, repo_type="dataset")
  with hub_server.serve(h) as url:
    h.url = url
    yield h


def resolve(uris, env):
  done = run(["-c", RESOLVE, *uris], env, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  return {r["uri"]: r for r in map(json.loads, done.stdout.splitlines())}


def test_hub_ids_parse():
  assert hub.parse("hf://a/b") == hub.HubPath("a/b")
  assert hub.parse("hf://a/b@v1/c/d.bin") == hub.HubPath("a/b", "v1", "c/d.bin")
  assert hub.parse("hf://a/b@refs%2Fpr%2F1/x") == hub.HubPath(
    "a/b", "refs/pr/1", "x"
  )
  d = hub.parse("hf://datasets/a/b/x.txt")
  assert d == hub.HubPath("a/b", None, "x.txt", "dataset")
  assert str(d) == "hf://datasets/a/b/x.txt"
  assert str(hub.parse("hf://a/b@v1/c")) == "hf://a/b@v1/c"
  for bad in ("hf://", "hf://a", "hf://a/@v1", "hf://a/b@/x", "hf://a/b/../c"):
    with pytest.raises(UserError, match="hf://"):
      hub.parse(bad)
  # Anything else is a local path and passes through untouched.
  assert hub.resolve("weights/x.safetensors") == "weights/x.safetensors"
  assert hub.resolve(None) is None
  assert not hub.is_hub("/hf://x")


@pytest.mark.multiprocess
def test_files_folders_revisions_and_the_cache(small_hub, tmp_path):
  env = environment(small_hub.url, tmp_path / "home")
  before = small_hub.count()
  got = resolve(
    [
      "hf://owner/repo/w.safetensors",
      "hf://owner/repo@v1/w.safetensors",
      f"hf://owner/repo@{small_hub.old}/w.safetensors",
      "hf://owner/repo/sub",
      "hf://datasets/owner/data/x.txt",
    ],
    env,
  )
  assert got["hf://owner/repo/w.safetensors"]["got"] == "new"
  assert got["hf://owner/repo@v1/w.safetensors"]["got"] == "old"
  assert got[f"hf://owner/repo@{small_hub.old}/w.safetensors"]["got"] == "old"
  # A folder: only what allow_patterns names (no .bin) is fetched.
  assert got["hf://owner/repo/sub"]["got"] == [
    "config.json",
    os.path.join("deeper", "a.json"),
  ]
  assert small_hub.count("sub/weights.bin") == 0
  got.update(resolve(["hf://owner/repo"], env))  # The whole repository.
  assert "sub/weights.bin" in got["hf://owner/repo"]["got"]
  assert got["hf://datasets/owner/data/x.txt"]["got"] == "rows"
  # Everything lands in huggingface_hub's cache under HF_HOME.
  path = got["hf://owner/repo/w.safetensors"]["path"]
  assert path.startswith(str(tmp_path / "home" / "hub" / "models--owner--repo"))
  assert small_hub.count() > before

  # Offline: the same answers from the cache, and not one request.
  before = small_hub.count()
  offline = resolve(list(got), dict(env, HF_HUB_OFFLINE="1"))
  assert small_hub.count() == before
  for uri in got:
    assert offline[uri]["path"] == got[uri]["path"], uri
  missing = resolve(
    ["hf://owner/repo/never_fetched.bin"], dict(env, HF_HUB_OFFLINE="1")
  )
  error = missing["hf://owner/repo/never_fetched.bin"]["error"]
  assert error.startswith("UserError: hf://owner/repo/never_fetched.bin ")
  assert "not in the Hugging Face cache" in error and "HF_HUB_OFFLINE" in error


@pytest.mark.multiprocess
def test_hub_errors_are_one_line_naming_the_id(small_hub, tmp_path):
  env = environment(small_hub.url, tmp_path / "home")
  got = resolve(
    [
      "hf://owner/repo/nothing.safetensors",
      "hf://owner/nope/w.safetensors",
      "hf://owner/repo@v9/w.safetensors",
      "hf://owner/gated/config.json",
      "hf://owner/bad name/w.safetensors",
    ],
    env,
  )
  errors = {uri: r["error"] for uri, r in got.items()}
  for uri, error in errors.items():
    assert error.startswith(f"UserError: {uri}"), error
    assert "\n" not in error
  assert (
    "has no file or folder nothing.safetensors"
    in (errors["hf://owner/repo/nothing.safetensors"])
  )
  # The listing helps to spot a typo.
  assert "w.safetensors" in errors["hf://owner/repo/nothing.safetensors"]
  assert "no repository owner/nope" in errors["hf://owner/nope/w.safetensors"]
  assert "no revision v9" in errors["hf://owner/repo@v9/w.safetensors"]
  assert "bad name" in errors["hf://owner/bad name/w.safetensors"]
  gated = errors["hf://owner/gated/config.json"]
  assert "gated" in gated and "huggingface-cli login" in gated
  assert "HF_TOKEN" in gated
  # A token without access is told so; the right token downloads.
  wrong = resolve(["hf://owner/gated/config.json"], dict(env, HF_TOKEN="bad"))
  assert "token has no access" in wrong["hf://owner/gated/config.json"]["error"]
  right = resolve(
    ["hf://owner/gated/config.json"], dict(env, HF_TOKEN="good-token")
  )
  assert right["hf://owner/gated/config.json"]["got"] == "{}"


@pytest.mark.slow  # huggingface_hub retries for about 23 s before it gives up.
@pytest.mark.multiprocess
def test_an_unreachable_hub_is_one_line(tmp_path):
  with socket.socket() as s:  # A port nothing listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = environment(f"http://127.0.0.1:{port}", tmp_path / "home")
  got = resolve(["hf://owner/repo/w.safetensors"], env)
  error = got["hf://owner/repo/w.safetensors"]["error"]
  assert error.startswith(
    "UserError: hf://owner/repo/w.safetensors: cannot reach"
  )
  assert "not in the Hugging Face cache" in error


# --- the presets and the loaders, with the released repositories' layout ------


def sample(model, out, env, *args):
  return run(
    [
      "-m",
      "tim_jax.commands.sample",
      f"--model={model}",
      f"--config={hub_repos.SMOKE[model]}",
      "--steps=2",
      f"--out={out}",
      *args,
    ],
    env,
  )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_c2i_preset_samples_then_runs_offline_from_the_cache(
  model_hub, tmp_path
):
  env = environment(model_hub.url, tmp_path / "home")
  out = tmp_path / "c2i.png"
  done = sample("tim-c2i-256", out, env, "--labels=207,360")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote" in done.stdout and "class 207" in done.stdout
  picture = np.asarray(Image.open(out))
  # Two rows of 256 px (32 latents x SD-VAE's 8), labels beside them.
  assert picture.shape[0] >= 2 * 256 and picture.std() > 0
  # The preset fetched its three parts, with progress bars, and not the
  # .bin copy of the autoencoder's weights.
  assert "c2i_model_256.safetensors: 100%" in done.stderr
  assert model_hub.count("/GoodEnough/TiM-C2I/resolve/") >= 2
  assert model_hub.count("/stabilityai/sd-vae-ft-ema/resolve/") >= 2
  assert model_hub.count("diffusion_pytorch_model.bin") == 0
  assert model_hub.count("c2i_model_512") == 0

  before = model_hub.count()
  again = tmp_path / "c2i_offline.png"
  done = sample(
    "tim-c2i-256", again, dict(env, HF_HUB_OFFLINE="1"), "--labels=207,360"
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert model_hub.count() == before  # Not one request.
  np.testing.assert_array_equal(np.asarray(Image.open(again)), picture)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_t2i_preset_samples_with_the_gated_text_encoder(model_hub, tmp_path):
  env = environment(model_hub.url, tmp_path / "home", HF_TOKEN=hub_repos.TOKEN)
  out = tmp_path / "t2i.png"
  done = sample(
    "tim-t2i",
    out,
    env,
    "--prompt=a dog",
    "--height=1024",
    "--width=768",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "0: a dog" in done.stdout
  picture = np.asarray(Image.open(out))
  assert picture.shape[0] >= 1024 and picture.shape[1] >= 768
  for repo in (
    "GoodEnough/TiM-T2I",
    "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
    "google/gemma-3-1b-it",
  ):
    assert model_hub.count(f"/{repo}/resolve/") >= 2, repo
  assert model_hub.count("tokenizer.model") == 0  # Not read: not fetched.


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_gated_text_encoder_without_token_stops_first(model_hub, tmp_path):
  env = environment(model_hub.url, tmp_path / "home")
  before = model_hub.count("t2i_model.bin")
  done = sample("tim-t2i", tmp_path / "x.png", env, "--prompt=a dog")
  assert done.returncode == 2
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith("error: hf://google/gemma-3-1b-it: ")
  assert "gated" in line and "huggingface-cli login" in line
  assert "HF_TOKEN" in line
  # It stops before the (large, for the real model) weights are fetched.
  assert model_hub.count("t2i_model.bin") == before


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_missing_file_is_one_line_naming_it(model_hub, tmp_path):
  env = environment(model_hub.url, tmp_path / "home")
  missing = "hf://GoodEnough/TiM-C2I/c2i_model_1024.safetensors"
  done = sample(
    "tim-c2i-256", tmp_path / "x.png", env, f"--checkpoint={missing}"
  )
  assert done.returncode == 2
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: {missing}: ")
  assert "no file or folder c2i_model_1024.safetensors" in line
  assert "c2i_model_256.safetensors" in line  # What the repository holds.


def test_presets_and_the_model_flags(capsys):
  from tim_jax import inference
  from tim_jax.commands import cli
  from tim_jax.commands import sample as sample_command

  # The presets name the released files (github.com/WZDTHU/TiM's model zoo).
  p = inference.PRESETS
  assert p["tim-c2i-256"].checkpoint == (
    "hf://GoodEnough/TiM-C2I/c2i_model_256.safetensors"
  )
  assert p["tim-t2i"].checkpoint == "hf://GoodEnough/TiM-T2I/t2i_model.bin"
  assert p["tim-t2i"].text_encoder == "hf://google/gemma-3-1b-it"
  for preset in p.values():
    config = preset.load_config()
    assert config.model.kind == preset.name.split("-")[1]
    hub.parse(preset.checkpoint)
    hub.parse(preset.autoencoder)
  assert p["tim-c2i-256"].load_config().autoencoder.name == "sd_vae_ft_ema"
  assert p["tim-t2i"].load_config().text_encoder.name == "gemma3"
  # An unknown name or no model at all: one line, before any download.
  assert cli.call(sample_command, ["--model=tim-c2i-1024"]) == 2
  err = capsys.readouterr().err
  assert "no model preset 'tim-c2i-1024'" in err and "tim-c2i-256" in err
  assert cli.call(sample_command, ["--labels=1"]) == 2
  err = capsys.readouterr().err
  assert "--checkpoint" in err and "--model" in err


LOADERS = r"""
import json, sys
import numpy as np
from tim_jax import autoencoders, inference
from tim_jax.config import config_base
from tim_jax.encoders import gemma, radio
out = {}
ae = autoencoders.from_diffusers(
    "hf://stabilityai/sd-vae-ft-ema", name="sd_vae_ft_ema")
out["sd_vae_downsample"] = ae.downsample
dc = autoencoders.from_diffusers(
    "hf://mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers")
out["dc_ae_downsample"] = dc.downsample
enc = gemma.load("hf://google/gemma-3-1b-it")
out["gemma_dim"] = enc.dim
teacher = radio.load("hf://nvidia/RADIO/radio-v2.5-b_half.pth.tar")
local = radio.load(sys.argv[1])
x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype("float32")
out["radio_same"] = bool(np.array_equal(
    np.asarray(teacher(x, grid=(2, 2))), np.asarray(local(x, grid=(2, 2)))))
pipe = inference.load(
    "hf://GoodEnough/TiM-C2I@main/c2i_model_512.safetensors",
    config_base.load_file(sys.argv[2]))
out["c2i_512_kind"] = pipe.kind
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_library_loaders_take_hub_ids(model_hub, tmp_path):
  env = environment(model_hub.url, tmp_path / "home", HF_TOKEN=hub_repos.TOKEN)
  teacher = os.path.join(ROOT, "tests", "data", "radio", "radio_plain.pth")
  done = run(
    ["-c", LOADERS, teacher, hub_repos.SMOKE["tim-c2i-512"]], env, TIMEOUT
  )
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert got == {
    "sd_vae_downsample": 8,
    "dc_ae_downsample": 32,
    "gemma_dim": 16,
    "radio_same": True,
    "c2i_512_kind": "c2i",
  }


@pytest.mark.slow
@pytest.mark.multiprocess
def test_training_takes_init_from_and_the_repa_teacher_from_the_hub(
  model_hub, tmp_path
):
  # The tiny pixel-space C2I model, initialised from official weights on
  # the hub and distilling the RADIO teacher fetched from the hub.
  from tim_jax.config import builders, config_base
  from tim_jax.weights import convert

  overrides = [
    "--config.loss_extras.repa_encoder=radio_v2_5_b",
    "--config.loss_extras.repa_encoder_path="
    "hf://nvidia/RADIO/radio-v2.5-b_half.pth.tar",
    "--config.model.use_projector=True",
    "--config.model.network.z_dim=64",  # The test teacher's width.
  ]
  config = config_base.load_file("configs/c2i.py:tiny,smoke")
  config.unlock()
  config.model.use_projector = True
  config.model.network.z_dim = 64
  path = tmp_path / "init.safetensors"
  convert.save_official(builders.new_model(config), str(path))
  model_hub.add("tim-jax-test/tiny-c2i", {"model.safetensors": str(path)})
  env = environment(model_hub.url, tmp_path / "home")
  done = run(
    [
      "-m",
      "tim_jax.main",
      "--config=configs/c2i.py:tiny,smoke",
      f"--workdir={tmp_path / 'run'}",
      "--config.init_from=hf://tim-jax-test/tiny-c2i/model.safetensors",
      "--config.sample.every=0",
      "--config.evals.shapes_oracle.every=0",
      "--config.evals.holdout_loss.every=0",
      *overrides,
    ],
    env,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "initialised from hf://tim-jax-test/tiny-c2i/model.safetensors" in (
    done.stderr
  )
  assert model_hub.count("/tim-jax-test/tiny-c2i/resolve/") >= 2
  assert model_hub.count("/nvidia/RADIO/resolve/") >= 2
  assert os.path.isdir(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_prepare_takes_the_autoencoder_from_the_hub(model_hub, tmp_path):
  import autoencoder_utils

  images = tmp_path / "images"
  autoencoder_utils.write_image_folder(
    str(images), classes=("n01", "n02"), per_class=2
  )
  env = environment(model_hub.url, tmp_path / "home")
  done = run(
    [
      "-m",
      "tim_jax.commands.prepare",
      f"--images={images}",
      "--autoencoder=sd_vae_ft_ema",
      "--autoencoder_path=hf://stabilityai/sd-vae-ft-ema",
      "--resolution=64",
      "--batch_size=2",
      f"--data_dir={tmp_path / 'latents'}",
    ],
    env,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote 4" in done.stdout
