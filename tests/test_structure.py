"""Package structure: the module graph of ``clair_jax`` is one-way (no import cycle)."""

import ast
import pathlib

import clair_jax

PACKAGE = pathlib.Path(clair_jax.__file__).parent


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
  """Every ``clair_jax`` module ``path`` imports, at module level or inside a function."""
  found = set()
  package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for name in names:
      while name and name not in modules:  # `from pkg import function` -> pkg
        name = name.rpartition(".")[0]
      if name:
        found.add(name)
  found.discard(module_name(path))
  return found


def test_module_graph_has_no_cycle():
  paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  modules = set(paths)
  graph = {name: imports_of(path, modules) for name, path in paths.items()}
  # A package's __init__ importing its own submodules is how packages expose them, and a
  # submodule importing the public surface (``clair_jax``) is the one allowed way up: drop
  # the edges into package __init__ files, then require a DAG.
  packages = {name for name, path in paths.items() if path.name == "__init__.py"}
  graph = {name: {m for m in deps if m not in packages} for name, deps in graph.items()}
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
      if dep not in state:
        visit(dep)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_public_surface_is_the_package_init():
  for name in clair_jax.__all__:
    assert hasattr(clair_jax, name), name
  assert clair_jax.clair.__module__ == "clair_jax._src.api"


def test_clair_core_runs_named_stages():
  """clair_core is a short sequence of stage functions, each returning a NamedTuple."""
  import inspect
  import typing

  from clair_jax._src import estimator

  stages = ("_normalise", "robust_start_stage", "calibrate_weights_stage", "decompose_stage",
            "detect_stage", "refine_stage", "_result")
  source = inspect.getsource(estimator.clair_core)
  body = source[source.index('"""', source.index('"""') + 3) + 3:]
  for name in stages:
    assert f"{name}(" in body, name
  assert len([line for line in body.splitlines() if line.strip()]) <= 30
  for name in stages[1:-1]:
    returned = typing.get_type_hints(getattr(estimator, name))["return"]
    assert issubclass(returned, tuple) and hasattr(returned, "_fields"), (name, returned)
