"""Quality against the number of steps, for one or more shapes-world models.

The command is ``python -m tim_jax.commands.nfe_study``. For every run (a
tim_jax workdir or checkpoint; its saved config says how to sample it:
guidance, interval, sampler mode) and every step count, the study samples
``num`` images for held-out scenes of the built-in data (captions for t2i,
labels for c2i) from the same noise, and scores them with the shapes oracle:

* attribute accuracy against what was asked (``overall`` is the GenEval-like
  all-correct rate; see ``oracle.attribute_accuracy``),
* the Fréchet distance, in the oracle's features, to ``reference_num``
  real images of other scenes.

A ``real`` row scores the rendered images of the requested scenes
themselves: the ceiling of the accuracy and the floor of the distance at
this sample size. Writes ``results.csv``, ``results.md``, ``nfe_study.png``
(both scores against NFE) and ``samples_<run>.png`` (the first prompts at
every NFE).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import csv
import os
import time
from typing import Any

import numpy as np

from tim_jax.core import images
from tim_jax.core.errors import UserError
from tim_jax.shapes import oracle, scoring

SCORES = scoring.SCORES


def run_study(
  runs: dict[str, str],
  nfes: Sequence[int],
  num: int = 500,
  batch_size: int = 250,
  seed: int = 0,
  cfg_scale: float | None = None,
  reference_num: int = 5000,
  mode: str | None = None,
  stochasticity: float = 0.0,
  last_step_noise: bool = True,
  judge: oracle.Oracle | None = None,
  progress: bool = True,
  on_row: Callable[[list[dict[str, Any]]], None] | None = None,
  *,
  load: Callable,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
  """Rows of scores (dicts) and the sample strips: per run, ``images``
  (the first 8 prompts' samples, row-major with one column per NFE) and
  their ``captions``.

  ``cfg_scale`` and ``mode`` (``transition`` or ``diffusion``: plain Euler
  steps of the model's flow, r = t) replace every run's saved sampler
  setting when given. ``stochasticity`` (OT-FM only) and
  ``last_step_noise`` (False: the diffusion mode's last step stays
  deterministic) go to the sampler for every run (``sampling.sample``).
  ``load(path)`` reads a run into a sampling pipeline
  (``tim_jax.inference.load``, with the weight set the caller chose).
  ``on_row(rows)`` is called after every new row (the command writes the
  partial CSV there, so an interrupted study keeps what it measured).
  """
  rows, strips = [], {}
  scorer = None
  for name, path in runs.items():
    pipe = load(path)
    config = pipe.config
    if config.data.name != "shapes":
      raise UserError(
        f"run {name} ({path}) was trained on "
        f"{config.data.name!r}; the oracle reads only the "
        "built-in shapes world"
      )
    # Refused before any sampling: these settings would fail or do nothing.
    if stochasticity > 0 and not pipe.transport.supports_stochastic:
      raise UserError(
        f"run {name} ({path}) uses the {pipe.transport.name} transport; "
        "stochasticity > 0 is defined only for OT-FM"
      )
    run_mode = mode or config.sample.mode
    if not last_step_noise and (stochasticity <= 0 or run_mode != "diffusion"):
      raise UserError(
        f"run {name} ({path}): last_step_noise=False changes only the "
        "diffusion mode's stochastic sampling; it needs mode diffusion and "
        f"stochasticity > 0 (got mode {run_mode}, stochasticity "
        f"{stochasticity})"
      )
    if scorer is None:
      scorer = scoring.ShapesScorer(
        pipe.kind, config.data.image_size, num, reference_num, judge=judge
      )
      rows.append(dict(run="real", nfe=0, seconds=0.0, **scorer.real_scores()))
      if on_row:
        on_row(rows)
    elif pipe.kind != scorer.kind:
      raise UserError(
        "all runs of one study must be of the same kind "
        f"(t2i or c2i); {name} is {pipe.kind}"
      )
    cond, names = pipe.conditions(**scorer.requests())
    strip = []
    for nfe in nfes:
      t0 = time.time()
      samples = pipe.generate(
        cond,
        num_steps=int(nfe),
        cfg_scale=cfg_scale,
        seed=seed,
        mode=mode,
        stochasticity=stochasticity,
        last_step_noise=last_step_noise,
        batch_size=batch_size,
        progress=progress,
        desc=f"{name} NFE {nfe}",
      )
      seconds = time.time() - t0
      pixels = pipe.decode(samples)
      scores = scorer.score(pixels)
      rows.append(
        dict(run=name, nfe=int(nfe), seconds=round(seconds, 1), **scores)
      )
      if on_row:
        on_row(rows)
      strip.append(images.to_uint8(pixels[:8]))
      if progress:
        print(
          f"{name} NFE {nfe}: overall {scores['overall']:.3f}, "
          f"FD {scores['fd']:.2f} ({seconds:.0f} s)",
          flush=True,
        )
    # Rows of samples (the first 8 prompts), columns of NFE.
    tiles = np.stack(strip, axis=1)
    strips[name] = dict(
      images=tiles.reshape((-1,) + tiles.shape[2:]),
      captions=list(names[: len(tiles)]),
    )
  return rows, strips


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """The rows as CSV."""
  fields = ["run", "nfe", *SCORES, "seconds"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row[k] for k in fields})


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """One table: accuracy columns in %, FD to two decimals."""
  head = (
    "| run | NFE | overall | position | colour | shape | size | count "
    "| shape, one object | all correct, two objects | FD (oracle) |"
  )
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    nfe = "–" if r["run"] == "real" else str(r["nfe"])
    pct = [
      "–" if np.isnan(float(r[k])) else f"{100 * float(r[k]):.1f}"
      for k in SCORES[:-1]
    ]
    lines.append(
      f"| {r['run']} | {nfe} | " + " | ".join(pct) + f" | {r['fd']:.2f} |"
    )
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """Accuracy and Fréchet distance against NFE, one line per run, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  real = [r for r in rows if r["run"] == "real"]
  runs = [n for n in dict.fromkeys(r["run"] for r in rows) if n != "real"]
  for name in runs:
    mine = [r for r in rows if r["run"] == name]
    x = [r["nfe"] for r in mine]
    axes[0].plot(x, [100 * r["overall"] for r in mine], "o-", label=name)
    axes[1].plot(x, [r["fd"] for r in mine], "o-", label=name)
  if real:
    axes[0].axhline(
      100 * real[0]["overall"], color="gray", ls="--", label="real images"
    )
    axes[1].axhline(real[0]["fd"], color="gray", ls="--", label="real images")
  nfes = sorted({r["nfe"] for r in rows if r["run"] != "real"})
  for ax, title in zip(
    axes, ("all attributes right (%)", "Fréchet distance (oracle features)")
  ):
    ax.set_xscale("log", base=2)
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE (sampling steps)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].set_yscale("log")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(
  rows: Sequence[Mapping[str, Any]],
  strips: Mapping[str, Mapping[str, Any]],
  out: str,
  nfes: Sequence[int],
) -> None:
  """``results.csv``, ``results.md``, ``nfe_study.png`` and one ``samples_<run>.png`` per run into ``out``."""
  os.makedirs(out, exist_ok=True)
  write_csv(rows, os.path.join(out, "results.csv"))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(rows))
  plot(rows, os.path.join(out, "nfe_study.png"))
  for name, strip in strips.items():
    images.save_png(
      os.path.join(out, f"samples_{name}.png"),
      images.annotated_grid(
        strip["images"],
        cols=len(nfes),
        row_labels=strip["captions"],
        col_labels=[f"{n} NFE" for n in nfes],
        title=f"{name}: the first prompts at each NFE",
      ),
    )
