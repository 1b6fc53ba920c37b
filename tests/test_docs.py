"""The documentation: links resolve, the API page is current and complete,
the README stays the short front door, and every command is installed."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages():
  out = [os.path.join(ROOT, "README.md")]
  for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
    out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".md")]
  return out


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  text = heading.strip().lower().replace("`", "")
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(path: str) -> set:
  seen, out = {}, set()
  in_code = False
  for line in open(path, encoding="utf-8"):
    if line.startswith("```"):
      in_code = not in_code
    if in_code or not line.startswith("#"):
      continue
    slug = _slug(line.lstrip("#"))
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


PAGES = _pages()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
  text = open(page, encoding="utf-8").read()
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # Code is not links.
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    full = (
      os.path.normpath(os.path.join(os.path.dirname(page), path))
      if path
      else page
    )
    if not os.path.exists(full):
      broken.append(target)
    elif anchor and full.endswith(".md") and anchor not in _anchors(full):
      broken.append(target)
  assert not broken


def test_the_readme_is_short_and_names_the_two_commands():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  assert len(text.splitlines()) <= 200
  assert (
    "pip install -e . && python -m tim_jax.main --config=configs/t2i.py"
  ) in text
  assert "python -m pytest -q -n auto tests" in text


def test_the_ci_runs_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  command = re.search(r"python -m pytest [^\n`]*tests", readme).group(0)
  assert command in ci


def test_the_api_page_is_current_and_complete():
  from tim_jax.commands import api_reference

  page, missing = api_reference.reference()
  assert not missing, f"public names without a docstring: {missing}"
  with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
    assert f.read() == page, (
      "docs/api.md is stale: python -m tim_jax.commands.api_reference "
      "--out=docs/api.md"
    )


def _setup_scripts():
  tree = ast.parse(
    open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
  )
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(
      getattr(t, "id", "") == "CONSOLE_SCRIPTS" for t in node.targets
    ):
      return [ast.literal_eval(e) for e in node.value.elts]
  raise AssertionError("no CONSOLE_SCRIPTS in setup.py")


def test_every_command_is_a_console_script_and_documented():
  commands = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(ROOT, "tim_jax", "commands"))
    if f.endswith(".py")
    # Helpers, not commands: cli runs them, gpu_compile adds GPU nodes
    # to the compile command.
    and f not in ("__init__.py", "cli.py", "api_reference.py", "gpu_compile.py")
  )
  scripts = {s.split("=")[1].strip() for s in _setup_scripts()}
  docs = "".join(open(p, encoding="utf-8").read() for p in PAGES)
  for name in commands:
    assert f"tim_jax.commands.{name}:entry" in scripts, name
    assert f"python -m tim_jax.commands.{name}" in docs, name
  assert "tim_jax.main:entry" in scripts


def test_public_functions_have_type_hints():
  import importlib
  import inspect

  from tim_jax.commands import api_reference

  unannotated = []
  for name in api_reference.modules():
    module = importlib.import_module(name)
    for public in api_reference.public_names(module):
      obj = getattr(module, public)
      if getattr(obj, "__module__", None) != name:
        continue
      functions = [(public, obj)] if inspect.isfunction(obj) else []
      if inspect.isclass(obj):
        for method in api_reference.public_methods(obj):
          member = vars(obj)[method]
          if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
          # Skip what a decorator of another library attached (flax's
          # struct.dataclass adds ``replace``): not this module's code.
          if inspect.isfunction(member) and member.__module__ == name:
            functions.append((f"{public}.{method}", member))
      for label, fn in functions:
        sig = inspect.signature(fn)
        args = [
          p
          for p, v in sig.parameters.items()
          if p not in ("self", "cls")
          and v.annotation is v.empty
          and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
        ]
        if args or (
          sig.return_annotation is sig.empty and fn.__name__ != "__init__"
        ):
          unannotated.append(f"{name}.{label}")
  assert not unannotated, f"{len(unannotated)}: {unannotated}"


def _documented_commands():
  """Every ``python -m tim_jax.X ...`` line of a shell block in the docs."""
  import shlex

  found = []
  for page in PAGES:
    text = open(page, encoding="utf-8").read()
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
      joined = re.sub(r"\\\n\s*", " ", block)
      for line in joined.splitlines():
        line = (
          line.split("#")[0].strip() if not line.strip().startswith("#") else ""
        )
        m = re.search(r"python3? -m (tim_jax[\w.]*)(.*)", line)
        if m and "pytest" not in line:
          args = [a for a in shlex.split(m.group(2)) if a != "..."]
          found.append((os.path.relpath(page, ROOT), m.group(1), args))
  return found


@pytest.mark.parametrize(
  "page,module,args",
  _documented_commands(),
  ids=lambda v: v if isinstance(v, str) else None,
)
def test_every_documented_command_parses(page, module, args, monkeypatch):
  # The docs' commands keep up with the code: the module exists and every
  # flag (config overrides included) is one the command takes.
  import importlib

  from absl import flags

  from tim_jax.commands import cli

  monkeypatch.chdir(ROOT)
  command = importlib.import_module(module)
  fv = flags.FlagValues()
  command.define_flags(fv)
  for name in list(fv):
    fv[name].required = False  # Placeholders stand for required values.
  for validator in list(fv._flags().values()):  # pylint: disable=protected-access
    validator.validators = []
  rest = cli.parse(fv, [module] + [a for a in args if a.startswith("-")])
  assert rest[1:] == []


@pytest.mark.slow
def test_the_readme_commands_run(tmp_path, monkeypatch, capsys):
  # The README's training command (two steps instead of 4,000) and its
  # sampling command, as written, into a scratch workdir.
  from tim_jax import main
  from tim_jax.commands import cli

  readme = [c for c in _documented_commands() if c[0] == "README.md"]
  modules = [m for _, m, _ in readme]
  # The rest sample the released models from the Hub (--model): they run
  # against a loopback hub in tests/test_hub.py.
  assert modules[:2] == ["tim_jax.main", "tim_jax.commands.sample"], modules
  assert all(
    any(a.startswith("--model=") for a in args) for _, _, args in readme[2:]
  ), readme[2:]
  monkeypatch.chdir(ROOT)
  workdir = str(tmp_path / "t2i_tiny")

  def here(args):
    return [a.replace("workdir/t2i_tiny", workdir) for a in args]

  train_args = here(readme[0][2]) + [
    "--config.num_steps=2",
    "--config.evals.shapes_oracle.every=0",
    "--config.evals.holdout_loss.every=0",
  ]
  assert cli.call(main, train_args) == 0
  from tim_jax.commands import sample

  out = str(tmp_path / "grid.png")
  sample_args = [
    a if not a.startswith("--out=") else f"--out={out}"
    for a in here(readme[1][2])
  ]
  assert cli.call(sample, sample_args) == 0
  assert "wrote" in capsys.readouterr().out and os.path.exists(out)
