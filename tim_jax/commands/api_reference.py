"""The public API page from the docstrings: ``python -m tim_jax.commands.api_reference``.

    python -m tim_jax.commands.api_reference --out=docs/api.md

Walks the library's modules in layer order (the command-line programs are
documented as commands, not here) and writes, per module, its docstring's
first paragraph and every public function and class (``__all__`` where a
module has one, else the names it defines without a leading underscore)
with its signature and its docstring's first paragraph; public methods
follow their class. ``tests/test_docs.py`` checks that the page is current
and that every public name has a docstring.
"""

from __future__ import annotations

from collections.abc import Iterator
import importlib
import inspect
import os
import pkgutil
import sys

from absl import flags

from tim_jax.commands import cli
from tim_jax.core.errors import UserError

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folders in layer order (tests/test_layout.py holds the rule).
LAYERS = (
  "core",
  "method",
  "models",
  "weights",
  "autoencoders",
  "encoders",
  "eval",
  "shapes",
  "config",
  "data",
  "inference",
  "training",
)
HEADER = """# Public API

Generated from the docstrings by
`python -m tim_jax.commands.api_reference --out=docs/api.md`;
`tests/test_docs.py` fails when this page is stale or a public name has no
docstring. Each entry is the first paragraph of its docstring: `help()` or
the source has the rest. Modules are listed bottom-up, in the order of the
package's layers ([architecture.md](architecture.md)).
"""


def modules() -> Iterator[str]:
  """The library modules' names, layer by layer (no commands, no main)."""
  import tim_jax  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(tim_jax.__file__)
  for folder in LAYERS:
    package = f"tim_jax.{folder}"
    yield package
    names = sorted(
      m.name for m in pkgutil.iter_modules([os.path.join(root, folder)])
    )
    for name in names:
      if not name.startswith("_"):
        yield f"{package}.{name}"


def first_paragraph(doc: str | None) -> str:
  """The docstring's first paragraph on one line ("" when none)."""
  if not doc:
    return ""
  return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def public_names(module) -> list[str]:
  """``__all__``, else the functions and classes the module defines."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return sorted(
    name
    for name, obj in vars(module).items()
    if not name.startswith("_")
    and (inspect.isfunction(obj) or inspect.isclass(obj))
    and getattr(obj, "__module__", None) == module.__name__
  )


def public_methods(cls) -> list[str]:
  """Methods and properties the class defines itself (not inherited)."""
  out = []
  for name, obj in vars(cls).items():
    if name.startswith("_") and name != "__call__":
      continue
    if isinstance(obj, (staticmethod, classmethod)):
      obj = obj.__func__
    if inspect.isfunction(obj) or isinstance(obj, property):
      out.append(name)
  return out


class _Written:
  """An annotation shown as written in the source (they are strings under
  ``from __future__ import annotations``)."""

  def __init__(self, text):
    self.text = text

  def __repr__(self):
    return self.text


def signature(obj) -> str:
  """The signature, annotations as written."""
  try:
    sig = inspect.signature(obj)
  except (TypeError, ValueError):
    return ""

  def written(a):
    return _Written(a) if isinstance(a, str) else a

  def default(d):
    # A path inside the package: shown from the package, not this machine.
    if isinstance(d, str) and d.startswith(PACKAGE_ROOT):
      return _Written(repr("<tim_jax>" + d[len(PACKAGE_ROOT) :]))
    return d

  sig = sig.replace(
    parameters=[
      p.replace(annotation=written(p.annotation), default=default(p.default))
      for p in sig.parameters.values()
    ],
    return_annotation=written(sig.return_annotation),
  )
  text = str(sig)
  return text if len(text) <= 160 else text[:157] + "..."


def doc_of(owner, name: str) -> str | None:
  """The docstring, inherited from a base class where a method overrides
  a documented one."""
  obj = getattr(owner, name)
  return inspect.getdoc(obj)


def reference() -> tuple[str, list[str]]:
  """(the page, the public names without a docstring)."""
  lines, missing = [HEADER], []
  for name in modules():
    module = importlib.import_module(name)
    lines.append(f"\n## `{name}`\n")
    summary = first_paragraph(module.__doc__)
    if not summary:
      missing.append(name)
    lines.append(summary + "\n")
    for public in public_names(module):
      obj = getattr(module, public)
      if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue  # Constants and re-exported modules: see the source.
      if getattr(obj, "__module__", name) != name:
        lines.append(f"- `{public}`: see `{obj.__module__}`.")
        continue
      doc = first_paragraph(inspect.getdoc(obj))
      if not doc:
        missing.append(f"{name}.{public}")
      kind = "class " if inspect.isclass(obj) else ""
      lines.append(f"- {kind}`{public}{signature(obj)}`: {doc}")
      if inspect.isclass(obj):
        for method in public_methods(obj):
          member = vars(obj)[method]
          text = first_paragraph(doc_of(obj, method))
          if not text:
            missing.append(f"{name}.{public}.{method}")
          sig = (
            ""
            if isinstance(member, property)
            else signature(getattr(obj, method))
          )
          lines.append(f"  - `{method}{sig}`: {text}")
  return "\n".join(lines).rstrip() + "\n", missing


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "out", "docs/api.md", "Where to write the page.", flag_values=fv
  )


def main(fv: flags.FlagValues, args) -> None:
  if args:
    raise UserError(f"unexpected arguments: {args}")
  page, missing = reference()
  if missing:
    raise UserError(
      f"{len(missing)} public names have no docstring: " + ", ".join(missing)
    )
  cli.check_writable(fv.out, "--out")
  with open(fv.out, "w", encoding="utf-8") as f:
    f.write(page)
  print(f"wrote {fv.out} ({page.count(chr(10))} lines)")


if __name__ == "__main__":
  cli.run(sys.modules[__name__])
