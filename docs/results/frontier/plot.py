"""The quality frontier of the built-in text-to-image world: oracle scores
against training minutes, one line per recipe.

    python docs/results/frontier/plot.py --results=A/results.csv,B/results.csv \\
        --minutes=docs/results/frontier/minutes.csv --out=docs/results/frontier

``results.csv`` files come from ``python -m tim_jax.commands.nfe_study`` with
runs named ``RECIPE@STEP`` (one per checkpoint); ``minutes.csv`` has the
columns ``run,minutes`` (the training minutes that reached each
``RECIPE@STEP``). Writes ``frontier.md`` (every run and NFE) and
``frontier.png`` (shape on one-object captions, all correct on two-object
captions and the distance, at 4 NFE, against minutes).
"""

import argparse
import csv
import os

TARGET_SHAPE_ONE, TARGET_OVERALL_TWO = 0.90, 0.50
# The training minutes of the first command's 15-minute budget (install
# and evaluators take the rest).
BUDGET_MINUTES = 13.0


def read(results, minutes_path):
  with open(minutes_path) as f:
    minutes = {r["run"]: float(r["minutes"]) for r in csv.DictReader(f)}
  rows = []
  for path in results:
    with open(path) as f:
      for r in csv.DictReader(f):
        if r["run"] == "real" or r["run"] not in minutes:
          continue
        recipe, _, step = r["run"].partition("@")
        rows.append(
          dict(
            recipe=recipe,
            step=int(step or 0),
            minutes=minutes[r["run"]],
            nfe=int(r["nfe"]),
            **{
              k: float(r[k])
              for k in ("overall", "shape_one", "overall_two", "fd")
            },
          )
        )
  return sorted(rows, key=lambda r: (r["recipe"], r["step"], r["nfe"]))


def _pct(v):
  return "–" if v != v else f"{100 * v:.1f}"  # NaN: no such requests.


def markdown(rows):
  lines = [
    "| recipe | step | training minutes | NFE | shape, one object | "
    "all correct, two objects | all correct | FD (oracle) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['recipe']} | {r['step']} | {r['minutes']:.1f} | "
      f"{r['nfe']} | {_pct(r['shape_one'])} | "
      f"{_pct(r['overall_two'])} | {_pct(r['overall'])} | "
      f"{r['fd']:.1f} |"
    )
  return "\n".join(lines) + "\n"


def plot(rows, path, nfe=4):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
  recipes = list(dict.fromkeys(r["recipe"] for r in rows))
  # Twenty colours and three markers: no two recipes drawn alike.
  colours = plt.get_cmap("tab20").colors
  for i, recipe in enumerate(recipes):
    mine = [r for r in rows if r["recipe"] == recipe and r["nfe"] == nfe]
    x = [r["minutes"] for r in mine]
    style = dict(
      color=colours[i % 20],
      marker="osD"[i // 20 % 3],
      label=recipe,
      lw=2.5 if "(the default)" in recipe else 1.2,
    )
    for ax, key, scale in zip(
      axes, ("shape_one", "overall_two", "fd"), (100, 100, 1)
    ):
      ax.plot(x, [scale * r[key] for r in mine], **style)
  axes[0].axhline(100 * TARGET_SHAPE_ONE, color="gray", ls="--", label="target")
  axes[1].axhline(
    100 * TARGET_OVERALL_TWO, color="gray", ls="--", label="target"
  )
  titles = (
    f"shape right, one-object captions (%), {nfe} NFE",
    f"all right, two-object captions (%), {nfe} NFE",
    f"Fréchet distance (oracle), {nfe} NFE",
  )
  for ax, title in zip(axes, titles):
    ax.axvline(
      BUDGET_MINUTES,
      color="gray",
      ls=":",
      label="budget" if ax is axes[0] else None,
    )
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[2].set_yscale("log")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(
    handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--results",
    required=True,
    help="comma-separated nfe_study results.csv files",
  )
  p.add_argument("--minutes", required=True, help="run,minutes CSV")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  rows = read(a.results.split(","), a.minutes)
  if not rows:
    raise SystemExit("no run of the results is in the minutes file")
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "frontier.md"), "w") as f:
    f.write(markdown(rows))
  plot(rows, os.path.join(a.out, "frontier.png"))
  print(markdown(rows))


if __name__ == "__main__":
  main()
