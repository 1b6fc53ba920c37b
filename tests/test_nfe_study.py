"""The NFE study command on a tiny checkpoint."""

import csv
import os

import numpy as np
from PIL import Image
import pytest

from tim_jax.shapes import nfe_study

pytestmark = [pytest.mark.slow]


def test_study_writes_table_plot_and_strips(
  tiny_t2i_workdir, tmp_path, monkeypatch
):
  from tim_jax import inference

  modes = []
  generate = inference.Pipeline.generate

  def recording(self, *a, **kw):
    modes.append(self.settings(1, mode=kw.get("mode")).mode)
    return generate(self, *a, **kw)

  monkeypatch.setattr(inference.Pipeline, "generate", recording)
  seen = []
  rows, strips = nfe_study.run_study(
    {"tiny": tiny_t2i_workdir},
    [1, 2],
    reference_num=200,
    num=6,
    batch_size=4,
    progress=False,
    on_row=lambda r: seen.append(len(r)),
    load=inference.load,
  )
  assert seen == [1, 2, 3]  # Partial results after every row.
  assert [(r["run"], r["nfe"]) for r in rows] == [
    ("real", 0),
    ("tiny", 1),
    ("tiny", 2),
  ]
  real = rows[0]
  assert real["overall"] == 1.0  # The requested scenes themselves.
  for r in rows[1:]:
    assert r["fd"] > real["fd"]  # A 2-step model is far from the data.
    assert 0.0 <= r["overall"] <= 1.0
  # The run's own sampler mode, then the override (Euler steps of the
  # flow, r = t) for every run.
  nfe_study.run_study(
    {"tiny": tiny_t2i_workdir},
    [1],
    reference_num=20,
    num=2,
    batch_size=2,
    progress=False,
    mode="diffusion",
    load=inference.load,
  )
  assert modes == ["transition", "transition", "diffusion"]
  # 6 prompts x 2 NFE shown, with the prompts.
  assert strips["tiny"]["images"].shape == (12, 32, 32, 3)
  assert len(strips["tiny"]["captions"]) == 6

  out = str(tmp_path / "study")
  nfe_study.write_outputs(rows, strips, out, [1, 2])
  with open(os.path.join(out, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [t["run"] for t in table] == ["real", "tiny", "tiny"]
  assert float(table[1]["fd"]) == pytest.approx(rows[1]["fd"])
  md = open(os.path.join(out, "results.md")).read().splitlines()
  assert md[0].startswith("| run | NFE | overall")
  assert md[2].startswith("| real | – | 100.0 |")
  assert len(md) == 5
  assert Image.open(os.path.join(out, "nfe_study.png")).size[0] > 500
  strip = np.asarray(Image.open(os.path.join(out, "samples_tiny.png")))
  # A row per prompt (its caption beside it), a column per NFE, 128 px.
  assert strip.shape[1] == 220 + 2 * 132 + 4
  assert strip.shape[0] > 6 * 132 + 4
  assert (strip[-(6 * 132 + 4) :, :220] < 128).any()


def test_run_arguments_are_checked():
  from tim_jax.commands import nfe_study as command

  assert command.parse_runs(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
  for bad in (["a"], ["=x"], ["a=/x", "a=/y"], ["real=/x"], []):
    with pytest.raises(ValueError):
      command.parse_runs(bad)


def test_study_refuses_models_of_other_data(tmp_path, monkeypatch, capsys):
  import types

  import train_utils

  from tim_jax import inference
  from tim_jax.commands import cli
  from tim_jax.commands import nfe_study as command

  config = train_utils.tiny_t2i()
  config.data.name = "latents"
  asked = []

  def load(path, config_=None, weights="ema"):
    asked.append(weights)
    return types.SimpleNamespace(config=config, kind="t2i")

  with pytest.raises(ValueError, match="reads only the built-in shapes"):
    nfe_study.run_study(
      {"x": "somewhere"}, [1], num=2, progress=False, reference_num=2, load=load
    )
  # The command reads the weights it is asked for, and refuses bad flags in
  # one line before any work.
  monkeypatch.setattr(inference, "load", load)
  assert (
    cli.call(
      command,
      [
        "--run=x=somewhere",
        "--weights=params",
        "--num_images=2",
        "--num_reference=2",
        f"--out={tmp_path}",
      ],
    )
    == 2
  )
  assert "reads only the built-in shapes" in capsys.readouterr().err
  assert asked == ["ema", "params"]
  assert cli.call(command, ["--run=x=y", "--num_steps=0,2"]) == 2
  assert "--num_steps" in capsys.readouterr().err


def test_sampler_flags_reach_the_sampler(tiny_t2i_workdir, tmp_path):
  """--stochasticity and --nolast_step_noise change the samples: at 3 Euler
  steps the middle step is stochastic, and so is the last one unless
  --nolast_step_noise, so the three settings give three different strips."""
  from tim_jax.commands import cli
  from tim_jax.commands import nfe_study as command

  def strip(name, *extra):
    out = tmp_path / name
    argv = [
      f"--run=tiny={tiny_t2i_workdir}",
      "--num_steps=3",
      "--num_images=4",
      "--num_reference=20",
      "--batch_size=4",
      "--mode=diffusion",
      f"--out={out}",
      *extra,
    ]
    assert cli.call(command, argv) == 0
    return np.asarray(Image.open(out / "samples_tiny.png"))

  plain = strip("plain")
  noisy = strip("noisy", "--stochasticity=0.5")
  quiet_end = strip("quiet_end", "--stochasticity=0.5", "--nolast_step_noise")
  assert not np.array_equal(quiet_end, plain)  # The middle step's noise.
  assert not np.array_equal(quiet_end, noisy)  # The last step's noise.
  # The same noise for the steps both variants share: the same seed again
  # gives the same strip.
  assert np.array_equal(
    strip("quiet_end_again", "--stochasticity=0.5", "--nolast_step_noise"),
    quiet_end,
  )


def test_sampler_flags_are_checked(tiny_t2i_workdir, tmp_path, capsys):
  from tim_jax import inference
  from tim_jax.commands import cli
  from tim_jax.commands import nfe_study as command

  # Refused in one line before any model is read: a flag that would do
  # nothing, or a negative ratio.
  for bad in (
    ["--nolast_step_noise"],
    ["--nolast_step_noise", "--stochasticity=0.2", "--mode=transition"],
    ["--stochasticity=-1"],
  ):
    assert cli.call(command, ["--run=x=nowhere", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "--stochasticity" in err or "--nolast_step_noise" in err
  # Without --mode the run's own mode decides (the tiny run's is
  # transition, whose last step is never stochastic): refused before any
  # scoring.
  assert inference.load(tiny_t2i_workdir).config.sample.mode == "transition"
  with pytest.raises(ValueError, match="needs mode diffusion"):
    nfe_study.run_study(
      {"tiny": tiny_t2i_workdir},
      [1],
      num=2,
      progress=False,
      stochasticity=0.2,
      last_step_noise=False,
      load=inference.load,
    )
