"""The modules of transformer/ import each other without a cycle.

The graph is read from the source with `ast`: every `import` and `from ... import` of a
`transformer.*` module, at module level or inside a function (a function-level import that
only hides a cycle still counts as an edge).
"""

from __future__ import annotations

import ast
import os
from typing import Optional

import pytest

PACKAGE = "transformer"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
  """{dotted module name: path} of every .py file under `root` (a package is its __init__)."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(directory, name), root)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join([package] + rel)] = os.path.join(directory, name)
  return out


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
  """The known modules one import statement names (relative imports resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in known]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    parts = parts if is_package else parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    base = ".".join(parts + ([node.module] if node.module else []))
  out = []
  for alias in node.names:  # `from pkg import mod` names the submodule, else the module itself
    sub = f"{base}.{alias.name}"
    out.append(sub if sub in known else base)
  return [m for m in out if m in known]


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
  """{module: modules it imports} over the package's own modules."""
  modules = _modules(root, package)
  known = set(modules)
  graph = {}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    graph[module] = {m for node in ast.walk(tree)
                     for m in _imported(node, module, is_package, known) if m != module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
  """One cycle [a, b, ..., a] of `graph`, or None (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def test_find_cycle_on_hand_made_graphs():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"x": set(), "a": {"b"}, "b": {"b2", "c"}, "b2": set(), "c": {"b"}}) == [
      "b", "c", "b"]


def test_import_graph_reads_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("def f():\n  from .. import a  # hidden\n  return a\n")
  (pkg / "sub" / "c.py").write_text("from . import b\nfrom pkg.sub.b import f\nimport pkg.a\n")
  graph = import_graph(str(pkg), "pkg")
  assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(),
                   "pkg.sub.b": {"pkg.a"}, "pkg.sub.c": {"pkg.sub.b", "pkg.a"}}
  assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_transformer_has_no_import_cycle():
  graph = import_graph()
  # The graph is the real one: these edges exist.
  assert "transformer.data.treebank" in graph["transformer.parsing"]
  assert "transformer.tasks.parsing" in graph["transformer.tasks"]
  assert "transformer.run" in graph["transformer.main"]  # a function-level import
  cycle = find_cycle(graph)
  if cycle:
    pytest.fail("import cycle: " + " -> ".join(cycle))
