"""No import cycle among the modules of `mae_jax` (issue 25, item 5): the graph is built from the
source with `ast` (every `import` / `from ... import`, also those inside functions), never by
importing, and searched for a cycle by depth-first search."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mae_jax"


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _resolve(name: str, known) -> str | None:
  """The package module `name` refers to (a module, or the package holding a name)."""
  while name:
    if name in known:
      return name
    name = name.rpartition(".")[0]
  return None


def import_graph() -> dict[str, set[str]]:
  known = modules()
  graph = {}
  for name, path in known.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        # `from pkg import mod` names a module when pkg.mod is one, else a name inside pkg.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
      for t in targets:
        r = _resolve(t, known)
        if r is not None and r != name and not name.startswith(r + "."):  # a parent package is no edge
          edges.add(r)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        return stack[stack.index(m):] + [m]
      if m not in state and (c := visit(m)):
        return c
    stack.pop()
    state[n] = "done"
    return None

  for n in sorted(graph):
    if n not in state and (c := visit(n)):
      return c
  return None


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_known_edges():
  g = import_graph()
  assert "mae_jax.train.loop" in g["mae_jax.train.pretrain"]
  assert "mae_jax.reconstruct" in g["mae_jax.train.pretrain"]
  assert "mae_jax.models.vit" in g["mae_jax.models.mae"]


def test_no_import_cycle_in_the_package():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_visualize_is_a_leaf_of_the_trainer():
  g = import_graph()
  assert not [m for m, edges in g.items() if "mae_jax.visualize" in edges and m.startswith("mae_jax.train")]
