"""The package's shape: no import cycle (top-level and function-local imports), no core module
importing the command line or the tools (benchmark, the toy-world harness), modules small enough
to read, and no method named where every method is handled alike (the registry dispatches)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "persona_jax"
SHELL = ("persona_jax.cli", "persona_jax.benchmark", "persona_jax.world", "persona_jax.__main__")
MAX_LINES = 600
# Modules that handle every method alike: they dispatch through methods/registry.py.
GENERIC = ("persona_jax/cli", "persona_jax/export.py", "persona_jax/text_to_image.py",
           "persona_jax/verify.py", "persona_jax/train", "persona_jax/diffusion")


def modules() -> dict[str, Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


def imports(name: str, path: Path, known) -> set[str]:
  """The persona_jax modules `name` imports anywhere in its file."""
  def target(dotted):
    while dotted and dotted not in known:
      dotted = dotted.rpartition(".")[0]
    return dotted or None
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names] + [base]
    else:
      continue
    out |= {t for t in map(target, names) if t and t != name}
  return out


@pytest.fixture(scope="module")
def graph():
  """Every import, and the registry's imports by name (its method and command modules)."""
  from persona_jax.methods.registry import COMMANDS, SPECS
  mods = modules()
  out = {m: imports(m, p, mods) for m, p in mods.items()}
  out["persona_jax.methods.registry"] |= {f"persona_jax.methods.{m}" for m in SPECS + COMMANDS}
  return out


def cycles(graph) -> list[list[str]]:
  """Tarjan's strongly connected components of more than one module."""
  index, low, stack, on, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))
  for v in graph:
    if v not in index:
      visit(v)
  return cycles


def test_the_cycle_check_sees_function_local_and_relative_imports(tmp_path):
  pkg = tmp_path / "persona_jax"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "a.py").write_text("from persona_jax.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from . import c\n")
  (pkg / "sub" / "c.py").write_text("def g():\n  import persona_jax.a\n")
  (pkg / "d.py").write_text("import persona_jax.a\n")
  paths = {"persona_jax.a": pkg / "a.py", "persona_jax.sub.b": pkg / "sub" / "b.py",
           "persona_jax.sub.c": pkg / "sub" / "c.py", "persona_jax.d": pkg / "d.py",
           "persona_jax.sub": pkg / "sub"}
  toy = {m: imports(m, p, paths) for m, p in paths.items() if p.suffix == ".py"}
  assert "persona_jax.sub.c" in toy["persona_jax.sub.b"]          # relative, in a function
  assert cycles({**toy, "persona_jax.sub": set()}) == [
      ["persona_jax.a", "persona_jax.sub.b", "persona_jax.sub.c"]]


def test_no_import_cycle(graph):
  """Over every import, function-local ones included."""
  assert not cycles(graph), cycles(graph)


def test_the_core_imports_no_command_line_and_no_tool(graph):
  bad = {m: sorted(t for t in deps if t.startswith(SHELL)) for m, deps in graph.items()
         if not m.startswith(SHELL)}
  assert not {m: t for m, t in bad.items() if t}


def test_no_module_is_over_the_size_limit():
  long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_generic_modules_name_no_method():
  """No string literal that is a method's name and no import of a method's module in the modules
  that handle every method alike (flags such as --lora are strings of their own)."""
  from persona_jax.methods.registry import METHODS, SPECS
  names = set(METHODS)
  method_modules = {f"persona_jax.methods.{m}" for m in SPECS}
  mods = modules()
  found = []
  for name, path in mods.items():
    rel = str(path.relative_to(ROOT.parent))
    if not rel.startswith(GENERIC):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and node.value in names:
        found.append(f"{rel}:{node.lineno} '{node.value}'")
    found += [f"{rel} imports {t}" for t in imports(name, path, mods) if t in method_modules]
  assert not found, found
