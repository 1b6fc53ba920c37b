"""Quality against the number of steps, for one or more shapes-world models.

    python -m tim_jax.eval.nfe_study --run=TiM=RUN_DIR \\
        --run=FM=FM_RUN_DIR --nfe=1,2,4,8,16,32,64 --num=500 --out=DIR

For every run (a tim_jax workdir or checkpoint; its saved config says how to
sample it: guidance, interval, sampler mode) and every NFE, the study samples
``--num`` images for held-out scenes of the built-in data (captions for t2i,
labels for c2i) from the same noise, and scores them with the shapes oracle:

* attribute accuracy against what was asked (``overall`` is the GenEval-like
  all-correct rate; see ``oracle.attribute_accuracy``),
* the Fréchet distance, in the oracle's features, to ``--reference_num``
  real images of other scenes.

A ``real`` row scores the rendered images of the requested scenes
themselves: the ceiling of the accuracy and the floor of the distance at
this sample size. Writes ``results.csv``, ``results.md``, ``nfe_study.png``
(both scores against NFE) and ``samples_<run>.png`` (the first prompts at
every NFE).
"""

from __future__ import annotations

import csv
import os
import time
from typing import Dict, Sequence

import numpy as np

from tim_jax import checkpoint, images, inference
from tim_jax.eval import oracle, shapes_scores

SCORES = shapes_scores.SCORES


def run_study(runs: Dict[str, str], nfes: Sequence[int], num: int = 500,
              batch_size: int = 250, seed: int = 0, cfg_scale=None,
              reference_num: int = 5000, mode=None,
              judge: oracle.Oracle | None = None, progress: bool = True,
              on_row=None, weights: str = "ema"):
  """Rows of scores (dicts) and the sample strips: per run, ``images``
  (the first 8 prompts' samples, row-major with one column per NFE) and
  their ``captions``.

  ``cfg_scale`` and ``mode`` (``transition`` or ``diffusion``: plain Euler
  steps of the model's flow, r = t) replace every run's saved sampler
  setting when given. ``weights``: each checkpoint's ``"ema"`` weights
  (the default) or its trained ``"params"``.
  ``on_row(rows)`` is called after every new row (the command writes the
  partial CSV there, so an interrupted study keeps what it measured).
  """
  rows, strips = [], {}
  scorer = None
  for name, path in runs.items():
    pipe = inference.load(path, weights=weights)
    config = pipe.config
    if config.data.name != "shapes":
      raise ValueError(f"run {name} ({path}) was trained on "
                       f"{config.data.name!r}; the oracle reads only the "
                       "built-in shapes world")
    if scorer is None:
      scorer = shapes_scores.ShapesScorer(
          pipe.kind, config.data.image_size, num, reference_num, judge=judge)
      rows.append(dict(run="real", nfe=0, seconds=0.0,
                       **scorer.real_scores()))
      if on_row:
        on_row(rows)
    elif pipe.kind != scorer.kind:
      raise ValueError("all runs of one study must be of the same kind "
                       f"(t2i or c2i); {name} is {pipe.kind}")
    cond, names = pipe.conditions(**scorer.requests())
    strip = []
    for nfe in nfes:
      t0 = time.time()
      samples = pipe.generate(
          cond, num_steps=int(nfe), cfg_scale=cfg_scale, seed=seed, mode=mode,
          batch_size=batch_size, progress=progress, desc=f"{name} NFE {nfe}")
      seconds = time.time() - t0
      pixels = pipe.decode(samples)
      scores = scorer.score(pixels)
      rows.append(dict(run=name, nfe=int(nfe), seconds=round(seconds, 1),
                       **scores))
      if on_row:
        on_row(rows)
      strip.append(images.to_uint8(pixels[:8]))
      if progress:
        print(f"{name} NFE {nfe}: overall {scores['overall']:.3f}, "
              f"FD {scores['fd']:.2f} ({seconds:.0f} s)", flush=True)
    # Rows of samples (the first 8 prompts), columns of NFE.
    tiles = np.stack(strip, axis=1)
    strips[name] = dict(images=tiles.reshape((-1,) + tiles.shape[2:]),
                        captions=list(names[:len(tiles)]))
  return rows, strips


def write_csv(rows, path):
  fields = ["run", "nfe", *SCORES, "seconds"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row[k] for k in fields})


def markdown(rows) -> str:
  """One table: accuracy columns in %, FD to two decimals."""
  head = ("| run | NFE | overall | position | colour | shape | size | count "
          "| shape, one object | all correct, two objects | FD (oracle) |")
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    nfe = "–" if r["run"] == "real" else str(r["nfe"])
    pct = ["–" if np.isnan(float(r[k])) else f"{100 * float(r[k]):.1f}"
           for k in SCORES[:-1]]
    lines.append(f"| {r['run']} | {nfe} | " + " | ".join(pct)
                 + f" | {r['fd']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(rows, path):
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
    axes[0].axhline(100 * real[0]["overall"], color="gray", ls="--",
                    label="real images")
    axes[1].axhline(real[0]["fd"], color="gray", ls="--", label="real images")
  nfes = sorted({r["nfe"] for r in rows if r["run"] != "real"})
  for ax, title in zip(axes, ("all attributes right (%)",
                              "Fréchet distance (oracle features)")):
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


def write_outputs(rows, strips, out: str, nfes):
  os.makedirs(out, exist_ok=True)
  write_csv(rows, os.path.join(out, "results.csv"))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(rows))
  plot(rows, os.path.join(out, "nfe_study.png"))
  for name, strip in strips.items():
    images.save_png(os.path.join(out, f"samples_{name}.png"),
                    images.annotated_grid(
                        strip["images"], cols=len(nfes),
                        row_labels=strip["captions"],
                        col_labels=[f"{n} NFE" for n in nfes],
                        title=f"{name}: the first prompts at each NFE"))


def parse_runs(items: Sequence[str]) -> Dict[str, str]:
  """["NAME=PATH", ...] -> {NAME: PATH}, refusing bad or repeated names."""
  runs = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--run must be NAME=PATH, got {item!r}")
    if name == "real" or name in runs:
      raise ValueError(f"run name {name!r} is reserved or repeated")
    runs[name] = path
  if not runs:
    raise ValueError("give at least one --run=NAME=PATH")
  return runs


def _main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  runs = parse_runs(f.run)
  try:
    nfes = [int(v) for v in f.nfe]
  except ValueError:
    raise ValueError(f"--nfe must be integers, got {f.nfe}") from None
  if any(n < 1 for n in nfes):
    raise ValueError(f"every NFE must be >= 1, got {nfes}")
  t0 = time.time()
  os.makedirs(f.out, exist_ok=True)
  partial = os.path.join(f.out, "results.csv")
  rows, strips = run_study(runs, nfes, num=f.num, batch_size=f.batch_size,
                           seed=f.seed, cfg_scale=f.cfg,
                           reference_num=f.reference_num, mode=f.mode,
                           weights=f.weights,
                           on_row=lambda rows: write_csv(rows, partial))
  write_outputs(rows, strips, f.out, nfes)
  print(markdown(rows))
  print(f"wrote {f.out}/results.csv, results.md, nfe_study.png and "
        f"samples_*.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_multi_string("run", [], "NAME=PATH of a tim_jax run "
                            "(repeatable).")
  flags.DEFINE_list("nfe", ["1", "2", "4", "8", "16", "32", "64"],
                    "Step counts.")
  flags.DEFINE_integer("num", 500, "Images per run and NFE.")
  flags.DEFINE_integer("reference_num", 5000, "Real images the distance "
                       "is measured to.")
  flags.DEFINE_integer("batch_size", 250, "Images per sampler call.")
  flags.DEFINE_integer("seed", 0, "Noise seed (the same for every run).")
  flags.DEFINE_float("cfg", None, "Guidance scale for every run (default: "
                     "each run's sample.cfg_scale).")
  flags.DEFINE_enum("mode", None, ["transition", "diffusion"], "Sampler "
                    "mode for every run (default: each run's sample.mode); "
                    "diffusion = Euler steps of the model's flow (r = t).")
  flags.DEFINE_enum("weights", "ema", list(checkpoint.WEIGHT_SETS), "Each "
                    "checkpoint's EMA weights or its trained weights.")
  flags.DEFINE_string("out", "nfe_study", "Output directory.")
  app.run(_main)
