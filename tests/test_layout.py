"""The package's layering: who may import whom.

Read from the source with ``ast``, so a violation fails here before it
becomes a knot: no module reaches into another's private names, inference
and evaluation import nothing of training, and the method (transports,
transition, sampling) imports neither models nor trainer.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tim_jax")


def _modules():
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(path):
  """(imported module, imported names, aliases) of every tim_jax import."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith("tim_jax")):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in MODULES:  # `from tim_jax import train`: a module.
          found.append((full, ()))
          aliases[a.asname or a.name] = full
        else:
          found.append((node.module, (a.name,)))
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("tim_jax"):
          found.append((a.name, ()))
          aliases[a.asname or a.name] = a.name
  private_uses = [
      f"{aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
      and n.value.id in aliases and n.attr.startswith("_")
      and not n.attr.startswith("__")]
  return found, private_uses


def test_the_package_is_found():
  assert {"tim_jax.train", "tim_jax.inference", "tim_jax.sample",
          "tim_jax.eval.nfe_study"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_of_other_modules(module):
  found, private_uses = _imports(MODULES[module])
  private = [f"{m}.{n}" for m, names in found for n in names
             if n.startswith("_")]
  assert not private + private_uses


def _reaches(module, seen=None):
  """Every tim_jax module ``module`` imports, directly or not."""
  seen = set() if seen is None else seen
  for imported, _ in _imports(MODULES[module])[0]:
    target = imported if imported in MODULES else None
    if target and target not in seen:
      seen.add(target)
      _reaches(target, seen)
  return seen


@pytest.mark.parametrize("module", [
    "tim_jax.inference", "tim_jax.sample", "tim_jax.eval.nfe_study",
    "tim_jax.eval.evaluators", "tim_jax.eval.oracle", "tim_jax.eval.fid",
    "tim_jax.eval.inception"])
def test_inference_and_evaluation_import_nothing_of_training(module):
  assert not {"tim_jax.train", "tim_jax.optim", "tim_jax.main"} & _reaches(
      module)


@pytest.mark.parametrize("module", ["tim_jax.transports",
                                    "tim_jax.transition", "tim_jax.sampling"])
def test_the_method_knows_neither_model_nor_trainer(module):
  reached = _reaches(module)
  assert not {m for m in reached if m.startswith(("tim_jax.models",
                                                  "tim_jax.train",
                                                  "tim_jax.inference"))}
