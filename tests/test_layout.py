"""The package's layering: which folder may import which.

The folders of ``tim_jax/`` are layers, listed here bottom-up; a module
imports only modules of its own folder or of a layer below it (functions'
local imports count too). Read from the source with ``ast``, so a violation
fails here before it becomes a knot. Besides: no import cycle between
modules, no module reaches into another's private names, and every folder
of the package is in the list (a new one must choose its place).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tim_jax")

# Bottom-up. Folders on one line share a layer and may not import each other.
LAYERS = (
  ("core",),  # numerics, sharding, images, errors, resumable work
  ("method",),  # transports, the TiM target and loss, the sampler
  ("models",),  # the TiM backbone, its layers, named networks, FLOPs
  ("weights",),  # official files, PyTorch files, orbax checkpoints
  ("autoencoders", "encoders"),  # frozen networks: SD-VAE, DC-AE, RADIO
  ("eval",),  # FID: Fréchet statistics, InceptionV3
  ("shapes",),  # the built-in world, its oracle, scores, NFE study
  ("config",),  # every knob; the objects a config builds
  ("data",),  # data kinds, conditioning, latent datasets, preparation
  ("inference",),  # checkpoint -> samples, prompt sets, generation
  ("training",),  # trainer, loop, optimizer, evaluators
  ("commands",),  # the command-line programs
  ("main",),  # python -m tim_jax.main
)
RANK = {folder: i for i, layer in enumerate(LAYERS) for folder in layer}


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


def _folder(module):
  """``tim_jax.method.sampling`` -> "method"; the package itself -> None."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def _imports(path):
  """(imported module, imported names, aliases) of every tim_jax import."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found, aliases = [], {}
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.ImportFrom)
      and node.module
      and (node.module.startswith("tim_jax"))
    ):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in MODULES:  # `from tim_jax import training`: a module.
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
    f"{aliases[n.value.id]}.{n.attr}"
    for n in ast.walk(tree)
    if isinstance(n, ast.Attribute)
    and isinstance(n.value, ast.Name)
    and n.value.id in aliases
    and n.attr.startswith("_")
    and not n.attr.startswith("__")
  ]
  return found, private_uses


def _edges(module):
  return {m for m, _ in _imports(MODULES[module])[0] if m in MODULES}


def test_the_package_is_found():
  assert {
    "tim_jax.training.loop",
    "tim_jax.inference.pipeline",
    "tim_jax.commands.sample",
    "tim_jax.shapes.nfe_study",
    "tim_jax.main",
  } <= set(MODULES)


def test_every_folder_has_a_layer():
  folders = {_folder(m) for m in MODULES} - {None}
  assert folders == set(RANK), "add the folder to LAYERS (or drop it)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
  here = _folder(module)
  if here is None:  # tim_jax/__init__.py: the version, nothing else.
    assert not _edges(module)
    return
  upward = [
    m
    for m in _edges(module)
    if _folder(m) is not None  # The version.
    and _folder(m) != here
    and RANK[_folder(m)] >= RANK[here]
  ]
  assert not upward, f"{module} ({here}) imports {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_of_other_modules(module):
  found, private_uses = _imports(MODULES[module])
  private = [
    f"{m}.{n}" for m, names in found for n in names if n.startswith("_")
  ]
  assert not private + private_uses


def test_no_import_cycles():
  state, cycles = {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(_edges(module)):
      if target == module:
        continue
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target) :] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[module] = "done"

  for module in sorted(MODULES):
    if module not in state:
      visit(module, [module])
  assert not cycles
